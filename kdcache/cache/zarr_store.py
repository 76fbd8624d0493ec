"""Zarr v3 backend: a directory store, crc32c checksums on every chunk, metadata in the root's attributes.

Whole views, what training reads, take a direct path: each chunk file is read straight into its
rows of the result and its crc32c computed there, by two threads that each take every other chunk
(one reads while the other checksums). zarr reads each chunk into a buffer of its own, checksums
it, then copies it into the result, ten chunks at a time: a third of the speed of a raw numpy read
of the same bytes, where this path reaches about two thirds (0.63x in benchmarks/RESULTS.md).

A store at a URL (s3://, gs://, memory://, file://...) is a zarr FsspecStore; there every read goes
through zarr, and chunk_exists asks the store.
"""

from __future__ import annotations

import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import google_crc32c  # declared in pyproject: zarr 3.1.0-3.1.3 checksum with the crc32c package instead
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

# zarr.core is private ("should not be imported directly by 3rd-party code", says its __init__), but zarr 3.1 has
# no public function that runs a store's coroutine (Store.exists is async) on zarr's own event loop, as zarr runs
# them: chunk_exists needs one for a store at a URL. So this one private name stays, and pyproject pins zarr to the
# 3.1 series it was tested with. The direct read also leans on members of zarr's private metadata class
# (array.metadata.codecs, .encode_chunk_key): the same pin covers them, and tests/test_zarr_direct_read.py checks
# the direct read against zarr's own.
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from kdcache.cache.location import (
    Location,
    Place,
    check_reachable,
    storage_options,
    url_filesystem,
)
from kdcache.cache.store import ArrayInfo, NotACacheError, Selection, Store
from kdcache.errors import CorruptCacheError, KdcacheError

METADATA_KEY = "kdcache"
CODECS = (BytesCodec(endian="little"), Crc32cCodec())  # what kdcache writes, and what the direct read decodes
CHECKSUM_BYTES = 4
# a chunk that happens to equal the fill value must still exist on disk, so that a missing chunk file always
# means lost data
WRITE_EVERY_CHUNK = {"write_empty_chunks": True}
READ_THREADS = 2  # one reads a chunk while the other checksums one: more only contend for the GIL


