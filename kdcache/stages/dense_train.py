"""Segmentation: train-teacher (cross-entropy per pixel) and distill (a teacher's per-pixel logits plus
cross-entropy) of models that predict a class per pixel, through one loop on one screen; the test split's mIoU and
pixel accuracy after every epoch (kdcache.stages.segmentation_metrics).

Epoch e trains on view e mod K of its views: each batch's images and label maps are replayed from the view's
parameters by `DenseData.views` (crop and flip applied to both alike), and a student's targets are the teacher's
logit maps of the same samples and view from a `DenseTargets` provider: the dense cache (`open_dense_targets`), the
live teacher on fresh views (`LiveDenseTargets`), or the live teacher on the cache's views (`LiveOnViews`: the
online baseline a cache's students are compared with). A teacher's views are drawn fresh every epoch. The loss of a
step is ce_weight · cross-entropy over the labelled pixels (IGNORE_INDEX left out) + distill_weight · pixel-kd or
cwd of the student's map against the teacher's at temperature T (configs/losses.yaml; --ce-weight,
--distill-weight, --temperature override them).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from kdcache import distributed
from kdcache.cache.location import Location
from kdcache.config import DistillConfig, TeacherConfig, TrainConfig, options_given, recorded_config, save_config
from kdcache.data.dense import IGNORE_INDEX, DenseData, LabelledPolicy, is_dense
from kdcache.errors import KdcacheError
from kdcache.losses import LossSpec, LossSum, get_loss, scaled_loss
from kdcache.losses.spec import DENSE_FUNCTIONS, LOGIT_MAP
from kdcache.models import create_model, file_sha256, load_teacher, save_checkpoint
from kdcache.runtime import epoch_generator, prepare_model
from kdcache.stages.dense_targets import DenseTargets, LiveDenseTargets
from kdcache.stages.folders import hold_run_folder, run_name
from kdcache.stages.recipe_options import learning_rate, make_optimizer, step_autocast, training_dtype
from kdcache.stages.segmentation_metrics import evaluate_segmentation
from kdcache.stages.text_train import append_metrics

SEGMENTATION_FUNCTIONS = ("ce", *DENSE_FUNCTIONS)  # the loss functions a segmentation model trains with
# options of the image loop the segmentation loop has no use for: refused rather than silently ignored
TEACHER_UNUSED = ("ema_decay", "image_size", "seq_len", "tokenizer", "vocab_size")
DISTILL_UNUSED = ("ema_decay", "views_per_step", "teacher_weights", "student_checkpoint", "scales",
                  "image_size", "tokenizer", "view_order", "batch_path", "alpha", "beta", "negatives", "kd_classes",
                  "mutual", "ema_teacher", "qat", "generations_ensemble")


@dataclass(frozen=True)
class SegmentationRun:
    """How one segmentation model did on the test split: mIoU and pixel accuracy after its last epoch, its best
    mIoU and that epoch."""

    name: str
    student: str
    loss: str
    test_miou: float
    test_pixel_acc: float
    best_test_miou: float
    best_epoch: int
    img_per_s: float
    seconds: float
    folder: Path


class DenseViews(Protocol):
    """The views a segmentation model trains on: a policy and each view's parameters (DenseTargets gives both)."""

    policy: LabelledPolicy
    num_views: int

    def params(self, view: int) -> Tensor:
        """The augmentation parameters [N, P] (CPU int64) of every sample in view `view`."""
        ...


class FreshDenseViews:
    """A view per epoch drawn fresh from the policy (a teacher's training), seeded by (seed, epoch)."""

    def __init__(self, policy: LabelledPolicy, num_samples: int, epochs: int, seed: int) -> None:
        self.policy, self.num_samples, self.num_views, self.seed = policy, num_samples, epochs, seed

    def params(self, view: int) -> Tensor:
        """The parameters of epoch `view`'s draws."""
        return self.policy.sample(epoch_generator(self.seed, view), self.num_samples)


