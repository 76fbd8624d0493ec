"""Segmentation's stages (kdcache.stages.dense_train, segmentation_metrics): mIoU and pixel accuracy as a slow
count says, the loss of a step as its parts say, a student from precomputed teacher maps identical to one from the
live teacher on the same views, and train-teacher, distill and eval through the command line."""

import csv
import json
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kdcache.data.dense as dense
from kdcache.cli import main
from kdcache.config import DistillConfig, TrainConfig
from kdcache.data import load_dataset
from kdcache.data.dense import IGNORE_INDEX, DenseData
from kdcache.errors import KdcacheError
from kdcache.losses import cwd, pixel_kd, scaled_loss
from kdcache.models import create_model, save_checkpoint
from kdcache.stages.dense_targets import LiveDenseTargets, at_stride
from kdcache.stages.dense_train import LiveOnViews, distill_dense, segmentation_terms, train_segmentation
from kdcache.stages.segmentation_metrics import confusion_matrix, scores
from console import run_cli
from small_runs import saved_teacher

CPU = torch.device("cpu")


def slow_scores(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[float, float, int]:
    """mIoU over the classes present in the labels or predictions, pixel accuracy, and how many classes: counted
    pixel by pixel in Python."""
    pairs = [(int(t), int(p)) for t, p in zip(labels.flatten(), predictions.flatten()) if int(t) != IGNORE_INDEX]
    ious = []
    for c in range(num_classes):
        tp = sum(t == c and p == c for t, p in pairs)
        fp = sum(t != c and p == c for t, p in pairs)
        fn = sum(t == c and p != c for t, p in pairs)
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
    return sum(ious) / len(ious), sum(t == p for t, p in pairs) / len(pairs), len(ious)


def test_miou_and_pixel_accuracy_on_hand_made_maps():
    labels = torch.tensor([[[0, 0, 1, 1], [0, 255, 1, 1], [255, 255, 0, 0]]])
    predictions = torch.tensor([[[0, 1, 1, 1], [0, 2, 1, 2], [2, 1, 0, 0]]])  # the 255 pixels' guesses are not counted
    confusion = confusion_matrix(predictions, labels, 4)
    assert confusion.tolist() == [[4, 1, 0, 0], [0, 3, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    found = scores(confusion)
    # class 0: 4 / (4 + 1); class 1: 3 / (3 + 1 + 1); class 2 predicted, never right: 0; class 3 absent: no IoU
    assert found.miou == pytest.approx((4 / 5 + 3 / 5 + 0) / 3)
    assert found.pixel_acc == pytest.approx(7 / 9)
    assert (found.pixels, found.classes) == (9, 3)
    assert (found.miou, found.pixel_acc, found.classes) == pytest.approx(slow_scores(predictions, labels, 4))


def test_miou_and_pixel_accuracy_equal_a_slow_count_on_random_maps():
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 6, (3, 7, 5), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < 0.2] = IGNORE_INDEX
    labels[labels == 4] = 5  # class 4 never labelled; predicted now and then
    predictions = torch.randint(0, 6, labels.shape, generator=generator)
    found = scores(confusion_matrix(predictions, labels, 6))
    assert (found.miou, found.pixel_acc, found.classes) == pytest.approx(slow_scores(predictions, labels, 6))


def test_a_steps_loss_is_weighted_cross_entropy_over_labelled_pixels_plus_the_distillation_term():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 8, 8, generator=generator)
    teacher = torch.randn(2, 5, 4, 4, generator=generator)  # at output stride 2
    masks = torch.randint(0, 5, (2, 8, 8), generator=generator)
    masks[:, :2] = IGNORE_INDEX
    labelled = masks != IGNORE_INDEX
    ce = -F.log_softmax(logits, 1).gather(1, masks.clamp(max=4)[:, None])[:, 0][labelled].mean()
    for name, term, expected in [("cwd", "cwd", 3 * cwd(logits, teacher, 4.0)),
                                 ("pixel-kd", "pixel_kd", 10 * pixel_kd(logits, teacher, 1.0))]:
        terms = segmentation_terms(scaled_loss(name, {}, 240), logits, masks, teacher, 1)
        assert set(terms) == {"ce", term, "total"}
        assert terms["ce"] == pytest.approx(float(ce), rel=1e-6)
        assert terms[term] == pytest.approx(float(expected), rel=1e-6)
        assert terms["total"] == pytest.approx(float(ce + expected), rel=1e-6)
    overridden = scaled_loss("cwd", {"ce_weight": 0.5, "distill_weight": 2.0, "temperature": 2.0}, 240)
    terms = segmentation_terms(overridden, logits, masks, teacher, 1)
    assert terms["total"] == pytest.approx(float(0.5 * ce + 2 * cwd(logits, teacher, 2.0)), rel=1e-6)
    assert set(segmentation_terms(scaled_loss("ce", {}, 240), logits, masks, None, 1)) == {"ce", "total"}


@pytest.fixture(scope="module")
def scenes() -> tuple[DenseData, DenseData]:
    """32 training scenes and 16 test scenes (slices of digits-scenes' test split: it composes fastest)."""
    whole = load_dataset("digits-scenes", split="test")

    def part(split: str, rows: slice) -> DenseData:
        return DenseData(whole.name, split, whole.images[rows].contiguous(), whole.masks[rows].contiguous(),
                         whole.class_names, whole.mean, whole.std)
    return part("train", slice(0, 32)), part("test", slice(32, 48))


class PrecomputedMaps:
    """The teacher's maps of every view computed up front over the whole split, served by index (as a cache serves
    them), with the views asked for recorded."""

    def __init__(self, live: LiveDenseTargets, data: DenseData) -> None:
        self.policy, self.num_views, self.stride, self.asked = live.policy, live.num_views, live.stride, []
        everyone = torch.arange(len(data))
        self.stored = [live.params(view) for view in range(self.num_views)]
        self.held = [live.maps(view, everyone, data.views(self.policy, params, everyone, CPU)[0])
                     for view, params in enumerate(self.stored)]

    def params(self, view: int) -> torch.Tensor:
        self.asked.append(("params", view))
        return self.stored[view]

    def maps(self, view: int, indices: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        self.asked.append(("maps", view))
        return self.held[view][indices]


def _student(scenes, targets, folder: Path, loss: str = "cwd") -> tuple[torch.nn.Module, list[dict]]:
    data, test = scenes
    config = TrainConfig(epochs=3, batch_size=8, lr=0.05)
    torch.manual_seed(0)
    model = create_model("fcn_resnet8", num_classes=data.num_classes)
    train_segmentation(model, data, test, targets, targets, scaled_loss(loss, {}, config.epochs), config, folder,
                       {"arch": "fcn_resnet8", "loss": loss}, CPU, show_progress=False)
    with open(folder / "metrics.csv") as file:
        return model, list(csv.DictReader(file))


def test_a_student_from_precomputed_maps_equals_one_from_the_live_teacher_on_the_same_views(scenes, tmp_path):
    data, _ = scenes
    torch.manual_seed(1)
    teacher = create_model("fcn_resnet8", num_classes=data.num_classes).eval()
    live = LiveDenseTargets(teacher, data.policy("cifar"), len(data), num_views=2, stride=2, seed=5)
    cached = PrecomputedMaps(live, data)
    online, online_history = _student(scenes, live, tmp_path / "live")
    offline, offline_history = _student(scenes, cached, tmp_path / "cached")
    assert [view for kind, view in cached.asked if kind == "params"] == [0, 1, 0]  # epoch e: view e mod K
    assert {view for kind, view in cached.asked if kind == "maps"} == {0, 1}
    for key in ("loss_total", "loss_ce", "loss_cwd", "test_miou", "test_pixel_acc"):
        assert [float(row[key]) for row in offline_history] == pytest.approx(
            [float(row[key]) for row in online_history], rel=1e-5, abs=1e-6)
    for (name, a), b in zip(online.state_dict().items(), offline.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


def test_the_live_teacher_on_a_caches_views_replays_its_parameters_at_its_stride(scenes):
    data, _ = scenes
    teacher = create_model("fcn_resnet8", num_classes=data.num_classes).eval()
    cached = PrecomputedMaps(LiveDenseTargets(teacher, data.policy("cifar"), len(data), 2, stride=4, seed=9), data)
    replayed = LiveOnViews(teacher, cached, len(data))
    assert (replayed.num_views, replayed.stride) == (2, 4)
    assert torch.equal(replayed.params(1), cached.stored[1])
    indices = torch.tensor([3, 7])
    images, _ = data.views(replayed.policy, replayed.params(1), indices, CPU)
    with torch.no_grad():
        expected = at_stride(teacher(images), 4)
    assert torch.allclose(replayed.maps(1, indices, images), expected, atol=1e-6)
    assert torch.allclose(replayed.maps(1, indices, images), cached.maps(1, indices, images), atol=1e-5)


@pytest.fixture(scope="module")
def small_scenes():
    """digits-scenes of 16 training and 8 test scenes, for the commands below."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dense, "SCENE_COUNTS", {"train": 16, "test": 8})
        yield


@pytest.fixture(scope="module")
def teacher_run(small_scenes, tmp_path_factory) -> Path:
    """A segmentation teacher trained one epoch by `kdcache train-teacher`."""
    folder = tmp_path_factory.mktemp("seg") / "teacher"
    main(["train-teacher", "--dataset", "digits-scenes", "--model", "fcn_resnet8", "--epochs", "1", "--batch-size",
          "8", "--out", str(folder)])
    return folder


def test_train_teacher_records_miou_and_pixel_accuracy_and_eval_reports_the_same(teacher_run, small_scenes, capsys):
    with open(teacher_run / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert {"test_miou", "test_pixel_acc", "test_loss", "loss_ce", "loss_total"} <= set(rows[0])
    sidecar = json.loads((teacher_run / "model.json").read_text())
    assert (sidecar["arch"], sidecar["task"], sidecar["num_classes"]) == ("fcn_resnet8", "segmentation", 11)
    assert sidecar["dataset"]["name"] == "digits-scenes"
    code, out, err = run_cli(["eval", teacher_run, "--json"], capsys)
    assert code == 0, err
    found = json.loads(out)
    assert (found["miou"], found["pixel_acc"]) == pytest.approx((sidecar["test_miou"], sidecar["test_pixel_acc"]))
    assert (found["images"], found["model"]) == (8, "fcn_resnet8")
    code, out, _ = run_cli(["eval", teacher_run], capsys)
    assert code == 0 and f"mIoU {sidecar['test_miou']:.4f}" in out and "pixel accuracy" in out
    code, _, err = run_cli(["eval", teacher_run, "--within-classes"], capsys)
    assert code == 2 and "drop --within-classes" in err and len(err.strip().splitlines()) == 1


def test_distill_from_the_live_teacher_prints_and_writes_miou_and_pixel_accuracy(teacher_run, small_scenes, tmp_path,
                                                                                  capsys):
    code, out, err = run_cli(["distill", "--live-teacher", teacher_run, "--dataset", "digits-scenes", "--student",
                              "fcn_resnet8", "--loss", "ce", "--loss", "pixel-kd", "--epochs", 1, "--batch-size", 8,
                              "--out", tmp_path], capsys)
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("run"))
    assert "test mIoU" in header and "pixel acc" in header and "vs ce" in header
    with open(tmp_path / "summary.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["run"] for row in rows] == ["fcn_resnet8-ce", "fcn_resnet8-pixel-kd"]
    assert {"test_miou", "test_pixel_acc", "best_test_miou"} <= set(rows[0])
    sidecar = json.loads((tmp_path / "fcn_resnet8-pixel-kd" / "model.json").read_text())
    assert sidecar["live_teacher"]["arch"] == "fcn_resnet8" and sidecar["task"] == "segmentation"
    with open(tmp_path / "fcn_resnet8-pixel-kd" / "metrics.csv") as file:
        assert {"loss_pixel_kd", "test_miou", "distill_weight"} <= set(next(csv.DictReader(file)))


@pytest.mark.parametrize("argv, expected", [
    (["train-teacher", "--dataset", "digits-scenes", "--model", "resnet8"], "classifies whole images"),
    (["train-teacher", "--dataset", "digits", "--model", "fcn_resnet8"], "is a segmentation model"),
    (["train-teacher", "--dataset", "digits-scenes", "--model", "fcn_resnet8", "--image-size", 32], "--image-size 32"),
    (["distill", "--dataset", "digits-scenes", "--student", "fcn_resnet8", "--loss", "kd"], "ce, pixel-kd or cwd"),
    (["distill", "--dataset", "digits-scenes", "--student", "fcn_resnet8", "--loss", "cwd", "--resume"],
     "does not resume"),
    (["distill", "--dataset", "digits-scenes", "--student", "fcn_resnet8", "--loss", "cwd", "--ema-decay", 0.9],
     "without --ema-decay"),
    (["distill", "--dataset", "digits", "--student", "resnet8", "--loss", "cwd"], "labels whole images"),
])
def test_a_segmentation_mistake_is_one_line(argv, expected, teacher_run, small_scenes, tmp_path, capsys):
    teacher = ["--live-teacher", teacher_run] if argv[0] == "distill" else []
    code, out, err = run_cli([*argv, *teacher, "--epochs", 1, "--out", tmp_path / "run"], capsys)
    assert code == 2 and err.startswith("kdcache: error: ") and len(err.strip().splitlines()) == 1
    assert expected in err
    assert not (tmp_path / "run" / "model.pt").exists()


def test_students_from_the_cache_and_from_the_live_teacher_on_its_views_learn_alike(teacher_run, small_scenes,
                                                                                    tmp_path, capsys):
    cache = tmp_path / "cache.zarr"
    code, _, err = run_cli(["dump-teacher", "--dataset", "digits-scenes", "--checkpoint", teacher_run, "--views", 2,
                            "--stride", 2, "--dtype", "float32", "--out", cache], capsys)
    assert code == 0, err
    curves = {}
    for source, extra in (("cache", []), ("live", ["--live-teacher", teacher_run])):
        code, _, err = run_cli(["distill", "--cache", cache, *extra, "--student", "fcn_resnet8", "--loss", "cwd",
                                "--epochs", 3, "--batch-size", 8, "--out", tmp_path / source], capsys)
        assert code == 0, err
        with open(tmp_path / source / "fcn_resnet8-cwd" / "metrics.csv") as file:
            curves[source] = [float(row[key]) for row in csv.DictReader(file)
                              for key in ("loss_total", "loss_cwd", "test_miou")]
    assert curves["cache"] == pytest.approx(curves["live"], rel=1e-4, abs=1e-6)


def test_a_segmentation_student_or_live_teacher_is_refused_for_data_labelled_per_image(tmp_path, capsys):
    _, classifier = saved_teacher(tmp_path, 10, seed=0)
    segmenter = tmp_path / "segmenter.pt"
    save_checkpoint(segmenter, create_model("fcn_resnet8", num_classes=10))
    for teacher, spec, student, expected in [
            (classifier, "resnet8", "fcn_resnet8", "--student fcn_resnet8: fcn_resnet8 is a segmentation model (a "
                                                   "class per pixel), and digits labels whole images"),
            (segmenter, "fcn_resnet8", "resnet8", "--live-teacher fcn_resnet8: fcn_resnet8 is a segmentation model")]:
        code, _, err = run_cli(["distill", "--live-teacher", teacher, "--teacher", spec, "--dataset", "digits",
                                "--student", student, "--loss", "kd", "--epochs", 1, "--out", tmp_path / "run"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
    code, _, err = run_cli(["eval", segmenter, "--model", "fcn_resnet8", "--dataset", "digits"], capsys)
    assert code == 2 and "--model fcn_resnet8: fcn_resnet8 is a segmentation model" in err


def test_several_caches_are_refused_for_a_segmentation_student(scenes, tmp_path):
    config = DistillConfig(cache="a.zarr", extra_caches=("b.zarr",), students=("fcn_resnet8",), losses=("cwd",),
                           out=str(tmp_path))
    with ExitStack() as held, pytest.raises(KdcacheError, match=r"one teacher; give one --cache \(got 2\)"):
        distill_dense(config, None, *scenes, CPU, False, held)
    assert not any(tmp_path.iterdir())
