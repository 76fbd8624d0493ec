"""The direct zarr chunk reader's contract: where ZarrStore reads chunk files itself, it returns exactly what zarr
reads, and every layout it does not handle is left to zarr."""

import tempfile
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from zarr.codecs import BytesCodec, Crc32cCodec, GzipCodec, TransposeCodec

from kdcache.cache.location import remove_store
from kdcache.cache.zarr_store import ZarrStore, _direct_readable

DTYPES = ["float16", "float32", "int64", "int16", "int32"]


def spy_on_direct_reads() -> AbstractContextManager[mock.MagicMock]:
    """Patch ZarrStore._read_slab with a wrapper that still reads, and counts its calls."""
    return mock.patch.object(ZarrStore, "_read_slab", autospec=True, side_effect=ZarrStore._read_slab)


def zarrs_own_read(path: Path, name: str, selection: tuple) -> np.ndarray:
    """What zarr itself reads at array[selection], through a handle of its own."""
    return np.asarray(zarr.open_array(str(path / name), mode="r")[selection])


def assert_bitwise_equal(found: np.ndarray, expected: np.ndarray) -> None:
    """Same dtype, shape and bytes (NaN payloads, -0.0 and all)."""
    assert found.dtype == expected.dtype and found.shape == expected.shape
    assert found.tobytes() == expected.tobytes()


@st.composite
def layouts(draw: st.DrawFn) -> dict:
    """An array kdcache writes: [views, samples, *rest], chunked (1, block, *rest), and the chunks left unwritten."""
    samples = draw(st.integers(1, 40))
    block = draw(st.one_of(st.integers(1, samples),  # a block that divides the samples or pads the last chunk
                           st.integers(samples + 1, samples + 8)))  # one chunk, longer than the array
    views = draw(st.integers(1, 3))
    blocks = -(-samples // block)
    return {"views": views, "samples": samples, "rest": tuple(draw(st.lists(st.integers(1, 5), max_size=2))),
            "block": block, "dtype": draw(st.sampled_from(DTYPES)),
            "view": draw(st.integers(-views, views - 1)), "other": draw(st.integers(-views, views - 1)),
            "unwritten": draw(st.sets(st.integers(0, blocks - 1), max_size=blocks)),  # of the view read
            "seed": draw(st.integers(0, 2**32 - 1))}


@settings(max_examples=60, deadline=None)
@given(layout=layouts())
def test_the_direct_read_equals_zarrs_own_read_bit_for_bit(layout):
    views, samples, rest, block = layout["views"], layout["samples"], layout["rest"], layout["block"]
    view, other = layout["view"], layout["other"]
    shape = (views, samples, *rest)
    dtype = np.dtype(layout["dtype"])
    # random bytes: every bit pattern of the dtype, NaNs with payloads and subnormals included
    rng = np.random.default_rng(layout["seed"])
    values = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8).view(dtype).reshape(shape)
    with tempfile.TemporaryDirectory() as folder, ZarrStore.create(Path(folder) / "cache.zarr") as store:
        path = store.path
        store.create_array("logits", shape, dtype.name, (1, block, *rest), fill_value=0)
        for index in range(views):
            if index != range(views)[view]:
                store.write("logits", (index,), values[index])
        for first in range(0, samples, block):  # the view read: some chunks never written, so read as fill
            if first // block not in layout["unwritten"]:
                store.write("logits", (view, slice(first, first + block)), values[view, first:first + block])
        assert _direct_readable(store._array("logits"), (view,))
        # a reused buffer, filled with a pattern that no read may leave behind
        buffer = np.full(int(np.prod(shape[1:])) * dtype.itemsize, 0x5A, np.uint8).view(dtype).reshape(shape[1:])
        with spy_on_direct_reads() as direct:
            fresh = store.read("logits", (view,))
            into_buffer = store.read("logits", (view,), out=buffer)
            assert into_buffer is buffer
            assert_bitwise_equal(fresh, zarrs_own_read(path, "logits", (view,)))
            assert_bitwise_equal(into_buffer, fresh)
            reused = store.read("logits", (np.int64(other),), out=buffer)  # the same buffer, another view
            assert_bitwise_equal(reused, zarrs_own_read(path, "logits", (other,)))
            assert direct.call_count == 3
        expected = values[view].copy()
        for unwritten in layout["unwritten"]:
            expected[unwritten * block:(unwritten + 1) * block] = 0
        assert_bitwise_equal(fresh, expected)


def kdcache_array(shape: tuple[int, ...], chunks: tuple[int, ...]) -> Callable[[ZarrStore], None]:
    """An array made as kdcache makes them, through ZarrStore.create_array."""
    return lambda store: store.create_array("a", shape, "float32", chunks, fill_value=0)


def zarr_array(**options: object) -> Callable[[ZarrStore], None]:
    """An array of shape (3, 10, 4) made by zarr itself in the store's group, in a layout ZarrStore never writes."""
    arguments = {"shape": (3, 10, 4), "chunks": (1, 4, 4), "dtype": "float32", "serializer": BytesCodec(),
                 "compressors": [Crc32cCodec()], "fill_value": 0, **options}
    return lambda store: store._group.create_array("a", **arguments)


