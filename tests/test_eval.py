"""Evaluation as people expect it: top-5 beside top-1 (more than 5 classes), and `kdcache eval` of a run folder, a
weights file and a cache, each against a computation by hand."""

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from console import run_cli
from small_runs import saved_teacher, synthetic_splits
from kdcache.cache import open_cache
from kdcache.config import DistillConfig, TeacherConfig
from kdcache.data import get_policy, load_dataset, normalize
from kdcache.models import file_sha256
from kdcache.report import distill_sweep, summary_table
from kdcache.stages import train_teacher
from kdcache.stages.dump import dump_teacher
from kdcache.stages.evaluate import evaluate_batches
from kdcache.stages.splits import EvalSplit

CPU = torch.device("cpu")


def by_hand(model, test):
    """Top-1, top-5 (torch.topk) and mean cross-entropy of a model's logits on a whole split, in one pass."""
    with torch.no_grad():
        logits = model.eval()(normalize(test.images, test.mean, test.std))
    top5 = (logits.topk(5, dim=-1).indices == test.labels[:, None]).any(-1).float().mean().item()
    return ((logits.argmax(-1) == test.labels).float().mean().item(), top5,
            F.cross_entropy(logits, test.labels).item())


@pytest.mark.parametrize("classes", [10, 5])
def test_top5_is_recorded_beside_top1_for_more_than_five_classes_only(tmp_path, classes):
    _, teacher = saved_teacher(tmp_path, classes, seed=1)
    config = DistillConfig(live_teacher=str(teacher), teacher="resnet8", students=("resnet8",), losses=("ce", "kd"),
                           epochs=1, batch_size=16, out=str(tmp_path / "runs"), device="cpu")
    runs = distill_sweep(config, show_progress=False, data=synthetic_splits(48, classes, seed=5))
    metrics = list(csv.DictReader(open(runs[0].folder / "metrics.csv")))[-1]
    summary = list(csv.DictReader(open(tmp_path / "runs" / "summary.csv")))
    table = summary_table(runs)
    assert "test_loss" in metrics and "test_top5" in summary[0]  # summary.csv keeps one header for every sweep
    if classes > 5:
        assert float(metrics["test_top5"]) >= float(metrics["test_acc"])
        assert [row["test_top5"] for row in summary] == [f"{run.test_top5:.4f}" for run in runs]
        assert runs[0].test_top5 == float(metrics["test_top5"])
        assert "top-5" in table.splitlines()[0] and f"{100 * runs[0].test_top5:.2f}%" in table.splitlines()[1]
    else:  # always 100 %: no column in metrics.csv or the table, an empty cell in summary.csv
        assert "test_top5" not in metrics and "top-5" not in table
        assert [row["test_top5"] for row in summary] == ["", ""] and runs[0].test_top5 is None


@pytest.mark.parametrize("classes", [10, 5])
def test_the_evaluation_equals_topk_and_cross_entropy_by_hand(tmp_path, classes):
    model, _ = saved_teacher(tmp_path, classes, seed=2)
    test = synthetic_splits(40, classes, seed=3)[1]
    testing = EvalSplit(test, CPU, batch_size=7)  # several batches, the last one short
    found = evaluate_batches(model, testing.batches(range(len(testing))), len(testing))
    top1, top5, loss = by_hand(model, test)
    assert found.samples == len(test.labels)
    assert found.top1 == pytest.approx(top1) and found.loss == pytest.approx(loss, rel=1e-5)
    assert found.top5 == (pytest.approx(top5) if classes > 5 else None)


def test_eval_of_a_run_folder_gives_the_runs_last_test_accuracy(tmp_path, capsys):
    result = train_teacher(TeacherConfig(model="resnet8", dataset="synthetic", image_size=16, epochs=1, batch_size=100,
                                         out=str(tmp_path / "t"), device="cpu"), show_progress=False)
    last = list(csv.DictReader(open(tmp_path / "t" / "metrics.csv")))[-1]
    code, out, err = run_cli(["eval", tmp_path / "t", "--json"], capsys)
    found = json.loads(out)
    assert code == 0 and err == ""
    assert (found["model"], found["dataset"], found["split"], found["num_classes"], found["samples"]) == \
        ("resnet8", "synthetic", "test", 10, 500)
    assert found["top1"] == float(last["test_acc"]) == result.test_acc
    assert found["top5"] == float(last["test_top5"]) and found["loss"] == pytest.approx(float(last["test_loss"]))
    code, out, _ = run_cli(["eval", tmp_path / "t"], capsys)
    assert code == 0 and f"top-1 {found['top1']:.4f}  top-5 {found['top5']:.4f}  loss {found['loss']:.4f}" in out


