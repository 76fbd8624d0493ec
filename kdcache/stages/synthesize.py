"""Data-free distillation: synthesise a transfer set from the teacher alone (DeepInversion), cache the teacher on it,
and let any number of students train from that cache.

DeepInversion (Yin et al., CVPR 2020) optimises a batch of inputs, from Gaussian noise, so that the batch
statistics of every BatchNorm layer's input match the teacher's running statistics, while the teacher names
a target class for each input, under total-variation and ℓ2 priors, with Adam and a random jitter (a roll of
up to `jitter` pixels) every iteration. The defaults are the paper's CIFAR-10 parameters (NVlabs/DeepInversion
cifar10/README.md: batches of 256, 2000 iterations, Adam lr 0.05, BatchNorm weight 10; the script's total
variation 2.5e-5, ℓ2 0, jitter 2, balanced targets). Each finished batch is saved, so a rerun resumes.

The folder written is a dataset (`--dataset synthesized --data-root DIR`): uint8 images, labels = the target
classes, the teacher's normalisation, and, as its test split, the real test split of the teacher's dataset;
beside it, the teacher's cache over it (`DIR/teacher.zarr`), whose per-view accuracy is how often the teacher
names the intended class.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from kdcache.config import SynthesizeConfig, loader_options, save_config
from kdcache.data import ImageData, class_names, get_policy, load_dataset, normalize
from kdcache.data.synthesized import DESCRIPTION, IMAGES, LABELS
from kdcache.errors import KdcacheError
from kdcache.models import load_teacher
from kdcache.runtime import pick_device
from kdcache.stages.dump import DumpResult, dump_teacher

CACHE = "teacher.zarr"
LABEL_SOURCES = ("target", "teacher")  # an image's label: the class it was synthesised for, or the teacher's


@dataclass(frozen=True)
class SynthesisResult:
    """What a synthesis made: the folder, its size and time, how well it matched the teacher, and its cache."""

    folder: Path
    images: int
    seconds: float
    statistics_loss_start: float  # the BatchNorm-statistics loss of the noise, mean over batches
    statistics_loss_end: float  # ... of the synthesised images
    intended_accuracy: float  # how often the teacher names the target class of an (un-augmented) image
    cache: DumpResult


class BatchNormStatistics:
    """Forward hooks on every BatchNorm layer of a model: after a forward pass, `loss()` is DeepInversion's
    Σ_l ‖σ²_l(x) − running_var_l‖₂ + ‖μ_l(x) − running_mean_l‖₂, over the batch statistics of each layer's
    input."""

    def __init__(self, model: nn.Module) -> None:
        layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not layers:
            raise KdcacheError(f"synthesize: the teacher {type(model).__name__} has no BatchNorm layer, and "
                               "DeepInversion matches the statistics BatchNorm layers keep; use a teacher with "
                               "BatchNorm (the CIFAR ResNets, WRNs, timm/torchvision CNNs)")
        self.terms: list[Tensor] = []
        self.handles = [layer.register_forward_hook(self._record) for layer in layers]

    def _record(self, layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0].transpose(0, 1).flatten(1)  # [C, everything else]
        mean, var = x.mean(dim=1), x.var(dim=1, unbiased=False)
        self.terms.append(torch.linalg.vector_norm(var - layer.running_var) +
                          torch.linalg.vector_norm(mean - layer.running_mean))

    def loss(self) -> Tensor:
        """The last forward pass's loss (and forget it)."""
        total, self.terms = sum(self.terms), []
        return total

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self.handles:
            handle.remove()


def total_variation(x: Tensor) -> Tensor:
    """DeepInversion's image prior: the ℓ2 norms of the differences to the right, down and both diagonals, summed."""
    return (torch.linalg.vector_norm(x[..., :, :-1] - x[..., :, 1:]) +
            torch.linalg.vector_norm(x[..., :-1, :] - x[..., 1:, :]) +
            torch.linalg.vector_norm(x[..., 1:, :-1] - x[..., :-1, 1:]) +
            torch.linalg.vector_norm(x[..., :-1, :-1] - x[..., 1:, 1:]))


