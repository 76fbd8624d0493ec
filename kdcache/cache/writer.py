"""The cache writer: creates or resumes a cache, writes (view, block) units, marks them done last."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading

import numpy as np

from kdcache.cache.backends import create_store, open_store, store_class
from kdcache.cache.layout import (ARRAYS, DIGEST_ARRAY, DIGEST_BYTES, FORMAT, PENDING, WRITTEN_VERSION, CacheSpec,
                                  all_finite, differences, generic_array, metadata_digest, new_cache_id,
                                  require_metadata_digest)
from kdcache.cache.location import Location, Place, remove_store, store_exists
from kdcache.cache.lock import ReadersLock, WriterLock, disk_full_hint
from kdcache.cache.store import NotACacheError, Store
from kdcache.errors import KdcacheError

log = logging.getLogger(__name__)


class CacheWriter:
    """Writes one cache; the unit of work is a (view, block) pair, marked in `progress` only once written."""

    def __init__(self, store: Store, spec: CacheSpec, locks: list[WriterLock | ReadersLock]) -> None:
        self.store, self.spec, self._locks = store, spec, locks

    @classmethod
    def open(cls, place: Place, spec: CacheSpec, labels: np.ndarray, aug_params: np.ndarray | None,
             format: str | None = None, overwrite: bool = False, listing: bytes = b"",
             constants: dict[str, np.ndarray] | None = None) -> CacheWriter:
        """Take the writer lock, then create the cache, or resume it when it exists and was made with the same spec.

        aug_params: every view's parameters, written now; None for a streamed split, whose blocks bring their own
        (with `listing`, its files). constants: the values of the spec's constant arrays (a zero-shot teacher's
        text embedding), written when the cache is created.
        """
        path = Location.of(place).resolved()  # through a symlink: the real store, under the same lock
        store_class(path, format)  # an HDF5 cache at a URL is refused before any lock is taken
        _check_constants(spec, constants or {})
        locks = [WriterLock(path).acquire()]
        try:
            if store_exists(path) and (not _started_by_kdcache(path) or overwrite):  # a folder of the user's: refused
                locks.append(ReadersLock(path).exclude())  # no reader has it open, and none opens it until done
                log.warning("%s: %s; starting it anew", path, "--overwrite" if overwrite else
                            "its creation was interrupted before its metadata was written")
                remove_store(path)
            if store_exists(path):
                return cls(cls._resumable(path, spec), spec, locks)
            return cls(cls._created(path, format, spec, labels, aug_params, listing, constants or {}), spec, locks)
        except BaseException:
            for lock in reversed(locks):
                lock.release()
            raise

    @classmethod
    def join(cls, path: Place) -> CacheWriter:
        """Open a cache another process created and locked, to write blocks of its own (a rank of a sharded dump)."""
        store = open_store(path, read_only=False)
        return cls(store, CacheSpec.from_metadata(store.metadata(), str(path)), locks=[])

    @staticmethod
    def _resumable(path: Location, spec: CacheSpec) -> Store:
        """The existing store at path, open for writing, if it was made with `spec` in the format written now."""
        store = open_store(path, read_only=False)
        try:
            stored = CacheSpec.from_metadata(store.metadata(), str(path))
            if stored.format_version == WRITTEN_VERSION:
                require_metadata_digest(store.metadata(), store.read(DIGEST_ARRAY), str(path))
            else:
                raise KdcacheError(f"{path} is a format-{stored.format_version} cache started by an older kdcache; this "
                                   f"kdcache writes format {WRITTEN_VERSION}: finish it with the kdcache that started "
                                   f"it, or start over with --overwrite")
            differing = differences(stored, spec)
            if differing:
                raise KdcacheError(f"{path} exists and was made with other arguments (" + "; ".join(differing)
                                   + "): rerun with the same arguments to resume, another --out, or --overwrite")
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def _created(cls, path: Location, format: str | None, spec: CacheSpec, labels: np.ndarray,
                 aug_params: np.ndarray | None, listing: bytes, constants: dict[str, np.ndarray]) -> Store:
        """A new store with every array and the metadata; a disk that cannot hold even that is one line."""
        store = None
        try:
            store = create_store(path, format)
            cls._create_arrays(store, spec, labels, aug_params, listing, constants)
        except BaseException as error:
            if store is not None:
                with contextlib.suppress(Exception):  # closing flushes, which a full disk refuses too
                    store.close()
            if not isinstance(error, (OSError, RuntimeError)):  # h5py and zarr report a failed write either way
                raise
            raise KdcacheError(f"could not create the cache {path} ({error}); {disk_full_hint(error)}, then rerun the same "
                               f"command: the unfinished store is recognised and started anew") from error
        return store

    @staticmethod
    def _create_arrays(store: Store, spec: CacheSpec, labels: np.ndarray, aug_params: np.ndarray | None,
                       listing: bytes, constants: dict[str, np.ndarray]) -> None:
        block = spec.block_size
        store.create_array("labels", spec.labels_shape, "int64", spec.labels_shape)
        store.create_array("aug", (spec.num_views, spec.num_samples, spec.num_params), spec.aug_dtype,
                           (1, block, spec.num_params))
        if spec.streamed:
            store.create_array("files", (len(listing),), "uint8", (len(listing),))
            store.write("files", (), np.frombuffer(listing, np.uint8))
            store.create_array("file_crc32c", (spec.num_samples,), "uint32", (block,))
        for name in spec.data_arrays:
            shape, dtype = spec.array_layout(name)
            store.create_array(name, shape, dtype, (1, block, *shape[2:]))
        # one chunk per block (all views): a block belongs to one rank of a sharded dump, so does its chunk
        store.create_array("progress", (spec.num_views, spec.num_blocks), "int64", (spec.num_views, 1),
                           fill_value=PENDING)
        store.write("labels", (), labels.astype(np.int64))
        if not spec.streamed:
            store.write("aug", (), aug_params.astype(np.int32))
        store.write("progress", (), np.full((spec.num_views, spec.num_blocks), PENDING, np.int64))
        for name in spec.constant_arrays:  # one checksummed chunk each
            shape, dtype = spec.constant_layout(name)
            store.create_array(name, shape, dtype, shape)
            store.write(name, (), constants[name].astype(dtype))
        metadata = new_cache_id(spec.to_metadata())  # the store's id, here only: a resume keeps it
        store.create_array(DIGEST_ARRAY, (DIGEST_BYTES,), "uint8", (DIGEST_BYTES,))
        store.write(DIGEST_ARRAY, (), metadata_digest(metadata))
        # the metadata goes last: a store without it is one whose creation never finished
        store.set_metadata(metadata)
        store.flush()

    def progress(self) -> np.ndarray:
        """[views, blocks]: PENDING or the block's count of correct teacher predictions."""
        return self.store.read("progress")

    def pending(self, blocks: range | None = None) -> list[tuple[int, int]]:
        """The (view, block) pairs still to write, in order; only those of `blocks` when given (a rank's share)."""
        pairs = [tuple(map(int, vb)) for vb in np.argwhere(self.progress() == PENDING)]
        return pairs if blocks is None else [(view, block) for view, block in pairs if block in blocks]

    def aug_params(self) -> np.ndarray:
        """[views, samples, params] as stored (a resumed run replays exactly these)."""
        return self.store.read("aug")

    def write_block(self, view: int, block: int, arrays: dict[str, np.ndarray], correct: int) -> None:
        """Write one block of the data arrays (`logits`, or the three top-k ones), then mark it done; a failure
        leaves it pending. A streamed split's block also brings its `aug` rows, and `file_crc32c` with view 0."""
        rows = self.spec.block_range(block)
        stored, bad, bad_arrays = {}, np.zeros(len(rows), bool), []
        extra = {name: arrays[name] for name in ("aug", "file_crc32c") if self.spec.streamed and name in arrays}
        if self.spec.streamed and ("aug" not in extra or ("file_crc32c" in extra) != (view == 0)):
            raise ValueError(f"block {block} of view {view} of a streamed split needs its aug rows, and "
                             f"file_crc32c with view 0 only; got {sorted(arrays)}")
        for name in self.spec.data_arrays:
            shape, dtype = self.spec.array_layout(name)
            if name not in arrays or arrays[name].shape != (len(rows), *shape[2:]):
                raise ValueError(f"block {block} of view {view} needs {name} of shape {(len(rows), *shape[2:])}, got "
                                 f"{getattr(arrays.get(name), 'shape', None)}")
            stored[name] = arrays[name].astype(dtype, copy=False)  # checked after the cast: fp16 overflows to Inf
            # all_finite answers for the whole block ten times faster than isfinite (float16); which samples
            # are bad is worked out only when some are
            if stored[name].dtype.kind == "f" and not all_finite(stored[name]):
                bad |= ~np.isfinite(stored[name]).reshape(len(rows), -1).all(axis=1)
                bad_arrays.append(name)
        if bad.any():
            what = "logits" if set(bad_arrays) <= set(self.spec.logit_arrays) else f"outputs ({', '.join(bad_arrays)})"
            raise KdcacheError(f"teacher {what} are NaN or Inf for samples {_indices(np.flatnonzero(bad) + rows.start)} "
                               f"of view {view}; nothing of block {block} was marked done. Check the checkpoint "
                               f"and the data (run with --dtype float32 / without bf16 to rule out overflow)")
        try:
            for name, values in stored.items():
                self.store.write(name, (view, slice(rows.start, rows.stop)), values)
            if "aug" in extra:
                self.store.write("aug", (view, slice(rows.start, rows.stop)), extra["aug"].astype(np.float32))
            if "file_crc32c" in extra:
                self.store.write("file_crc32c", (slice(rows.start, rows.stop),), extra["file_crc32c"].astype(np.uint32))
            self.store.flush()
            self.store.write("progress", (view, block), np.int64(correct))
            self.store.flush()
        except OSError as error:
            raise KdcacheError(f"could not write view {view}, block {block} (samples {rows.start}-{rows.stop - 1}) "
                               f"of {self.store.path}: {error}; {disk_full_hint(error)}, then rerun the same command to resume "
                               f"(finished blocks are kept)") from error

    def redo(self, pairs: list[tuple[int, int]]) -> None:
        """Mark finished (view, block) pairs unfinished again, so that a rerun writes them anew."""
        for view, block in pairs:
            self.store.write("progress", (view, block), np.int64(PENDING))
        self.store.flush()

    def view_accuracy(self) -> list[float]:
        """Teacher top-1 accuracy of region 0 per view, from the blocks written so far."""
        return [float(row[row != PENDING].sum()) / self.spec.scored(view)
                for view, row in enumerate(self.progress())]

    def finish(self) -> list[float]:
        """Record per-view teacher accuracy in the metadata when every block is written; returns it."""
        progress = self.progress()
        accuracy = self.view_accuracy()
        if (progress != PENDING).all():
            metadata = self.store.metadata()
            metadata["view_accuracy"] = accuracy
            self.store.set_metadata(metadata)
            self.store.flush()
        return accuracy

    def close(self) -> None:
        """Close the store and release the writer lock."""
        try:
            self.store.close()
        finally:
            for lock in reversed(self._locks):
                lock.release()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class BackgroundWriter:
    """Writes blocks in a thread through a bounded queue, so the device never waits for the disk."""

    def __init__(self, writer: CacheWriter, max_pending: int = 4) -> None:
        self._writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kdcache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._writer.write_block(*item)
                except BaseException as error:  # handed to the main thread at its next call
                    self._error = error

    def submit(self, view: int, block: int, arrays: dict[str, np.ndarray], correct: int) -> None:
        """Queue one block (waits while the queue is full); re-raises an earlier write's error."""
        self._raise_pending()
        self._queue.put((view, block, arrays, correct))

    def close(self, raise_errors: bool = True) -> None:
        """Wait for queued blocks to be written; re-raise a write error unless another error is on its way."""
        self._queue.put(None)
        self._thread.join()
        if raise_errors:
            self._raise_pending()

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error


