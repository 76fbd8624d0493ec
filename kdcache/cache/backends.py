"""The store backends by format name, and choosing one for a location: to create a store, or to open one."""

from __future__ import annotations

from pathlib import Path

from kdcache.cache.hdf5_store import HDF5Store
from kdcache.cache.location import (
    Location,
    as_location,
    check_reachable,
    is_url,
    refuse_hdf5_url,
    store_exists,
    url_filesystem,
    url_path,
)
from kdcache.cache.store import Store
from kdcache.cache.zarr_store import ZarrStore
from kdcache.errors import KdcacheError
from kdcache.registry import Registry

BACKENDS: Registry[Store] = Registry("--format", sort=False)  # format name -> store class; the first is the default
BACKENDS.register(ZarrStore, ZarrStore.format_name)
BACKENDS.register(HDF5Store, HDF5Store.format_name)


def store_class(path: Location, format: str | None = None) -> type[Store]:
    """The backend for a location: the explicit format, else its suffix (.zarr or .h5), else Zarr.

    At a URL only Zarr: HDF5 there (by format or suffix) is a KdcacheError.
    """
    if format is not None:
        cls = BACKENDS.entry(format)
    else:
        suffix = url_path(path).suffix if is_url(path) else Path(path).suffix
        classes = [BACKENDS.entry(name) for name in BACKENDS.names()]
        cls = next((cls for cls in classes if suffix in cls.suffixes), ZarrStore)
    if is_url(path) and cls is not ZarrStore:
        raise refuse_hdf5_url(path)
    return cls


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
    if isinstance(location, str):
        store_class(location)  # an .h5 URL is refused by its suffix
        if not store_exists(location):
            raise KdcacheError(f"no cache at {location}: expected a Zarr (.zarr) store written by `kdcache "
                               f"dump-teacher`; check the URL or run dump-teacher first")
        fs, root = url_filesystem(location)
        if check_reachable(location, lambda: fs.isfile(root)):
            raise refuse_hdf5_url(location)  # one object, not a Zarr directory: HDF5 or something else
        return ZarrStore.open(location, read_only=read_only)
    if not location.exists():
        raise KdcacheError(f"no cache at {location}: expected a .zarr directory or an .h5 file written by "
                           f"`kdcache dump-teacher`; check the path or run dump-teacher first")
    cls = ZarrStore if location.is_dir() else HDF5Store
    return cls.open(location, read_only=read_only)
