"""HDF5 backend: one `.h5` file, fletcher32 checksums on every chunk, metadata as one JSON attribute.

HDF5 keeps a file valid through a kill only in SWMR mode: a file killed while open for writing in any other mode
can no longer be opened at all. So the real file is never open for writing outside SWMR mode. A new file is built
(arrays, then the metadata) under a temporary name beside it and renamed into place whole, as Zarr writes its
metadata last: a kill before the rename leaves no file at the path, and the rerun starts anew. The file is then
only ever opened for writing as a SWMR writer, whose metadata updates (finish's) are in-place changes of the
attribute. HDF5 refuses to reopen a killed SWMR writer's file for writing (its flags stay set), so `open` for
writing rebuilds such a file by copying it, which keeps everything that was written.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from kdcache.cache.location import Location, Place
from kdcache.cache.store import ArrayInfo, NotACacheError, Selection, Store
from kdcache.errors import CorruptCacheError

METADATA_KEY = "kdcache"
FREE_SPACE_MARGIN = 4 * 2**20  # bytes left free beyond a write's own: chunk index and metadata updates
log = logging.getLogger(__name__)


class HDF5Store(Store):
    """A cache as one HDF5 file (`.h5`)."""

    format_name = "hdf5"
    codecs = ("fletcher32",)
    suffixes = (".h5", ".hdf5")
    remote = False

    def __init__(self, path: Path, file: h5py.File, read_only: bool, building: Path | None = None) -> None:
        super().__init__(path, read_only)
        self._file = file
        self._building = building  # the temporary file a new store is built in, until it is renamed to path

    @classmethod
    def holds(cls, location: Location) -> bool:
        """Anything local but a directory: whether it is an HDF5 file at all, `open` checks by its signature."""
        return not location.is_url and not location.path.is_dir()

    @classmethod
    def create(cls, place: Place) -> HDF5Store:
        """Start an empty HDF5 file in the latest format (needed for SWMR), under a temporary name beside path: it
        takes path when its metadata is set or it is closed. Temporary files of earlier killed creations go."""
        path = Location.of(place).path
        if path.exists():
            raise FileExistsError(errno.EEXIST, f"{path} exists")
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # the caller holds the writer lock: none is in use
            stale.unlink(missing_ok=True)
        building = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        return cls(path, h5py.File(building, "w", libver="latest"), read_only=False, building=building)

    @classmethod
    def open(cls, place: Place, read_only: bool = True) -> HDF5Store:
        """Open an existing file; for writing, rebuild it first if a writer died with it open."""
        path = Location.of(place).path
        if not h5py.is_hdf5(path):  # reads the signature only
            raise NotACacheError(path, "a plain file")
        try:
            if read_only:
                # SWMR reading also opens a file whose writer was killed, and never writes to it; HDF5's own file
                # lock is off for readers, whose exclusion kdcache's ReadersLock does (with it, a reader made a
                # writer that reopens the file at finish() fail with "unable to lock file")
                return cls(path, h5py.File(path, "r", libver="latest", swmr=True, locking=False), read_only=True)
            return cls(path, _swmr_writer(path), read_only=False)
        except (OSError, RuntimeError) as error:  # h5py raises either for a damaged superblock
            if not read_only and "already open for write" in str(error):
                _rebuild_after_crash(path)
                return cls(path, _swmr_writer(path), read_only=False)
            raise NotACacheError(path, f"an HDF5 file that HDF5 cannot open ({error})") from error

    def _dataset(self, name: str) -> h5py.Dataset:
        if name not in self._file:
            raise CorruptCacheError(f"{self.path}: array {name!r} is missing")
        return self._file[name]

    def _create_array(self, name: str, shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...],
                      fill_value: int | float) -> None:
        if self._building is None:  # a SWMR writer cannot add objects: every array is made while the file is built
            raise ValueError(f"{self.path}: HDF5 arrays are created before the store's metadata is set, not after")
        if 0 in shape:  # e.g. the parameters of a policy that has none: nothing to chunk or checksum
            self._file.create_dataset(name, shape=shape, dtype=dtype)
            return
        self._file.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, fletcher32=True,
                                  fillvalue=fill_value)

    def _write(self, name: str, selection: Selection, values: np.ndarray) -> None:
        # HDF5 reports a full disk only as an exception ignored when its objects are freed: the write would
        # "succeed", its block be marked done, and the file be lost. So the room is checked before each write.
        free = shutil.disk_usage(self.path.parent).free
        if free < values.nbytes + FREE_SPACE_MARGIN:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {free} bytes free on {self.path.parent}, "
                                        f"{values.nbytes} to write and {FREE_SPACE_MARGIN} kept for HDF5's own records")
        self._dataset(name)[selection] = values

    def _read(self, name: str, selection: Selection, out: np.ndarray | None) -> np.ndarray:
        if out is None:
            return self._dataset(name)[selection or ()]
        self._dataset(name).read_direct(out, selection or None)
        return out

    def _set_metadata(self, metadata: dict[str, Any]) -> None:
        # modify() changes the attribute in place, which a SWMR writer may do (it may not add one)
        self._file.attrs.modify(METADATA_KEY, json.dumps(metadata))
        if self._building is not None:  # the metadata is written last: the file is whole, and takes its path
            self._publish()
            self._file = _swmr_writer(self.path)

    def _publish(self) -> None:
        """Close a file being built and put it in its place, whole; nothing for a file already there."""
        if self._building is not None:
            self._file.close()  # if this fails (a full disk), the partial file stays under its temporary name
            os.replace(self._building, self.path)
            self._building = None

    def metadata(self) -> dict[str, Any]:
        """The kdcache metadata document from the root attribute."""
        text = self._file.attrs.get(METADATA_KEY)
        if text is None:
            return {}
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise CorruptCacheError(f"{self.path}: the {METADATA_KEY!r} attribute is not valid JSON ({error})") from error

    def array_names(self) -> list[str]:
        """Names of the datasets at the file's root."""
        return sorted(k for k, v in self._file.items() if isinstance(v, h5py.Dataset))

    def array_info(self, name: str) -> ArrayInfo:
        """Shape, dtype and chunk shape of one dataset."""
        dataset = self._dataset(name)
        codecs = (dataset.compression,) * bool(dataset.compression) + ("fletcher32",) * dataset.fletcher32
        return ArrayInfo(tuple(dataset.shape), np.dtype(dataset.dtype), tuple(dataset.chunks or dataset.shape), codecs)

    def chunk_exists(self, name: str, chunk_coords: tuple[int, ...]) -> bool:
        """Whether HDF5 allocated storage for the chunk (it does so on first write)."""
        dataset = self._dataset(name)
        offset = tuple(c * s for c, s in zip(chunk_coords, dataset.chunks))
        return dataset.id.get_chunk_info_by_coord(offset).byte_offset is not None

    def flush(self) -> None:
        """Flush data and metadata to the file."""
        self._file.flush()

    def close(self) -> None:
        """Close the file (one still being built takes its path, without metadata if none was set)."""
        self._publish()
        if self._file.id.valid:
            self._file.close()


def _swmr_writer(path: Path) -> h5py.File:
    """The file opened for writing straight in SWMR mode: no instant in which a kill leaves it unopenable."""
    access = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    access.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
    return h5py.File(h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDWR | h5py.h5f.ACC_SWMR_WRITE, fapl=access))


def _rebuild_after_crash(path: Path) -> None:
    """Copy a file left open by a killed SWMR writer into a fresh file and put it in its place."""
    log.warning("%s was left open by a writer that stopped; rebuilding it (keeps everything written)", path)
    partial = path.with_name(path.name + ".rebuild")
    with h5py.File(path, "r", libver="latest", swmr=True) as source, \
            h5py.File(partial, "w", libver="latest") as target:
        for name in source:
            source.copy(source[name], target, name)
        for key, value in source.attrs.items():
            target.attrs[key] = value
    os.replace(partial, path)
