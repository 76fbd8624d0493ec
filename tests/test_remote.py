"""Caches at fsspec URLs: memory:// (object-store-like, in process) and file:// (the same code path, on disk)."""

import importlib.util
import json
import socket
import uuid
from pathlib import Path

import numpy as np
import pytest

from kdcache.cache import verify
from kdcache.cache.backends import create_store, open_store, store_class
from kdcache.cache.layout import CACHE_ID
from kdcache.cache.location import (
    Location,
    remove_store,
    storage_options,
    store_bytes,
    store_exists,
)
from kdcache.cache.lock import WriterLock, lock_path
from kdcache.cache.zarr_store import ZarrStore
from kdcache.errors import KdcacheError


@pytest.fixture(params=["memory", "file"])
def url(request, tmp_path):
    """A fresh cache URL: the memory filesystem is process-global, so each test gets a path of its own."""
    if request.param == "memory":
        url = f"memory://kdcache-test-{uuid.uuid4().hex}/cache.zarr"
        yield url
        remove_store(url)
        remove_store(url + ".lock")
    else:
        yield (tmp_path / "sub" / "cache.zarr").as_uri()  # a parent that does not exist yet


def write_sample(url):
    values = np.random.default_rng(0).standard_normal((3, 10, 4, 5)).astype(np.float16)
    store = create_store(url)
    assert isinstance(store, ZarrStore) and store.path == url
    store.create_array("logits", values.shape, "float16", (1, 4, 4, 5))
    store.create_array("progress", (3, 3), "int64", (1, 3), fill_value=-1)
    store.write("logits", (), values)
    store.write("progress", (0,), np.array([1, 2, 3]))
    store.set_metadata({"format": "x", "nested": {"list": [1, 2.5, "a"], "none": None}})
    store.flush()
    store.close()
    return values


def test_is_url_and_names():
    is_url = [Location.of(place).is_url for place in ("s3://bucket/c.zarr", "file:///tmp/c.zarr", "memory://x")]
    assert all(is_url)
    assert not any(Location.of(place).is_url for place in ("/tmp/c.zarr", "c.zarr", Path("/tmp/c.zarr")))
    assert Location.of("s3://bucket/dir/c.zarr/").name == "c.zarr" and Location.of("/tmp/c.h5").name == "c.h5"


@pytest.mark.parametrize("place, path, url, shown", [
    ("/tmp/dir/c.zarr", Path("/tmp/dir/c.zarr"), None, "/tmp/dir/c.zarr"),
    (Path("c.h5"), Path("c.h5"), None, "c.h5"),
    ("file:///tmp/dir/c.zarr/", None, "file:///tmp/dir/c.zarr", "file:///tmp/dir/c.zarr"),
    ("s3://bucket/dir/c.zarr", None, "s3://bucket/dir/c.zarr", "s3://bucket/dir/c.zarr"),
])
def test_a_location_is_classified_once_and_reads_as_the_user_wrote_it(place, path, url, shown):
    location = Location.of(place)
    assert (location.path, location.url, location.is_url) == (path, url, url is not None)
    assert str(location) == shown and f"no cache at {location}" == f"no cache at {shown}"
    assert Location.of(location) is location  # a later hop takes it as it is, without classifying it again
    assert location.target == (url or path) and location.suffix == Path(shown).suffix


def test_round_trip_at_a_url(url):
    assert not store_exists(url)
    values = write_sample(url)
    assert store_exists(url)
    with open_store(url, read_only=True) as store:
        assert isinstance(store, ZarrStore) and store.path == url and store.read_only
        assert store.array_names() == ["logits", "progress"]
        assert store.metadata() == {"format": "x", "nested": {"list": [1, 2.5, "a"], "none": None}}
        info = store.array_info("logits")
        assert (info.shape, info.dtype, info.chunks) == ((3, 10, 4, 5), np.float16, (1, 4, 4, 5))
        np.testing.assert_array_equal(store.read("logits"), values)
        np.testing.assert_array_equal(store.read("logits", (1,)), values[1])  # the view read, through zarr here
        np.testing.assert_array_equal(store.read("logits", (2, slice(4, 8))), values[2, 4:8])
        np.testing.assert_array_equal(store.read("progress"), [[1, 2, 3], [-1, -1, -1], [-1, -1, -1]])
        assert store.chunk_exists("logits", (0, 0, 0, 0)) and store.chunk_exists("logits", (2, 2, 0, 0))
        assert store.chunk_exists("progress", (0, 0)) and not store.chunk_exists("progress", (1, 0))


