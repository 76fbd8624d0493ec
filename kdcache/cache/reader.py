"""The cache reader: read-only, validates what it opens, reads whole views, verifies every chunk."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.cache.layout import PENDING, TOPK_ARRAYS, CacheSpec, require_match
from kdcache.cache.store import ChunkReadError, Store, open_store
from kdcache.cache.topk import decode_topk
from kdcache.errors import CorruptCacheError, KdcacheError

# |region 0 - mean of a scale's cells| allowed, relative to the sample's largest logit: fp16 storage
# of fp32 logits, or logits computed under bf16 autocast (8 mantissa bits)
SELF_CHECK_TOLERANCE = {"float32": 4e-3, "bfloat16": 4e-2}
FINITE_CHECK_BLOCK = 2**18  # values tested at a time: the scratch stays in cache
# float dtype -> (same-size unsigned int, its exponent bits): a value is NaN or Inf iff all of them are set
_EXPONENT_BITS = {np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(np.float32): (np.uint32, 0x7F800000)}


def open_cache(path: str | Path) -> TeacherCache:
    """Open a cache for reading; it is never written to."""
    store = open_store(path, read_only=True)
    try:
        return TeacherCache(store, CacheSpec.from_metadata(store.metadata(), str(path)))
    except BaseException:
        store.close()
        raise


def all_finite(values: np.ndarray) -> bool:
    """np.isfinite(values).all(), ten times faster for float16 (numpy upcasts each half float): the exponent bits
    tested block by block, by two threads, which keeps a whole-view read of 200 MB from spending more time here
    than on the disk."""
    if values.dtype not in _EXPONENT_BITS or not values.flags.c_contiguous:
        return bool(np.isfinite(values).all())
    unsigned, mask = _EXPONENT_BITS[values.dtype]
    words, mask = values.reshape(-1).view(unsigned), unsigned(mask)
    half = words.size // 2
    if half < FINITE_CHECK_BLOCK:
        return _exponents_below(words, mask)
    with ThreadPoolExecutor(1) as helper:  # numpy releases the GIL: the halves run on two cores
        other = helper.submit(_exponents_below, words[half:], mask)
        return _exponents_below(words[:half], mask) and other.result()


def _exponents_below(words: np.ndarray, mask: np.unsignedinteger) -> bool:
    """Whether no word has every bit of mask set."""
    scratch = np.empty(min(words.size, FINITE_CHECK_BLOCK), words.dtype)
    for start in range(0, words.size, FINITE_CHECK_BLOCK):
        part = words[start:start + FINITE_CHECK_BLOCK]
        if np.bitwise_and(part, mask, out=scratch[:part.size]).max() == mask:
            return False
    return True


@dataclass(frozen=True)
class Problem:
    """One thing `verify` found wrong, located by array, view and block."""

    array: str
    view: int | None
    block: int | None
    samples: range | None
    what: str

    def __str__(self) -> str:
        where = [f"array {self.array!r}"]
        if self.view is not None:
            where.append(f"view {self.view}")
        if self.block is not None:
            where.append(f"block {self.block} (samples {self.samples.start}-{self.samples.stop - 1})")
        return ", ".join(where) + f": {self.what}"


class TeacherCache:
    """A teacher cache opened read-only: metadata, labels, augmentation parameters and whole views."""

    def __init__(self, store: Store, spec: CacheSpec) -> None:
        self.store, self.spec, self.path = store, spec, store.path
        self._prefetcher: ThreadPoolExecutor | None = None
        self._complete_progress: np.ndarray | None = None
        self._check_shapes()

    # -- what it holds -----------------------------------------------------------------------
    @property
    def num_views(self) -> int:
        return self.spec.num_views

    @property
    def num_samples(self) -> int:
        return self.spec.num_samples

    @property
    def scales(self) -> tuple[int, ...]:
        return self.spec.scales

    @property
    def metadata(self) -> dict[str, Any]:
        return self.store.metadata()

    def progress(self) -> np.ndarray:
        """[views, blocks]: PENDING or the block's count of correct teacher predictions (read-only)."""
        if self._complete_progress is not None:
            return self._complete_progress
        progress = self._read_checked("progress", None)
        progress.flags.writeable = False
        if (progress != PENDING).all():
            # a complete cache's progress never changes, and reading its chunk per block costs as much as a
            # third of a view: every view read after the first skips it
            self._complete_progress = progress
        return progress

    def is_complete(self) -> bool:
        """Whether every (view, block) was written."""
        return bool((self.progress() != PENDING).all())

    def view_accuracy(self) -> list[float | None]:
        """Teacher top-1 accuracy of region 0 per view (None for a view not fully written)."""
        return [None if (row == PENDING).any() else float(row.sum()) / self.num_samples for row in self.progress()]

    def require(self, expected: dict[str, Any]) -> None:
        """Refuse this cache if a metadata field differs from what the caller expects (see layout.require_match)."""
        require_match(self.spec, str(self.path), expected)

    def require_fits(self, data: Any, policy: Any, scales: tuple[int, ...], teacher: str | None = None) -> None:
        """Refuse to train on this cache unless it was made from this data, normalisation, policy and scales.

        Checked from the most telling field to the most exact one, so a CIFAR-10 run on a CIFAR-100
        cache hears about the class count rather than a fingerprint.
        """
        expected = {"teacher.num_classes": data.num_classes, "dataset.name": data.name, "dataset.split": data.split,
                    "scales": scales, "augmentation": policy.describe(), "dataset.mean": list(data.mean),
                    "dataset.std": list(data.std), "dataset.fingerprint": data.fingerprint}
        if teacher is not None:
            expected = {"teacher.arch": teacher, **expected}
        self.require(expected)

    def require_complete(self) -> None:
        """Refuse an incomplete cache, or one with a chunk missing anywhere (a cheap scan; checksums are read per view)."""
        progress = self.progress()
        missing = np.argwhere(progress == PENDING)
        if len(missing):
            view, block = map(int, missing[0])
            raise KdcacheError(f"cache {self.path} is incomplete: {len(missing)} of {progress.size} (view, block) "
                               f"units are not written (first: view {view}, block {block}); rerun the same "
                               f"`kdcache dump-teacher` command to finish it")
        for name in ("labels", "aug", *self.spec.data_arrays):
            problem = next(self._missing_chunks(name, None), None)
            if problem is not None:
                raise self._damaged(problem)

    # -- reading -------------------------------------------------------------------------------
    def labels(self) -> np.ndarray:
        """[samples] int64 labels."""
        return self._read_checked("labels", None)

    def aug_params(self, view: int) -> np.ndarray:
        """[samples, params] int32 augmentation parameters of one view."""
        return self._read_checked("aug", view)

    def view(self, view: int, samples: range | None = None) -> np.ndarray:
        """[samples, regions, classes] logits of one whole view (as stored, or rebuilt from top-k storage in the
        stored dtype); refuses an incomplete or damaged view.

        samples: a contiguous, block-aligned part of the view to read instead (a DDP rank's shard).
        """
        arrays = self.view_arrays(view, samples)
        if not self.spec.topk:
            return arrays["logits"]
        rebuilt = decode_topk(*(torch.from_numpy(arrays[name]) for name in TOPK_ARRAYS), self.spec.num_classes)
        return rebuilt.numpy().astype(self.spec.dtype)  # exact: every rebuilt value is a stored one

    def view_arrays(self, view: int, samples: range | None = None,
                    out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The data arrays of one view (or its `samples`) as stored: `logits`, or `topk_values`, `topk_indices` and
        `topk_rest`; refuses an incomplete view, missing or damaged chunks and NaN or Inf values.

        out: buffers from `view_buffers` to read into: reused, they spare the kernel zeroing fresh pages.
        """
        if not 0 <= view < self.num_views:
            raise KdcacheError(f"cache {self.path} has views 0-{self.num_views - 1}; view {view} was asked for")
        blocks = self._blocks_of(samples)
        missing = np.flatnonzero(self.progress()[view, blocks.start:blocks.stop] == PENDING) + blocks.start
        if missing.size:
            raise KdcacheError(f"cache {self.path} is incomplete: view {view} lacks {missing.size} of "
                               f"{self.spec.num_blocks} blocks (first: block {missing[0]}); rerun the same "
                               f"`kdcache dump-teacher` command to finish it")
        arrays = {name: self._read_checked(name, view, blocks, None if out is None else out[name])
                  for name in self.spec.data_arrays}
        for name, values in arrays.items():
            if values.dtype.kind == "f" and not all_finite(values):
                first = int(np.flatnonzero(~np.isfinite(values).reshape(len(values), -1).all(1))[0])
                block = blocks.start + first // self.spec.block_size
                raise CorruptCacheError(str(Problem(name, view, block, self.spec.block_range(block),
                                                    "holds NaN or Inf values")) + f" in {self.path}; "
                                        "rebuild the cache with `kdcache dump-teacher --overwrite`")
        return arrays

    def view_buffers(self, samples: range | None = None) -> dict[str, np.ndarray]:
        """Empty arrays that `view_arrays(..., out=)` can read one view (or its `samples`) into."""
        count = self.spec.num_samples if samples is None else len(samples)
        buffers = {}
        for name in self.spec.data_arrays:
            shape, dtype = self.spec.array_layout(name)
            buffers[name] = np.empty((count, *shape[2:]), dtype)
        return buffers

    def prefetch(self, view: int, samples: range | None = None, out: dict[str, np.ndarray] | None = None) -> Future:
        """Start reading a whole view (or its `samples`) in a background thread; `.result()` gives `view_arrays(...)`."""
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-prefetch")
        return self._prefetcher.submit(self.view_arrays, view, samples, out)

    def _blocks_of(self, samples: range | None) -> range:
        """The blocks that hold exactly these samples; a range that does not start and end on block edges is refused."""
        spec = self.spec
        if samples is None:
            return range(spec.num_blocks)
        aligned = samples.step == 1 and samples.start % spec.block_size == 0 and 0 <= samples.start <= \
            samples.stop <= spec.num_samples and (samples.stop % spec.block_size == 0 or samples.stop == spec.num_samples)
        if not aligned:
            raise KdcacheError(f"cache {self.path}: samples {samples.start}-{samples.stop - 1} do not start and end on "
                               f"its blocks of {spec.block_size} samples ({spec.num_samples} in all)")
        return range(samples.start // spec.block_size, -(-samples.stop // spec.block_size))

    def _read_checked(self, name: str, view: int | None, blocks: range | None = None,
                      out: np.ndarray | None = None) -> np.ndarray:
        """Read an array (or one view of it, or its blocks), refusing missing chunks and naming the block that fails."""
        problem = next(self._missing_chunks(name, view, blocks), None)
        if problem is not None:
            raise self._damaged(problem)
        selection = () if view is None else (view,)
        if blocks is not None and len(blocks) != self.spec.num_blocks:
            rows = range(self.spec.block_range(blocks.start).start, self.spec.block_range(blocks.stop - 1).stop) \
                if len(blocks) else range(0)
            selection = (view, slice(rows.start, rows.stop))
        try:
            return self.store.read(name, selection, out)
        except ChunkReadError:
            problem = next(self._unreadable_chunks(name, view, blocks), None)
            if problem is None:
                raise
            raise self._damaged(problem) from None

    def _damaged(self, problem: Problem) -> CorruptCacheError:
        return CorruptCacheError(f"{self.path}: {problem}; the cache is damaged: rebuild it with "
                                 f"`kdcache dump-teacher --overwrite` (`kdcache verify` lists every damaged block)")

    # -- checking ------------------------------------------------------------------------------
    def _check_shapes(self) -> None:
        spec = self.spec
        # each array's shape, and the metadata fields it follows from
        expected = {
            **{name: (spec.array_layout(name)[0], "views.count, dataset.num_samples, scales, teacher.num_classes"
                      + (", logits.topk" if spec.topk else "")) for name in spec.data_arrays},
            "aug": ((spec.num_views, spec.num_samples, spec.num_params),
                    "views.count, dataset.num_samples, augmentation.param_names"),
            "labels": ((spec.num_samples,), "dataset.num_samples"),
            "progress": ((spec.num_views, spec.num_blocks), "views.count, dataset.num_samples, logits.block_size")}
        for name, (shape, fields) in expected.items():
            info = self.store.array_info(name)
            if info.shape != shape:
                raise CorruptCacheError(f"{self.path}: array {name!r} has shape {list(info.shape)} but the metadata "
                                        f"fields {fields} imply {list(shape)}; the cache was altered: rebuild it "
                                        f"with `kdcache dump-teacher --overwrite`")

    def _chunks(self, name: str, view: int | None, blocks: range | None = None
                ) -> Iterator[tuple[tuple[int, ...], int | None, int | None, tuple]]:
        """(chunk coordinates, view, block, selection) of every chunk of an array, of one view of it, or of its blocks."""
        info = self.store.array_info(name)
        if 0 in info.shape:
            return
        if name in (*self.spec.data_arrays, "aug"):
            views = range(self.num_views) if view is None else [view]
            for k in views:
                for block in blocks or range(self.spec.num_blocks):
                    rows = self.spec.block_range(block)
                    yield (k, block) + (0,) * (len(info.shape) - 2), k, block, (k, slice(rows.start, rows.stop))
        elif name == "progress" and info.chunks[0] == 1:  # one chunk per view: caches written before sharded dumps
            for k in range(self.num_views):
                yield (k, 0), k, None, (k,)
        elif name == "progress":  # one chunk per block, holding every view
            for block in range(self.spec.num_blocks):
                yield (0, block), None, block, (slice(None), slice(block, block + 1))
        else:
            yield (0,) * len(info.shape), None, None, ()

    def _missing_chunks(self, name: str, view: int | None, blocks: range | None = None) -> Iterator[Problem]:
        for coords, k, block, _ in self._chunks(name, view, blocks):
            if not self.store.chunk_exists(name, coords):
                yield Problem(name, k, block, None if block is None else self.spec.block_range(block),
                              "the chunk is missing (deleted or never written); it is never read as zeros")

    def _unreadable_chunks(self, name: str, view: int | None, blocks: range | None = None) -> Iterator[Problem]:
        for _, k, block, selection in self._chunks(name, view, blocks):
            try:
                self.store.read(name, selection)
            except ChunkReadError as error:
                yield Problem(name, k, block, None if block is None else self.spec.block_range(block),
                              f"fails its checksum ({error.__cause__})")

    def verify(self, on_block: Callable[[], None] | None = None) -> list[Problem]:
        """Read every chunk: checksums, missing chunks, completeness, finiteness, region-0 self-check."""
        problems = [p for name in ("labels", "progress", "aug") for p in self._missing_chunks(name, None)]
        problems += [p for name in ("labels", "progress", "aug") for p in self._unreadable_chunks(name, None)]
        if any(p.array == "progress" for p in problems):
            return problems
        progress = self.progress()
        tolerance = SELF_CHECK_TOLERANCE.get(self.spec.teacher["precision"], 4e-2)
        for k in range(self.num_views):
            for block in range(self.spec.num_blocks):
                problems += self._verify_block(k, block, progress[k, block], tolerance)
                if on_block is not None:
                    on_block()
        return problems

    def _verify_block(self, view: int, block: int, progress: int, tolerance: float) -> list[Problem]:
        rows = self.spec.block_range(block)
        names = self.spec.data_arrays

        def problem(what: str, name: str = names[0]) -> list[Problem]:
            return [Problem(name, view, block, rows, what)]

        if progress == PENDING:
            return problem("not written yet (the dump did not finish; rerun it to resume)")
        arrays = {}
        for name in names:
            coords = (view, block) + (0,) * (len(self.spec.array_layout(name)[0]) - 2)
            if not self.store.chunk_exists(name, coords):
                return problem("the chunk is missing (deleted); it is never read as zeros", name)
            try:
                arrays[name] = self.store.read(name, (view, slice(rows.start, rows.stop)))
            except ChunkReadError as error:
                return problem(f"fails its checksum ({error.__cause__})", name)
            finite = np.isfinite(arrays[name]).reshape(len(rows), -1).all(1)
            if not finite.all():
                return problem(f"NaN or Inf logits for samples {list(np.flatnonzero(~finite)[:10] + rows.start)}", name)
        if self.spec.topk:
            return self._verify_topk_block(arrays, rows, progress, problem)
        logits = arrays["logits"].astype(np.float32)
        found = self._recount(logits[:, 0].argmax(-1), rows, progress, problem)
        for scale in self._self_checkable_scales():
            start = sum(s * s for s in self.scales[: self.scales.index(scale)])
            cells = logits[:, start:start + scale * scale].mean(1)
            error = np.abs(cells - logits[:, 0]).max(-1) / np.maximum(np.abs(logits[:, 0]).max(-1), 1.0)
            if (error > tolerance).any():
                found += problem(f"region 0 differs from the mean of the scale-{scale} cells by up to "
                                 f"{error.max():.3g} (relative; allowed {tolerance}): the logits do not fit the "
                                 f"region layout")
        return found

    def _verify_topk_block(self, arrays: dict[str, np.ndarray], rows: range, progress: int,
                           problem: Callable[..., list[Problem]]) -> list[Problem]:
        """Top-k storage's own invariants: valid distinct classes, values descending, the rest below them."""
        values, indices, rest = (arrays[name] for name in TOPK_ARRAYS)
        if indices.min() < 0 or indices.max() >= self.spec.num_classes:
            return problem(f"class indices outside 0-{self.spec.num_classes - 1}", "topk_indices")
        ordered = np.sort(indices, axis=-1)
        if (ordered[..., 1:] == ordered[..., :-1]).any():
            return problem("a region lists the same class twice", "topk_indices")
        if (np.diff(values.astype(np.float32), axis=-1) > 0).any():
            return problem("values are not in descending order", "topk_values")
        if (rest.astype(np.float32) > values[..., -1].astype(np.float32)).any():
            return problem("the rest logit exceeds the k-th largest one, which no top-k encoding gives", "topk_rest")
        return self._recount(indices[:, 0, 0], rows, progress, problem)

    def _recount(self, predicted: np.ndarray, rows: range, progress: int,
                 problem: Callable[..., list[Problem]]) -> list[Problem]:
        labels_correct = int((predicted == self._labels_cached()[rows.start:rows.stop]).sum())
        if labels_correct != progress:
            return problem(f"progress records {progress} correct teacher predictions, the logits give "
                           f"{labels_correct}")
        return []

    def _labels_cached(self) -> np.ndarray:
        if not hasattr(self, "_labels"):
            self._labels = self.labels()
        return self._labels

    def _self_checkable_scales(self) -> list[int]:
        """Scales whose cells tile the teacher's final map evenly, so their mean is the global logit."""
        height, width = self.spec.teacher["feature_map"]
        return [s for s in self.scales if s > 1 and height and width
                and (height % s == 0 or s % height == 0) and (width % s == 0 or s % width == 0)]

    def close(self) -> None:
        """Stop the prefetch thread and close the store."""
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)
        self.store.close()

    def __enter__(self) -> TeacherCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
