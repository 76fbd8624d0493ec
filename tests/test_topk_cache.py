"""Format 2: a top-k cache holds the top-k encoding of exactly the logits a full cache holds, is read back as
rebuilt logits by the same reader, checks its own invariants, and trains students unchanged."""

import json

import numpy as np
import pytest
import torch

from kdcache.cache import open_cache, verify
from kdcache.cache.backends import open_store
from kdcache.cache.location import store_bytes
from kdcache.cache.layout import WRITTEN_VERSION
from kdcache.cache.sizes import byte_size
from kdcache.data import get_policy, load_dataset
from kdcache.errors import CorruptCacheError, KdcacheError
from kdcache.report import describe_cache
from kdcache.stages.dump import dump_teacher
from kdcache.stages.targets import CachedTargets
from kdcache.stages.topk import rebuild_topk

CLASSES = 20
SUFFIX = {"zarr": ".zarr", "hdf5": ".h5"}
INFO = {"arch": "resnet8", "num_classes": CLASSES, "checkpoint": "t.pt", "checkpoint_sha256": "cd" * 32}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", num_samples=50, num_classes=CLASSES, image_size=16, seed=5)


@pytest.fixture(scope="module")
def teacher():
    from kdcache.models import create_model

    torch.manual_seed(0)
    return create_model("resnet8", num_classes=CLASSES).eval()


def dump(teacher, data, path, **options):
    return dump_teacher(teacher, INFO, data, get_policy("cifar"), path, views=2, scales=(1, 2), block_size=16,
                        show_progress=False, **options)


@pytest.fixture(scope="module")
def full(teacher, data, tmp_path_factory):
    path = tmp_path_factory.mktemp("full") / "full.zarr"
    dump(teacher, data, path)
    return path


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
@pytest.mark.parametrize("k", [1, 5, CLASSES - 1])
def test_a_topk_view_is_the_rebuilt_full_view(teacher, data, full, tmp_path, fmt, k):
    path = tmp_path / f"k{SUFFIX[fmt]}"
    dump(teacher, data, path, topk=k)
    with open_cache(path) as cache, open_cache(full) as reference:
        assert cache.spec.format_version == WRITTEN_VERSION and cache.metadata["logits"]["topk"] == k
        assert sorted(cache.store.array_names()) == ["aug", "labels", "metadata_sha256", "progress", "topk_indices",
                                                     "topk_rest", "topk_values"]
        assert verify(cache) == []
        assert cache.view_accuracy() == reference.view_accuracy()  # the same top-1 class, recounted by verify
        for view in range(2):
            stored = reference.view(view)
            expected = rebuild_topk(torch.from_numpy(stored), k, torch.float16).numpy().astype(np.float16)
            np.testing.assert_array_equal(cache.view(view), expected)
            arrays = cache.view_arrays(view)
            assert arrays["topk_indices"].dtype == np.int16 and arrays["topk_values"].dtype == np.float16
            # the top k of what a full cache stores, in order
            top = torch.from_numpy(stored.astype(np.float32)).topk(k, dim=-1)
            np.testing.assert_array_equal(arrays["topk_values"].astype(np.float32), top.values.numpy())


def test_topk_saves_the_bytes_its_arithmetic_says(teacher, data, full, tmp_path):
    dump(teacher, data, tmp_path / "k.zarr", topk=2)
    with open_cache(tmp_path / "k.zarr") as cache, open_cache(full) as reference:
        # per sample: 5 regions x (2 values + 2 int16 classes + 1 rest) x 2 bytes, against 5 x 20 x 2
        assert (cache.spec.bytes_per_sample, reference.spec.bytes_per_sample) == (50, 200)
        samples = cache.spec.num_samples
        assert cache.spec.view_bytes() == 50 * samples and cache.spec.view_bytes(samples=3) == 150
        assert cache.spec.view_bytes(("topk_indices",)) == 5 * 2 * 2 * samples  # int16 classes alone
    data_bytes = {name: store_bytes(path) for name, path in (("topk", tmp_path / "k.zarr"), ("full", full))}
    assert data_bytes["topk"] < 0.5 * data_bytes["full"]


def test_cache_sizes_read_in_decimal_megabytes_and_gigabytes():
    assert (byte_size(2_500_000), byte_size(999_999_999), byte_size(1.5e9)) == ("2.5 MB", "1000.0 MB", "1.50 GB")


