"""Evaluation as people expect it: top-1, top-5 and the mean cross-entropy of a model on a test split (what every
training loop records each epoch, and `kdcache eval` reports for a run folder or weights file), and a teacher's
top-1 and top-5 over each view of a cache, recomputed from its stored logits beside what the dump recorded.

Top-5 is reported only for more than 5 classes: with 5 or fewer it is always 100 %, so it is None (and the
column is left out of metrics.csv, left empty in summary.csv).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.cache import TeacherCache, open_cache
from kdcache.data import DataSource, class_names, load_at_size
from kdcache.data.dense import DenseData, is_dense
from kdcache.data.files import default_workers
from kdcache.distributed import all_sum
from kdcache.errors import KdcacheError
from kdcache.models.checkpoint import checkpoint_sidecar, load_teacher, resolve_checkpoint
from kdcache.models import create_model
from kdcache.models.quantised import INT8_FILE, Int8Network, is_torchscript, rebuild_int8
from kdcache.models.specs import require_spec_from_file
from kdcache.stages.text_train import described_text, next_token_metrics
from kdcache.runtime import autocast, pick_device, prepare_model
from kdcache.stages.dataset import load_described_data
from kdcache.stages.dense_train import require_task
from kdcache.stages.segmentation_metrics import SegmentationScore, evaluate_segmentation
from kdcache.stages.splits import EVAL_BATCH, TestBatch, EvalSplit

TOP_K = 5  # the second accuracy reported: ImageNet's top-5
READ_SAMPLES = 65536  # samples of a view read at once when a cache's accuracy is recomputed (about a block's worth)


@dataclass(frozen=True)
class Evaluation:
    """A model on a test split: top-1 and top-5 accuracy (None for 5 classes or fewer), mean cross-entropy of its
    logits, and how many samples."""

    top1: float
    top5: float | None
    loss: float
    samples: int

    def metrics(self, suffix: str = "") -> dict[str, float]:
        """The metrics.csv columns: test_acc (top-1), test_top5 (more than 5 classes only), test_loss; `suffix`
        names another model's (_ema: the weight EMA's)."""
        found = {f"test_acc{suffix}": self.top1}
        if self.top5 is not None:
            found[f"test_top5{suffix}"] = self.top5
        return {**found, f"test_loss{suffix}": self.loss}


@torch.no_grad()
def evaluate_batches(model: torch.nn.Module, batches: Iterable[TestBatch], total: int) -> Evaluation:
    """Top-1, top-5 and mean cross-entropy of a model's logits over test batches, out of `total` samples (every
    rank's counts are summed: under DDP each rank gives its share's batches)."""
    model.eval()
    # top-1 hits, top-5 hits, summed loss; then how many ranks saw batches, and their class counts summed (a rank
    # whose share is empty does not know the class count)
    totals = torch.zeros(5, dtype=torch.float64)
    classes = 0
    for x, y in batches:
        with autocast(x.device):
            logits = model(x).float()
        classes = logits.shape[-1]
        top = logits.topk(min(TOP_K, classes), dim=-1).indices
        totals[:3] += torch.stack([(logits.argmax(-1) == y).sum(), (top == y[:, None]).any(-1).sum(),
                                   F.cross_entropy(logits, y, reduction="sum")]).cpu().double()
    if classes:
        totals[3:] += torch.tensor([1.0, classes])
    totals = all_sum(totals)
    num_classes = totals[4] / totals[3] if totals[3] else 0
    return Evaluation(float(totals[0]) / total, float(totals[1]) / total if num_classes > TOP_K else None,
                      float(totals[2]) / total, total)


@dataclass(frozen=True)
class ModelEvaluation:
    """`kdcache eval MODEL`: which weights, which model and data, and how they did (see Evaluation)."""

    checkpoint: str
    model: str
    dataset: str
    split: str
    num_classes: int
    top1: float
    top5: float | None
    loss: float
    samples: int
    among: list[int] | None = None  # within_classes: top-1, top-5 and loss among these classes' logits alone


def evaluate_model(checkpoint: str | os.PathLike, model: str | None = None, dataset: str | None = None,
                   data_root: str | os.PathLike | None = None, split: str = "test", image_size: int | None = None,
                   batch_size: int = EVAL_BATCH, device: str | None = None, workers: int | None = None,
                   preload: bool | None = None, classes: str | None = None, within_classes: bool = False,
                   max_image_pixels: int | None = None) -> ModelEvaluation | SegmentationEvaluation:
    """A model's weights (a file, or a kdcache run folder, whose model.json names the model, its classes, its data
    and where that data lay) on a split of its dataset, un-augmented, as the training loop evaluates it; a
    segmentation model's (data labelled per pixel) mIoU and pixel accuracy (SegmentationEvaluation).

    `model`: the spec, needed for weights without a kdcache sidecar (a run folder's own spec is never a python:
    one, which only a caller may name); `dataset`, `data_root`, `image_size`, `preload`, `classes` (the test images
    of these classes alone, e.g. "0-4"), `max_image_pixels` (files' limit): instead of the recorded. `within_classes`: the model answers among the
    split's classes' logits alone, as a model with a head per task answers that task (LwF's evaluation).
    """
    sidecar = checkpoint_sidecar(checkpoint)  # a path that is neither weights nor a run folder is refused here
    if is_torchscript(weights := resolve_checkpoint(checkpoint)):  # a program (--qat's deployable int8): never run
        raise KdcacheError(f"eval: {weights} is TorchScript, a program, which kdcache never "
                           f"runs (data is never code); pass the --qat run folder it came from (eval rebuilds the "
                           f"int8 model from its weights-only {INT8_FILE}), or run it yourself with torch.jit.load")
    if dataset is None and (sidecar.get("dataset") or {}).get("source") == "tokens":
        return _evaluate_language_model(checkpoint, model, sidecar, data_root, split, device)
    options = {name: value for name, value in (("image_size", image_size), ("preload", preload), ("classes", classes),
                                               ("max_image_pixels", max_image_pixels)) if value is not None}
    test = _split_of(checkpoint, sidecar, dataset, data_root, split, options)
    num_classes = int(sidecar.get("num_classes", test.num_classes))
    if test.num_classes != num_classes:
        raise KdcacheError(f"eval: {checkpoint} was trained on {num_classes} classes but {test.name} has "
                           f"{test.num_classes}; pass the --dataset it was trained on")
    if is_dense(test) and within_classes:
        raise KdcacheError("eval --within-classes: answers among some classes' logits, and a segmentation model's "
                           "mIoU and pixel accuracy are over every class of its label maps; drop --within-classes")
    if is_dense(test):  # labelled per pixel: mIoU and pixel accuracy
        return _evaluate_segmentation_model(checkpoint, model, test, batch_size, device)
    network, info = _int8_model(checkpoint, sidecar, model, num_classes, device) \
        or load_teacher(checkpoint, model, num_classes, class_names(test))
    require_task(network, info["arch"], test, "--model")  # a segmentation model has no top-1 of whole images
    where = pick_device("cpu" if isinstance(network, Int8Network) else device)
    testing = EvalSplit(test, where, default_workers(workers), batch_size=batch_size)
    network, batches = prepare_model(network, where), testing.batches(range(len(testing)))
    among = _split_classes(test) if within_classes else None
    if among is not None:
        network, batches = TaskHead(network, among), TaskHead.labels(batches, among, num_classes)
    found = evaluate_batches(network, batches, len(testing))
    return ModelEvaluation(info["checkpoint"], info["arch"], test.name, split, num_classes, **asdict(found),
                           among=among)


@dataclass(frozen=True)
class SegmentationEvaluation(SegmentationScore):
    """`kdcache eval` of a segmentation model: its score (mIoU over the classes present in the split's labels or
    predictions, pixel accuracy, mean cross-entropy over the labelled pixels, what they were counted over:
    kdcache.stages.segmentation_metrics), and which weights, model and data."""

    checkpoint: str
    model: str
    dataset: str
    split: str
    num_classes: int


def _evaluate_segmentation_model(checkpoint: str | os.PathLike, model: str | None, test: DenseData, batch_size: int,
                                 device: str | None) -> SegmentationEvaluation:
    """A segmentation model's weights on a split labelled per pixel, un-augmented, as its training evaluated it."""
    network, info = load_teacher(checkpoint, model, test.num_classes)
    require_task(network, info["arch"], test, "--model")
    where = pick_device(device)
    found = evaluate_segmentation(prepare_model(network, where), test.evaluation(where, batch_size), test.num_classes)
    return SegmentationEvaluation(**asdict(found), checkpoint=info["checkpoint"], model=info["arch"], dataset=test.name,
                                  split=test.split, num_classes=test.num_classes)


def _split_classes(test: DataSource) -> list[int]:
    """The classes a split was cut to (--classes, given or recorded), refusing a split of every class."""
    if getattr(test, "classes", None) is None:
        raise KdcacheError(f"eval --within-classes: answers among some classes' logits, and {test.name} {test.split} "
                           f"holds every class; give --classes (e.g. 0-4), or drop --within-classes")
    return list(test.classes)


class TaskHead(torch.nn.Module):
    """A model's logits of some classes alone: the head of one task, as a model with a head per task answers it."""

    def __init__(self, model: torch.nn.Module, classes: list[int]) -> None:
        super().__init__()
        self.model, self.classes = model, classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The model's logits of the task's classes, in their order."""
        return self.model(images)[..., self.classes]

    @staticmethod
    def labels(batches: Iterable[TestBatch], classes: list[int], num_classes: int) -> Iterable[tuple]:
        """The batches with each label as its place among the task's classes (the head's logit index)."""
        place = torch.full((num_classes,), -1, dtype=torch.long)
        place[classes] = torch.arange(len(classes))
        return ((images, place.to(labels.device)[labels]) for images, labels in batches)


def _int8_model(checkpoint: str | os.PathLike, sidecar: dict, model: str | None, num_classes: int,
                device: str | None) -> tuple[Int8Network, dict] | None:
    """A --qat run's int8 model (a run folder of one means it, as does its INT8_FILE), rebuilt from data: the
    student's spec, the recorded backend and input shape, the weights-only int8 state; None for float weights."""
    path = resolve_checkpoint(checkpoint)
    if Path(checkpoint).is_dir() and sidecar.get("test_acc_int8") is not None:
        path = path.parent / INT8_FILE  # a --qat run folder's model.pt holds the float weights; its product is int8
        if not path.is_file():
            raise KdcacheError(f"eval: {checkpoint} is a --qat run folder without {INT8_FILE} (its int8 weights); "
                               f"evaluate its float weights with `kdcache eval {path.parent / 'model.pt'}`")
        sidecar = checkpoint_sidecar(path)
    elif "int8" not in sidecar and path.name != INT8_FILE:  # by its name, an int8 state lacking its record is refused
        return None
    where = str(path.with_suffix(".json"))
    if device not in (None, "auto", "cpu"):
        raise KdcacheError(f"eval: {path} is an int8 model, whose quantised kernels run on the CPU; drop --device")
    if not (model or sidecar.get("arch")):
        raise KdcacheError(f"eval: which student is {path}? {where} names none; pass --model SPEC")
    arch = model or require_spec_from_file(sidecar["arch"], where, "--model")
    network = rebuild_int8(create_model(arch, num_classes=num_classes), sidecar.get("int8"), path, where)
    return network, {"checkpoint": str(path), "arch": f"{arch} (int8)"}


def _evaluate_language_model(checkpoint: str | os.PathLike, model: str | None, sidecar: dict,
                             corpus: str | os.PathLike | None, split: str, device: str | None) -> ModelEvaluation:
    """A language model's run on a split of the text it recorded, tokenised as it was: next-token top-1, top-5 and
    mean cross-entropy (perplexity is its exp) over every position with a next token."""
    test = described_text(sidecar["dataset"], None if corpus is None else str(corpus), None, split)
    network, info = load_teacher(checkpoint, model, test.num_classes)
    where = pick_device(device)
    top1, top5, loss, positions = next_token_metrics(prepare_model(network, where), test, where)
    return ModelEvaluation(info["checkpoint"], info["arch"], test.name, split, test.num_classes, top1, top5, loss,
                           positions)


def _split_of(checkpoint: str | os.PathLike, sidecar: dict, dataset: str | None, data_root: str | os.PathLike | None,
              split: str, options: dict) -> DataSource:
    """The split to evaluate on: of the dataset named, else of the one the run recorded, as it was read then."""
    recorded = sidecar.get("dataset") or {}
    data_root = data_root or (sidecar.get("config") or {}).get("data_root")
    if dataset is None and recorded.get("name"):
        return load_described_data(recorded, data_root, split, **options)
    if dataset is None:
        raise KdcacheError(f"eval: which dataset is {checkpoint} for? it has no kdcache sidecar (model.json) that "
                           f"names one; pass --dataset NAME (`kdcache datasets` lists them)")
    return load_at_size(dataset, data_root, split, **options)


@dataclass(frozen=True)
class ViewAccuracy:
    """The teacher on one view of a cache: top-1 as the dump counted it (on the logits before storage), and top-1
    and top-5 recomputed from the stored logits (None: not recomputed, the view unwritten, or top-5 not
    defined: 5 classes or fewer, or a top-k cache storing fewer than 5)."""

    view: int
    recorded_top1: float | None
    top1: float | None
    top5: float | None


@dataclass(frozen=True)
class CacheEvaluation:
    """`kdcache eval --cache`: the cache's teacher and data, and its accuracy per view."""

    cache: str
    teacher: str
    dataset: str
    split: str
    num_classes: int
    samples: int
    views: list[ViewAccuracy]


def evaluate_cache(path: str | os.PathLike, recompute: bool = True) -> CacheEvaluation:
    """The teacher's accuracy over each view of a cache against the samples' labels (a mixed view's against its
    own sample's): the recorded top-1, and with `recompute` top-1 and top-5 of region 0 of the stored logits (a
    top-k cache's stored classes), which reads every written view once."""
    with open_cache(path) as cache:
        spec, recorded = cache.spec, cache.view_accuracy()
        if spec.kind == "dense" and recompute:
            raise KdcacheError(f"eval --cache {path}: a dense cache holds the teacher's maps at stride "
                               f"{spec.stride}, from which the pixel accuracy the dump recorded at full size cannot "
                               f"be recounted; pass --recorded to read that")
        labels = cache.labels() if recompute else None
        views = [ViewAccuracy(view, accuracy, *(_stored_accuracy(cache, view, labels) if recompute and accuracy
                                                is not None else (None, None)))
                 for view, accuracy in enumerate(recorded)]
        return CacheEvaluation(str(path), spec.teacher["arch"],
                               spec.dataset["name"], spec.dataset["split"], spec.num_classes, spec.num_samples, views)


def _stored_accuracy(cache: TeacherCache, view: int, labels: np.ndarray) -> tuple[float, float | None]:
    """Top-1 and top-5 of region 0 of one view's stored logits, read a group of blocks at a time."""
    spec = cache.spec
    name = "topk_indices" if spec.topk else "logits"
    k = min(TOP_K, spec.num_classes, spec.topk or spec.num_classes)
    hits = np.zeros(2, np.int64)
    step = spec.block_size * max(1, READ_SAMPLES // spec.block_size)
    for start in range(0, spec.num_samples, step):
        rows = range(start, min(start + step, spec.num_samples))
        stored = cache.view_arrays(view, rows, names=(name,))[name][:, 0]  # region 0: the teacher's own logit
        # a top-k cache stores its classes by falling logit; full logits: the k largest in any order
        first = stored[:, 0] if spec.topk else stored.argmax(-1)
        ranked = stored[:, :k] if spec.topk else np.argpartition(-stored, k - 1, axis=-1)[:, :k]
        truth = labels[rows.start:rows.stop]
        hits += [(first == truth).sum(), (ranked == truth[:, None]).any(-1).sum()]
    defined = spec.num_classes > TOP_K and k == TOP_K
    return float(hits[0]) / spec.num_samples, float(hits[1]) / spec.num_samples if defined else None
