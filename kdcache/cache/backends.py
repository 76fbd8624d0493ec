"""The store backends by format name, and choosing one through that registry: to create a store, or to open one.

Each backend says what it claims: the suffixes of a location that names its format (`suffixes`), whether it may
live at a URL (`remote`), and what an existing store of its format looks like (`holds`). Registration order
breaks ties; the first registered is the default.
"""

from __future__ import annotations

from kdcache.cache.hdf5_store import HDF5Store
from kdcache.cache.location import Location, Place, refuse_hdf5_url, store_exists
from kdcache.cache.store import Store
from kdcache.cache.zarr_store import ZarrStore
from kdcache.errors import KdcacheError
from kdcache.registry import Registry

BACKENDS: Registry[Store] = Registry("--format", sort=False)  # format name -> store class; the first is the default
BACKENDS.register(ZarrStore, ZarrStore.format_name)
BACKENDS.register(HDF5Store, HDF5Store.format_name)


def backends() -> list[type[Store]]:
    """The registered store classes, in registration order (the default first)."""
    return [BACKENDS.entry(name) for name in BACKENDS.names()]


def store_class(place: Place, format: str | None = None) -> type[Store]:
    """The backend for a location: the explicit format, else the first whose suffixes claim the location's, else the
    default (Zarr). At a URL only a remote one: HDF5 there (by format or suffix) is a KdcacheError."""
    location = Location.of(place)
    if format is not None:
        cls = BACKENDS.entry(format)
    else:
        classes = backends()
        cls = next((cls for cls in classes if location.suffix in cls.suffixes), classes[0])
    if location.is_url and not cls.remote:
        raise refuse_hdf5_url(str(location))
    return cls


def create_store(place: Place, format: str | None = None) -> Store:
    """Create an empty store (which must not exist): the backend from store_class, a local parent made first."""
    location = Location.of(place)
    cls = store_class(location, format)
    if not location.is_url:
        location.path.parent.mkdir(parents=True, exist_ok=True)
    return cls.create(location)


def open_store(place: Place, read_only: bool = True) -> Store:
    """Open an existing cache store: the backend that holds what is there, one whose suffix the location has first
    (at a URL: a remote one)."""
    location = Location.of(place)
    store_class(location)  # a URL whose suffix names a local-only format is refused before anything is read
    if not store_exists(location):
        expected, check = (("a Zarr (.zarr) store", "URL") if location.is_url else
                           ("a .zarr directory or an .h5 file", "path"))
        raise KdcacheError(f"no cache at {location}: expected {expected} written by `kdcache dump-teacher`; check "
                           f"the {check} or run dump-teacher first")
    holding = [cls for cls in backends() if (cls.remote or not location.is_url) and cls.holds(location)]
    if not holding:  # at a URL, one object rather than a Zarr directory: HDF5 or something else
        raise refuse_hdf5_url(str(location))
    named = [cls for cls in holding if location.suffix in cls.suffixes]
    return (named or holding)[0].open(location, read_only=read_only)
