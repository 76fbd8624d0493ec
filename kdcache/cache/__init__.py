"""Teacher caches: the store interface with Zarr and HDF5 backends, the writer, the reader and the dump."""

from kdcache.cache.layout import CacheSpec
from kdcache.cache.reader import Problem, TeacherCache, open_cache
from kdcache.cache.store import Store, open_store
from kdcache.cache.writer import BackgroundWriter, CacheWriter

__all__ = ["BackgroundWriter", "CacheSpec", "CacheWriter", "Problem", "Store", "TeacherCache", "open_cache",
           "open_store"]
