"""What a segmentation student learns from: the teacher's per-pixel logits on each view, at an output stride.

A teacher's map at output stride s is the mean of each s × s block of its logits at the view's full size
(`at_stride`): s = 1 keeps every pixel; a larger s stores s² times fewer values, and a loss compares the student's
map resized to it (kdcache.losses.dense resizes the student's map to the teacher's). Providers of these maps
(`DenseTargets`: the cache, or the live teacher that every equivalence test compares against) serve the same
interface, so the segmentation loop cannot tell them apart.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcache.data.dense import LabelledPolicy
from kdcache.runtime import autocast


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
