"""What a segmentation student learns from: the teacher's per-pixel logits on each view, at an output stride.

A teacher's map at output stride s is the mean of each s × s block of its logits at the view's full size
(`at_stride`): s = 1 keeps every pixel; a larger s stores s² times fewer values, and a loss compares the student's
map resized to it (kdcache.losses.dense resizes the student's map to the teacher's). Providers of these maps
(`DenseTargets`: the cache, or the live teacher that every equivalence test compares against) serve the same
interface, so the segmentation loop cannot tell them apart. `open_dense_targets` opens a dense cache
(kdcache.cache.dense_layout, written by `kdcache dump-teacher` on a dense dataset) as one.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcache.cache import TeacherCache, open_cache
from kdcache.cache.location import Place
from kdcache.data.dense import DenseData, LabelledPolicy
from kdcache.errors import KdcacheError
from kdcache.runtime import autocast
from kdcache.stages.topk import decode_topk
from kdcache.stages.views import CachedViews


def at_stride(logits: Tensor, stride: int) -> Tensor:
    """Logits [B, C, H, W] at output stride `stride`: the mean of each stride × stride block, [B, C, H/s, W/s]
    (H and W divisible by the stride); stride 1 gives the logits themselves."""
    return logits if stride == 1 else F.avg_pool2d(logits, stride)


class DenseTargets(Protocol):
    """The teacher's maps on each view of a segmentation split, whoever computes them."""

    policy: LabelledPolicy
    num_views: int
    stride: int

    def params(self, view: int) -> Tensor:
        """The augmentation parameters [N, P] (CPU int64) of every sample in view `view`."""
        ...

    def maps(self, view: int, indices: Tensor, images: Tensor) -> Tensor:
        """The teacher's logits float32 [B, C, H/s, W/s] on the device for samples `indices` of view `view`, whose
        normalised views are `images` [B, 3, H, W] (a cache ignores them; a live teacher runs on them)."""
        ...


class LiveDenseTargets:
    """The teacher run on each view as it comes: the online baseline, with views drawn from `seed` per view."""

    def __init__(self, teacher: nn.Module, policy: LabelledPolicy, num_samples: int, num_views: int, stride: int = 1,
                 seed: int = 0) -> None:
        self.teacher, self.policy, self.num_samples = teacher.eval(), policy, num_samples
        self.num_views, self.stride, self.seed = num_views, stride, seed

    def params(self, view: int) -> Tensor:
        """View `view`'s parameters, drawn from a generator seeded by (seed, view): the same every time asked."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + view)
        return self.policy.sample(generator, self.num_samples)

    @torch.no_grad()
    def maps(self, view: int, indices: Tensor, images: Tensor) -> Tensor:
        """The teacher's logits on `images`, at the stride."""
        with autocast(images.device):
            logits = self.teacher(images)
        return at_stride(logits.float(), self.stride)


class CachedDenseTargets:
    """The teacher's maps from a dense cache (kdcache.cache.dense_layout): the view asked for resident on the device
    (a top-k cache kept compact, each batch's maps rebuilt there), the following view read meanwhile."""

    def __init__(self, cache: TeacherCache, policy: LabelledPolicy, device: torch.device) -> None:
        self.cache, self.policy, self.device = cache, policy, device
        self.num_views, self.stride = cache.num_views, cache.spec.stride
        self._views = CachedViews(cache, policy)  # replays view v as epoch v, refusing parameters no policy draws
        self._view: int | None = None
        self._arrays: dict[str, Tensor] = {}
        self._next: tuple[int, Future] | None = None

    def params(self, view: int) -> Tensor:
        """The stored augmentation parameters [N, P] (CPU int64) of view `view`."""
        return self._views.params(view)

    def maps(self, view: int, indices: Tensor, images: Tensor) -> Tensor:
        """The stored maps float32 [B, C, h, w] of samples `indices` under view `view` (`images` unused)."""
        if view != self._view:
            self._load(view)
        spec = self.cache.spec
        rows = [self._arrays[name][indices.to(self.device)] for name in spec.logit_arrays]
        positions = rows[0].float() if len(rows) == 1 else decode_topk(*rows, spec.num_classes)
        return positions.unflatten(1, spec.map_size).permute(0, 3, 1, 2).contiguous()

    def _load(self, view: int) -> None:
        """Make `view` resident (the read started for it, or one now), then start reading the view after it."""
        names = self.cache.spec.logit_arrays
        if self._next is not None and self._next[0] == view:
            arrays = self._next[1].result()
        else:
            if self._next is not None:
                self._next[1].exception()  # a read of another view ends before this one starts; its error is its own
            arrays = self.cache.view_arrays(view, names=names)
        self._arrays = {name: torch.from_numpy(values).to(self.device) for name, values in arrays.items()}
        self._view, following = view, (view + 1) % self.num_views
        self._next = (following, self.cache.prefetch(following, names=names)) if following != view else None

    def close(self) -> None:
        """Close the cache (and its background read)."""
        self.cache.close()

    def __enter__(self) -> CachedDenseTargets:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_dense_targets(location: Place, data: DenseData, device: torch.device,
                       policy: LabelledPolicy | None = None) -> CachedDenseTargets:
    """The teacher's maps from the dense cache at `location`, refused (one line naming the field and both values)
    unless it is complete and was written from `data` (name, split, classes, images and label maps) under `policy`
    (default: the cache's own, as `data` builds it)."""
    cache = open_cache(location)
    try:
        if cache.spec.kind != "dense":
            raise KdcacheError(f"cache {cache.path} holds {cache.spec.kind} logits, not a segmentation teacher's maps: "
                               f"dump one with `kdcache dump-teacher --dataset {data.name} --teacher MODEL` (a "
                               f"segmentation model)")
        cache.require({"dataset": data.describe()})
        policy = policy or data.policy(cache.spec.augmentation["name"])
        cache.require({"augmentation": policy.describe()})
        cache.require_complete()
    except BaseException:
        cache.close()
        raise
    return CachedDenseTargets(cache, policy, device)
