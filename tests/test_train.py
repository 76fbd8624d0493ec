"""Stage 2: the fast path equals the Dataset, cached targets equal the live teacher, resume is exact."""

import csv
import json

import numpy as np
import pytest
import torch

from small_runs import saved_teacher, synthetic_splits
from kdcache.cache import open_cache
from kdcache.config import DistillConfig, TeacherConfig
from kdcache.data import get_policy, load_dataset
from kdcache.errors import KdcacheError
from kdcache.losses import get_loss
from kdcache.models import LogitMap, create_model, file_sha256
from kdcache.report import distill_sweep
from kdcache.runtime import epoch_generator
from kdcache.stages import (
    CacheDataset,
    CachedTargets,
    CachedViews,
    LiveTeacher,
    device_batches,
    distill,
    train_teacher,
)
from kdcache.stages.dump import dump_teacher

CLASSES = 4


@pytest.fixture(scope="module")
def data():
    return synthetic_splits(48, CLASSES, seed=5)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return saved_teacher(tmp_path_factory.mktemp("teacher"), CLASSES, seed=1)


def make_cache(teacher, data, path, dtype="float16", views=2):
    model, checkpoint = teacher
    info = {"arch": "resnet8", "num_classes": CLASSES, "checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint)}
    dump_teacher(model, info, data[0], get_policy("cifar"), path, views=views, scales=(1, 2, 4), dtype=dtype,
                 block_size=20, show_progress=False)
    return path


@pytest.fixture(scope="module")
def cache16(teacher, data, tmp_path_factory):
    return make_cache(teacher, data, tmp_path_factory.mktemp("c16") / "c.zarr")


@pytest.fixture(scope="module")
def cache32(teacher, data, tmp_path_factory):
    return make_cache(teacher, data, tmp_path_factory.mktemp("c32") / "c.zarr", dtype="float32")


@pytest.mark.parametrize("epoch", [0, 1, 2])
@pytest.mark.parametrize("scales", [(1, 2, 4), (1, 2), (1,)])
def test_fast_path_batches_equal_the_datasets_items_for_the_same_indices(cache16, data, epoch, scales):
    train, policy = data[0], get_policy("cifar")
    with open_cache(cache16) as cache:
        dataset = CacheDataset(cache, data=train, scales=scales)
        dataset.set_epoch(epoch)
        views = CachedViews(cache, policy)
        targets = CachedTargets(cache, scales)
        targets.begin_epoch(views.view_of(epoch))
        batches = device_batches(train.images, train.labels, views.params(epoch), policy, train.mean, train.std,
                                 targets, 8, epoch_generator(0, epoch))
        order = torch.randperm(len(train.labels), generator=epoch_generator(0, epoch))
        for number, (x, y, t) in enumerate(batches):
            items = [dataset[int(i)] for i in order[number * 8:(number + 1) * 8]]
            torch.testing.assert_close(x, torch.stack([item[0] for item in items]), rtol=0, atol=0)
            torch.testing.assert_close(y, torch.stack([item[1] for item in items]), rtol=0, atol=0)
            torch.testing.assert_close(t["regions"], torch.stack([item[2]["regions"] for item in items]), rtol=0,
                                       atol=0)
        assert number == len(train.labels) // 8 - 1 and t["regions"].shape == (8, sum(s * s for s in scales), CLASSES)


def test_dataset_works_with_dataloader_and_distributed_sampler(cache16, data):
    from torch.utils.data import DataLoader, DistributedSampler

    with open_cache(cache16) as cache:
        dataset = CacheDataset(cache, data=data[0])
        halves = [list(DistributedSampler(dataset, num_replicas=2, rank=r, shuffle=True, seed=0)) for r in (0, 1)]
        assert sorted(halves[0] + halves[1]) == list(range(48))
        x, y, t = next(iter(DataLoader(dataset, batch_size=6, sampler=halves[0])))
        assert x.shape == (6, 3, 16, 16) and x.dtype == torch.float32 and t["regions"].shape == (6, 21, CLASSES)
        dataset.set_epoch(1)
        assert dataset.view == 1
        assert not torch.equal(dataset[0][2]["regions"], CacheDataset(cache, data=data[0])[0][2]["regions"])


@pytest.mark.parametrize("loss_name", ["kd", "dkd", "sdd-lskd", "sdd-kd", "sld"])
def test_a_step_on_cached_targets_equals_a_step_on_the_live_teacher(cache16, teacher, data, loss_name):
    train, policy = data[0], get_policy("cifar")
    loss = get_loss(loss_name)
    with open_cache(cache16) as cache:
        views = CachedViews(cache, policy)
        cached = CachedTargets(cache)
        cached.begin_epoch(views.view_of(1))
        live = LiveTeacher(teacher[0], cache.scales)
        x, y, _ = next(device_batches(train.images, train.labels, views.params(1), policy, train.mean, train.std,
                                      None, 16, epoch_generator(0, 1)))
        index = torch.randperm(48, generator=epoch_generator(0, 1))[:16]
        losses, grads = [], []
        for targets in (cached, live):
            torch.manual_seed(3)
            student = LogitMap(create_model("resnet8", num_classes=CLASSES), cache.scales)
            terms = loss.compute(student(x), targets(index, x), y, epoch=200)
            terms["total"].backward()
            losses.append(terms["total"].detach())
            grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    # the cache holds fp16-rounded teacher logits: equal up to that rounding
    torch.testing.assert_close(losses[0], losses[1], rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-2, atol=2e-4)


def config(tmp_path, name, **options):
    settings = dict(students=("resnet8",), losses=("sdd-lskd",), epochs=2, batch_size=8, out=str(tmp_path / name),
                    device="cpu")
    settings.update(options)
    return DistillConfig(**settings)


def student_weights(folder):
    return torch.load(folder / "model.pt", weights_only=True)["model"]


def test_two_epochs_from_a_float32_cache_equal_two_epochs_with_the_live_teacher_on_the_same_views(cache32, teacher,
                                                                                                 data, tmp_path):
    offline = distill(config(tmp_path, "offline", cache=str(cache32)), show_progress=False, data=data)
    online = distill(config(tmp_path, "online", cache=str(cache32), live_teacher=str(teacher[1]), teacher="resnet8"),
                     show_progress=False, data=data)
    a, b = student_weights(offline[0].folder), student_weights(online[0].folder)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    assert offline[0].test_acc == online[0].test_acc


def test_resume_after_epoch_one_of_three_gives_the_weights_of_an_uninterrupted_run(cache16, data, tmp_path,
                                                                                   monkeypatch):
    from interrupt import interrupted_after_first_epoch

    whole = distill(config(tmp_path, "whole", cache=str(cache16), epochs=3), show_progress=False, data=data)
    interrupted_after_first_epoch(monkeypatch, lambda: distill(config(tmp_path, "resumed", cache=str(cache16),
                                                                      epochs=3), show_progress=False, data=data))
    resumed = distill(config(tmp_path, "resumed", cache=str(cache16), epochs=3, resume=True), show_progress=False,
                      data=data)
    a, b = student_weights(whole[0].folder), student_weights(resumed[0].folder)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    rows = list(csv.DictReader(open(resumed[0].folder / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    with pytest.raises(KdcacheError, match="--resume: .* other settings \\(config\\)"):
        distill(config(tmp_path, "resumed", cache=str(cache16), epochs=3, lr=0.1, resume=True), show_progress=False,
                data=data)
    # the same run inside another sweep (another student beside it) still resumes: it computes the same thing
    again = distill(config(tmp_path, "resumed", cache=str(cache16), epochs=3, resume=True,
                           students=(resumed[0].student, "resnet20")), show_progress=False, data=data)
    assert again[0].test_acc == resumed[0].test_acc


def test_many_students_from_one_cache_each_get_a_folder_and_the_sweep_a_summary(cache16, data, tmp_path):
    runs = distill_sweep(config(tmp_path, "sweep", cache=str(cache16), students=("resnet8", "wrn_16_2"),
                                losses=("ce", "kd", "sdd-lskd"), scales=(1, 2)), show_progress=False, data=data)
    assert [r.name for r in runs] == ["resnet8-ce", "resnet8-kd", "resnet8-sdd-lskd", "wrn_16_2-ce", "wrn_16_2-kd",
                                      "wrn_16_2-sdd-lskd"]
    summary = list(csv.DictReader(open(tmp_path / "sweep" / "summary.csv")))
    assert [row["run"] for row in summary] == [r.name for r in runs]
    assert (tmp_path / "sweep" / "summary.png").stat().st_size > 1000
    for run in runs:
        rows = list(csv.DictReader(open(run.folder / "metrics.csv")))
        assert len(rows) == 2 and {"loss_ce", "train_acc", "test_acc", "img_per_s", "lr"} <= set(rows[0])
        # a column per term of the run's loss, named as the loss names it
        assert {column for column in rows[0] if column.startswith("loss_")} == \
            {f"loss_{term}" for term in get_loss(run.loss).term_names}
        sidecar = json.loads((run.folder / "model.json").read_text())
        assert sidecar["arch"] == run.student and sidecar["cache"] == str(cache16)
    # the two ce runs and the kd runs of one student started from the same weights and saw the same batches
    assert runs[0].test_acc == pytest.approx(float(summary[0]["test_acc"]), abs=1e-4)


def test_explicit_student_loss_pairs_replace_the_grid(cache16, data, tmp_path):
    runs = distill(config(tmp_path, "pairs", cache=str(cache16), epochs=1, pairs=("resnet8:kd", "wrn_16_2:ce")),
                   show_progress=False, data=data)
    assert [(r.student, r.loss) for r in runs] == [("resnet8", "kd"), ("wrn_16_2", "ce")]
    with pytest.raises(KdcacheError, match="--pair: expected STUDENT:LOSS"):
        distill(config(tmp_path, "pairs", cache=str(cache16), pairs=("resnet8",)), show_progress=False, data=data)


def test_distill_refuses_a_cache_of_another_dataset_or_a_missing_source(cache16, data, tmp_path):
    other = load_dataset("synthetic", num_samples=48, num_classes=CLASSES, image_size=16, seed=6)
    with pytest.raises(KdcacheError, match="written for dataset.mean .* but this run has"):  # other pixel statistics
        distill(config(tmp_path, "x", cache=str(cache16)), show_progress=False, data=(other, data[1]))
    with pytest.raises(KdcacheError, match="--cache CACHE .* --live-teacher CHECKPOINT .* --mutual .* --ema-teacher"):
        distill(config(tmp_path, "x"), show_progress=False, data=data)
    with pytest.raises(KdcacheError, match="does not apply to loss 'kd'"):
        distill(config(tmp_path, "x", cache=str(cache16), losses=("kd",), alpha=2.0), show_progress=False, data=data)


def test_online_baseline_draws_fresh_views_each_epoch(teacher, data, tmp_path):
    runs = distill(config(tmp_path, "live", live_teacher=str(teacher[1]), teacher="resnet8", losses=("kd",)),
                   show_progress=False, data=data)
    assert json.loads((runs[0].folder / "model.json").read_text())["live_teacher"]["arch"] == "resnet8"


def test_batch_path_dataset_trains_like_the_device_path(cache16, data, tmp_path):
    fast = distill(config(tmp_path, "fast", cache=str(cache16)), show_progress=False, data=data)
    general = distill(config(tmp_path, "general", cache=str(cache16), batch_path="dataset"), show_progress=False,
                      data=data)
    a, b = student_weights(fast[0].folder), student_weights(general[0].folder)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_train_teacher_on_digits_reaches_70_percent_in_a_few_cpu_epochs(tmp_path):
    result = train_teacher(TeacherConfig(model="resnet8", epochs=6, batch_size=32, out=str(tmp_path / "t"),
                                         device="cpu"), show_progress=False)
    assert result.test_acc >= 0.7
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["arch"] == "resnet8" and sidecar["num_classes"] == 10
    assert sidecar["dataset"]["fingerprint"] == load_dataset("digits").fingerprint
    assert len(sidecar["sha256"]) == 64 and sidecar["test_acc"] == result.test_acc
    state = torch.load(result.checkpoint, weights_only=True)
    assert set(state) == {"model"} and np.isclose(sidecar["best_test_acc"], result.best_test_acc)


@pytest.mark.parametrize("order", ["cycle", "shuffle"])
def test_cached_targets_reuse_two_buffers_without_serving_a_stale_view(teacher, data, tmp_path, order):
    path = make_cache(teacher, data, tmp_path / "c.zarr", views=3)
    with open_cache(path) as cache:
        views = CachedViews(cache, get_policy("cifar"), order, seed=2)
        targets = CachedTargets(cache)
        buffers = {id(array) for buffer in targets._buffers for array in buffer.values()}
        everything = torch.arange(48)
        for epoch in range(7):
            targets.begin_epoch(views.view_of(epoch), views.view_of(epoch + 1))
            expected = torch.from_numpy(cache.view(views.view_of(epoch)).astype(np.float32))
            assert torch.equal(targets(everything, None)["regions"], expected), epoch
        assert {id(array) for buffer in targets._buffers for array in buffer.values()} == buffers  # reused
