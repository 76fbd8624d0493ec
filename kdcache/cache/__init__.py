"""Teacher caches, storage only: locations, the store interface and its Zarr and HDF5 backends, the format, the
writer, the reader and verify. Nothing here knows torch or models."""

from kdcache.cache.backends import create_store, open_store
from kdcache.cache.dense_layout import DenseCacheSpec
from kdcache.cache.layout import CacheSpec
from kdcache.cache.reader import Problem, TeacherCache, open_cache
from kdcache.cache.store import Store
from kdcache.cache.token_layout import TokenCacheSpec
from kdcache.cache.verify import verify
from kdcache.cache.writer import BackgroundWriter, CacheWriter

__all__ = ["BackgroundWriter", "CacheSpec", "CacheWriter", "DenseCacheSpec", "Problem", "Store", "TeacherCache", "TokenCacheSpec", "create_store",
           "open_cache", "open_store", "verify"]