def invert_batch(teacher: nn.Module, statistics: BatchNormStatistics, targets: Tensor, like: ImageData,
                 config: SynthesizeConfig, generator: torch.Generator, progress: tqdm | None = None
                 ) -> tuple[Tensor, float, float]:
    """Inputs [B, C, H, W] (normalised as `like`'s images) the teacher maps to `targets`, by config.iterations Adam
    steps from noise, kept after each step within the pixels' range (as DeepInversion's ImageNet code clips them);
    and the BatchNorm-statistics loss at the first and last step."""
    device = targets.device
    inputs = torch.randn((len(targets), *like.images.shape[1:]), generator=generator).to(device).requires_grad_()
    mean, std = (torch.tensor(values, device=device).view(-1, 1, 1) for values in (like.mean, like.std))
    low, high = -mean / std, (1 - mean) / std
    optimizer = torch.optim.Adam([inputs], lr=config.lr)
    shifts = torch.randint(-config.jitter, config.jitter + 1, (max(config.iterations, 1), 2), generator=generator)
    first = last = float("nan")
    for step in range(config.iterations):
        jittered = torch.roll(inputs, shifts=tuple(shifts[step].tolist()), dims=(2, 3))
        cross_entropy = F.cross_entropy(teacher(jittered), targets)
        matched = statistics.loss()
        loss = (cross_entropy + config.bn_weight * matched + config.tv_weight * total_variation(jittered)
                + config.l2_weight * torch.linalg.vector_norm(jittered))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            inputs.copy_(torch.maximum(torch.minimum(inputs, high), low))
        first, last = (float(matched.detach()) if step == 0 else first), float(matched.detach())
        if progress is not None:
            progress.update()
    return inputs.detach(), first, last


def to_uint8(inputs: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Normalised inputs [B, C, H, W] as the uint8 images they stand for (un-normalised, clamped, rounded)."""
    mean_, std_ = (torch.tensor(v, device=inputs.device).view(-1, 1, 1) for v in (mean, std))
    return torch.round((inputs * std_ + mean_).clamp(0, 1) * 255).to(torch.uint8).cpu()


def synthesize(config: SynthesizeConfig, show_progress: bool = True) -> SynthesisResult:
    """`kdcache synthesize`: the transfer set (resuming finished batches), its dataset files and the teacher's cache."""
    if config.labels not in LABEL_SOURCES:
        raise KdcacheError(f"--labels: unknown source {config.labels!r}; known: {', '.join(LABEL_SOURCES)}")
    started, device = time.perf_counter(), pick_device(config.device)
    source = load_dataset(config.dataset, config.data_root, "train", **loader_options(config))
    teacher, info = load_teacher(config.checkpoint, config.teacher or None, source.num_classes, class_names(source))
    teacher = teacher.to(device).eval().requires_grad_(False)
    folder = Path(config.out)
    _claim(folder, config)
    targets = _targets(config.num, source.num_classes, config.seed)
    statistics = BatchNormStatistics(teacher)
    batches = math.ceil(config.num / config.batch_size)
    progress = tqdm(total=batches * config.iterations, desc="synthesize", unit="step", disable=not show_progress)
    losses = []
    try:
        for batch in range(batches):
            losses.append(_batch(teacher, statistics, targets, batch, source, config, device, folder, progress))
    finally:
        statistics.remove()
        progress.close()
    images = _assembled(folder, len(losses))
    predicted = _predictions(teacher, images, source, device)
    intended = float((predicted == targets).float().mean())
    # --labels teacher: the floor of data-free distillation, noise (--iterations 0) that the teacher labels
    data = _write_dataset(folder, images, predicted if config.labels == "teacher" else targets, source, config,
                          info, losses)
    cache = dump_teacher(teacher, info, data, get_policy(config.augmentation, tuple(data.images.shape[-2:])),
                         folder / CACHE, views=config.views, scales=config.scales, device=device, seed=config.seed,
                         overwrite=True, show_progress=show_progress)
    return SynthesisResult(folder, config.num, time.perf_counter() - started,
                           float(np.mean([first for first, _ in losses])), float(np.mean([last for _, last in losses])),
                           intended, cache)


def _claim(folder: Path, config: SynthesizeConfig) -> None:
    """Start the folder, or check that the synthesis it holds is this one (so a rerun resumes it)."""
    settings = folder / "synthesis.json"
    wanted = {key: value for key, value in asdict(config).items() if key not in ("out", "device", "overwrite")}
    wanted = json.loads(json.dumps(wanted))  # tuples as lists, as they read back
    if settings.exists() and not config.overwrite:
        found = json.loads(settings.read_text())
        if found != wanted:
            changed = sorted(key for key in set(found) | set(wanted) if found.get(key) != wanted.get(key))
            raise KdcacheError(f"synthesize: {folder} holds a synthesis with other settings ({', '.join(changed)}); "
                               f"rerun with its settings to resume it, or use another --out (or --overwrite)")
        return
    (folder / "batches").mkdir(parents=True, exist_ok=True)
    save_config(config, folder)  # `kdcache synthesize --config OUT/config.yaml` repeats it
    for old in (folder / "batches").glob("*.npz"):
        old.unlink()
    settings.write_text(json.dumps(wanted, indent=2) + "\n")


def _targets(num: int, num_classes: int, seed: int) -> Tensor:
    """Balanced target classes (each class ⌊num/C⌋ or one more times) in a seeded random order."""
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    return (torch.arange(num) % num_classes)[order]


def _batch(teacher: nn.Module, statistics: BatchNormStatistics, targets: Tensor, batch: int, source: ImageData,
           config: SynthesizeConfig, device: torch.device, folder: Path, progress: tqdm) -> tuple[float, float]:
    """One batch: read back when a previous run finished it, else inverted and saved (atomically)."""
    path = folder / "batches" / f"{batch:05d}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as saved:
            progress.update(config.iterations)
            return float(saved["loss_start"]), float(saved["loss_end"])
    rows = slice(batch * config.batch_size, min((batch + 1) * config.batch_size, config.num))
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([config.seed, batch]).generate_state(1)[0]))
    inputs, first, last = invert_batch(teacher, statistics, targets[rows].to(device), source, config, generator,
                                       progress)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, images=to_uint8(inputs, source.mean, source.std).numpy(), loss_start=first, loss_end=last)
    os.replace(partial, path)  # a batch file exists only once it is whole
    return first, last