class LiveOnViews(LiveDenseTargets):
    """The live teacher on another provider's views (a cache's): its parameters and stride, the teacher's maps
    computed on them; the online baseline on exactly the cache's pixels."""

    def __init__(self, teacher: nn.Module, views: DenseTargets, num_samples: int) -> None:
        super().__init__(teacher, views.policy, num_samples, views.num_views, views.stride)
        self.views = views

    def params(self, view: int) -> Tensor:
        """The other provider's parameters of view `view`."""
        return self.views.params(view)


def segmentation_terms(spec: LossSpec, logits: Tensor, masks: Tensor, teacher_maps: Tensor | None,
                       epoch: int) -> dict[str, Tensor]:
    """One step's loss terms: `ce` (ce_weight · cross-entropy over the pixels not IGNORE_INDEX, with the spec's
    label smoothing), the spec's distillation term of the student's logits [B, C, H, W] against the teacher's maps
    (distill_weight · warm-up factor · pixel-kd or cwd at T), and their `total`; epoch counted from 1."""
    now = spec.at(epoch)
    terms = {"ce": now.ce_weight * F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX,
                                                   label_smoothing=now.label_smoothing)}
    if now.function != "ce":
        terms |= now.distillation_terms({LOGIT_MAP: logits}, {LOGIT_MAP: teacher_maps}, masks, epoch)
    terms["total"] = sum(terms.values())
    return terms


def train_segmentation(model: nn.Module, data: DenseData, test: DenseData, views: DenseViews,
                       targets: DenseTargets | None, spec: LossSpec, config: TrainConfig, folder: Path,
                       record: dict[str, Any], device: torch.device, show_progress: bool = True) -> SegmentationRun:
    """Train `model` on `views` of `data` (epoch e: view e mod K), with the teacher's maps of `targets` where the
    loss distils; after each epoch the test split's mIoU and pixel accuracy go to folder/metrics.csv; model.pt
    and model.json at the end."""
    folder.mkdir(parents=True, exist_ok=True)
    model = prepare_model(model, device).train()
    optimizer, dtype = make_optimizer(model.parameters(), config), training_dtype(config.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    steps, history, started = len(data) // config.batch_size, [], time.perf_counter()
    if steps == 0:
        raise KdcacheError(f"--batch-size {config.batch_size} exceeds the {len(data)} training images of "
                           f"{data.name}; give a smaller --batch-size")
    for epoch in range(config.epochs):
        view = epoch % views.num_views
        params = views.params(view)
        order = torch.randperm(len(data), generator=epoch_generator(config.seed, epoch))
        sums: dict[str, Tensor | float] = {}
        for step in tqdm(range(steps), desc=f"{folder.name} epoch {epoch + 1}/{config.epochs}", leave=False,
                         disable=not show_progress):
            indices = order[step * config.batch_size:(step + 1) * config.batch_size]
            images, masks = data.views(views.policy, params, indices, device)
            taught = None if targets is None else targets.maps(view, indices, images)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, epoch, step, steps)
            with step_autocast(device, dtype):
                logits = model(images)
            terms = segmentation_terms(spec, logits.float(), masks, taught, epoch + 1)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms["total"]).backward()
            if config.clip_grad is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach() / steps  # on the device: no sync per step
        seconds = time.perf_counter() - started
        score = evaluate_segmentation(model, test.evaluation(device), test.num_classes)
        model.train()
        row = {"epoch": epoch + 1, **{f"loss_{name}": float(value) for name, value in sums.items()},
               **score.metrics(), "lr": optimizer.param_groups[0]["lr"],
               "img_per_s": (epoch + 1) * steps * config.batch_size / seconds, "seconds": seconds,
               **spec.settings(epoch + 1)}
        _refuse_non_finite(row, folder)
        history.append(row)
        append_metrics(folder / "metrics.csv", row)
        if show_progress:
            tqdm.write(f"{folder.name:>28} epoch {epoch + 1:>3}/{config.epochs}  loss {row['loss_total']:.4f}  "
                       f"test mIoU {row['test_miou']:.4f}  pixel acc {row['test_pixel_acc']:.4f}  "
                       f"{row['img_per_s']:.0f} img/s")
    return _finish(model, folder, record, history)


