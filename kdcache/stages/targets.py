"""Target providers, the seam between the stages: the cache and the live teacher give the same region logits."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Protocol

import numpy as np
import torch
from torch import nn

from kdcache.cache import TeacherCache
from kdcache.cache.topk import topk_bytes
from kdcache.errors import KdcacheError
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
    """Region logits from a cache: the epoch's whole view resident on the device (or, `on_host`, in host memory,
    each batch's rows gathered and moved), the next one read meanwhile.

    A top-k cache stays compact (values, classes, rest); each batch's logits are rebuilt on the device.
    """

    def __init__(self, cache: TeacherCache, scales: tuple[int, ...] | None = None,
                 device: torch.device = torch.device("cpu"), samples: range | None = None,
                 on_host: bool = False) -> None:
        self.cache, self.device, self.on_host = cache, device, on_host
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
            self._arrays, self._view = [tensor if self.on_host else tensor.to(self.device) for tensor in tensors], view
        self._next = None
        if next_view is not None and next_view != view:
            self._next = (next_view, self.cache.prefetch(next_view, self.samples, self._buffers[1 - self._in_use]))

    def __call__(self, indices: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """[b, R, C] float32 targets of these samples under the current view."""
        rows = [tensor[indices.to(tensor.device)].to(self.device, non_blocking=True) for tensor in self._arrays]
        if len(rows) == 1:
            return rows[0].float()
        return decode_topk(*rows, self.cache.spec.num_classes)


# CachedTargets holds a view three times: the view in use and the next one in host buffers, and one on the device
HOST_COPIES, DEVICE_COPIES = 2, 1
SUGGESTED_TOPK = 20


def _size(size: float) -> str:
    """Bytes as GB, or MB below a gigabyte."""
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def available_host_memory() -> int | None:
    """Bytes of memory the system can still give (Linux's MemAvailable), or None where it does not say."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def require_target_memory(cache: TeacherCache, samples: range | None, device: torch.device,
                          host_available: int | None = None, device_available: int | None = None,
                          on_host: bool = False) -> str:
    """What a view of targets needs; refuse, suggesting --topk, where the host or the device has less to give.

    on_host: the view in use stays in host memory (CachedTargets(on_host=True)), none of it on the device."""
    spec = cache.spec
    count = spec.num_samples if samples is None else len(samples)
    view = count * sum(int(np.prod(spec.array_layout(name)[0][2:])) * np.dtype(spec.array_layout(name)[1]).itemsize
                       for name in spec.data_arrays)
    on_device = view if device.type == "cuda" and not on_host else 0
    host_bytes = view * (HOST_COPIES + (DEVICE_COPIES if device.type == "cpu" and not on_host else 0))
    host_available = available_host_memory() if host_available is None else host_available
    if on_device and device_available is None:
        device_available = torch.cuda.mem_get_info(device)[0]
    statement = (f"each view of {cache.path} takes {_size(view)} ({count} samples of "
                 f"{'top-' + str(spec.topk) if spec.topk else 'all'} {spec.num_regions} x {spec.num_classes} logits); "
                 f"training holds {_size(host_bytes)} of it in host memory"
                 + (f" and {_size(view)} on {device}" if on_device else ""))
    short = []
    if host_available is not None and host_bytes > host_available:
        short.append(f"{_size(host_bytes)} of host memory but {_size(host_available)} is available")
    if on_device and device_available is not None and view > device_available:
        short.append(f"{_size(view)} on {device} but {_size(device_available)} is available")
    if short:
        smaller = "" if spec.topk or SUGGESTED_TOPK >= spec.num_classes else (
            f"; a cache dumped with --topk {SUGGESTED_TOPK} takes "
            f"{_size(count * topk_bytes(spec.num_regions, spec.num_classes, SUGGESTED_TOPK).topk)} per view")
        raise KdcacheError(f"{statement}: it needs {' and '.join(short)}. Dump a smaller cache (--topk, fewer "
                           f"--scales) or train with fewer --scales, or on a machine with more memory{smaller}")
    return statement


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
