"""Stage 1: the teacher runs once over K replayable views of a dataset, and its region logits go to a cache."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from kdcache import distributed
from kdcache.cache.layout import CacheSpec
from kdcache.cache.store import Location, as_location, location_name, store_bytes
from kdcache.cache.topk import encode_topk
from kdcache.cache.writer import BackgroundWriter, CacheWriter
from kdcache.data import ImageData, normalize
from kdcache.errors import KdcacheError
from kdcache.models import LogitMap
from kdcache.runtime import autocast, precision, prepare_model


@dataclass(frozen=True)
class DumpResult:
    """What a dump did: where, how big, how fast, and the teacher's accuracy per view."""

    path: str | Path  # a URL for a remote cache
    images: int
    seconds: float
    bytes_on_disk: int
    view_accuracy: list[float]
    resumed: bool

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def view_params(policy: Any, num_samples: int, num_views: int | None, exhaustive: bool, seed: int) -> torch.Tensor:
    """[K, N, P] augmentation parameters: K sampled views, or every view of a finite policy per sample."""
    generator = torch.Generator().manual_seed(seed)
    if exhaustive:
        grid = policy.enumerate()  # [V, P]
        # each sample sees every view once, in its own seeded random order
        order = torch.rand(num_samples, len(grid), generator=generator).argsort(dim=1)
        return grid[order].transpose(0, 1).contiguous()
    if num_views is None or num_views < 1:
        raise KdcacheError(f"--views: expected a positive number of views per sample, got {num_views}")
    return torch.stack([policy.sample(generator, num_samples) for _ in range(num_views)])


def dump_teacher(teacher: nn.Module, teacher_info: dict[str, Any], data: ImageData, policy: Any, out: Location, *,
                 views: int | None = 1, exhaustive: bool = False, scales: tuple[int, ...] = (1, 2, 4),
                 batch_size: int = 256, device: torch.device = torch.device("cpu"), dtype: str = "float16",
                 format: str | None = None, seed: int = 0, block_size: int = 0, overwrite: bool = False,
                 topk: int = 0, show_progress: bool = True) -> DumpResult:
    """Write the teacher's region logits for every (view, sample) to a cache; resumes an interrupted dump.

    teacher_info names the teacher in the metadata: arch, num_classes, checkpoint, checkpoint_sha256.
    topk > 0 stores per region only the k largest logits, their classes and one logit for the rest (format 2).
    Under torchrun each rank computes and writes a contiguous, chunk-aligned range of blocks; rank 0
    creates the cache and records the per-view accuracy once every rank is done.
    """
    out = as_location(out)
    here = distributed.init(device)
    params = view_params(policy, len(data.labels), views, exhaustive, seed)
    logit_map = prepare_model(LogitMap(teacher, scales), device).eval()
    with torch.no_grad():
        feature_map = list(teacher.forward_features(normalize(data.images[:1], data.mean, data.std).to(device)).shape[2:])
    spec = CacheSpec(
        teacher={**teacher_info, "precision": precision(device), "feature_map": feature_map},
        dataset=data.describe(), augmentation=policy.describe(), num_views=len(params), exhaustive=exhaustive,
        seed=seed, scales=tuple(scales), dtype=dtype, block_size=block_size, topk=topk)
    if spec.num_classes != data.num_classes:
        raise KdcacheError(f"the teacher predicts {spec.num_classes} classes but dataset {data.name} has "
                           f"{data.num_classes}; pass the checkpoint trained on this dataset")
    if not 0 <= topk < spec.num_classes:
        raise KdcacheError(f"--topk: expected a number of logits per region below the {spec.num_classes} classes "
                           f"(0 or no --topk stores them all), got {topk}")

    writer = CacheWriter.open(out, spec, data.labels.numpy(), params.numpy(), format=format, overwrite=overwrite,
                              here=here)
    try:
        blocks, shard = distributed.shard(spec.num_blocks, spec.block_size, spec.num_samples, here)
        pending = writer.pending(blocks)
        resumed = len(pending) < spec.num_views * len(blocks)
        # a resumed run replays exactly the stored parameters
        stored_params = torch.from_numpy(writer.aug_params()).to(device)
        held = slice(shard.samples.start, shard.samples.stop)  # a rank moves only its own samples to its device
        images, labels = data.images[held].to(device), data.labels[held].to(device)
        total = sum(len(spec.block_range(block)) for _, block in pending)
        started = time.perf_counter()
        background = BackgroundWriter(writer)
        try:
            rank = f" rank {here.rank}/{here.size}" if here.distributed else ""
            with tqdm(total=total, unit="img", unit_scale=True, disable=not show_progress,
                      desc=f"dump {location_name(out)}{rank}", position=here.rank) as bar:
                for view, block in pending:
                    arrays, correct = _teacher_block(logit_map, images, labels, stored_params[view, held], data,
                                                     policy, spec, block, batch_size, device, held.start)
                    background.submit(view, block, arrays, correct)
                    bar.update(len(spec.block_range(block)))
        except BaseException:
            background.close(raise_errors=False)  # blocks already queued are still written
            raise
        background.close()
        seconds = time.perf_counter() - started
        distributed.barrier()  # every rank's blocks are written before rank 0 reads the progress
        accuracy = writer.finish() if here.is_main else writer.view_accuracy()
        images = int(distributed.all_sum(torch.tensor(total)))
    finally:
        writer.close()
    return DumpResult(out, images, seconds, store_bytes(out), accuracy, resumed)


def _teacher_block(logit_map: nn.Module, images: torch.Tensor, labels: torch.Tensor, params: torch.Tensor,
                   data: ImageData, policy: Any, spec: CacheSpec, block: int, batch_size: int,
                   device: torch.device, first: int = 0) -> tuple[dict[str, np.ndarray], int]:
    """The data arrays of one block of samples under one view's parameters (region logits, or their top-k
    encoding, made on the device), and how many region-0 predictions are right.

    images, labels and params hold the samples from `first` on (a rank's share of a sharded dump).
    """
    rows = spec.block_range(block)
    parts, correct = [], torch.zeros((), dtype=torch.long, device=device)
    # batches always start at the block's start, so a resumed block computes exactly what it would have
    for start in range(rows.start, rows.stop, batch_size):
        batch = slice(start - first, min(start + batch_size, rows.stop) - first)
        x = normalize(policy.apply(images[batch], params[batch]), data.mean, data.std)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(device):
            regions = logit_map(x).float().to(getattr(torch, spec.dtype))
        correct += (regions[:, 0].argmax(-1) == labels[batch]).sum()  # of what is stored, so verify can recount it
        parts.append(regions)
    logits = torch.cat(parts)
    if not spec.topk:
        return {"logits": logits.cpu().numpy()}, int(correct)
    values, indices, rest = encode_topk(logits, spec.topk)
    dtype = getattr(torch, spec.dtype)
    return {"topk_values": values.to(dtype).cpu().numpy(), "topk_rest": rest.to(dtype).cpu().numpy(),
            "topk_indices": indices.to(getattr(torch, spec.index_dtype)).cpu().numpy()}, int(correct)
