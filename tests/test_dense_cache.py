"""Dense caches: a segmentation teacher's per-pixel logits at an output stride serve exactly what the live teacher
gives on the replayed views, resume, verify, and are refused for other data or another policy, naming the field."""

import numpy as np
import pytest
import torch

from kdcache.cache import open_cache, verify
from kdcache.data.dense import DIGIT_NAMES, IGNORE_INDEX, DenseData, compose_scenes
from kdcache.data.sources import _channel_stats, _digits_images
from kdcache.errors import KdcacheError
from kdcache.models import create_model, save_checkpoint
from kdcache.report import describe_cache
from kdcache.stages.dense_dump import dump_dense
from kdcache.stages.dense_targets import at_stride, open_dense_targets
from cache_faults import disk_full_at_write, flip_chunk_byte
from console import run_cli

SCENES, VIEWS, BLOCK, CPU = 12, 2, 4, torch.device("cpu")
INFO = {"arch": "fcn_resnet8", "num_classes": 11, "checkpoint": "teacher.pt", "checkpoint_sha256": "0" * 64}


def scenes(count: int = SCENES, seed: int = 0, split: str = "train") -> DenseData:
    """A few digits scenes (48×48, 11 classes), composed as digits-scenes composes its own, normalised alike."""
    digits, labels = _digits_images()
    images, masks = compose_scenes(digits, labels, count, np.random.RandomState(seed))
    stats = _channel_stats(compose_scenes(digits, labels, count, np.random.RandomState(0))[0])
    return DenseData("digits-scenes", split, images, masks, ("background", *DIGIT_NAMES), *stats)


@pytest.fixture(scope="module")
def data():
    return scenes()


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return create_model("fcn_resnet8", num_classes=11).eval()


def _dump(teacher, data, out, **options):
    options = {"views": VIEWS, "stride": 4, "block_size": BLOCK, "device": "cpu", "show_progress": False, **options}
    return dump_dense(teacher, INFO, data, data.policy("cifar"), out, **options)


def _live(teacher, data, targets, view, stride):
    """The live teacher on the view replayed from the cache's parameters, at the stride, and the view's label maps."""
    images, masks = data.views(data.policy("cifar"), targets.params(view), torch.arange(len(data)), CPU)
    with torch.no_grad():
        logits = teacher(images).float()
    return at_stride(logits, stride), logits, masks


