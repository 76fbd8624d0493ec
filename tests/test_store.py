"""One conformance suite for every store backend (as zarr-python tests its stores): Zarr on disk, Zarr at a
memory:// URL (through fsspec, as s3:// and gs:// are reached) and HDF5."""

import uuid

import fsspec
import numpy as np
import pytest
from cache_faults import delete_chunk, flip_chunk_byte

from kdcache.cache.backends import open_store, store_class
from kdcache.cache.hdf5_store import HDF5Store
from kdcache.cache.location import remove_store
from kdcache.cache.store import ChunkReadError
from kdcache.cache.zarr_store import ZarrStore
from kdcache.errors import KdcacheError


class StoreConformance:
    """Behaviour every backend shares; subclasses name the backend."""

    backend: type

    @pytest.fixture
    def path(self, tmp_path):
        return tmp_path / f"cache{self.backend.suffixes[0]}"

    @pytest.fixture
    def store(self, path):
        store = self.backend.create(path)
        yield store
        store.close()

    # -- damage done where the backend keeps its chunks: the tests below stay the same for every backend --
    def flip_chunk_byte(self, path, array, coords):
        """Invert one byte inside a stored chunk."""
        flip_chunk_byte(path, array, coords)

    def delete_chunk(self, path, array, coords):
        """Remove one stored chunk."""
        delete_chunk(path, array, coords)

    def test_array_round_trip_with_chunks(self, store):
        values = np.random.default_rng(0).standard_normal((3, 10, 4, 5)).astype(np.float16)
        store.create_array("logits", values.shape, "float16", (1, 4, 4, 5))
        store.write("logits", (), values)
        np.testing.assert_array_equal(store.read("logits"), values)
        np.testing.assert_array_equal(store.read("logits", (1, slice(4, 8))), values[1, 4:8])
        info = store.array_info("logits")
        assert (info.shape, info.dtype, info.chunks) == ((3, 10, 4, 5), np.float16, (1, 4, 4, 5))
        assert store.array_names() == ["logits"]

    def test_a_read_into_a_buffer_equals_a_fresh_read_and_a_wrong_buffer_is_refused(self, store):
        values = np.random.default_rng(1).standard_normal((2, 10, 4, 5)).astype(np.float16)
        store.create_array("logits", values.shape, "float16", (1, 4, 4, 5))
        store.write("logits", (), values)
        buffer = np.full((10, 4, 5), 7, np.float16)
        assert store.read("logits", (1,), out=buffer) is buffer
        np.testing.assert_array_equal(buffer, values[1])
        rows = np.empty((4, 4, 5), np.float16)
        np.testing.assert_array_equal(store.read("logits", (0, slice(4, 8)), out=rows), values[0, 4:8])
        with pytest.raises(ValueError, match="should be a contiguous float16 array, found float32"):
            store.read("logits", (1,), out=np.empty((10, 4, 5), np.float32))

    def test_metadata_round_trip(self, store):
        assert store.metadata() == {}
        document = {"format": "x", "nested": {"list": [1, 2.5, "a"], "none": None}}
        store.set_metadata(document)
        assert store.metadata() == document

    def test_reopened_read_only_store_refuses_every_write(self, store, path):
        store.create_array("a", (4,), "int64", (2,))
        store.write("a", (), np.arange(4))
        store.close()
        reopened = open_store(path, read_only=True)
        assert isinstance(reopened, self.backend)
        for attempt in (lambda: reopened.write("a", (), np.zeros(4)), lambda: reopened.set_metadata({}),
                        lambda: reopened.create_array("b", (1,), "int64", (1,))):
            with pytest.raises(KdcacheError, match="read-only"):
                attempt()
        np.testing.assert_array_equal(reopened.read("a"), np.arange(4))
        reopened.close()

    def test_chunk_exists_only_once_written_even_if_all_fill_value(self, store):
        store.create_array("a", (2, 6), "int64", (1, 3), fill_value=-1)
        assert not store.chunk_exists("a", (0, 0))
        store.write("a", (0, slice(0, 3)), np.full(3, -1))
        assert store.chunk_exists("a", (0, 0))
        assert not store.chunk_exists("a", (1, 1))

    def test_a_reopened_writer_keeps_a_chunk_rewritten_to_the_fill_value(self, store, path):
        # a resumed dump writes through a reopened store: its chunks must not vanish for equalling the fill value
        store.create_array("a", (2, 6), "int64", (2, 1), fill_value=-1)
        store.write("a", (), np.zeros((2, 6), np.int64))
        store.close()
        with open_store(path, read_only=False) as reopened:
            reopened.write("a", (slice(None), slice(1, 2)), np.full((2, 1), -1))
            assert reopened.chunk_exists("a", (0, 1))
        with open_store(path) as reader:
            np.testing.assert_array_equal(reader.read("a")[:, 1], [-1, -1])

    def test_fill_value_where_nothing_was_written(self, store):
        store.create_array("a", (2, 3), "int64", (1, 3), fill_value=-1)
        store.write("a", (0,), np.array([1, 2, 3]))
        np.testing.assert_array_equal(store.read("a"), [[1, 2, 3], [-1, -1, -1]])

    def test_zero_size_array(self, store):
        store.create_array("aug", (2, 5, 0), "int32", (1, 5, 0))
        store.write("aug", (), np.zeros((2, 5, 0), np.int32))
        assert store.read("aug").shape == (2, 5, 0)

    def test_flipped_byte_fails_its_checksum(self, store, path):
        store.create_array("a", (2, 64), "float32", (1, 64))
        store.write("a", (), np.arange(128, dtype=np.float32).reshape(2, 64))
        store.close()
        self.flip_chunk_byte(path, "a", (1, 0))
        reopened = open_store(path)
        np.testing.assert_array_equal(reopened.read("a", (0,)), np.arange(64))
        with pytest.raises(ChunkReadError, match="'a'"):
            reopened.read("a", (1,))
        reopened.close()


