"""Teacher training (plain cross-entropy through the shared loop) and loading a teacher from a checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcache import distributed
from kdcache.config import TeacherConfig, config_dict, loader_options
from kdcache.data import ImageData, get_policy, load_dataset
from kdcache.errors import KdcacheError
from kdcache.losses import get_loss
from kdcache.models import create_model, file_sha256, load_checkpoint
from kdcache.runtime import pick_device
from kdcache.train.loop import Run, fit
from kdcache.train.views import FreshViews


@dataclass(frozen=True)
class TrainedModel:
    """Where a trained model was written, and how good it is."""

    checkpoint: Path
    sidecar: Path
    test_acc: float
    best_test_acc: float


def train_teacher(config: TeacherConfig, show_progress: bool = True) -> TrainedModel:
    """Train a registry model with cross-entropy on fresh augmented views every epoch; write model.pt + model.json.

    Under torchrun: DDP, each rank holding an even share of the samples (see `distill`).
    """
    device = pick_device(config.device)
    here = distributed.init(device)
    data = load_dataset(config.dataset, config.data_root, "train", **loader_options(config))
    test = load_dataset(config.dataset, config.data_root, "test", **loader_options(config))
    policy = get_policy(config.augmentation, image_size=tuple(data.images.shape[-2:]))
    torch.manual_seed(config.seed)
    model = create_model(config.model, num_classes=data.num_classes)
    record = {"arch": config.model, "num_classes": data.num_classes, "loss": "ce", "dataset": data.describe(),
              "config": _record_config(config)}
    run = Run(config.model, model, get_loss("ce"), (1,), config, Path(config.out), device, record, here)
    shard = distributed.shard(len(data.labels), 1, len(data.labels), here)[1]
    fit([run], data, test, FreshViews(policy, len(data.labels), config.seed), policy, None, config, device,
        show_progress=show_progress and here.is_main, shard=shard)
    checkpoint = run.finish()
    distributed.barrier()  # rank 0 has written the checkpoint and its sidecar
    sidecar = json.loads(checkpoint.with_suffix(".json").read_text())
    return TrainedModel(checkpoint, checkpoint.with_suffix(".json"), sidecar["test_acc"], sidecar["best_test_acc"])


def checkpoint_sidecar(checkpoint: str | Path) -> dict[str, Any]:
    """The JSON written beside a kdcache checkpoint (arch, classes, dataset), or {} for a foreign checkpoint."""
    sidecar = Path(checkpoint).with_suffix(".json")
    try:
        return json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    except json.JSONDecodeError as error:
        raise KdcacheError(f"{sidecar} is not valid JSON ({error}); fix or delete it and pass --teacher") from error


def load_teacher(checkpoint: str | Path, arch: str | None, data: ImageData) -> tuple[nn.Module, dict[str, Any]]:
    """A teacher in eval mode and the metadata that names it (arch, classes, checkpoint and its sha256)."""
    checkpoint = Path(checkpoint)
    sidecar = checkpoint_sidecar(checkpoint)
    arch = arch or sidecar.get("arch")
    if not arch:
        raise KdcacheError(f"--teacher: which architecture is {checkpoint}? it has no kdcache sidecar "
                           f"({checkpoint.with_suffix('.json').name}); pass --teacher NAME (see `kdcache models`)")
    model = create_model(arch, num_classes=data.num_classes)
    load_checkpoint(checkpoint, model)
    info = {"arch": arch, "num_classes": data.num_classes, "checkpoint": str(checkpoint),
            "checkpoint_sha256": file_sha256(checkpoint)}
    return model.eval(), info


def _record_config(config: Any) -> dict[str, Any]:
    """The config as saved with a run, less what does not change what this run computes: the device, resuming,
    and which other students and losses share the sweep (so a run resumes when the sweep around it changes)."""
    return {k: v for k, v in config_dict(config).items()
            if k not in ("device", "resume", "students", "losses", "pairs")}
