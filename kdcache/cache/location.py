"""Where a cache lives: a local path or a URL with a scheme, and the few things done to a location as a whole.

Every entry point here takes either form. A URL (`s3://bucket/cache.zarr`, `gs://...`, `memory://...`,
`file:///...`) is reached through fsspec (credentials from the environment, as s3fs and gcsfs read
them) and is always a Zarr store; file:// URLs too go through fsspec, not the local fast paths.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from kdcache.errors import KdcacheError

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

Location = str | os.PathLike  # a local path, or a URL with a scheme


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
    return url_path(location).name if isinstance(location, str) else location.name


def url_path(url: str) -> PurePosixPath:
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


def check_reachable(url: str, call: Any) -> Any:
    """call() on a remote store; a failure other than absence (credentials, network) as a KdcacheError."""
    try:
        return call()
    except FileNotFoundError:
        raise
    except OSError as error:
        raise KdcacheError(f"cannot reach {url} ({type(error).__name__}: {error}); check the URL, the network and "
                           f"the credentials in the environment (as fsspec's {_scheme(url)} backend reads them)") \
            from error


def refuse_hdf5_url(url: str) -> KdcacheError:
    return KdcacheError(f"{url}: HDF5 caches must be local: expected a local path for an HDF5 (.h5) cache, found the "
                        f"URL {url}; do: use Zarr (a .zarr URL, or --format zarr) for a cache at a URL")


def store_exists(location: Location) -> bool:
    """Whether anything (a store, or what is left of one) is at the location."""
    location = as_location(location)
    if isinstance(location, Path):
        return location.exists()
    fs, path = url_filesystem(location)
    fs.invalidate_cache(path)  # listings fsspec cached before a writer added or removed objects
    return bool(check_reachable(location, lambda: fs.exists(path)))


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
        found = check_reachable(location, lambda: fs.find(path, detail=True))
    except FileNotFoundError:
        return 0
    return sum(int(info.get("size") or 0) for info in found.values() if info.get("type", "file") == "file")


def remove_store(path: Location) -> None:
    """Delete a cache store (a Zarr directory or an HDF5 file, or every object under a URL)."""
    location = as_location(path)
    if isinstance(location, str):
        fs, root = url_filesystem(location)
        fs.invalidate_cache(root)
        if check_reachable(location, lambda: fs.exists(root)):
            check_reachable(location, lambda: fs.rm(root, recursive=True))
        fs.invalidate_cache(root)
        return
    if location.is_dir():
        shutil.rmtree(location)
    elif location.exists():
        location.unlink()