@pytest.mark.parametrize("stride", [1, 4, 8])
def test_a_full_cache_serves_the_live_teachers_map_on_each_replayed_view(teacher, data, tmp_path, stride):
    _dump(teacher, data, tmp_path / "c.zarr", stride=stride)
    with open_dense_targets(tmp_path / "c.zarr", data, CPU) as targets:
        assert (targets.num_views, targets.stride) == (VIEWS, stride)
        for view in range(VIEWS):
            live, _, _ = _live(teacher, data, targets, view, stride)
            served = targets.maps(view, torch.arange(SCENES), None)
            assert served.shape == (SCENES, 11, 48 // stride, 48 // stride) and served.dtype == torch.float32
            torch.testing.assert_close(served, live.half().float(), rtol=1e-3, atol=1e-3)
            # any subset, in any order: the rows of those samples
            some = torch.tensor([7, 0, 5])
            assert torch.equal(targets.maps(view, some, None), served[some])


def test_a_top_k_cache_keeps_the_live_teachers_k_best_classes_per_position_and_their_rest(teacher, data, tmp_path):
    k, stride = 3, 2
    _dump(teacher, data, tmp_path / "c.zarr", stride=stride, topk=k)
    with open_dense_targets(tmp_path / "c.zarr", data, CPU) as targets:
        for view in range(VIEWS):
            live = _live(teacher, data, targets, view, stride)[0].half().float()
            served = targets.maps(view, torch.arange(SCENES), None)
            kept = live.topk(k, dim=1).indices
            torch.testing.assert_close(served.gather(1, kept), live.gather(1, kept), rtol=1e-3, atol=1e-3)
            # the others share one logit, which keeps their softmax mass at T = 1
            others = torch.ones_like(live, dtype=torch.bool).scatter(1, kept, False)
            rest = served.masked_fill(~others, float("nan"))
            assert torch.equal(rest.nanmean(1), rest.nan_to_num(float("-inf")).amax(1))
            mass = lambda z: (torch.softmax(z, 1) * others).sum(1)  # noqa: E731
            torch.testing.assert_close(mass(served), mass(live), rtol=0, atol=2e-3)


def test_the_view_accuracy_is_the_teachers_pixel_accuracy_on_labelled_pixels_at_full_size(teacher, data, tmp_path):
    result = _dump(teacher, data, tmp_path / "c.zarr", stride=8)
    with open_dense_targets(tmp_path / "c.zarr", data, CPU) as targets:
        for view in range(VIEWS):
            _, logits, masks = _live(teacher, data, targets, view, 8)
            labelled = masks != IGNORE_INDEX
            expected = float(((logits.argmax(1) == masks) & labelled).sum()) / float(labelled.sum())
            assert result.view_accuracy[view] == pytest.approx(expected)
            assert targets.cache.metadata["dense"]["labelled_pixels"][view] == int(labelled.sum())
        assert int(labelled.sum()) < SCENES * 48 * 48  # the crops' padding is never scored


def test_an_interrupted_dense_dump_resumes_to_the_arrays_of_an_uninterrupted_one(teacher, data, tmp_path, monkeypatch):
    whole, broken = tmp_path / "whole.h5", tmp_path / "broken.h5"
    _dump(teacher, data, whole, topk=2)
    with disk_full_at_write(monkeypatch, "topk_values", 2), pytest.raises(KdcacheError, match=r"could not write view 0, block 1 .*rerun the same command"):
        _dump(teacher, data, broken, topk=2)
    result = _dump(teacher, data, broken, topk=2)
    assert result.resumed and result.images == VIEWS * SCENES - BLOCK
    with open_cache(whole) as a, open_cache(broken) as b:
        for name in (*a.spec.data_arrays, "aug", "labels", "progress"):
            np.testing.assert_array_equal(a.store.read(name), b.store.read(name))
        assert a.metadata["view_accuracy"] == b.metadata["view_accuracy"] and verify(b) == []


def test_verify_finds_a_damaged_chunk_and_a_count_beyond_the_labelled_pixels(teacher, data, tmp_path):
    _dump(teacher, data, tmp_path / "c.zarr")
    with open_cache(tmp_path / "c.zarr") as cache:
        assert verify(cache) == []
        labelled = int(cache.labels()[1, :BLOCK].sum())
    flip_chunk_byte(tmp_path / "c.zarr", "logits", (1, 2, 0, 0))
    from kdcache.cache.backends import open_store
    with open_store(tmp_path / "c.zarr", read_only=False) as store:
        store.write("progress", (1, 0), np.int64(labelled + 1))
    with open_cache(tmp_path / "c.zarr") as cache:
        found = [str(problem) for problem in verify(cache)]
    assert len(found) == 2
    assert "array 'logits', view 1, block 2 (samples 8-11): fails its checksum" in found[1]
    assert f"view 1, block 0 (samples 0-3): progress records {labelled + 1} correct teacher pixels" in found[0]
    with pytest.raises(KdcacheError, match=r"array 'logits', view 1, block 2 .* fails its checksum"):
        open_dense_targets(tmp_path / "c.zarr", data, CPU).maps(1, torch.arange(3), None)


def test_the_cache_refuses_other_data_or_another_policy_naming_the_field_and_both_values(teacher, data, tmp_path):
    _dump(teacher, data, tmp_path / "c.zarr")
    where = rf"^cache {tmp_path / 'c.zarr'} was written for"
    other = scenes(seed=1)
    with pytest.raises(KdcacheError, match=where + rf" dataset.fingerprint {data.fingerprint[:20]}.* but this run has "
                                                   rf"{other.fingerprint[:20]}"):
        open_dense_targets(tmp_path / "c.zarr", other, CPU)
    with pytest.raises(KdcacheError, match=where + r" dataset.split train but this run has test"):
        open_dense_targets(tmp_path / "c.zarr", scenes(split="test"), CPU)
    fewer = DenseData("digits-scenes", "train", data.images, data.masks.clamp(max=9), data.class_names[:10],
                      data.mean, data.std)
    with pytest.raises(KdcacheError, match=where + r" dataset.num_classes 11 but this run has 10"):
        open_dense_targets(tmp_path / "c.zarr", fewer, CPU)
    with pytest.raises(KdcacheError, match=where + r" augmentation.name cifar but this run has none"):
        open_dense_targets(tmp_path / "c.zarr", data, CPU, policy=data.policy("none"))


def test_a_classifier_teacher_a_stride_that_does_not_tile_and_a_top_k_of_all_classes_are_refused(data, tmp_path):
    classifier = create_model("resnet8", num_classes=11)
    with pytest.raises(KdcacheError, match=r"^--teacher resnet8: a dense dataset .* not one .*fcn_resnet20$"):
        dump_dense(classifier, {**INFO, "arch": "resnet8"}, data, data.policy("cifar"), tmp_path / "c.zarr")
    segmenter = create_model("fcn_resnet8", num_classes=11)
    with pytest.raises(KdcacheError, match=r"^--stride 5: .* 48×48 images; choose one of 1, 2, 3, 4, 6, 8, 12, 16"):
        _dump(segmenter, data, tmp_path / "c.zarr", stride=5)
    with pytest.raises(KdcacheError, match=r"^--topk: expected a number of logits per position below the 11"):
        _dump(segmenter, data, tmp_path / "c.zarr", topk=11)
    assert not (tmp_path / "c.zarr").exists()


def test_dump_teacher_on_digits_scenes_writes_a_dense_cache_that_inspect_and_verify_read(tmp_path, capsys):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "teacher.pt", create_model("fcn_resnet8", num_classes=11))
    cache = tmp_path / "c.zarr"
    common = ["dump-teacher", "--dataset", "digits-scenes", "--split", "test", "--teacher", "fcn_resnet8",
              "--checkpoint", tmp_path / "teacher.pt", "--device", "cpu", "--out", cache]
    code, out, err = run_cli([*common, "--views", "1", "--stride", "8", "--topk", "2"], capsys)
    assert code == 0, err
    code, out, _ = run_cli(["inspect", cache], capsys)
    assert code == 0 and "a dense cache" in out and "6×6 at stride 8" in out and "top 2 classes per position" in out
    code, out, _ = run_cli(["verify", cache], capsys)
    assert code == 0
    code, _, err = run_cli(["eval", "--cache", cache], capsys)
    assert code == 2 and "cannot be recounted; pass --recorded" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run_cli(["eval", "--cache", cache, "--recorded"], capsys)
    with open_cache(cache) as opened:
        assert code == 0 and f"{opened.view_accuracy()[0]:.4f}" in out
    for given, why in ((["--scales", "1,2"], "--scales are for image classifiers' caches"),
                       (["--mix", "cutmix"], "--mix are for image classifiers' caches")):
        code, _, err = run_cli([*common, "--overwrite", *given], capsys)
        assert code == 2 and why in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli([*common[:2], "digits", *common[3:], "--stride", "4"], capsys)
    assert code == 2 and "--stride is the output stride of a dense dataset's logit maps; digits has a label per image" \
        in err