def test_eval_of_a_weights_file_names_its_model_and_dataset(tmp_path, capsys):
    model, weights = saved_teacher(tmp_path, 10, seed=4)
    code, out, _ = run_cli(["eval", weights, "--model", "resnet8", "--dataset", "synthetic", "--image-size", "16",
                            "--batch-size", "64", "--json"], capsys)
    found = json.loads(out)
    top1, top5, loss = by_hand(model, load_dataset("synthetic", split="test", image_size=16))
    assert code == 0 and found["checkpoint"] == str(weights) and found["model"] == "resnet8"
    assert (found["top1"], found["top5"]) == (pytest.approx(top1), pytest.approx(top5))
    assert found["loss"] == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["eval", "{tmp}/nowhere"], "checkpoint {tmp}/nowhere does not exist: pass a weights file"),
    (["eval", "{tmp}/teacher.pt", "--dataset", "synthetic"], "--teacher: which model is {tmp}/teacher.pt? it has no "
                                                               "kdcache sidecar (teacher.json); pass --teacher SPEC"),
    (["eval", "{tmp}/teacher.pt", "--model", "resnet8"], "eval: which dataset is {tmp}/teacher.pt for? it has no "
                                                         "kdcache sidecar (model.json) that names one; pass --dataset"),
    (["eval"], "eval: give MODEL_OR_RUN_FOLDER (weights, or a run folder of train-teacher or distill) or --cache"),
    (["eval", "--cache", "{tmp}/c.zarr", "--model", "resnet8", "--split", "train"],
     "eval --cache: --model, --split set how a model is evaluated"),
    (["eval", "{tmp}/teacher.pt", "--recorded"], "eval: --recorded reports a cache's recorded accuracy; give --cache"),
])
def test_eval_mistakes_are_one_line_each(tmp_path, capsys, argv, message):
    saved_teacher(tmp_path, 10, seed=4)
    code, out, err = run_cli([arg.format(tmp=tmp_path) for arg in argv], capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("kdcache: error: " + message.format(tmp=tmp_path))


@pytest.mark.parametrize("topk", [0, 6, 3])
def test_eval_of_a_cache_recomputes_each_views_accuracy_from_its_stored_logits(tmp_path, capsys, topk):
    model, weights = saved_teacher(tmp_path, 10, seed=6)
    info = {"arch": "resnet8", "checkpoint": str(weights), "checkpoint_sha256": file_sha256(weights)}
    dump_teacher(model, info, synthetic_splits(40, 10, seed=7)[0], get_policy("cifar"), tmp_path / "c.zarr",
                 views=2, scales=(1, 2), dtype="float32", block_size=16, topk=topk, show_progress=False)
    code, out, _ = run_cli(["eval", "--cache", tmp_path / "c.zarr", "--json"], capsys)
    found = json.loads(out)
    with open_cache(tmp_path / "c.zarr") as cache:
        labels, recorded = torch.from_numpy(cache.labels()), cache.view_accuracy()
        logits = [torch.from_numpy(cache.view(view))[:, 0] for view in range(cache.num_views)]
    assert code == 0 and (found["teacher"], found["num_classes"], found["samples"]) == ("resnet8", 10, 40)
    for view, stored in enumerate(logits):
        row = found["views"][view]
        top5 = (stored.topk(5, dim=-1).indices == labels[:, None]).any(-1).float().mean().item()
        assert row["view"] == view and row["recorded_top1"] == recorded[view]
        assert row["top1"] == pytest.approx((stored.argmax(-1) == labels).float().mean().item()) == recorded[view]
        # a top-k cache of fewer than 5 classes per region cannot say which fifth class the teacher ranked
        assert row["top5"] == (None if 0 < topk < 5 else pytest.approx(top5))
    code, out, _ = run_cli(["eval", "--cache", tmp_path / "c.zarr", "--recorded"], capsys)
    assert code == 0 and out.splitlines()[1].split() == ["view", "recorded", "top-1", "top-1", "top-5"]
    assert out.splitlines()[2].split() == ["0", f"{recorded[0]:.4f}", "-", "-"]
