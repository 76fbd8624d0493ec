"""The cache reader: read-only, validates what it opens, reads whole views (`verify.py` checks every chunk)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdcache.cache.backends import open_store
from kdcache.cache.location import Location, Place, store_exists
from kdcache.cache.lock import ReadersLock
from kdcache.cache.layout import (DIGEST_ARRAY, DIGEST_BYTES, DIGEST_SINCE, PENDING, TEXT_EMBEDDING, TOPK_ARRAYS,
                                  CacheSpec, all_finite, cache_id, require_match, require_metadata_digest,
                                  require_same_cache)
from kdcache.cache.store import ChunkReadError, Store
from kdcache.cache.topk import decode_topk_array
from kdcache.errors import CorruptCacheError, KdcacheError


def open_cache(place: Place, cache_id: str | None = None) -> TeacherCache:
    """Open a cache for reading; it is never written to, nor deleted or rewritten while open (see ReadersLock).

    cache_id: the `TeacherCache.cache_id` of the cache this caller opened and checked before (a dataset reopening it
    in a worker): a store rewritten since is refused, naming both ids.
    """
    path = Location.of(place)
    readers = ReadersLock(path).share()
    try:
        if cache_id is not None:  # first: any other check would name the new store's fields, not what happened
            require_same_cache(stored_cache_id(path), cache_id, str(path))
        store = open_store(path, read_only=True)
    except BaseException:
        readers.release()
        raise
    try:
        return TeacherCache(store, CacheSpec.from_metadata(store.metadata(), str(path)), readers)
    except BaseException:
        store.close()
        readers.release()
        raise


def stored_cache_id(place: Place) -> str | None:
    """The cache_id of the store at path now; None where there is none (removed, or half removed or created: being
    rewritten). A URL that cannot be reached is its own error, not a cache gone."""
    path = Location.of(place)
    if not store_exists(path):
        return None
    try:
        with open_store(path, read_only=True) as store:
            metadata = store.metadata()
    except CorruptCacheError:  # its zarr.json gone or cut short, its HDF5 file not whole
        return None
    return cache_id(metadata, str(path)) if metadata else None


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

    def __init__(self, store: Store, spec: CacheSpec, readers: ReadersLock | None = None) -> None:
        self.store, self.spec, self.path = store, spec, store.path
        self._readers = readers
        self._prefetcher: ThreadPoolExecutor | None = None
        self._complete_progress: np.ndarray | None = None
        self._check_arrays()
        if spec.format_version >= DIGEST_SINCE:
            require_metadata_digest(store.metadata(), self._read_checked(DIGEST_ARRAY, None), str(self.path))
        # which store this is: written once when it was created; one of the same arguments rewritten has another
        self.cache_id = cache_id(store.metadata(), str(self.path))

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
        return [None if (row == PENDING).any() else float(row.sum()) / self.spec.scored(view)
                for view, row in enumerate(self.progress())]

    def require(self, expected: dict[str, Any]) -> None:
        """Refuse this cache if a metadata field differs from what the caller expects (see layout.require_match)."""
        require_match(self.spec, str(self.path), expected)

    def require_complete(self) -> None:
        """Refuse an incomplete cache, or one with a chunk missing anywhere (a cheap scan; checksums are read per view)."""
        progress = self.progress()
        missing = np.argwhere(progress == PENDING)
        if len(missing):
            view, block = map(int, missing[0])
            raise KdcacheError(f"cache {self.path} is incomplete: {len(missing)} of {progress.size} (view, block) "
                               f"units are not written (first: view {view}, block {block}); rerun the same "
                               f"`kdcache dump-teacher` command to finish it")
        for name in ("labels", "aug", *self.spec.data_arrays, *self.spec.file_arrays, *self.spec.constant_arrays):
            problem = next(self.missing_chunks(name, None), None)
            if problem is not None:
                raise self._damaged(problem)

    # -- reading -------------------------------------------------------------------------------
    def labels(self) -> np.ndarray:
        """[samples] int64 labels ([samples, positions] next-token ids of a token cache, -1 where none)."""
        return self._read_checked("labels", None)

    def aug_params(self, view: int) -> np.ndarray:
        """[samples, params] augmentation parameters of one view: int32 pixels, or float32 fractions of each file
        for a streamed split."""
        with self._unchanged():
            return self._read_checked("aug", view)

    def text_embedding(self) -> np.ndarray:
        """[classes, D] float32: a zero-shot teacher's (CLIP's) L2-normalised text embedding of each class's prompt,
        the prompts as the metadata's teacher.zero_shot says (template, class_names)."""
        if TEXT_EMBEDDING not in self.spec.constant_arrays:
            raise KdcacheError(f"cache {self.path} holds no text embedding: its teacher {self.spec.teacher['arch']} is "
                               f"no zero-shot teacher; a clip:NAME teacher's cache has one")
        values = self._read_checked(TEXT_EMBEDDING, None)
        if not all_finite(values):
            raise self._damaged(Problem(TEXT_EMBEDDING, None, None, None, "holds NaN or Inf values"))
        return values

    def file_listing(self) -> list[bytes]:
        """A streamed split's files as the dump listed them, relative to the split's folder, in sample order."""
        return self._read_checked("files", None).tobytes().split(b"\n")

    def file_checksums(self) -> np.ndarray:
        """[samples] int64 crc32c of each file of a streamed split, as the teacher read it."""
        return self._read_checked("file_crc32c", None).astype(np.int64)

    def view(self, view: int, samples: range | None = None) -> np.ndarray:
        """[samples, regions, classes] logits of one whole view (as stored, or rebuilt from top-k storage in the
        stored dtype); refuses an incomplete or damaged view.

        samples: a contiguous, block-aligned part of the view to read instead (a DDP rank's shard).
        """
        arrays = self.view_arrays(view, samples, names=self.spec.logit_arrays)
        if not self.spec.topk:
            return arrays["logits"]
        return decode_topk_array(*(arrays[name] for name in TOPK_ARRAYS), self.spec.num_classes)

    def view_arrays(self, view: int, samples: range | None = None, out: dict[str, np.ndarray] | None = None,
                    names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """The data arrays of one view (or its `samples`) as stored: `logits`, or `topk_values`, `topk_indices` and
        `topk_rest`; refuses an incomplete view, missing or damaged chunks and NaN or Inf values.

        out: buffers from `view_buffers` to read into: reused, they spare the kernel zeroing fresh pages.
        names: the data arrays to read (default: all of them, the outputs' too).
        """
        if not 0 <= view < self.num_views:
            raise KdcacheError(f"cache {self.path} has views 0-{self.num_views - 1}; view {view} was asked for")
        blocks = self._blocks_of(samples)
        with self._unchanged():
            missing = np.flatnonzero(self.progress()[view, blocks.start:blocks.stop] == PENDING) + blocks.start
            if missing.size:
                raise KdcacheError(f"cache {self.path} is incomplete: view {view} lacks {missing.size} of "
                                   f"{self.spec.num_blocks} blocks (first: block {missing[0]}); rerun the same "
                                   f"`kdcache dump-teacher` command to finish it")
            arrays = {name: self._read_checked(name, view, blocks, None if out is None else out[name])
                      for name in (self.spec.data_arrays if names is None else names)}
        for name, values in arrays.items():
            if values.dtype.kind == "f" and not all_finite(values):
                first = int(np.flatnonzero(~np.isfinite(values).reshape(len(values), -1).all(1))[0])
                block = blocks.start + first // self.spec.block_size
                raise CorruptCacheError(str(Problem(name, view, block, self.spec.block_range(block),
                                                    "holds NaN or Inf values")) + f" in {self.path}; "
                                        "rebuild the cache with `kdcache dump-teacher --overwrite`")
        return arrays

    def view_buffers(self, samples: range | None = None, names: tuple[str, ...] | None = None
                     ) -> dict[str, np.ndarray]:
        """Empty arrays that `view_arrays(..., out=)` can read one view (or its `samples`) into."""
        count = self.spec.num_samples if samples is None else len(samples)
        buffers = {}
        for name in self.spec.data_arrays if names is None else names:
            shape, dtype = self.spec.array_layout(name)
            buffers[name] = np.empty((count, *shape[2:]), dtype)
        return buffers

    def prefetch(self, view: int, samples: range | None = None, out: dict[str, np.ndarray] | None = None,
                 names: tuple[str, ...] | None = None) -> Future:
        """Start reading a whole view (or its `samples`) in a background thread; `.result()` gives `view_arrays(...)`."""
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-prefetch")
        return self._prefetcher.submit(self.view_arrays, view, samples, out, names)

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
        problem = next(self.missing_chunks(name, view, blocks), None)
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
            problem = next(self.unreadable_chunks(name, view, blocks), None)
            if problem is None:
                raise
            raise self._damaged(problem) from None

    def require_unchanged(self) -> None:
        """Refuse when the store at this cache's path is no longer the one opened here (rewritten since, e.g. by
        `dump-teacher --overwrite`, where no readers lock kept that out: at a URL): its chunks are read by path."""
        require_same_cache(stored_cache_id(self.store.location), self.cache_id, str(self.path))

    @contextlib.contextmanager
    def _unchanged(self) -> Iterator[None]:
        """Around a read an epoch makes: refused if the store was rewritten before it, during it, or in a way that
        made it fail (a chunk gone is a rewrite under way, not damage)."""
        self.require_unchanged()
        try:
            yield
        except KdcacheError:
            self.require_unchanged()
            raise
        self.require_unchanged()

    def _damaged(self, problem: Problem) -> CorruptCacheError:
        return CorruptCacheError(f"{self.path}: {problem}; the cache is damaged: rebuild it with "
                                 f"`kdcache dump-teacher --overwrite` (`kdcache verify` lists every damaged block)")

    # -- checking ------------------------------------------------------------------------------
    def _check_arrays(self) -> None:
        """Refuse arrays whose shape, dtype, chunking or codecs differ from what the metadata implies, before reads."""
        spec = self.spec
        # each array's shape, dtype and first two chunk dimensions (None: any), and the metadata fields they follow from
        data = "views.count, dataset.num_samples, scales, teacher.num_classes" + (", logits.topk" if spec.topk else "")
        expected = {
            **{name: (*spec.array_layout(name), (1, spec.block_size), data) for name in spec.data_arrays},
            "aug": ((spec.num_views, spec.num_samples, spec.num_params), spec.aug_dtype,
                    (1, spec.block_size) if spec.num_params else None,
                    "views.count, dataset.num_samples, augmentation.param_names, logits.block_size"),
            "labels": (spec.labels_shape, "int64", None, "dataset.num_samples"),
            "progress": ((spec.num_views, spec.num_blocks), "int64", None,
                         "views.count, dataset.num_samples, logits.block_size"),
            **({DIGEST_ARRAY: ((DIGEST_BYTES,), "uint8", None, "format_version")}
               if spec.format_version >= DIGEST_SINCE else {}),
            **{name: (*spec.constant_layout(name), None, "teacher.num_classes, teacher.zero_shot.dim")
               for name in spec.constant_arrays},
            **({"files": ((spec.dataset["listing_bytes"],), "uint8", None, "dataset.listing_bytes"),
                "file_crc32c": ((spec.num_samples,), "uint32", (spec.block_size,),
                                "dataset.num_samples, logits.block_size")} if spec.streamed else {})}
        for name, (shape, dtype, chunks, fields) in expected.items():
            info = self.store.array_info(name)
            if info.codecs != type(self.store).codecs and math.prod(info.shape) > 0:  # HDF5 stores empty ones plain
                raise CorruptCacheError(f"{self.path}: array {name!r} is encoded {list(info.codecs)}, but kdcache "
                                        f"writes {list(type(self.store).codecs)} (with its checksum); the cache was "
                                        f"altered: rebuild it with `kdcache dump-teacher --overwrite`")
            found = (list(info.shape), str(info.dtype), None if chunks is None else tuple(info.chunks[:2]))
            if found != (list(shape), dtype, chunks):
                raise CorruptCacheError(f"{self.path}: array {name!r} is {found[0]} {found[1]}"
                                        + ("" if chunks is None else f" in chunks of {list(found[2])}")
                                        + f" but the metadata fields {fields} imply {list(shape)} {dtype}"
                                        + ("" if chunks is None else f" in chunks of {list(chunks)}")
                                        + "; the cache was altered: rebuild it with `kdcache dump-teacher --overwrite`")

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
        elif name == "file_crc32c":  # one chunk per block, written with view 0's
            for block in blocks or range(self.spec.num_blocks):
                rows = self.spec.block_range(block)
                yield (block,), None, block, (slice(rows.start, rows.stop),)
        elif name == "progress" and self.spec.format_version == 1 and info.chunks[0] == 1:  # format 1, per view
            for k in range(self.num_views):
                yield (k, 0), k, None, (k,)
        elif name == "progress":  # one chunk per block, holding every view
            for block in range(self.spec.num_blocks):
                yield (0, block), None, block, (slice(None), slice(block, block + 1))
        else:
            yield (0,) * len(info.shape), None, None, ()

    def missing_chunks(self, name: str, view: int | None, blocks: range | None = None) -> Iterator[Problem]:
        """A Problem for each chunk of the array (or one view of it, or its blocks) that does not exist."""
        for coords, k, block, _ in self._chunks(name, view, blocks):
            if not self.store.chunk_exists(name, coords):
                yield Problem(name, k, block, None if block is None else self.spec.block_range(block),
                              "the chunk is missing (deleted or never written); it is never read as zeros")

    def unreadable_chunks(self, name: str, view: int | None, blocks: range | None = None) -> Iterator[Problem]:
        """A Problem for each chunk of the array (or one view of it, or its blocks) that fails its checksum."""
        for _, k, block, selection in self._chunks(name, view, blocks):
            try:
                self.store.read(name, selection)
            except ChunkReadError as error:
                yield Problem(name, k, block, None if block is None else self.spec.block_range(block),
                              f"fails its checksum ({error.__cause__})")

    def close(self) -> None:
        """Stop the prefetch thread and close the store."""
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)
        self.store.close()
        if self._readers is not None:
            self._readers.release()

    def __enter__(self) -> TeacherCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
