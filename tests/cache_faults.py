"""Damage done to caches on disk, the way disks and people do it, for the fault tests."""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import h5py
import pytest

from kdcache.cache.store import Store


def chunk_file(cache: Path, array: str, coords: tuple[int, ...]) -> Path:
    """The file of one Zarr chunk (default v3 key encoding: <array>/c/i/j/...)."""
    return cache / array / "c" / Path(*map(str, coords))


def flip_chunk_byte(cache: Path, array: str, coords: tuple[int, ...], offset: int = 7) -> None:
    """Invert one byte inside a stored chunk (Zarr chunk file, or the HDF5 chunk's bytes in the file)."""
    if cache.is_dir():
        path, position = chunk_file(cache, array, coords), offset
    else:
        with h5py.File(cache, "r", libver="latest", swmr=True) as file:
            dataset = file[array]
            start = tuple(c * s for c, s in zip(coords, dataset.chunks))
            path, position = cache, dataset.id.get_chunk_info_by_coord(start).byte_offset + offset
    with open(path, "r+b") as handle:
        handle.seek(position)
        byte = handle.read(1)[0]
        handle.seek(position)
        handle.write(bytes([byte ^ 0xFF]))


def delete_chunk(cache: Path, array: str, coords: tuple[int, ...]) -> None:
    """Remove one Zarr chunk file."""
    chunk_file(cache, array, coords).unlink()


@contextlib.contextmanager
def disk_full_at_write(monkeypatch: pytest.MonkeyPatch, array: str, count: int) -> Iterator[None]:
    """Within the block, the count-th write to `array` fails as a full disk does (ENOSPC); every other write goes
    through, and after the block every write does."""
    store_write, writes = Store.write, []

    def failing(self, name, selection, values):
        if name == array:
            writes.append(selection)
            if len(writes) == count:
                raise OSError(28, "No space left on device")
        return store_write(self, name, selection, values)

    monkeypatch.setattr(Store, "write", failing)
    try:
        yield
    finally:
        monkeypatch.setattr(Store, "write", store_write)
