"""Which augmentation parameters each epoch uses (a cached view replayed, or fresh draws as online training does),
and whether a cache's views fit the data and policy of a run."""

from __future__ import annotations

from typing import Protocol

import torch

from kdcache.cache import TeacherCache
from kdcache.data import AugmentPolicy, ImageData
from kdcache.errors import CorruptCacheError, KdcacheError
from kdcache.runtime import epoch_generator

VIEW_ORDERS = ("cycle", "shuffle")


class Views(Protocol):
    """What the loop asks of each epoch's views."""

    def view_of(self, epoch: int) -> int | None:
        """The cached view that epoch replays (None for fresh views)."""
        ...

    def params(self, epoch: int) -> torch.Tensor:
        """[N, P] augmentation parameters of the epoch."""
        ...


class CachedViews:
    """Epoch e replays view e mod K of a cache (`cycle`), or a seeded permutation of the K views per round (`shuffle`)."""

    def __init__(self, cache: TeacherCache, policy: AugmentPolicy, order: str = "cycle", seed: int = 0) -> None:
        if order not in VIEW_ORDERS:
            raise KdcacheError(f"--view-order: unknown order {order!r}; known: {', '.join(VIEW_ORDERS)}")
        self.cache, self.policy, self.order, self.seed = cache, policy, order, seed

    def view_of(self, epoch: int) -> int:
        """The cached view that epoch replays."""
        views = self.cache.num_views
        if self.order == "cycle":
            return epoch % views
        return int(torch.randperm(views, generator=epoch_generator(self.seed, epoch // views))[epoch % views])

    def params(self, epoch: int) -> torch.Tensor:
        """[N, P] augmentation parameters of the epoch's view, refused if the policy could not have drawn them."""
        view = self.view_of(epoch)
        params = torch.from_numpy(self.cache.aug_params(view)).long()
        bad = torch.nonzero(self.policy.out_of_range(params)).flatten()
        if len(bad):
            first = int(bad[0])
            raise CorruptCacheError(f"{self.cache.path}: array 'aug', view {view}: {len(bad)} samples hold parameters "
                                    f"the {self.policy.describe()['name']} policy never draws (first: sample {first}, "
                                    f"{dict(zip(self.policy.param_names, params[first].tolist()))}); the cache was "
                                    f"altered: rebuild it with `kdcache dump-teacher --overwrite`")
        return params


class FreshViews:
    """New random parameters every epoch (online distillation and teacher training), seeded per epoch."""

    def __init__(self, policy: AugmentPolicy, num_samples: int, seed: int = 0) -> None:
        self.policy, self.num_samples, self.seed = policy, num_samples, seed

    def view_of(self, epoch: int) -> None:
        """Fresh views belong to no cached view."""
        return None

    def params(self, epoch: int) -> torch.Tensor:
        """[N, P] parameters drawn for this epoch."""
        return self.policy.sample(epoch_generator(self.seed, epoch), self.num_samples)


def require_fits(cache: TeacherCache, data: ImageData, policy: AugmentPolicy, scales: tuple[int, ...],
                 teacher: str | None = None) -> None:
    """Refuse to train on a cache unless it was made from this data, normalisation, policy and scales.

    Checked from the most telling field to the most exact one, so a CIFAR-10 run on a CIFAR-100
    cache hears about the class count rather than a fingerprint.
    """
    expected = {"teacher.num_classes": data.num_classes, "dataset.name": data.name, "dataset.split": data.split,
                "scales": scales, "augmentation": policy.describe(), "dataset.mean": list(data.mean),
                "dataset.std": list(data.std), "dataset.fingerprint": data.fingerprint}
    if teacher is not None:
        expected = {"teacher.arch": teacher, **expected}
    cache.require(expected)
