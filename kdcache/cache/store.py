"""One small storage interface for caches: named chunked arrays plus one JSON metadata document.

Backends (Zarr, HDF5) only fill in the abstract methods; the read-only check, error wrapping and
format selection live here once.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from kdcache.errors import CorruptCacheError, KdcacheError

Selection = tuple[int | slice, ...]


@dataclass(frozen=True)
class ArrayInfo:
    """Shape, dtype and chunk shape of one stored array."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]


class ChunkReadError(CorruptCacheError):
    """Stored bytes that fail their checksum or cannot be decoded."""


class Store(ABC):
    """A cache on disk: chunked, checksummed arrays and a JSON metadata document."""

    format_name: ClassVar[str]
    suffix: ClassVar[str]

    def __init__(self, path: Path, read_only: bool) -> None:
        self.path = Path(path)
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
    def read(self, name: str, selection: Selection = ()) -> np.ndarray:
        """Read a region of an array; a checksum failure raises ChunkReadError."""
        try:
            return self._read(name, selection)
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
    def create(cls, path: Path) -> Store:
        """Create an empty store at path (which must not exist)."""

    @classmethod
    @abstractmethod
    def open(cls, path: Path, read_only: bool = True) -> Store:
        """Open an existing store."""

    @abstractmethod
    def _create_array(self, name: str, shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...],
                      fill_value: int | float) -> None: ...

    @abstractmethod
    def _write(self, name: str, selection: Selection, values: np.ndarray) -> None: ...

    @abstractmethod
    def _read(self, name: str, selection: Selection) -> np.ndarray: ...

    @abstractmethod
    def _set_metadata(self, metadata: dict[str, Any]) -> None: ...


def _describe(selection: Selection) -> str:
    if not selection:
        return "[:]"
    parts = [f"{s.start or 0}:{'' if s.stop is None else s.stop}" if isinstance(s, slice) else str(s)
             for s in selection]
    return "[" + ", ".join(parts) + "]"


def backends() -> dict[str, type[Store]]:
    """Format name → store class."""
    from kdcache.cache.hdf5_store import HDF5Store
    from kdcache.cache.zarr_store import ZarrStore

    return {ZarrStore.format_name: ZarrStore, HDF5Store.format_name: HDF5Store}


def store_class(path: Path, format: str | None = None) -> type[Store]:
    """The backend for a path: the explicit format, else the path's suffix (.zarr or .h5), else Zarr."""
    known = backends()
    if format is not None:
        if format not in known:
            raise KdcacheError(f"--format: unknown format {format!r}; known: {', '.join(known)}")
        return known[format]
    for cls in known.values():
        if Path(path).suffix in (cls.suffix, *getattr(cls, "other_suffixes", ())):
            return cls
    return known["zarr"]


def remove_store(path: Path) -> None:
    """Delete a cache store (a Zarr directory or an HDF5 file)."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def open_store(path: str | Path, read_only: bool = True) -> Store:
    """Open an existing cache store, choosing the backend from what is on disk."""
    path = Path(path)
    if not path.exists():
        raise KdcacheError(f"no cache at {path}: expected a .zarr directory or an .h5 file written by "
                           f"`kdcache dump-teacher`; check the path or run dump-teacher first")
    from kdcache.cache.hdf5_store import HDF5Store
    from kdcache.cache.zarr_store import ZarrStore

    cls = ZarrStore if path.is_dir() else HDF5Store
    return cls.open(path, read_only=read_only)
