"""Stage 1: what dump-teacher writes equals the live teacher on the replayed views, and survives interruptions."""

import json
import os
import socket

import numpy as np
import pytest
import torch
from cache_faults import disk_full_at_write, flip_chunk_byte
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcache.cache import open_cache, verify
from kdcache.cache.lock import WriterLock, lock_path
from kdcache.data import get_policy, load_dataset, normalize
from kdcache.errors import CorruptCacheError, KdcacheError
from kdcache.models import LogitMap, create_model
from kdcache.stages.dump import dump_teacher

FORMATS = ["zarr", "hdf5"]
SUFFIX = {"zarr": ".zarr", "hdf5": ".h5"}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", num_samples=40, num_classes=5, image_size=16, seed=3)


@pytest.fixture(scope="module")
def teacher(data):
    torch.manual_seed(0)
    return create_model("resnet8", num_classes=data.num_classes).eval()


TEACHER_INFO = {"arch": "resnet8", "num_classes": 5, "checkpoint": "t.pt", "checkpoint_sha256": "ab" * 32}


def dump(teacher, data, path, **options):
    settings = {"views": 3, "scales": (1, 2, 4), "batch_size": 7, "block_size": 16, "show_progress": False}
    settings.update(options)
    return dump_teacher(teacher, TEACHER_INFO, data, get_policy(settings.pop("policy", "cifar")), path, **settings)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_every_cached_view_equals_the_live_teacher_on_the_replayed_view(teacher, data, tmp_path, fmt, dtype):
    path = tmp_path / f"c{SUFFIX[fmt]}"
    result = dump(teacher, data, path, dtype=dtype)
    policy, live = get_policy("cifar"), LogitMap(teacher, (1, 2, 4)).eval()
    with open_cache(path) as cache:
        assert cache.store.format_name == fmt and cache.is_complete()
        np.testing.assert_array_equal(cache.labels(), data.labels.numpy())
        for k in range(3):
            params = torch.from_numpy(cache.aug_params(k)).long()
            with torch.no_grad():
                expected = live(normalize(policy.apply(data.images, params), data.mean, data.std))
            stored = torch.from_numpy(cache.view(k).astype(np.float32))
            assert stored.shape == (40, 21, 5)
            # fp16 rounding aside: half an fp16 ulp of the value, relative 2**-11
            tolerance = dict(rtol=2**-10, atol=1e-6) if dtype == "float16" else dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(stored, expected, **tolerance)
            assert result.view_accuracy[k] == pytest.approx(float((stored[:, 0].argmax(-1) == data.labels).float().mean()))
        assert cache.metadata["view_accuracy"] == result.view_accuracy
        assert verify(cache) == []


def test_views_differ_and_are_replayable_parameters(teacher, data, tmp_path):
    dump(teacher, data, tmp_path / "c.zarr")
    with open_cache(tmp_path / "c.zarr") as cache:
        params = [cache.aug_params(k) for k in range(3)]
        assert params[0].shape == (40, 3) and not np.array_equal(params[0], params[1])
        assert ((params[0] >= 0) & (params[0] <= [8, 8, 1])).all()


