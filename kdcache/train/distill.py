"""Stage 2: train any number of students from one cache (or from the live teacher, the online baseline)."""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kdcache import distributed
from kdcache.cache import TeacherCache, open_cache
from kdcache.config import DistillConfig, loader_options
from kdcache.data import ImageData, dataset_options, get_policy, load_dataset
from kdcache.distributed import Shard, World
from kdcache.errors import KdcacheError
from kdcache.losses import LossSpec, get_loss
from kdcache.models import create_model
from kdcache.runtime import pick_device
from kdcache.train.dataset import CachedViewDataset
from kdcache.train.loop import Run, fit, loader_batches
from kdcache.train.targets import CachedTargets, LiveTeacher
from kdcache.train.teacher import _record_config, load_teacher
from kdcache.train.views import CachedViews, FreshViews

log = logging.getLogger(__name__)
BATCH_PATHS = ("device", "dataset")
PAPER_EPOCHS = 240  # the schedule the papers' epoch counts refer to


@dataclass(frozen=True)
class RunSummary:
    """How one student did."""

    name: str
    student: str
    loss: str
    test_acc: float
    best_test_acc: float
    best_epoch: int
    seconds: float
    img_per_s: float
    folder: Path


def distill(config: DistillConfig, show_progress: bool = True,
            data: tuple[ImageData, ImageData] | None = None) -> list[RunSummary]:
    """Train every (student, loss) pair of the config from one target source; write each run and a summary.

    data: (train, test) already loaded, instead of the dataset the cache or config names.
    """
    if config.cache is None and config.live_teacher is None:
        raise KdcacheError("distill: give --cache CACHE (train from a teacher cache) or --live-teacher CHECKPOINT "
                           "(the online baseline)")
    if config.batch_path not in BATCH_PATHS:
        raise KdcacheError(f"--batch-path: unknown path {config.batch_path!r}; known: {', '.join(BATCH_PATHS)}")
    for student, loss in config.runs():  # names are checked before any work
        create_model(student)
        get_loss(loss)
    device = pick_device(config.device)
    distributed.init(device)
    cache = open_cache(config.cache) if config.cache else None
    try:
        return _distill(config, cache, device, show_progress, data)
    finally:
        if cache is not None:
            cache.close()


def _distill(config: DistillConfig, cache: TeacherCache | None, device: torch.device, show_progress: bool,
             data_and_test: tuple[ImageData, ImageData] | None) -> list[RunSummary]:
    stored = cache.spec if cache is not None else None
    if data_and_test is None:
        dataset = config.dataset or (stored.dataset["name"] if stored else "digits")
        options = loader_options(config)
        if not options and stored and "image_size" in dataset_options(dataset):  # the size the cache was made at
            options = {"image_size": stored.dataset["image_shape"][-1]}
        data_and_test = (load_dataset(dataset, config.data_root, stored.dataset["split"] if stored else "train",
                                      **options), load_dataset(dataset, config.data_root, "test", **options))
    data, test = data_and_test
    policy = get_policy(stored.augmentation["name"] if stored else config.augmentation, image_size=tuple(data.images.shape[-2:]))
    scales = tuple(config.scales or (stored.scales if stored else (1, 2, 4)))
    losses = {name: scaled_loss(name, config.loss_overrides(), config.epochs) for _, name in config.runs()}
    if cache is not None:
        cache.require_fits(data, policy, scales, teacher=config.teacher)
        cache.require_complete()
        standardising = sorted(name for name, loss in losses.items() if loss.standardize or loss.loss == "sdd_lskd")
        if stored.topk and standardising:
            log.warning("%s stores the top %d logits per region: rebuilt logits have a smaller spread than the "
                        "teacher's, so logit standardisation (%s) sharpens the teacher; benchmarks/TOPK.md measures "
                        "it. Prefer a full cache, or a loss without standardisation, for these runs",
                        cache.path, stored.topk, ", ".join(standardising))
    here, shard = _shard(cache, len(data.labels), config)
    show_progress = show_progress and here.is_main

    if config.live_teacher is not None:
        teacher, teacher_info = load_teacher(config.live_teacher, config.teacher, data)
        if cache is not None:  # replaying the cache's views live is the equivalence baseline: same teacher only
            cache.require({"teacher.checkpoint_sha256": teacher_info["checkpoint_sha256"]})
        targets = LiveTeacher(teacher, scales, device)
        source = {"live_teacher": teacher_info}
    else:
        targets = CachedTargets(cache, scales, device, None if shard.is_whole else shard.samples)
        source = {"cache": str(cache.path), "teacher": stored.teacher, "cache_views": stored.num_views}
    # with a cache, its views are replayed (also by a live teacher: the online baseline on the same pixels)
    views = CachedViews(cache, config.view_order, config.seed) if cache is not None else \
        FreshViews(policy, len(data.labels), config.seed)

    out = Path(config.out)
    runs = []
    for student, loss_name in config.runs():
        loss = losses[loss_name]
        torch.manual_seed(config.seed)  # every run of a student starts from the same weights
        model = create_model(student, num_classes=data.num_classes)
        record = {"arch": student, "num_classes": data.num_classes, "loss": loss_name,
                  "dataset": data.describe(), "config": _record_config(config), **source}
        run = Run(f"{student}-{loss_name}", model, loss, scales if loss.uses_regions else (1,), config,
                  out / f"{student}-{loss_name}", device, record, here)
        if config.resume:
            run.resume()
        runs.append(run)

    batch_path = None
    if config.batch_path == "dataset":
        if cache is None or config.live_teacher is not None:
            raise KdcacheError("--batch-path dataset reads targets from a cache: use it with --cache and without "
                               "--live-teacher")
        dataset_of_views = CachedViewDataset(cache, data, policy, scales, config.view_order, config.seed)

        def batch_path(epoch, generator):
            dataset_of_views.set_epoch(epoch)
            return loader_batches(dataset_of_views, config.batch_size, generator, device)

    started = time.perf_counter()
    fit(runs, data, test, views, policy, targets, config, device, batch_path, show_progress, shard)
    summaries = [_summary(run) for run in runs]
    if here.is_main:
        write_summary(summaries, out)
    if show_progress:
        print(summary_table(summaries))
        print(f"{len(runs)} run(s) in {time.perf_counter() - started:.0f} s; written to {out}/ "
              f"(summary.csv, summary.png, and per run: metrics.csv, model.pt, last.pt)")
    return summaries