def _refuse_non_finite(row: dict[str, float], folder: Path) -> None:
    """Stop a run whose epoch loss is NaN or infinite before its weights are saved."""
    if not math.isfinite(row["loss_total"]):
        raise KdcacheError(f"{folder.name}: the loss became non-finite ({row['loss_total']}) at epoch {row['epoch']}: "
                           f"the run stopped before saving its weights; lower --lr or add --clip-grad 1.0, then start "
                           f"it again with another --out")


def _finish(model: nn.Module, folder: Path, record: dict[str, Any], history: list[dict[str, float]]
            ) -> SegmentationRun:
    """model.pt (weights only) and its model.json sidecar, which dump-teacher and eval read (arch, classes, data)."""
    save_checkpoint(folder / "model.pt", model)
    best = max(history, key=lambda row: row["test_miou"])
    last = history[-1]
    sidecar = {**record, "test_miou": last["test_miou"], "test_pixel_acc": last["test_pixel_acc"],
               "best_test_miou": best["test_miou"], "best_epoch": best["epoch"], "epochs": len(history),
               "sha256": file_sha256(folder / "model.pt")}
    (folder / "model.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return SegmentationRun(folder.name, record["arch"], record["loss"], last["test_miou"], last["test_pixel_acc"],
                           best["test_miou"], int(best["epoch"]), last["img_per_s"], last["seconds"], folder)


def require_task(model: nn.Module, spec: str, data: Any, flag: str) -> None:
    """Refuse a classifier of whole images for data labelled per pixel, and a segmentation model (a class per
    pixel, `model.segmentation`) for data labelled per image."""
    segments = bool(getattr(model, "segmentation", False))
    if is_dense(data) and not segments:
        raise KdcacheError(f"{flag} {spec}: {data.name} labels every pixel, and {spec} classifies whole images; give "
                           f"a segmentation model such as fcn_resnet20 or fcn_resnet8 (`kdcache models 'fcn*'`)")
    if segments and not is_dense(data):
        raise KdcacheError(f"{flag} {spec}: {spec} is a segmentation model (a class per pixel), and {data.name} "
                           f"labels whole images; give a classifier (`kdcache models`), or data labelled per pixel "
                           f"such as --dataset digits-scenes")


def _refuse_unused(config: Any, names: tuple[str, ...], command: str) -> None:
    """One line for an option the segmentation loop would ignore, and for torchrun (it trains in one process)."""
    given = options_given(config, tuple(name for name in names if hasattr(config, name)))
    if given:
        raise KdcacheError(f"{command} of a segmentation model trains without {', '.join(given)}: these options are "
                           f"the image loop's; leave them out")
    if distributed.world().distributed:
        raise KdcacheError(f"{command} of a segmentation model trains in one process here; run it without torchrun")


def train_dense_teacher(config: TeacherConfig, data: DenseData, test: DenseData, device: torch.device,
                        show_progress: bool = True) -> SegmentationRun:
    """`kdcache train-teacher` on a segmentation dataset: cross-entropy per pixel on fresh views every epoch."""
    _refuse_unused(config, TEACHER_UNUSED, "train-teacher")
    torch.manual_seed(config.seed)
    model = create_model(config.model, num_classes=data.num_classes)
    require_task(model, config.model, data, "--model")
    record = {"arch": config.model, "num_classes": data.num_classes, "loss": "ce", "task": "segmentation",
              "dataset": data.describe(), "config": recorded_config(config)}
    views = FreshDenseViews(data.policy(config.augmentation or data.default_policy), len(data), config.epochs,
                            config.seed)
    spec = get_loss("ce", label_smoothing=config.label_smoothing)
    return train_segmentation(model, data, test, views, None, spec, config, Path(config.out), record, device,
                              show_progress)