def _assembled(folder: Path, batches: int) -> Tensor:
    """The saved batches' images as one uint8 tensor [N, C, H, W]."""
    parts = []
    for batch in range(batches):
        with np.load(folder / "batches" / f"{batch:05d}.npz", allow_pickle=False) as saved:
            parts.append(saved["images"])
    return torch.from_numpy(np.concatenate(parts))


def _write_dataset(folder: Path, images: Tensor, labels: Tensor, source: ImageData, config: SynthesizeConfig,
                   info: dict[str, Any], losses: list[tuple[float, float]]) -> ImageData:
    """The images and labels as the arrays, and the description, that `synthesized` loads; loaded back."""
    np.save(folder / IMAGES, images.numpy())
    np.save(folder / LABELS, labels.numpy())
    description = {"format": 1, "num_classes": source.num_classes, "mean": list(source.mean), "std": list(source.std),
                   "teacher": info, "method": "DeepInversion (Yin et al., CVPR 2020)",
                   "source": {"name": config.dataset, "root": config.data_root, "options": loader_options(config)},
                   "statistics_loss": {"start": [a for a, _ in losses], "end": [b for _, b in losses]}}
    (folder / DESCRIPTION).write_text(json.dumps(description, indent=2) + "\n")
    return load_dataset("synthesized", folder, "train")


@torch.no_grad()
def _predictions(teacher: nn.Module, images: Tensor, source: ImageData, device: torch.device) -> Tensor:
    """The class the teacher names for each synthesised image as stored (uint8 [N, C, H, W], un-augmented,
    normalised as `source`) [N]."""
    found = [teacher(normalize(images[start:start + 256].to(device), source.mean, source.std)).argmax(-1).cpu()
             for start in range(0, len(images), 256)]
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.long)
