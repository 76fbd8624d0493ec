"""What every dump shares, whatever its teacher: the result it reports, the cache writer one process opens (or every
rank of a sharded dump joins), and the loop that writes (view, block) units in the background as they are computed."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kdcache import distributed
from kdcache.cache.backends import store_class
from kdcache.cache.layout import CacheSpec
from kdcache.cache.location import Location, store_bytes
from kdcache.cache.writer import BackgroundWriter, CacheWriter
from kdcache.distributed import World
from kdcache.errors import KdcacheError
from kdcache.stages.topk import encode_topk


Block = tuple[int, int, dict[str, np.ndarray], int]  # view, block, its arrays, its count of right predictions


@dataclass(frozen=True)
class DumpResult:
    """What a dump did: where, how big, how fast, and the teacher's accuracy per view."""

    path: str | Path  # a URL for a remote cache
    images: int
    seconds: float
    bytes_on_disk: int
    view_accuracy: list[float]
    resumed: bool
    unit: str = "image"  # what `images` counts: images, or a token cache's sequences

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def open_writer(out: Location, spec: CacheSpec, labels: np.ndarray, params: np.ndarray | None, format: str | None,
                overwrite: bool, here: World, listing: bytes = b"",
                constants: dict[str, np.ndarray] | None = None) -> CacheWriter:
    """The cache's writer: one process creates or resumes it; under torchrun rank 0 does, and the others join."""
    if not here.distributed:
        return CacheWriter.open(out, spec, labels, params, format, overwrite, listing, constants)
    backend = store_class(out, format)
    if backend.format_name != "zarr":
        raise KdcacheError(f"a sharded dump ({here.size} processes) writes Zarr, where each rank writes only its "
                           f"own chunk files; {out} is {backend.format_name}, whose file takes one writer: use "
                           f"a .zarr --out (or --format zarr), or run one process")
    main = distributed.from_main(lambda: CacheWriter.open(out, spec, labels, params, format, overwrite, listing,
                                                          constants))
    return main if here.is_main else CacheWriter.join(out)


def dump_pending(writer: CacheWriter, out: Location, compute: Callable[[list[tuple[int, int]]], Iterator[Block]],
                 here: World, show_progress: bool, unit: str = "image") -> DumpResult:
    """Compute and write this process's pending (view, block) units (a rank's share under torchrun), record the
    teacher's accuracy per view once every rank is done, close the writer; what the dump did. `unit`: what a sample
    is (image, or a token cache's sequence)."""
    try:
        blocks, _ = distributed.shard(writer.spec.num_blocks, writer.spec.block_size, writer.spec.num_samples, here)
        pending = writer.pending(blocks)
        resumed = len(pending) < writer.spec.num_views * len(blocks)
        started = time.perf_counter()
        total = write_pending(writer, compute(pending), pending, f"dump {out.name}", here, show_progress,
                              unit=PROGRESS_UNITS[unit])
        seconds = time.perf_counter() - started
        distributed.barrier()  # every rank's blocks are written before rank 0 reads the progress
        accuracy = writer.finish() if here.is_main else writer.view_accuracy()
        samples = int(distributed.all_sum(torch.tensor(total)))
    finally:
        writer.close()
    return DumpResult(out.target, samples, seconds, store_bytes(out), accuracy, resumed, unit=unit)


PROGRESS_UNITS = {"image": "img", "sequence": "seq"}  # a dump's sample unit -> its progress bar's


def write_pending(writer: CacheWriter, computed: Iterator[Block], pending: list[tuple[int, int]], description: str,
                  here: World, show_progress: bool, unit: str = "img") -> int:
    """Write every pending (view, block) as `computed` gives it, the writes in the background; the number of samples
    (images, or sequences: `unit` on the progress bar)."""
    total = sum(len(writer.spec.block_range(block)) for _, block in pending)
    background = BackgroundWriter(writer)
    try:
        rank = f" rank {here.rank}/{here.size}" if here.distributed else ""
        with tqdm(total=total, unit=unit, unit_scale=True, disable=not show_progress, desc=description + rank,
                  position=here.rank) as bar:
            for view, block, arrays, correct in computed:
                background.submit(view, block, arrays, correct)
                bar.update(len(writer.spec.block_range(block)))
    except BaseException:
        background.close(raise_errors=False)  # blocks already queued are still written
        raise
    background.close()
    return total


def encoded_logits(logits: torch.Tensor, spec: CacheSpec) -> dict[str, np.ndarray]:
    """Logits [b, R, C] in the stored dtype as the cache keeps them: whole (`logits`), or with spec.topk the top k per
    region (or position), their classes and the rest (kdcache.stages.topk)."""
    if not spec.topk:
        return {"logits": logits.cpu().numpy()}
    values, indices, rest = encode_topk(logits, spec.topk)
    return {"topk_values": values.to(logits.dtype).cpu().numpy(), "topk_rest": rest.to(logits.dtype).cpu().numpy(),
            "topk_indices": indices.to(getattr(torch, spec.index_dtype)).cpu().numpy()}