DIRECT = kdcache_array((3, 10, 4), (1, 4, 4))  # the layout the direct path handles, read in ways it does not
# every layout, and every selection, that the direct path leaves to zarr
FALLBACKS = {
    "chunks of two views": (kdcache_array((3, 10, 4), (2, 4, 4)), (1,)),
    "chunks splitting a trailing dim": (kdcache_array((3, 10, 4), (1, 4, 2)), (1,)),
    "chunks splitting the last of two trailing dims": (kdcache_array((3, 10, 4, 6), (1, 4, 4, 3)), (2,)),
    "a slice of views": (DIRECT, (slice(0, 2),)),
    "a full slice": (DIRECT, (slice(None),)),
    "the whole array": (DIRECT, ()),
    "a tuple of two ints": (DIRECT, (1, 2)),
    "an int and a slice": (DIRECT, (1, slice(2, 7))),
    "a big-endian dtype": (zarr_array(dtype=">f4", serializer=BytesCodec(endian="big")), (1,)),
    "gzip before crc32c": (zarr_array(compressors=[GzipCodec(), Crc32cCodec()]), (1,)),
    "no crc32c": (zarr_array(compressors=[]), (1,)),
    "zarr's default codecs": (zarr_array(serializer="auto", compressors="auto"), (1,)),
    "a transpose filter": (zarr_array(filters=[TransposeCodec(order=(0, 2, 1))]), (1,)),
    "shards of (1, 4, 4) chunks": (zarr_array(shards=(1, 8, 4), serializer="auto", compressors=[Crc32cCodec()]),
                                   (1,)),
    "zero samples": (kdcache_array((3, 0, 4), (1, 1, 4)), (1,)),
    "a zero-size trailing dim": (kdcache_array((2, 5, 0), (1, 5, 0)), (1,)),
    "a 1-d array": (kdcache_array((10,), (4,)), (1,)),
    "a 1-d array, one view a chunk": (kdcache_array((10,), (1,)), (-1,)),
}


@pytest.mark.parametrize(("make", "selection"), FALLBACKS.values(), ids=FALLBACKS.keys())
@pytest.mark.parametrize("with_buffer", [False, True], ids=["fresh", "into a buffer"])
def test_every_layout_the_direct_path_does_not_handle_is_read_by_zarr(tmp_path, make, selection, with_buffer):
    path = tmp_path / "cache.zarr"
    with ZarrStore.create(path) as store:
        make(store)
        array = store._array("a")
        values = np.arange(array.size, dtype=array.dtype).reshape(array.shape)
        store.write("a", (), values)
        expected = zarrs_own_read(path, "a", selection)
        np.testing.assert_array_equal(expected, values[selection])  # the case reads what was written
        assert not _direct_readable(array, selection)
        with spy_on_direct_reads() as direct:
            found = store.read("a", selection, out=np.empty_like(expected) if with_buffer else None)
        assert direct.call_count == 0
        assert_bitwise_equal(found, expected)


def test_a_bool_index_is_left_to_zarr_which_refuses_it(tmp_path):
    # True is an int to Python: read directly it would be view 1, where zarr refuses it
    with ZarrStore.create(tmp_path / "cache.zarr") as store, spy_on_direct_reads() as direct:
        DIRECT(store)
        with pytest.raises(IndexError):
            store._array("a")[True]
        with pytest.raises(IndexError):
            store.read("a", (True,))
    assert direct.call_count == 0


def test_a_chunk_grid_zarr_does_not_call_regular_is_left_to_zarr(tmp_path, monkeypatch):
    # zarr 3.1 writes only regular grids; for any other, Array.chunks raises NotImplementedError (its documented
    # contract), which the direct path takes as "not mine"
    def not_regular(array: zarr.Array) -> tuple[int, ...]:
        raise NotImplementedError("not a regular chunk grid")

    with ZarrStore.create(tmp_path / "cache.zarr") as store:
        DIRECT(store)
        values = np.arange(120, dtype=np.float32).reshape(3, 10, 4)
        store.write("a", (), values)
        monkeypatch.setattr(zarr.Array, "chunks", property(not_regular))
        assert not _direct_readable(store._array("a"), (1,))
        with spy_on_direct_reads() as direct:
            assert_bitwise_equal(store.read("a", (1,)), values[1])
        assert direct.call_count == 0


def test_a_store_at_a_url_is_read_by_zarr():
    url = f"memory://kdcache-test-{uuid.uuid4().hex}/cache.zarr"
    store = ZarrStore.create(url)
    try:
        DIRECT(store)
        values = np.arange(120, dtype=np.float32).reshape(3, 10, 4)
        store.write("a", (), values)
        assert _direct_readable(store._array("a"), (1,))  # the layout is one it reads, but not at a URL
        with spy_on_direct_reads() as direct:
            assert_bitwise_equal(store.read("a", (1,)), values[1])
        assert direct.call_count == 0
    finally:
        store.close()
        remove_store(url)
