"""One small storage interface for caches: named chunked arrays plus one JSON metadata document.

Backends (Zarr, HDF5) only fill in the abstract methods; the read-only check, error wrapping and
format selection live here once.

A cache's location is a local path or a URL with a scheme (`s3://bucket/cache.zarr`, `gs://...`,
`memory://...`, `file:///...`): every entry point here takes either. A URL is reached through fsspec
(credentials from the environment, as s3fs and gcsfs read them) and is always a Zarr store; file://
URLs too go through fsspec, not the local fast paths.
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from kdcache.errors import CorruptCacheError, KdcacheError

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

Selection = tuple[int | slice, ...]
Location = str | os.PathLike  # a local path, or a URL with a scheme


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

    def __init__(self, path: Location, read_only: bool) -> None:
        self.path: str | Path = as_location(path)  # a Path, or the URL's text for a store at a URL
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
    def _read(self, name: str, selection: Selection, out: np.ndarray | None) -> np.ndarray: ...

    @abstractmethod
    def _set_metadata(self, metadata: dict[str, Any]) -> None: ...


def _describe(selection: Selection) -> str:
    if not selection:
        return "[:]"
    parts = [f"{s.start or 0}:{'' if s.stop is None else s.stop}" if isinstance(s, slice) else str(s)
             for s in selection]
    return "[" + ", ".join(parts) + "]"


def is_url(location: object) -> bool:
    """Whether a location is a URL with a scheme (`scheme://...`, file:// included) rather than a local path.

    Only a str can be a URL: pathlib collapses `s3://b` to `s3:/b`, so a URL must never pass through Path().
    """
    return isinstance(location, str) and "://" in location


def as_location(location: Location) -> str | Path:
    """A URL as its text (without a trailing slash), anything else as a Path."""
    return location.rstrip("/") if is_url(location) else Path(location)


def location_name(location: Location) -> str:
    """The last component of a path or URL (`cache.zarr`), for progress bars and short messages."""
    location = as_location(location)
    return _url_path(location).name if isinstance(location, str) else location.name


def _url_path(url: str) -> PurePosixPath:
    """The path part of a URL, to read its name and suffix."""
    return PurePosixPath(url.rsplit("::", 1)[-1].split("://", 1)[1].split("?", 1)[0].rstrip("/") or "/")


def url_filesystem(url: str, asynchronous: bool = False) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem and the path on it of a URL; a missing package or unknown scheme is a KdcacheError.

    Credentials are never passed: fsspec's backends read them from the environment.
    """
    return _fsspec_call(url, lambda: _url_to_fs(url, asynchronous))


def storage_options(url: str) -> dict[str, Any]:
    """Options kdcache passes to fsspec for a URL: local directories are created as files are written."""
    import fsspec.utils

    return {"auto_mkdir": True} if fsspec.utils.get_protocol(url) in ("file", "local") else {}


def _url_to_fs(url: str, asynchronous: bool) -> tuple[AbstractFileSystem, str]:
    import fsspec

    options = storage_options(url)
    if asynchronous:
        options["asynchronous"] = True
    return fsspec.url_to_fs(url, **options)


def _fsspec_call(url: str, call: Any) -> Any:
    """call(), with fsspec's errors for a scheme it cannot serve turned into KdcacheErrors."""
    try:
        return call()
    except ImportError as error:  # fsspec knows the scheme, but its package is not installed
        package = getattr(error.__cause__, "name", None) or getattr(error, "name", None)
        install = f"pip install {package.split('.')[0]}" if package else "install the package fsspec names"
        raise KdcacheError(f"{url}: a cache at a {_scheme(url)}:// URL needs a package that is not installed "
                           f"({error}); do: {install}") from error
    except ValueError as error:
        if "Protocol not known" not in str(error):
            raise
        raise KdcacheError(f"{url}: unknown URL scheme {_scheme(url)!r} (fsspec has no filesystem for it); expected "
                           f"a local path or a URL such as s3://bucket/cache.zarr, gs://bucket/cache.zarr or "
                           f"file:///abs/cache.zarr") from error


def _scheme(url: str) -> str:
    return url.split("://", 1)[0]


def _check_reachable(url: str, call: Any) -> Any:
    """call() on a remote store; a failure other than absence (credentials, network) as a KdcacheError."""
    try:
        return call()
    except FileNotFoundError:
        raise
    except OSError as error:
        raise KdcacheError(f"cannot reach {url} ({type(error).__name__}: {error}); check the URL, the network and "
                           f"the credentials in the environment (as fsspec's {_scheme(url)} backend reads them)") \
            from error


def _refuse_hdf5_url(url: str) -> KdcacheError:
    return KdcacheError(f"{url}: HDF5 caches must be local: expected a local path for an HDF5 (.h5) cache, found the "
                        f"URL {url}; do: use Zarr (a .zarr URL, or --format zarr) for a cache at a URL")


def backends() -> dict[str, type[Store]]:
    """Format name → store class."""
    from kdcache.cache.hdf5_store import HDF5Store
    from kdcache.cache.zarr_store import ZarrStore

    return {ZarrStore.format_name: ZarrStore, HDF5Store.format_name: HDF5Store}


def store_class(path: Location, format: str | None = None) -> type[Store]:
    """The backend for a location: the explicit format, else its suffix (.zarr or .h5), else Zarr.

    At a URL only Zarr: HDF5 there (by format or suffix) is a KdcacheError.
    """
    known = backends()
    if format is not None:
        if format not in known:
            raise KdcacheError(f"--format: unknown format {format!r}; known: {', '.join(known)}")
        cls = known[format]
    else:
        suffix = _url_path(path).suffix if is_url(path) else Path(path).suffix
        cls = next((cls for cls in known.values() if suffix in (cls.suffix, *getattr(cls, "other_suffixes", ()))),
                   known["zarr"])
    if is_url(path) and cls is not known["zarr"]:
        raise _refuse_hdf5_url(path)
    return cls


def store_exists(location: Location) -> bool:
    """Whether anything (a store, or what is left of one) is at the location."""
    location = as_location(location)
    if isinstance(location, Path):
        return location.exists()
    fs, path = url_filesystem(location)
    fs.invalidate_cache(path)  # listings fsspec cached before a writer added or removed objects
    return bool(_check_reachable(location, lambda: fs.exists(path)))


def store_bytes(location: Location) -> int:
    """Bytes of all the store's files (a Zarr directory's, an HDF5 file's) or objects; 0 when there is none."""
    location = as_location(location)
    if isinstance(location, Path):
        if location.is_dir():
            return sum(f.stat().st_size for f in location.rglob("*") if f.is_file())
        return location.stat().st_size if location.exists() else 0
    fs, path = url_filesystem(location)
    fs.invalidate_cache(path)
    try:
        found = _check_reachable(location, lambda: fs.find(path, detail=True))
    except FileNotFoundError:
        return 0
    return sum(int(info.get("size") or 0) for info in found.values() if info.get("type", "file") == "file")


def remove_store(path: Location) -> None:
    """Delete a cache store (a Zarr directory or an HDF5 file, or every object under a URL)."""
    location = as_location(path)
    if isinstance(location, str):
        fs, root = url_filesystem(location)
        fs.invalidate_cache(root)
        if _check_reachable(location, lambda: fs.exists(root)):
            _check_reachable(location, lambda: fs.rm(root, recursive=True))
        fs.invalidate_cache(root)
        return
    if location.is_dir():
        shutil.rmtree(location)
    elif location.exists():
        location.unlink()


def create_store(location: Location, format: str | None = None) -> Store:
    """Create an empty store (which must not exist): the backend from store_class, a local parent made first."""
    location = as_location(location)
    cls = store_class(location, format)
    if isinstance(location, Path):
        location.parent.mkdir(parents=True, exist_ok=True)
    return cls.create(location)


def open_store(path: Location, read_only: bool = True) -> Store:
    """Open an existing cache store, choosing the backend from what is on disk (at a URL: Zarr only)."""
    location = as_location(path)
    from kdcache.cache.hdf5_store import HDF5Store
    from kdcache.cache.zarr_store import ZarrStore

    if isinstance(location, str):
        store_class(location)  # an .h5 URL is refused by its suffix
        if not store_exists(location):
            raise KdcacheError(f"no cache at {location}: expected a Zarr (.zarr) store written by `kdcache "
                               f"dump-teacher`; check the URL or run dump-teacher first")
        fs, root = url_filesystem(location)
        if _check_reachable(location, lambda: fs.isfile(root)):
            raise _refuse_hdf5_url(location)  # one object, not a Zarr directory: HDF5 or something else
        return ZarrStore.open(location, read_only=read_only)
    if not location.exists():
        raise KdcacheError(f"no cache at {location}: expected a .zarr directory or an .h5 file written by "
                           f"`kdcache dump-teacher`; check the path or run dump-teacher first")
    cls = ZarrStore if location.is_dir() else HDF5Store
    return cls.open(location, read_only=read_only)