def test_cached_targets_rebuild_each_batch_on_the_device_from_the_compact_arrays(teacher, data, tmp_path):
    dump(teacher, data, tmp_path / "k.zarr", topk=3)
    with open_cache(tmp_path / "k.zarr") as cache:
        targets = CachedTargets(cache, scales=(1,))
        targets.begin_epoch(1)
        assert [tuple(t.shape) for t in targets._arrays.values()] == [(50, 1, 3), (50, 1, 3), (50, 1)]  # compact
        indices = torch.tensor([7, 0, 49, 7])
        expected = torch.from_numpy(cache.view(1)[:, :1].astype(np.float32))[indices]
        torch.testing.assert_close(targets(indices, None)["regions"], expected, rtol=0, atol=0)


def test_distill_trains_from_a_topk_cache_and_warns_for_standardising_losses(teacher, data, tmp_path, caplog):
    from kdcache.config import DistillConfig
    from kdcache.models import save_checkpoint
    from kdcache.stages import distill

    dump(teacher, data, tmp_path / "k.zarr", topk=4)
    test = load_dataset("synthetic", num_samples=50, num_classes=CLASSES, image_size=16, seed=5)
    save_checkpoint(tmp_path / "unused.pt", teacher)
    config = DistillConfig(cache=str(tmp_path / "k.zarr"), students=("resnet8",), losses=("kd", "sdd-lskd"), epochs=1,
                           batch_size=16, device="cpu", out=str(tmp_path / "runs"))
    with caplog.at_level("WARNING"):
        summaries = distill(config, show_progress=False, data=(data, test))
    assert [s.loss for s in summaries] == ["kd", "sdd-lskd"] and all(0 <= s.test_acc <= 1 for s in summaries)
    assert "stores the top 4 logits per region" in caplog.text and "sdd-lskd" in caplog.text


def test_verify_finds_what_no_topk_encoding_gives(teacher, data, tmp_path):
    path = tmp_path / "k.zarr"
    dump(teacher, data, path, topk=3)
    with open_store(path, read_only=False) as store:
        indices = store.read("topk_indices", (0, slice(0, 16)))
        indices[4, 0, 1] = indices[4, 0, 0]  # one class listed twice
        store.write("topk_indices", (0, slice(0, 16)), indices)
        values = store.read("topk_values", (1, slice(16, 32)))
        values[0, 1] = values[0, 1, ::-1]  # a region's values ascending
        store.write("topk_values", (1, slice(16, 32)), values)
    with open_cache(path) as cache:
        found = [str(problem) for problem in verify(cache)]
    assert len(found) == 2
    assert "array 'topk_indices', view 0, block 0 (samples 0-15): a region lists the same class twice" in found[0]
    assert "array 'topk_values', view 1, block 1 (samples 16-31): values are not in descending order" in found[1]


def test_topk_choices_that_cannot_work_are_refused(teacher, data, tmp_path):
    with pytest.raises(KdcacheError, match=rf"--topk: expected a number of logits per region below the {CLASSES} "
                                           r"classes \(0 or no --topk stores them all\), got 20"):
        dump(teacher, data, tmp_path / "k.zarr", topk=CLASSES)
    assert not (tmp_path / "k.zarr").exists()

    dump(teacher, data, tmp_path / "k.zarr", topk=3)
    with pytest.raises(KdcacheError, match=r"other arguments \(logits.topk: cache has 3, this run has 0"):
        dump(teacher, data, tmp_path / "k.zarr")  # resuming needs the same --topk

    with open_store(tmp_path / "k.zarr", read_only=False) as store:
        metadata = store.metadata()
        store.set_metadata(json.loads(json.dumps({**metadata, "logits": {**metadata["logits"], "topk": CLASSES}})))
    with pytest.raises(CorruptCacheError, match=r"'logits.topk' should be in 1..19 \(teacher.num_classes - 1\), "
                                                r"found 20"):
        open_cache(tmp_path / "k.zarr")


def test_inspect_says_what_a_topk_cache_stores(teacher, data, tmp_path):
    dump(teacher, data, tmp_path / "k.zarr", topk=3)
    text = describe_cache(tmp_path / "k.zarr")["text"]
    assert f"format version {WRITTEN_VERSION}" in text and "top 3 per region stored, the rest rebuilt" in text