def _check_constants(spec: CacheSpec, constants: dict[str, np.ndarray]) -> None:
    """Refuse constant arrays other than the spec's, or of another shape, or not finite."""
    if sorted(constants) != sorted(spec.constant_arrays):
        raise ValueError(f"the cache's constant arrays are {list(spec.constant_arrays)}; got {sorted(constants)}")
    for name, values in constants.items():
        shape, dtype = spec.constant_layout(name)
        if values.shape != shape:
            raise ValueError(f"{name} should be of shape {shape}, got {values.shape}")
        if not all_finite(values.astype(dtype)):
            raise KdcacheError(f"the teacher's {name} holds NaN or Inf values; nothing was written. Check the "
                               f"checkpoint")


def _indices(values: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def _started_by_kdcache(path: Location) -> bool:
    """Whether the store at path holds kdcache's metadata (True), or is one whose creation kdcache started and
    that stopped before the metadata, written last, was (False); anything else is refused, never deleted."""
    if not path.is_url and path.path.is_dir() and not any(path.path.iterdir()):
        return False  # a Zarr store killed before its zarr.json: an empty folder, nothing to lose
    try:
        store = open_store(path, read_only=True)
    except NotACacheError as error:
        raise _not_a_cache(path, error.found) from error
    with store:
        metadata, arrays = store.metadata(), set(store.array_names())
    if metadata.get("format") == FORMAT:
        return True
    if not metadata and {generic_array(name) for name in arrays} <= set(ARRAYS):
        return False
    raise _not_a_cache(path, f"its metadata names no kdcache format and it holds {sorted(arrays)}")


def _not_a_cache(path: Location, why: str) -> KdcacheError:
    return KdcacheError(f"{path} exists and is not a kdcache cache ({why}); kdcache neither resumes nor deletes "
                        f"it, not even with --overwrite: choose another --out, or move it away yourself")
