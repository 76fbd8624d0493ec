"""The training recipe around a step: optimiser, learning rate per step, precision, gradient clipping, weight EMA.

The defaults are the CIFAR KD papers' recipe (SGD, step decay, bf16 autocast on CUDA and float32 on the CPU,
no clipping, no EMA), so every earlier result reproduces; `--optimizer adamw --schedule cosine
--lr-warmup-epochs 5 --ema-decay 0.9998 --label-smoothing 0.1` is the recipe timm and FKD train students with.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable
from typing import Protocol

import torch
from torch import nn

from kdcache.config import TrainConfig
from kdcache.errors import KdcacheError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def make_optimizer(parameters: Iterable[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum (the papers'), or AdamW with decoupled weight decay; lr is set per step."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    raise KdcacheError(f"--optimizer: unknown optimizer {config.optimizer!r}; known: {', '.join(OPTIMIZERS)}")


def learning_rate(config: TrainConfig, epoch: int, step: int, steps: int) -> float:
    """The learning rate of one step (epoch from 0, step of `steps` in it): a linear warm-up over the first
    lr_warmup_epochs, then step decay at the milestones (per epoch, as the papers) or a cosine to 0 (per step)."""
    done = epoch + step / max(steps, 1)  # epochs completed before this step
    warmup = config.lr_warmup_epochs
    if done < warmup:
        return config.lr * (done + 1 / max(steps, 1)) / warmup  # the first step already moves
    if config.schedule == "step":
        return config.lr * config.lr_decay_rate ** sum(epoch >= m for m in config.lr_milestones())
    if config.schedule == "cosine":
        progress = (done - warmup) / max(config.epochs - warmup, 1e-12)
        return 0.5 * config.lr * (1 + math.cos(math.pi * min(progress, 1.0)))
    raise KdcacheError(f"--schedule: unknown schedule {config.schedule!r}; known: {', '.join(SCHEDULES)}")


def training_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of --precision on this device (None: float32); one a device cannot run is refused."""
    if name not in PRECISIONS:
        raise KdcacheError(f"--precision: unknown precision {name!r}; known: {', '.join(PRECISIONS)}")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name == "fp32":
        return None
    if name == "fp16" and device.type != "cuda":
        raise KdcacheError(f"--precision fp16 trains with a gradient scaler on CUDA; {device} has none: use "
                           f"--precision fp32 (or bf16 where the CPU has it)")
    if name == "bf16" and not _has_bf16(device):
        fix = "fp16 (with a gradient scaler)" if device.type == "cuda" else "fp32"
        raise KdcacheError(f"--precision bf16: {device} has no bfloat16 arithmetic; use --precision {fix}")
    return torch.bfloat16 if name == "bf16" else torch.float16


def _has_bf16(device: torch.device) -> bool:
    """Whether the device computes in bfloat16 natively (V100 and 2080 Ti do not; most CPUs do not either)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def step_autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast of a training step's forward pass in `dtype` (nothing for float32)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


class StepHook(Protocol):
    """What moves beside a model after each of its optimiser steps (a weight average): the loop calls after_step;
    the run keeps `model` in last.pt under `key` (and resumes it), and, where `report` names a suffix, evaluates
    it (test_acc + report) and saves it as model + report + .pt."""

    key: str
    model: nn.Module
    report: str | None

    def after_step(self, model: nn.Module) -> None:
        """Follow the model's weights after an optimiser step."""
        ...


class WeightEMA:
    """An exponential moving average of a model's weights: after each step e ← decay·e + (1 − decay)·w for every
    parameter, and the buffers (BatchNorm's running statistics) copied. A StepHook: by default --ema-decay's,
    kept in last.pt as `ema`, evaluated as test_acc_ema and saved as model_ema.pt."""

    def __init__(self, model: nn.Module, decay: float, flag: str = "--ema-decay", key: str = "ema",
                 report: str | None = "_ema") -> None:
        if not 0 < decay < 1:
            raise KdcacheError(f"{flag}: expected a decay in (0, 1) such as 0.9998, got {decay}")
        self.decay, self.key, self.report = decay, key, report
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards the model's current weights; copy its buffers."""
        for average, weight in zip(self.model.parameters(), model.parameters(), strict=True):
            average.lerp_(weight.detach(), 1 - self.decay)
        for average, buffer in zip(self.model.buffers(), model.buffers(), strict=True):
            average.copy_(buffer)

    after_step = update


def recipe_hooks(model: nn.Module, config: TrainConfig) -> list[StepHook]:
    """The recipe's hooks on a model: the weight EMA of --ema-decay where asked."""
    return [] if config.ema_decay is None else [WeightEMA(model, config.ema_decay)]
