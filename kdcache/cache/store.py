"""One small storage interface for caches: named chunked arrays plus one JSON metadata document.

Backends (Zarr, HDF5; `backends.py` registers them and chooses one through the registry) only fill in the abstract
methods; the read-only check and error wrapping live here once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from kdcache.cache.location import Location, Place
from kdcache.errors import CorruptCacheError, KdcacheError

Selection = tuple[int | slice, ...]


@dataclass(frozen=True)
class ArrayInfo:
    """Shape, dtype and chunk shape of one stored array."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    codecs: tuple[str, ...] = ()  # how each chunk is encoded, by name: a cache's must include its checksum


class NotACacheError(KdcacheError):
    """What is at a cache's path is no cache store at all (a plain file, a folder without zarr.json...)."""

    def __init__(self, path: Place, found: str) -> None:
        self.found = found  # what is there, in words: "a plain file"
        super().__init__(f"{path} is {found}, not a kdcache cache (a .zarr folder or an .h5 file); pass the path of a "
                         f"cache written by `kdcache dump-teacher`")


class ChunkReadError(CorruptCacheError):
    """Stored bytes that fail their checksum or cannot be decoded."""


class Store(ABC):
    """A cache on disk: chunked, checksummed arrays and a JSON metadata document."""

    format_name: ClassVar[str]
    codecs: ClassVar[tuple[str, ...]]  # the encoding kdcache writes every chunk with (ArrayInfo.codecs)
    suffixes: ClassVar[tuple[str, ...]]  # of a location that names this format; the first is the usual one
    remote: ClassVar[bool]  # whether a store of this format may live at a URL

    def __init__(self, path: Place, read_only: bool) -> None:
        self.location = Location.of(path)
        self.path: str | Path = self.location.target  # a Path, or the URL's text for a store at a URL
        self.read_only = read_only

    # -- writing: every public writer checks the read-only flag here, once -----------------
    def _check_writable(self) -> None:
        if self.read_only:
            raise KdcacheError(f"{self.path} is open read-only; reading a cache never changes it")

    def create_array(self, name: str, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...],
                     fill_value: int | float = 0) -> None:
        """Create a chunked, checksummed array."""
        self._check_writable()
        self._create_array(name, tuple(shape), np.dtype(dtype), tuple(chunks), fill_value)

    def write(self, name: str, selection: Selection, values: np.ndarray) -> None:
        """Write values into a region of an array."""
        self._check_writable()
        self._write(name, selection, values)

    def set_metadata(self, metadata: dict[str, Any]) -> None:
        """Replace the JSON metadata document."""
        self._check_writable()
        self._set_metadata(metadata)

    # -- reading ---------------------------------------------------------------------------
    def read(self, name: str, selection: Selection = (), out: np.ndarray | None = None) -> np.ndarray:
        """Read a region of an array (into `out` when given: a reused buffer spares fresh pages); a checksum
        failure raises ChunkReadError."""
        if out is not None and (out.dtype != (dtype := self.array_info(name).dtype) or not out.flags.c_contiguous):
            raise ValueError(f"read({name!r}): the buffer should be a contiguous {dtype} array, "
                             f"found {out.dtype}")  # HDF5 would convert silently
        try:
            return self._read(name, selection, out)
        except (ValueError, OSError, RuntimeError) as error:
            raise ChunkReadError(f"{self.path}: array {name!r} at {_describe(selection)} cannot be read "
                                 f"({error})") from error

    @abstractmethod
    def metadata(self) -> dict[str, Any]:
        """The JSON metadata document ({} when none was written)."""

    @abstractmethod
    def array_names(self) -> list[str]:
        """Names of the stored arrays."""

    @abstractmethod
    def array_info(self, name: str) -> ArrayInfo:
        """Shape, dtype and chunks of one array."""

    @abstractmethod
    def chunk_exists(self, name: str, chunk_coords: tuple[int, ...]) -> bool:
        """Whether the chunk at these chunk-grid coordinates was ever written."""

    def flush(self) -> None:
        """Make what was written so far durable."""

    @abstractmethod
    def close(self) -> None:
        """Release the underlying files."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- for the backends ------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def holds(cls, location: Location) -> bool:
        """Whether what exists at the location is laid out as this format's store (a directory, one file...)."""

    @classmethod
    @abstractmethod
    def create(cls, path: Place) -> Store:
        """Create an empty store at path (which must not exist)."""

    @classmethod
    @abstractmethod
    def open(cls, path: Place, read_only: bool = True) -> Store:
        """Open an existing store."""

    @abstractmethod
    def _create_array(self, name: str, shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...],
                      fill_value: int | float) -> None: ...

    @abstractmethod
    def _write(self, name: str, selection: Selection, values: np.ndarray) -> None: ...

    @abstractmethod
    def _read(self, name: str, selection: Selection, out: np.ndarray | None) -> np.ndarray: ...

    @abstractmethod
    def _set_metadata(self, metadata: dict[str, Any]) -> None: ...


def _describe(selection: Selection) -> str:
    if not selection:
        return "[:]"
    parts = [f"{s.start or 0}:{'' if s.stop is None else s.stop}" if isinstance(s, slice) else str(s)
             for s in selection]
    return "[" + ", ".join(parts) + "]"
