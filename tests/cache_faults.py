"""Damage done to caches on disk, the way disks and people do it, for the fault tests."""

from pathlib import Path

import h5py


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