def test_a_trailing_slash_names_the_same_store(url):
    write_sample(url)
    with open_store(url + "/") as store:
        assert store.path == url


def test_reopened_for_writing_keeps_and_extends(url):
    write_sample(url)
    with open_store(url, read_only=False) as store:
        store.write("progress", (1,), np.array([4, 5, 6]))
        assert store.chunk_exists("progress", (1, 0))
    with open_store(url) as store:
        np.testing.assert_array_equal(store.read("progress", (1,)), [4, 5, 6])


def test_read_only_store_at_a_url_refuses_every_write(url):
    write_sample(url)
    with open_store(url, read_only=True) as store:
        for attempt in (lambda: store.write("progress", (), np.zeros((3, 3))), lambda: store.set_metadata({}),
                        lambda: store.create_array("b", (1,), "int64", (1,))):
            with pytest.raises(KdcacheError, match="read-only"):
                attempt()
        np.testing.assert_array_equal(store.read("progress", (0,)), [1, 2, 3])


def test_bytes_and_removal(url, tmp_path):
    assert store_bytes(url) == 0
    write_sample(url)
    size = store_bytes(url)
    assert size > 3 * 10 * 4 * 5 * 2  # at least the float16 logits
    if url.startswith("file://"):
        local = tmp_path / "sub" / "cache.zarr"
        assert size == store_bytes(local) == sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
    remove_store(url)
    assert not store_exists(url) and store_bytes(url) == 0
    remove_store(url)  # nothing there: no error
    with pytest.raises(KdcacheError, match=f"no cache at {url}: expected a Zarr"):
        open_store(url)


def test_create_refuses_an_existing_store(url):
    write_sample(url)
    with pytest.raises(FileExistsError):  # zarr's own error for mode "w-", as for a local store
        create_store(url)


def test_missing_store_at_a_url_is_the_no_cache_error(url):
    with pytest.raises(KdcacheError, match="no cache at .*cache.zarr: .*run dump-teacher first"):
        open_store(url)


@pytest.mark.parametrize("name", ["cache.h5", "cache.hdf5"])
def test_hdf5_at_a_url_is_refused_for_writing_and_reading(url, name):
    h5 = url.rsplit("/", 1)[0] + "/" + name
    expected = r"expected a local path .*found the URL .*; do: use Zarr"
    for attempt in (lambda: create_store(h5), lambda: store_class(h5), lambda: store_class(url, "hdf5"),
                    lambda: create_store(url, "hdf5"), lambda: open_store(h5)):
        with pytest.raises(KdcacheError, match=expected):
            attempt()
    assert not store_exists(h5) and not store_exists(url)
    assert store_class(url) is ZarrStore and store_class(url, "zarr") is ZarrStore


def test_a_single_object_at_a_url_is_not_opened_as_zarr(url):
    import fsspec

    with fsspec.open(url, "wb", **storage_options(url)) as file:
        file.write(b"\x89HDF\r\n\x1a\n")
    with pytest.raises(KdcacheError, match="use Zarr"):
        open_store(url)
    remove_store(url)
    assert not store_exists(url)


def test_the_lock_at_a_url_refuses_a_second_writer_and_is_released(url):
    import fsspec

    assert lock_path(url) == url + ".lock"
    first = WriterLock(url).acquire()
    assert store_exists(url + ".lock")
    with fsspec.open(url + ".lock", "rb") as file:
        assert b'"pid"' in file.read()
    with pytest.raises(KdcacheError, match=rf"{url} is being written by another kdcache process .*delete the lock "
                                           rf"object {url}\.lock"):
        WriterLock(url).acquire()
    first.release()
    assert not store_exists(url + ".lock")
    with WriterLock(url):  # free again
        assert store_exists(url + ".lock")
    assert not store_exists(url + ".lock")


