"""Where a cache lives: a local path or a URL with a scheme, and the few things done to a location as a whole.

A `Location` is made once from what the user wrote (a `Place`); every entry point here takes either. A URL
(`s3://bucket/cache.zarr`, `gs://...`, `memory://...`, `file:///...`) is reached through fsspec (credentials from
the environment, as s3fs and gcsfs read them) and is always a Zarr store; file:// URLs too go through fsspec, not
the local fast paths.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from kdcache.errors import KdcacheError

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem


@dataclass(frozen=True)
class Location:
    """Where a cache lives, classified once from what the user wrote: a local `path`, or a `url` with a scheme.

    Made at the door (`Location.of`) and passed on, so no later hop asks again which of the two it is; `str()` is
    what the user wrote (a URL without its trailing slash), for messages.
    """

    path: Path | None = None
    url: str | None = None

    @classmethod
    def of(cls, place: Place) -> Location:
        """A Location as it is; a str with a scheme (`scheme://...`, file:// included) as a URL; anything else a path.

        Only a str can be a URL: pathlib collapses `s3://b` to `s3:/b`, so a URL must never pass through Path().
        """
        if isinstance(place, Location):
            return place
        if isinstance(place, str) and "://" in place:
            return cls(url=place.rstrip("/"))
        return cls(path=Path(place))

    @property
    def is_url(self) -> bool:
        """Whether the cache is reached through fsspec (a URL) rather than the local filesystem."""
        return self.url is not None

    @property
    def target(self) -> Path | str:
        """What a backend opens: the Path, or the URL's text."""
        return self.url if self.url is not None else self.path

    @property
    def name(self) -> str:
        """The last component of the path or URL (`cache.zarr`), for progress bars and short messages."""
        return url_path(self.url).name if self.url is not None else self.path.name

    @property
    def suffix(self) -> str:
        """The suffix of that last component (`.zarr`), which names a store's format."""
        return url_path(self.url).suffix if self.url is not None else self.path.suffix

    def sibling(self, name: str) -> Location:
        """The location named `name` beside this one (in the same folder, or under the same URL prefix)."""
        if self.url is None:
            return Location(path=self.path.with_name(name))
        return Location(url=f"{self.url.rsplit('/', 1)[0]}/{name}")

    def resolved(self) -> Location:
        """A path through its symlinks to the real one; a URL as it is."""
        return self if self.url is not None else Location(path=self.path.resolve())

    def __str__(self) -> str:
        return str(self.target)


Place = str | os.PathLike | Location  # a cache's place as given: a local path, a URL with a scheme, or a Location


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


def store_exists(place: Place) -> bool:
    """Whether anything (a store, or what is left of one) is at the location."""
    location = Location.of(place)
    if not location.is_url:
        return location.path.exists()
    fs, path = url_filesystem(location.url)
    fs.invalidate_cache(path)  # listings fsspec cached before a writer added or removed objects
    return bool(check_reachable(location.url, lambda: fs.exists(path)))


def store_bytes(place: Place) -> int:
    """Bytes of all the store's files (a Zarr directory's, an HDF5 file's) or objects; 0 when there is none."""
    location = Location.of(place)
    if not location.is_url:
        if location.path.is_dir():
            return sum(f.stat().st_size for f in location.path.rglob("*") if f.is_file())
        return location.path.stat().st_size if location.path.exists() else 0
    fs, path = url_filesystem(location.url)
    fs.invalidate_cache(path)
    try:
        found = check_reachable(location.url, lambda: fs.find(path, detail=True))
    except FileNotFoundError:
        return 0
    return sum(int(info.get("size") or 0) for info in found.values() if info.get("type", "file") == "file")


def remove_store(place: Place) -> None:
    """Delete a cache store (a Zarr directory or an HDF5 file, or every object under a URL)."""
    location = Location.of(place)
    if location.is_url:
        fs, root = url_filesystem(location.url)
        fs.invalidate_cache(root)
        if check_reachable(location.url, lambda: fs.exists(root)):
            check_reachable(location.url, lambda: fs.rm(root, recursive=True))
        fs.invalidate_cache(root)
        return
    if location.path.is_dir():
        shutil.rmtree(location.path)
    elif location.path.exists():
        location.path.unlink()