@pytest.mark.slow
def test_the_benchmark_measures_every_stride_and_storage_and_the_dump_against_the_forward(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "dense_cache.py"
    spec = importlib.util.spec_from_file_location("dense_cache_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    benchmark.main(["--quick", "--json", str(tmp_path / "rows.json")])
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(row["stride"], row["storage"]) for row in rows["storage"]] == [
        (stride, storage) for stride in (1, 2, 4, 8) for storage in ("full fp16", "top-1 fp16", "top-2 fp16",
                                                                      "top-4 fp16")]
    full = {row["stride"]: row for row in rows["storage"] if row["storage"] == "full fp16"}
    assert full[1]["mae"] < 1e-3 and full[1]["raw_bytes"] == 48 * 48 * 11 * 2 == 16 * full[4]["raw_bytes"]
    assert [row["what"] for row in rows["throughput"]] == ["forward", "dump stride 4 full", "dump stride 4 top-2"]
    assert all(row["img_per_s"] > 0 and row["ratio"] > 0 for row in rows["throughput"])
    assert "| 8 | top-4 fp16 |" in capsys.readouterr().out


@pytest.mark.slow
def test_a_sharded_dense_dump_equals_a_single_process_one(tmp_path):
    from test_scale_out import ENV, kdcache

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "teacher.pt", create_model("fcn_resnet8", num_classes=11))
    args = ["dump-teacher", "--dataset", "digits-scenes", "--split", "test", "--teacher", "fcn_resnet8", "--checkpoint",
            "teacher.pt", "--views", 1, "--stride", 8, "--topk", 2, "--block-size", 64, "--device", "cpu"]
    assert ENV["OMP_NUM_THREADS"] == "1"  # both dumps at one thread a process: the same float32 sums
    kdcache(tmp_path, *args, "--out", "one.zarr")
    printed = kdcache(tmp_path, *args, "--out", "sharded.zarr", processes=2)
    assert printed.count("wrote sharded.zarr") == 1
    with open_cache(tmp_path / "sharded.zarr") as sharded, open_cache(tmp_path / "one.zarr") as one:
        assert sharded.spec.kind == "dense" and sharded.spec.num_blocks == 4 and verify(sharded) == []
        for name in (*one.spec.data_arrays, "aug", "labels", "progress"):
            np.testing.assert_array_equal(sharded.store.read(name), one.store.read(name), err_msg=name)
        assert sharded.metadata["view_accuracy"] == one.metadata["view_accuracy"]


def test_an_edited_dense_metadata_is_refused_naming_its_fields(teacher, data, tmp_path):
    from kdcache.cache.backends import open_store
    from kdcache.errors import CorruptCacheError

    _dump(teacher, data, tmp_path / "c.zarr")
    with open_store(tmp_path / "c.zarr", read_only=False) as store:
        metadata = store.metadata()
        store.set_metadata({**metadata, "dense": {**metadata["dense"], "map": [6, 6]}})
    with pytest.raises(CorruptCacheError, match=r"a dense cache has .* dense.stride=4, dense.map=\[6, 6\] for images "
                                                r"\[3, 48, 48\]: it was edited"):
        open_cache(tmp_path / "c.zarr")
    with open_store(tmp_path / "c.zarr", read_only=False) as store:
        store.set_metadata({**metadata, "dense": {key: value for key, value in metadata["dense"].items()
                                                  if key != "labelled_pixels"}})
    with pytest.raises(CorruptCacheError, match=r"metadata field 'dense.labelled_pixels' is missing"):
        open_cache(tmp_path / "c.zarr")