def test_a_stale_lock_at_a_url_is_taken_over(url, caplog):
    import fsspec

    record = {"pid": 999999999, "host": socket.gethostname(), "started": "then"}  # on this host, long gone
    with fsspec.open(url + ".lock", "wb", **storage_options(url)) as file:
        file.write(json.dumps(record).encode())
    with WriterLock(url):
        assert "taking over the stale lock" in caplog.text
    assert not store_exists(url + ".lock")


def test_unknown_scheme_is_a_clear_error():
    for attempt in (lambda: open_store("nosuchfs://x/c.zarr"), lambda: create_store("nosuchfs://x/c.zarr"),
                    lambda: store_exists("nosuchfs://x/c.zarr"), lambda: WriterLock("nosuchfs://x/c.zarr")):
        with pytest.raises(KdcacheError, match="unknown URL scheme 'nosuchfs'"):
            attempt()


def test_missing_filesystem_package_names_what_to_install(monkeypatch):
    from fsspec.registry import known_implementations

    monkeypatch.setitem(known_implementations, "kdcachetestfs",
                        {"class": "kdcache_absent_pkg.FileSystem", "err": "Install kdcache_absent_pkg to use it"})
    for attempt in (lambda: open_store("kdcachetestfs://b/c.zarr"), lambda: create_store("kdcachetestfs://b/c.zarr"),
                    lambda: store_bytes("kdcachetestfs://b/c.zarr"), lambda: WriterLock("kdcachetestfs://b/c.zarr")):
        with pytest.raises(KdcacheError, match="needs a package that is not installed .*do: pip install "
                                               "kdcache_absent_pkg"):
            attempt()


@pytest.mark.parametrize(("scheme", "package"), [("s3", "s3fs"), ("gs", "gcsfs")])
def test_cloud_scheme_without_its_package_names_it(scheme, package):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    with pytest.raises(KdcacheError, match=f"a cache at a {scheme}:// URL needs a package .*do: pip install {package}"):
        open_store(f"{scheme}://bucket/c.zarr")


def test_a_dump_to_a_url_equals_a_local_one_and_students_train_from_it(url, tmp_path):
    """End to end at a URL: dump (with its lock), resume refusal, inspect, verify and distill read the same
    bytes a local cache holds."""
    import torch

    from kdcache.cache import open_cache
    from kdcache.config import DistillConfig
    from kdcache.data import get_policy, load_dataset
    from kdcache.models import create_model
    from kdcache.report import describe_cache
    from kdcache.stages import distill
    from kdcache.stages.dump import dump_teacher

    data = load_dataset("synthetic", num_samples=48, num_classes=4, image_size=16, seed=2)
    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=4).eval()
    info = {"arch": "resnet8", "num_classes": 4, "checkpoint": "t.pt", "checkpoint_sha256": "ef" * 32}
    settings = {"views": 2, "scales": (1, 2), "block_size": 16, "show_progress": False}
    remote = dump_teacher(teacher, info, data, get_policy("cifar"), url, **settings)
    dump_teacher(teacher, info, data, get_policy("cifar"), tmp_path / "local.zarr", **settings)
    assert remote.path == url and remote.bytes_on_disk == store_bytes(url) > 0
    assert not store_exists(url + ".lock")  # released
    with pytest.raises(KdcacheError, match="made with other arguments"):
        dump_teacher(teacher, info, data, get_policy("cifar"), url, **{**settings, "views": 3})
    with open_cache(url) as cache, open_cache(tmp_path / "local.zarr") as local:
        # the same document but for each store's own id
        assert verify(cache) == [] and {**cache.metadata, CACHE_ID: 0} == {**local.metadata, CACHE_ID: 0}
        for view in range(2):
            np.testing.assert_array_equal(cache.view(view), local.view(view))
    assert describe_cache(url)["complete"]

    runs = {}
    for name, cache in (("remote", url), ("local", str(tmp_path / "local.zarr"))):
        config = DistillConfig(cache=cache, students=("resnet8",), losses=("kd",), epochs=1, batch_size=16,
                               device="cpu", out=str(tmp_path / name))
        runs[name] = distill(config, show_progress=False, data=(data, data))[0]
    assert runs["remote"].test_acc == runs["local"].test_acc
    trained = [torch.load(runs[name].folder / "model.pt", weights_only=True)["model"] for name in ("remote", "local")]
    for name, value in trained[0].items():  # the same targets give the same student, bit for bit
        assert torch.equal(value, trained[1][name]), name
