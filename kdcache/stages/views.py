"""Which augmentation parameters each epoch uses (a cached view replayed, or fresh draws as online training does),
and whether a cache's views fit the data and policy of a run (the checks themselves live with the cache,
kdcache.cache.fit, which compares the source's and policy's descriptions)."""

from __future__ import annotations

from typing import Protocol

import torch

from kdcache.cache import TeacherCache, fit
from kdcache.cache.fit import require_outputs  # noqa: F401  (where kdcache.stages.targets reads it)
from kdcache.data import AugmentPolicy, DataSource, Policy
from kdcache.data.dense import LabelledPolicy
from kdcache.errors import CorruptCacheError, KdcacheError
from kdcache.runtime import epoch_generator

VIEW_ORDERS = ("cycle", "shuffle")
DEFAULT_VIEWS = 4  # DumpConfig.views None: a dump without --views or --exhaustive


class Views(Protocol):
    """What the loop asks of each epoch's views."""

    def view_of(self, epoch: int) -> int | None:
        """The cached view that epoch replays (None for fresh views)."""
        ...

    def params(self, epoch: int) -> torch.Tensor | None:
        """[N, P] augmentation parameters of the epoch; None: each file's view drawn fresh where it is read."""
        ...


class CachedViews:
    """Epoch e replays view e mod K of a cache (`cycle`), or a seeded permutation of the K views per round (`shuffle`).

    With S views per step (distill --views-per-step), epoch e trains on the sequence's places e·S to e·S + S - 1:
    `view_of` and `params` take that place.
    """

    def __init__(self, cache: TeacherCache, policy: Policy, order: str = "cycle",
                 seed: int = 0) -> None:
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
        stored = torch.from_numpy(self.cache.aug_params(view))
        params = stored if self.cache.spec.streamed else stored.long()
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

    def __init__(self, policy: Policy, num_samples: int, seed: int = 0) -> None:
        self.policy, self.num_samples, self.seed = policy, num_samples, seed

    def view_of(self, epoch: int) -> None:
        """Fresh views belong to no cached view."""
        return None

    def params(self, epoch: int) -> torch.Tensor | None:
        """[N, P] parameters drawn for this epoch; None for files, whose views are drawn for each image's own size
        where it is decoded (from the seed, the epoch and the sample)."""
        return self.policy.sample(epoch_generator(self.seed, epoch), self.num_samples)


def view_params(policy: AugmentPolicy | LabelledPolicy, num_samples: int, num_views: int | None, exhaustive: bool, seed: int) -> torch.Tensor:
    """[K, N, P] augmentation parameters of a dump: K sampled views, or every view of a finite policy per sample."""
    generator = torch.Generator().manual_seed(seed)
    if exhaustive:
        grid = policy.enumerate()  # [V, P]
        # each sample sees every view once, in its own seeded random order
        order = torch.rand(num_samples, len(grid), generator=generator).argsort(dim=1)
        return grid[order].transpose(0, 1).contiguous()
    if num_views is None or num_views < 1:
        raise KdcacheError(f"--views: expected a positive number of views per sample, got {num_views}")
    return torch.stack([policy.sample(generator, num_samples) for _ in range(num_views)])


def require_fits(cache: TeacherCache, data: DataSource, policy: Policy, scales: tuple[int, ...],
                 teacher: str | None = None) -> None:
    """Refuse to train on a cache unless it was made from this data, normalisation, policy and scales (and files,
    for a streamed split): `kdcache.cache.fit.require_fits` on their descriptions."""
    fit.require_fits(cache, data.describe(), policy.describe(), scales, teacher, data.listed_files())
