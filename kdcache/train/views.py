"""Which augmentation parameters each epoch uses: a cached view replayed, or fresh draws as online training does."""

from __future__ import annotations

import torch

from kdcache.cache import TeacherCache
from kdcache.errors import KdcacheError

VIEW_ORDERS = ("cycle", "shuffle")


class CachedViews:
    """Epoch e replays view e mod K of a cache (`cycle`), or a seeded permutation of the K views per round (`shuffle`)."""

    def __init__(self, cache: TeacherCache, order: str = "cycle", seed: int = 0) -> None:
        if order not in VIEW_ORDERS:
            raise KdcacheError(f"--view-order: unknown order {order!r}; known: {', '.join(VIEW_ORDERS)}")
        self.cache, self.order, self.seed = cache, order, seed

    def view_of(self, epoch: int) -> int:
        """The cached view that epoch replays."""
        views = self.cache.num_views
        if self.order == "cycle":
            return epoch % views
        round_generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch // views)
        return int(torch.randperm(views, generator=round_generator)[epoch % views])

    def params(self, epoch: int) -> torch.Tensor:
        """[N, P] augmentation parameters of the epoch's view."""
        return torch.from_numpy(self.cache.aug_params(self.view_of(epoch))).long()


class FreshViews:
    """New random parameters every epoch (online distillation and teacher training), seeded per epoch."""

    def __init__(self, policy: object, num_samples: int, seed: int = 0) -> None:
        self.policy, self.num_samples, self.seed = policy, num_samples, seed

    def view_of(self, epoch: int) -> None:
        """Fresh views belong to no cached view."""
        return None

    def params(self, epoch: int) -> torch.Tensor:
        """[N, P] parameters drawn for this epoch."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return self.policy.sample(generator, self.num_samples)