class ZarrConformance(StoreConformance):
    """What Zarr adds, wherever the store lives: each chunk an object of its own, views read as zarr reads them."""

    backend = ZarrStore

    def test_deleted_chunk_file_is_detected(self, store, path):
        store.create_array("a", (2, 4), "float32", (1, 4))
        store.write("a", (), np.ones((2, 4), np.float32))
        self.delete_chunk(path, "a", (1, 0))
        assert store.chunk_exists("a", (0, 0)) and not store.chunk_exists("a", (1, 0))

    @pytest.mark.parametrize("dtype", ["float16", "float32", "int64"])
    @pytest.mark.parametrize("view", [0, 2, -1])
    def test_the_direct_view_read_equals_zarrs_own_read(self, store, path, dtype, view):
        # 37 rows in chunks of 8: the last chunk is stored padded and must be cut. On disk a view takes the direct
        # chunk-file path; at a URL it goes through zarr: both must give the same array
        values = (np.random.default_rng(1).standard_normal((3, 37, 4, 5)) * 100).astype(dtype)
        store.create_array("logits", values.shape, dtype, (1, 8, 4, 5))
        store.write("logits", (), values)
        direct = store.read("logits", (view,))
        assert direct.dtype == values.dtype and direct.flags.c_contiguous
        np.testing.assert_array_equal(direct, np.asarray(store._array("logits")[view]))
        np.testing.assert_array_equal(direct, values[view])
        with pytest.raises(IndexError):
            store.read("logits", (3,))


class TestZarrStore(ZarrConformance):
    """A Zarr directory on disk: views take the direct chunk-file path."""


class TestFsspecMemoryStore(ZarrConformance):
    """A Zarr store at a memory:// URL: every byte goes through fsspec, as at s3:// or gs://."""

    @pytest.fixture
    def path(self):
        # the memory filesystem is process-global: a root of the test's own, gone afterwards
        root = f"memory://kdcache-test-{uuid.uuid4().hex}"
        yield f"{root}/cache.zarr"
        remove_store(root)
        assert not fsspec.filesystem("memory").exists(root)

    def flip_chunk_byte(self, path, array, coords, offset=7):
        """Invert one byte inside a stored chunk object."""
        fs, key = fsspec.filesystem("memory"), _chunk_key(path, array, coords)
        data = bytearray(fs.cat_file(key))
        data[offset] ^= 0xFF
        fs.pipe_file(key, bytes(data))

    def delete_chunk(self, path, array, coords):
        """Remove one stored chunk object."""
        fs, key = fsspec.filesystem("memory"), _chunk_key(path, array, coords)
        assert fs.isfile(key)
        fs.rm_file(key)


def _chunk_key(url, array, coords):
    """The object of one Zarr chunk at a URL (default v3 key encoding: <array>/c/i/j/...)."""
    return f"{url}/{array}/c/" + "/".join(map(str, coords))


class TestHDF5Store(StoreConformance):
    backend = HDF5Store


@pytest.mark.parametrize(("name", "fmt", "expected"), [
    ("c.zarr", None, ZarrStore), ("c.h5", None, HDF5Store), ("c.hdf5", None, HDF5Store),
    ("c", None, ZarrStore), ("c.zarr", "hdf5", HDF5Store)])
def test_backend_from_format_or_suffix(name, fmt, expected, tmp_path):
    assert store_class(tmp_path / name, fmt) is expected


def test_unknown_format_and_missing_path_are_clear(tmp_path):
    with pytest.raises(KdcacheError, match="--format: unknown name 'parquet'; known: hdf5, zarr"):
        store_class(tmp_path / "c", "parquet")
    with pytest.raises(KdcacheError, match="no cache at"):
        open_store(tmp_path / "absent.zarr")


def test_hdf5_file_of_a_killed_writer_keeps_its_data_and_reopens_for_writing(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "cache.h5"
    writer = (
        "import os, sys, numpy as np\n"
        "from kdcache.cache.hdf5_store import HDF5Store\n"
        "store = HDF5Store.create(__import__('pathlib').Path(sys.argv[1]))\n"
        "store.create_array('a', (2, 8), 'float32', (1, 8))\n"
        "store.set_metadata({})  # the file is built: it takes its path, open as a SWMR writer\n"
        "store.write('a', (0,), np.arange(8, dtype=np.float32))\n"
        "store.flush()\n"
        "os._exit(0)  # dies with the file open in SWMR mode\n")
    subprocess.run([sys.executable, "-c", writer, str(path)], check=True)
    with open_store(path, read_only=True) as reader:  # readable as it is
        np.testing.assert_array_equal(reader.read("a", (0,)), np.arange(8))
    with HDF5Store.open(path, read_only=False) as store:  # rebuilt, then writable
        store.write("a", (1,), np.ones(8, np.float32))
        np.testing.assert_array_equal(store.read("a", (0,)), np.arange(8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.h5"]