def _shard(cache: TeacherCache | None, num_samples: int, config: DistillConfig) -> tuple[World, Shard]:
    """This rank's samples: whole for one process; under torchrun a contiguous range of the cache's blocks
    (so each rank reads only its slice of every view), or an even split without a cache."""
    here = distributed.world()
    if not here.distributed:
        return here, Shard.whole(num_samples)
    if config.batch_path != "device":
        raise KdcacheError(f"--batch-path {config.batch_path} runs in one process; under torchrun use the default "
                           f"--batch-path device")
    if cache is None:
        return here, distributed.shard(num_samples, 1, num_samples, here)[1]
    blocks, shard = distributed.shard(cache.spec.num_blocks, cache.spec.block_size, num_samples, here)
    if not len(blocks):
        raise KdcacheError(f"cache {cache.path} has {cache.spec.num_blocks} blocks of {cache.spec.block_size} samples, "
                           f"fewer than the {here.size} processes: each rank needs at least one; rebuild the cache "
                           f"with a smaller --block-size or start fewer processes")
    return here, shard


def scaled_loss(name: str, overrides: dict[str, float], epochs: int) -> LossSpec:
    """A loss with the flags' overrides; epoch-based defaults (warm-up, SLD's switch) scaled from 240 epochs to `epochs`."""
    default = get_loss(name)
    unused = [key for key in overrides if getattr(default, key, None) is None]
    if unused:
        raise KdcacheError(f"--{unused[0].replace('_', '-')} does not apply to loss {name!r} (it has no "
                           f"{unused[0]}); see `kdcache losses`")
    scaled = {key: getattr(default, key) * epochs / PAPER_EPOCHS for key in ("warmup_epochs", "switch_epoch")
              if key not in overrides and getattr(default, key)}
    return get_loss(name, **scaled, **overrides)


def _summary(run: Run) -> RunSummary:
    run.finish()
    best = max(run.history, key=lambda row: row["test_acc"])
    return RunSummary(run.name, run.record["arch"], run.record["loss"], run.history[-1]["test_acc"],
                      best["test_acc"], int(best["epoch"]), sum(row["seconds"] for row in run.history),
                      sum(row["img_per_s"] for row in run.history) / len(run.history), run.folder)


def write_summary(summaries: list[RunSummary], out: Path) -> None:
    """summary.csv (one row per run) and summary.png (test accuracy per epoch of every run)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "summary.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["run", "student", "loss", "test_acc", "best_test_acc", "best_epoch", "img_per_s", "folder"])
        for s in summaries:
            writer.writerow([s.name, s.student, s.loss, f"{s.test_acc:.4f}", f"{s.best_test_acc:.4f}", s.best_epoch,
                             f"{s.img_per_s:.1f}", s.folder])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for s in summaries:
        with open(s.folder / "metrics.csv") as file:
            rows = list(csv.DictReader(file))
        axes.plot([int(r["epoch"]) for r in rows], [float(r["test_acc"]) for r in rows], label=s.name)
    axes.set(xlabel="epoch", ylabel="test accuracy", title="kdcache distill")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "summary.png", dpi=120)
    plt.close(figure)


def summary_table(summaries: list[RunSummary]) -> str:
    """A printed table: each run's accuracy, and its gain over the same student's cross-entropy run."""
    ce = {s.student: s.test_acc for s in summaries if s.loss == "ce"}
    lines = [f"{'run':<30} {'test acc':>9} {'best (epoch)':>14} {'vs ce':>7} {'img/s':>8}"]
    for s in summaries:
        gain = f"{100 * (s.test_acc - ce[s.student]):+.2f}" if s.student in ce and s.loss != "ce" else ""
        lines.append(f"{s.name:<30} {100 * s.test_acc:>8.2f}% {100 * s.best_test_acc:>7.2f}% ({s.best_epoch:>3}) "
                     f"{gain:>7} {s.img_per_s:>8.0f}")
    return "\n".join(lines)