class ZarrStore(Store):
    """A cache as a Zarr v3 directory (`.zarr`), local or at a URL."""

    format_name = "zarr"
    codecs = tuple(codec.to_dict()["name"] for codec in CODECS)
    suffixes = (".zarr",)
    remote = True

    def __init__(self, path: Place, group: zarr.Group, read_only: bool) -> None:
        super().__init__(path, read_only)
        self._group = group
        self._local = not self.location.is_url  # the direct chunk-file paths are for local stores only
        self._arrays: dict[str, zarr.Array] = {}
        self._readers: ThreadPoolExecutor | None = None

    @classmethod
    def holds(cls, location: Location) -> bool:
        """A directory (at a URL: a prefix of objects, not one object)."""
        if not location.is_url:
            return location.path.is_dir()
        fs, root = url_filesystem(location.url)
        return not check_reachable(location.url, lambda: fs.isfile(root))

    @classmethod
    def create(cls, path: Place) -> ZarrStore:
        """Create an empty Zarr v3 group at a path or URL."""
        return cls(path, zarr.open_group(_zarr_store(path, read_only=False), mode="w-", zarr_format=3),
                   read_only=False)

    @classmethod
    def open(cls, path: Place, read_only: bool = True) -> ZarrStore:
        """Open an existing Zarr v3 group at a path or URL."""
        store = _zarr_store(path, read_only)
        try:
            group = zarr.open_group(store, mode="r" if read_only else "r+", zarr_format=3)
        except FileNotFoundError as error:  # zarr's "no group found" too
            raise NotACacheError(path, _folder_without_group(path)) from error
        except OSError as error:
            raise KdcacheError(f"cannot read {path} ({type(error).__name__}: {error}); check that this process may "
                               f"read it (for a URL: the network and the credentials in the environment)") from error
        except Exception as error:  # zarr raises many kinds for a malformed zarr.json: all mean "unreadable"
            raise CorruptCacheError(f"{path}: its zarr.json is not a readable Zarr v3 group ({type(error).__name__}: "
                                    f"{error}); the cache was altered: delete it and dump it again (dump-teacher "
                                    f"--overwrite deletes only a store it can read)") from error
        return cls(path, group, read_only)

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            try:
                # write_empty_chunks is a setting of the open array, not of the stored one: a resumed writer needs it too
                self._arrays[name] = self._group[name].with_config(WRITE_EVERY_CHUNK)
            except Exception as error:  # as in open(): a missing or malformed array zarr.json
                raise CorruptCacheError(f"{self.path}: array {name!r} is missing or its zarr.json is malformed "
                                        f"({type(error).__name__}: {error}); the cache was altered: rebuild it with "
                                        f"`kdcache dump-teacher --overwrite`") from error
        return self._arrays[name]

    def _create_array(self, name: str, shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...],
                      fill_value: int | float) -> None:
        self._arrays[name] = self._group.create_array(
            name, shape=shape, chunks=chunks, dtype=dtype, serializer=BytesCodec(), compressors=[Crc32cCodec()],
            fill_value=fill_value, config=WRITE_EVERY_CHUNK)

    def _write(self, name: str, selection: Selection, values: np.ndarray) -> None:
        self._array(name)[selection] = values

    def _read(self, name: str, selection: Selection, out: np.ndarray | None) -> np.ndarray:
        array = self._array(name)
        if self._local and _direct_readable(array, selection):
            return self._read_slab(array, selection[0], out)
        values = np.asarray(array[selection])
        if out is None:
            return values
        out[...] = values
        return out

    def _read_slab(self, array: zarr.Array, index: int, out: np.ndarray | None) -> np.ndarray:
        """array[index] of an array chunked (1, rows, *rest): every chunk read straight into its rows (of `out`)."""
        index = range(array.shape[0])[index]  # a negative index as numpy reads it; out of range raises
        if out is None:
            out = np.empty(array.shape[1:], array.dtype)
        elif out.shape != array.shape[1:]:
            raise ValueError(f"a buffer of shape {list(array.shape[1:])} was expected, found {list(out.shape)}")
        chunk_bytes = array.chunks[1] * math.prod(array.shape[2:]) * out.itemsize
        data = out.reshape(-1).view(np.uint8)
        folder = f"{self.path / array.path}/"
        chunks = [(folder + array.metadata.encode_chunk_key((index, block) + (0,) * (out.ndim - 1)),
                   data[block * chunk_bytes:(block + 1) * chunk_bytes])
                  for block in range(math.ceil(array.shape[1] / array.chunks[1]))]
        fill = np.asarray(array.fill_value, out.dtype).reshape(1).view(np.uint8)
        if self._readers is None:
            self._readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="kdcache-zarr-read")
        # one task per thread: a task per chunk spends more time handing the GIL around than reading
        reads = [self._readers.submit(_read_chunks, chunks[first::READ_THREADS], chunk_bytes, fill)
                 for first in range(READ_THREADS)]
        for read in reads:
            read.result()
        return out

    def _set_metadata(self, metadata: dict[str, Any]) -> None:
        self._group.attrs[METADATA_KEY] = metadata

    def metadata(self) -> dict[str, Any]:
        """The kdcache metadata document from the root group's attributes."""
        return dict(self._group.attrs.get(METADATA_KEY, {}))

    def array_names(self) -> list[str]:
        """Names of the arrays in the root group."""
        return sorted(self._group.array_keys())

    def array_info(self, name: str) -> ArrayInfo:
        """Shape, dtype and chunk shape of one array."""
        array = self._array(name)
        codecs = tuple(codec.to_dict()["name"] for codec in array.metadata.codecs)
        return ArrayInfo(tuple(array.shape), np.dtype(array.dtype), tuple(array.chunks), codecs)

    def chunk_exists(self, name: str, chunk_coords: tuple[int, ...]) -> bool:
        """Whether the chunk's object exists in the store."""
        array = self._array(name)
        key = f"{array.path}/{array.metadata.encode_chunk_key(chunk_coords)}"
        if not self._local:  # the object store's own answer, through the filesystem zarr writes with
            return bool(sync(self._group.store.exists(key)))
        # the file itself: zarr's async exists() costs a round trip to its event loop, 0.1 ms a chunk
        return (self.path / key).is_file()

    def close(self) -> None:
        """Zarr keeps no files open between calls; stop the read threads."""
        self._arrays.clear()
        if self._readers is not None:
            self._readers.shutdown()
            self._readers = None