def segmentation_loss(name: str, config: DistillConfig) -> LossSpec:
    """--loss `name` with the flags' overrides, refused unless it is one a segmentation model trains with."""
    spec = scaled_loss(name, config.loss_overrides(), config.epochs)
    if isinstance(spec, LossSum) or spec.function not in SEGMENTATION_FUNCTIONS:
        raise KdcacheError(f"--loss {name}: a segmentation student trains with one loss of ce, pixel-kd or cwd "
                           f"(`kdcache losses`)")
    return spec


def refuse_dense_losses(losses: dict[str, LossSpec | LossSum], data: Any) -> None:
    """Refuse a segmentation loss (it reads per-pixel logit maps) for a run on data labelled per image."""
    dense = [name for name, loss in losses.items() if LOGIT_MAP in loss.needs]
    if dense:
        raise KdcacheError(f"--loss {dense[0]}: distils per-pixel logit maps, and {data.name} labels whole images; "
                           f"give a segmentation dataset's cache (digits-scenes) or an image loss (`kdcache losses`)")


def dense_provider(config: DistillConfig, cache: Location | None, data: DenseData, device: torch.device
                   ) -> tuple[DenseTargets, dict[str, Any]]:
    """The students' views and teacher maps: the dense cache's, the live teacher's on the cache's views (with
    --live-teacher), or the live teacher's on fresh views (no cache); and how the runs' records name it."""
    provider = None
    if cache is not None:
        from kdcache.stages.dense_targets import open_dense_targets  # the dense cache's reader

        provider = open_dense_targets(cache, data, device)
    if config.live_teacher is None:
        return provider, {"cache": str(cache)}
    teacher, info = load_teacher(config.live_teacher, config.teacher, data.num_classes)
    require_task(teacher, info["arch"], data, "--live-teacher")
    teacher = prepare_model(teacher, device)
    if provider is None:
        policy = data.policy(config.augmentation or data.default_policy)
        return LiveDenseTargets(teacher, policy, len(data), config.epochs, seed=config.seed), {"live_teacher": info}
    return LiveOnViews(teacher, provider, len(data)), {"live_teacher": info, "cache": str(cache)}


def distill_dense(config: DistillConfig, cache: Location | None, data: DenseData, test: DenseData,
                  device: torch.device, show_progress: bool, held: ExitStack) -> list[SegmentationRun]:
    """`kdcache distill` on a segmentation split: every (student, loss) pair from scratch on the provider's views,
    each in a run folder of its own, held until `held` closes (taken once nothing is left to refuse)."""
    _refuse_unused(config, DISTILL_UNUSED, "distill")
    if config.resume:
        raise KdcacheError("distill --resume: a segmentation student's run does not resume; the same command without "
                           "--resume starts it again in a folder of its own")
    if config.extra_caches:
        raise KdcacheError(f"distill: a segmentation student learns from one teacher; give one --cache (got "
                           f"{1 + len(config.extra_caches)})")
    specs = {name: segmentation_loss(name, config) for _, name in config.runs()}
    models = []
    for student, _ in config.runs():  # every run of a student starts from the same weights
        torch.manual_seed(config.seed)
        models.append(create_model(student, num_classes=data.num_classes))
        require_task(models[-1], student, data, "--student")
    provider, source = dense_provider(config, cache, data, device)
    runs = []
    for (student, loss), model in zip(config.runs(), models):
        folder = hold_run_folder(Path(config.out), run_name(student, loss), config.name, False, held).path
        save_config(config.one_run(student, loss), folder)
        record = {"arch": student, "num_classes": data.num_classes, "loss": loss, "task": "segmentation",
                  "dataset": data.describe(), "config": recorded_config(config), **source}
        taught = None if specs[loss].function == "ce" else provider
        runs.append(train_segmentation(model, data, test, provider, taught, specs[loss], config, folder, record,
                                       device, show_progress))
    return runs
