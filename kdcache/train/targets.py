"""Target providers, the seam between the stages: the cache and the live teacher give the same region logits."""

from __future__ import annotations

from concurrent.futures import Future

import torch
from torch import nn

from kdcache.cache import TeacherCache
from kdcache.models import LogitMap, region_indices
from kdcache.runtime import autocast, prepare_model


class CachedTargets:
    """Region logits from a cache: the epoch's whole view resident on the device, the next one read meanwhile."""

    def __init__(self, cache: TeacherCache, scales: tuple[int, ...] | None = None,
                 device: torch.device = torch.device("cpu")) -> None:
        self.cache, self.device = cache, device
        # a subset of the cache's scales is a subset of its regions, selected once per view
        self.regions = None if scales is None or tuple(scales) == cache.scales else region_indices(cache.scales, scales)
        self._view: int | None = None
        self._logits: torch.Tensor | None = None
        self._next: tuple[int, Future] | None = None

    def begin_epoch(self, view: int | None, next_view: int | None = None) -> None:
        """Make `view` resident; start reading `next_view` in the background."""
        if view != self._view:
            if self._next is not None and self._next[0] == view:
                logits = self._next[1].result()
            else:
                logits = self.cache.view(view)
            tensor = torch.from_numpy(logits)
            if self.regions is not None:
                tensor = tensor[:, self.regions]
            self._logits, self._view = tensor.to(self.device), view
        self._next = None
        if next_view is not None and next_view != view:
            self._next = (next_view, self.cache.prefetch(next_view))

    def __call__(self, indices: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """[b, R, C] float32 targets of these samples under the current view."""
        return self._logits[indices].float()


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