def _folder_without_group(path: Place) -> str:
    """What a folder without zarr.json is, in words: a kdcache run folder (train-teacher's, distill's) is named."""
    location = Location.of(path)
    if not location.is_url and (location.path / "model.pt").is_file():
        return "a kdcache run folder (model.pt holds a model's weights: pass it as --checkpoint)"
    return "a folder without zarr.json"


def _zarr_store(path: Place, read_only: bool) -> LocalStore | FsspecStore:
    """zarr's store for a location: a LocalStore for a path, an FsspecStore (async, as zarr needs) for a URL."""
    location = Location.of(path)
    if not location.is_url:
        return LocalStore(location.path, read_only=read_only)
    url_filesystem(location.url)  # a missing package or unknown scheme, as a KdcacheError
    # from_url makes an async filesystem, wrapping a sync one (memory, file) in fsspec's AsyncFileSystemWrapper
    return FsspecStore.from_url(location.url, storage_options=storage_options(location.url), read_only=read_only)


def _direct_readable(array: zarr.Array, selection: Selection) -> bool:
    """Whether array[selection] is one index of an array chunked (1, rows, *rest) in kdcache's codecs."""
    # a bool is an int to Python, but zarr refuses it as an index: it goes to zarr, to be refused there too
    if not (len(selection) == 1 and isinstance(selection[0], (int, np.integer)) and not isinstance(selection[0], bool)
            and array.ndim >= 2 and array.size > 0 and tuple(array.metadata.codecs) == CODECS
            and array.dtype.isnative and sys.byteorder == "little"):
        return False
    try:  # public API: zarr documents Array.chunks as raising NotImplementedError for a grid that is not regular
        chunks = array.chunks
    except NotImplementedError:
        return False
    return chunks[0] == 1 and tuple(chunks[2:]) == tuple(array.shape[2:])


def _read_chunks(chunks: list[tuple[str, np.ndarray]], chunk_bytes: int, fill: np.ndarray) -> None:
    """Read each (chunk file, its rows as bytes) pair."""
    for path, rows in chunks:
        _read_chunk(path, rows, chunk_bytes, fill)


def _read_chunk(path: str, rows: np.ndarray, chunk_bytes: int, fill: np.ndarray) -> None:
    """Read one chunk file into `rows` (bytes) and check its crc32c; a missing file is fill, as zarr reads it."""
    try:
        file = open(path, "rb", buffering=0)
    except FileNotFoundError:
        rows.reshape(-1, fill.size)[:] = fill
        return
    with file:
        size = os.fstat(file.fileno()).st_size
        if size != chunk_bytes + CHECKSUM_BYTES:
            raise ValueError(f"chunk {path} holds {size} bytes, expected {chunk_bytes + CHECKSUM_BYTES}")
        # a last chunk is stored whole, padded past the array's end
        target = rows if rows.size == chunk_bytes else np.empty(chunk_bytes, np.uint8)
        if file.readinto(target) != chunk_bytes:
            raise ValueError(f"chunk {path} was cut short while being read")
        stored = file.read(CHECKSUM_BYTES)
    if google_crc32c.value(target) != int.from_bytes(stored, "little"):
        raise ValueError(f"Stored and computed checksum do not match in chunk {path}")
    if target is not rows:
        rows[:] = target[:rows.size]