def test_exhaustive_gives_each_sample_each_of_the_162_views_exactly_once(teacher, data, tmp_path):
    small = load_dataset("synthetic", num_samples=6, num_classes=5, image_size=16, seed=1)
    dump(teacher, small, tmp_path / "c.zarr", views=None, exhaustive=True, scales=(1,), block_size=0)
    grid = get_policy("cifar").enumerate().numpy()
    with open_cache(tmp_path / "c.zarr") as cache:
        assert cache.num_views == 162 and cache.spec.exhaustive
        aug = cache.store.read("aug")  # [162, 6, 3]
    for sample in range(6):
        assert sorted(map(tuple, aug[:, sample])) == sorted(map(tuple, grid))
    # in a random order per sample, not the grid's order
    assert not np.array_equal(aug[:, 0], aug[:, 1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_dump_interrupted_mid_way_resumes_to_the_arrays_of_an_uninterrupted_run(teacher, data, tmp_path, fmt,
                                                                                    monkeypatch):
    whole, broken = tmp_path / f"whole{SUFFIX[fmt]}", tmp_path / f"broken{SUFFIX[fmt]}"
    dump(teacher, data, whole)
    with disk_full_at_write(monkeypatch, "logits", 5), pytest.raises(KdcacheError, match=r"could not write view 1, block 1 .*No space left.*rerun the same command"):
        dump(teacher, data, broken)
    assert not lock_path(broken).exists()
    with open_cache(broken) as cache:
        progress = cache.progress()
        assert (progress >= 0).sum() == 4 and progress[1, 1] == -1
        with pytest.raises(KdcacheError, match="incomplete: view 1 lacks"):
            cache.view(1)
    result = dump(teacher, data, broken)
    assert result.resumed and result.images == 40 + 16 + 8  # view 1 blocks 1, 2 and all of view 2
    with open_cache(whole) as a, open_cache(broken) as b:
        for name in ("logits", "aug", "labels", "progress"):
            np.testing.assert_array_equal(a.store.read(name), b.store.read(name))
        assert a.metadata["view_accuracy"] == b.metadata["view_accuracy"]


def test_rerun_with_other_arguments_is_refused_naming_each_field(teacher, data, tmp_path):
    dump(teacher, data, tmp_path / "c.zarr")
    with pytest.raises(KdcacheError) as refused:
        dump(teacher, data, tmp_path / "c.zarr", views=2, scales=(1, 2))
    message = str(refused.value)
    assert "views.count: cache has 3, this run has 2" in message and "scales: cache has [1, 2, 4]" in message
    assert "--overwrite" in message
    dump(teacher, data, tmp_path / "c.zarr", views=2, scales=(1, 2), overwrite=True)
    with open_cache(tmp_path / "c.zarr") as cache:
        assert cache.num_views == 2 and cache.scales == (1, 2)


def test_opening_for_another_dataset_is_refused_naming_the_fingerprint(teacher, data, tmp_path):
    dump(teacher, data, tmp_path / "c.zarr")
    other = load_dataset("synthetic", num_samples=40, num_classes=5, image_size=16, seed=4)
    with open_cache(tmp_path / "c.zarr") as cache:
        cache.require({"dataset.fingerprint": data.fingerprint, "scales": (1, 2)})
        with pytest.raises(KdcacheError, match=f"dataset.fingerprint {data.fingerprint}.*this run has "
                                               f"{other.fingerprint}.*rebuild the cache or pass the dataset"):
            cache.require({"dataset.fingerprint": other.fingerprint})
        with pytest.raises(KdcacheError, match=r"holds scales \[1, 2, 4\] but this run asks for \[1, 3\]"):
            cache.require({"scales": (1, 3)})


@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_teacher_logits_stop_the_dump_naming_samples_and_mark_nothing_of_their_block(teacher, data, tmp_path,
                                                                                        fmt, monkeypatch):
    path = tmp_path / f"c{SUFFIX[fmt]}"
    bad = 21  # in block 1 (samples 16-31) of view 0
    real_call = LogitMap.regions

    def poisoned(self, features, image_size):
        regions = real_call(self, features, image_size)
        first_sample = int(poisoned.offset)
        poisoned.offset += len(features)
        rows = torch.arange(first_sample, first_sample + len(features))
        return torch.where((rows == bad)[:, None, None], torch.nan, regions)

    poisoned.offset = 0
    monkeypatch.setattr(LogitMap, "regions", poisoned)
    # one batch per block so that the running offset is the sample index
    with pytest.raises(KdcacheError, match=r"NaN or Inf for samples 21 of view 0; nothing of block 1"):
        dump(teacher, data, path, batch_size=16)
    monkeypatch.setattr(LogitMap, "regions", real_call)
    with open_cache(path) as cache:
        assert cache.progress()[0, 1] == -1


@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_names_array_view_and_block_of_a_flipped_byte(teacher, data, tmp_path, fmt):
    path = tmp_path / f"c{SUFFIX[fmt]}"
    dump(teacher, data, path)
    flip_chunk_byte(path, "logits", (2, 1, 0, 0))
    with open_cache(path) as cache:
        problems = [str(p) for p in verify(cache)]
        assert len(problems) == 1 and problems[0].startswith("array 'logits', view 2, block 1 (samples 16-31)")
        cache.view(1)  # other views read fine
        with pytest.raises(CorruptCacheError, match=r"array 'logits', view 2, block 1 \(samples 16-31\): fails its "
                                                    r"checksum"):
            cache.view(2)


def test_a_second_writer_is_refused_by_the_lock_and_a_dead_ones_lock_file_holds_nothing(teacher, data, tmp_path):
    path = tmp_path / "c.zarr"
    with WriterLock(path):  # held by this process, as a running dump holds it
        with pytest.raises(KdcacheError, match=rf"being written by another kdcache process \(pid {os.getpid()} .*"
                                               r"released when that process ends"):
            dump(teacher, data, path)
    # a record left by a process that died, even one naming a pid that runs something else now (pid 1): the
    # kernel holds no lock for it, so the next writer simply writes
    lock_path(path).write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "started": "earlier"}))
    dump(teacher, data, path)
    assert not lock_path(path).exists()


def test_inspect_reports_accuracy_and_completeness(teacher, data, tmp_path):
    from kdcache.report import describe_cache

    result = dump(teacher, data, tmp_path / "c.h5")
    report = describe_cache(tmp_path / "c.h5")
    assert report["complete"] and report["blocks_total"] == 9 and report["view_accuracy"] == result.view_accuracy
    assert "resnet8" in report["text"] and "[3, 40, 21, 5] float16" in report["text"]
    json.dumps(report)  # --json output


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(["float16", "float32", "float64"]), size=st.sampled_from([1, 1000, 2**19 + 3]),
       bad=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from([np.nan, np.inf, -np.inf])),
                    max_size=2))
def test_all_finite_agrees_with_numpy_wherever_the_bad_values_sit(dtype, size, bad):
    from kdcache.cache.layout import all_finite

    values = np.random.default_rng(size).standard_normal(size).astype(dtype) * 1000
    values[0] = np.finfo(dtype).max  # the largest finite value is finite
    for where, value in bad:  # both halves of a large array, which are checked by two threads
        values[int(where * size)] = value
    assert all_finite(values) == bool(np.isfinite(values).all())
    assert all_finite(values[::2]) == bool(np.isfinite(values[::2]).all())  # not contiguous: numpy's own check
