"""`kdcache train-teacher`: plain cross-entropy through the shared loop, fresh views every epoch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kdcache import distributed
from kdcache.config import TeacherConfig, loader_options, recorded_config, save_config
from kdcache.data import load_splits, policy_for
from kdcache.data.dense import is_dense
from kdcache.data.text import is_text
from kdcache.data.files import default_workers
from kdcache.losses import get_loss
from kdcache.models import create_model
from kdcache.runtime import pick_device
from kdcache.stages.dense_train import SegmentationRun, require_task, train_dense_teacher
from kdcache.stages.loop import Run, fit
from kdcache.stages.splits import make_split
from kdcache.stages.text_train import LanguageRun, train_text_teacher
from kdcache.stages.views import FreshViews


@dataclass(frozen=True)
class TrainedModel:
    """Where a trained model was written, and how good it is."""

    checkpoint: Path
    sidecar: Path
    test_acc: float
    best_test_acc: float


def train_teacher(config: TeacherConfig, show_progress: bool = True) -> TrainedModel | LanguageRun | SegmentationRun:
    """Train a registry model with cross-entropy on fresh augmented views every epoch; write model.pt + model.json.
    On a text dataset, a language model on its sequences (kdcache.stages.text_train); on a segmentation dataset,
    a segmentation model on its label maps (kdcache.stages.dense_train).

    Under torchrun: DDP, each rank holding an even share of the samples (see `distill`).
    """
    device = pick_device(config.device)
    here = distributed.init(device)
    if here.is_main:  # beside model.json: `kdcache train-teacher --config OUT/config.yaml` repeats the run
        save_config(config, config.out)
    data, test = load_splits(config.dataset, config.data_root, **loader_options(config))
    if is_text(data):  # a language model: its own loop (next tokens, held-out perplexity)
        return train_text_teacher(config, data, test, device, show_progress and here.is_main)
    if is_dense(data):  # a class per pixel: its own loop (mIoU and pixel accuracy each epoch)
        return train_dense_teacher(config, data, test, device, show_progress and here.is_main)
    policy = policy_for(data, config.augmentation)
    torch.manual_seed(config.seed)
    model = create_model(config.model, num_classes=data.num_classes)
    require_task(model, config.model, data, "--model")
    record = {"arch": config.model, "num_classes": data.num_classes, "loss": "ce", "dataset": data.describe(),
              "config": recorded_config(config)}
    loss = get_loss("ce", label_smoothing=config.label_smoothing)
    run = Run(config.model, model, loss, (1,), config, Path(config.out), device, record, here)
    shard = distributed.even_share(len(data.labels), here)
    split = make_split(data, test, policy, device, shard, default_workers(config.workers), config.seed)
    fit([run], split, FreshViews(policy, len(data.labels), config.seed), None, config, device,
        show_progress=show_progress and here.is_main)
    checkpoint = run.finish()
    distributed.barrier()  # rank 0 has written the checkpoint and its sidecar
    sidecar = json.loads(checkpoint.with_suffix(".json").read_text())
    return TrainedModel(checkpoint, checkpoint.with_suffix(".json"), sidecar["test_acc"], sidecar["best_test_acc"])
