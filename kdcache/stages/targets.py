"""Target providers, the seam between the stages: the cache and the live teacher give the same region logits."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Protocol

import torch
from torch import nn

from kdcache.cache import TeacherCache
from kdcache.models import LogitMap, region_indices
from kdcache.runtime import autocast, prepare_model
from kdcache.stages.topk import decode_topk


class Targets(Protocol):
    """A target provider: what the loop asks of the cache, the live teacher, or any other source of targets."""

    def begin_epoch(self, view: int | None, next_view: int | None = None) -> None:
        """Get ready to give the targets of `view` (None: fresh views); `next_view` is the following epoch's."""
        ...

    def __call__(self, indices: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """[b, R, C] float32 region logits of these samples (their indices, and their augmented, normalised images)."""
        ...


class CachedTargets:
    """Region logits from a cache: the epoch's whole view resident on the device, the next one read meanwhile.

    A top-k cache stays compact on the device (values, classes, rest); each batch's logits are rebuilt there.
    """

    def __init__(self, cache: TeacherCache, scales: tuple[int, ...] | None = None,
                 device: torch.device = torch.device("cpu"), samples: range | None = None) -> None:
        self.cache, self.device = cache, device
        self.samples = samples  # a DDP rank's shard: only its blocks are read, and indices count from its start
        # a subset of the cache's scales is a subset of its regions, selected once per view
        self.regions = None if scales is None or tuple(scales) == cache.scales else region_indices(cache.scales, scales)
        self._view: int | None = None
        self._arrays: list[torch.Tensor] = []
        self._next: tuple[int, Future] | None = None
        # two sets of host buffers, reused: the view in use reads from one while the next is read into the other
        self._buffers = [cache.view_buffers(samples) for _ in range(2)]
        self._in_use = 0

    def begin_epoch(self, view: int | None, next_view: int | None = None) -> None:
        """Make `view` resident; start reading `next_view` in the background."""
        if view != self._view:
            if self._next is not None and self._next[0] == view:
                arrays = self._next[1].result()
                self._in_use = 1 - self._in_use
            else:
                if self._next is not None:  # a read of another view may still be filling the other buffers
                    self._next[1].exception()  # waits; its error, if any, is that view's, raised when it is read
                arrays = self.cache.view_arrays(view, self.samples, self._buffers[self._in_use])
            tensors = [torch.from_numpy(values) for values in arrays.values()]  # logits, or values, indices, rest
            if self.regions is not None:
                tensors = [tensor[:, self.regions] for tensor in tensors]
            self._arrays, self._view = [tensor.to(self.device) for tensor in tensors], view
        self._next = None
        if next_view is not None and next_view != view:
            self._next = (next_view, self.cache.prefetch(next_view, self.samples, self._buffers[1 - self._in_use]))

    def __call__(self, indices: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """[b, R, C] float32 targets of these samples under the current view."""
        if len(self._arrays) == 1:
            return self._arrays[0][indices].float()
        return decode_topk(*(tensor[indices] for tensor in self._arrays), self.cache.spec.num_classes)


class LiveTeacher:
    """Region logits from running the teacher on the batch: the online baseline."""

    def __init__(self, teacher: nn.Module, scales: tuple[int, ...], device: torch.device = torch.device("cpu")) -> None:
        self.device = device
        self.logit_map = prepare_model(LogitMap(teacher, scales), device).eval()

    def begin_epoch(self, view: int | None, next_view: int | None = None) -> None:
        """Nothing to load: the teacher computes every batch."""

    def __call__(self, indices: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """[b, R, C] float32 teacher region logits of these (augmented, normalised) images."""
        with torch.no_grad(), autocast(self.device):
            return self.logit_map(images).float()
