"""Zarr v3 backend: a directory store, crc32c checksums on every chunk, metadata in the root's attributes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.core.sync import sync
from zarr.storage import LocalStore

from kdcache.cache.store import ArrayInfo, Selection, Store
from kdcache.errors import CorruptCacheError

METADATA_KEY = "kdcache"


class ZarrStore(Store):
    """A cache as a Zarr v3 directory (`.zarr`)."""

    format_name = "zarr"
    suffix = ".zarr"

    def __init__(self, path: Path, group: zarr.Group, read_only: bool) -> None:
        super().__init__(path, read_only)
        self._group = group
        self._arrays: dict[str, zarr.Array] = {}

    @classmethod
    def create(cls, path: Path) -> ZarrStore:
        """Create an empty Zarr v3 group at path."""
        return cls(path, zarr.open_group(LocalStore(path), mode="w-", zarr_format=3), read_only=False)

    @classmethod
    def open(cls, path: Path, read_only: bool = True) -> ZarrStore:
        """Open an existing Zarr v3 group."""
        try:
            group = zarr.open_group(LocalStore(path, read_only=read_only), mode="r" if read_only else "r+",
                                    zarr_format=3)
        except Exception as error:  # zarr raises many kinds for a malformed zarr.json: all mean "unreadable"
            raise CorruptCacheError(f"{path} is not a readable Zarr v3 cache: its zarr.json is missing or malformed "
                                    f"({type(error).__name__}: {error}); rebuild it with `kdcache dump-teacher "
                                    f"--overwrite`") from error
        return cls(path, group, read_only)

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            try:
                self._arrays[name] = self._group[name]
            except Exception as error:  # as in open(): a missing or malformed array zarr.json
                raise CorruptCacheError(f"{self.path}: array {name!r} is missing or its zarr.json is malformed "
                                        f"({type(error).__name__}: {error}); the cache was altered: rebuild it with "
                                        f"`kdcache dump-teacher --overwrite`") from error
        return self._arrays[name]

    def _create_array(self, name: str, shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...],
                      fill_value: int | float) -> None:
        self._arrays[name] = self._group.create_array(
            name, shape=shape, chunks=chunks, dtype=dtype, serializer=BytesCodec(), compressors=[Crc32cCodec()],
            fill_value=fill_value,
            # a chunk that happens to equal the fill value must still exist on disk, so that a missing
            # chunk file always means lost data
            config={"write_empty_chunks": True})

    def _write(self, name: str, selection: Selection, values: np.ndarray) -> None:
        self._array(name)[selection] = values

    def _read(self, name: str, selection: Selection) -> np.ndarray:
        return np.asarray(self._array(name)[selection])

    def _set_metadata(self, metadata: dict[str, Any]) -> None:
        self._group.attrs[METADATA_KEY] = metadata

    def metadata(self) -> dict[str, Any]:
        """The kdcache metadata document from the root group's attributes."""
        return dict(self._group.attrs.get(METADATA_KEY, {}))

    def array_names(self) -> list[str]:
        """Names of the arrays in the root group."""
        return sorted(self._group.array_keys())

    def array_info(self, name: str) -> ArrayInfo:
        """Shape, dtype and chunk shape of one array."""
        array = self._array(name)
        return ArrayInfo(tuple(array.shape), np.dtype(array.dtype), tuple(array.chunks))

    def chunk_exists(self, name: str, chunk_coords: tuple[int, ...]) -> bool:
        """Whether the chunk's object exists in the store."""
        array = self._array(name)
        key = f"{name}/{array.metadata.encode_chunk_key(chunk_coords)}"
        return sync(self._group.store.exists(key))

    def close(self) -> None:
        """Zarr keeps no files open between calls."""
        self._arrays.clear()
