"""Where and how tensors compute: device choice and mixed precision, one place for every stage."""

from __future__ import annotations

import contextlib

import torch

from kdcache.distributed import world
from kdcache.errors import KdcacheError


def pick_device(name: str | None = None) -> torch.device:
    """`auto`/None: CUDA when present, else CPU; an explicit device that is absent is a clear error.

    Under torchrun, `auto` and `cuda` mean this process's own GPU, cuda:LOCAL_RANK.
    """
    if name in (None, "auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", world().local_rank)
        torch.cuda.set_device(device)
        return device
    if name in (None, "auto"):
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise KdcacheError(f"--device: {name!r} is not a device; use auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdcacheError(f"--device {name}: this machine has no CUDA GPU that torch can use; use --device cpu")
    return device


def precision(device: torch.device) -> str:
    """The compute precision kdcache uses on a device: bf16 autocast on CUDA, float32 elsewhere."""
    return "bfloat16" if device.type == "cuda" else "float32"


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing on CPU (where bf16 convolutions are slow and results must be exact)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move a model to the device, channels_last on CUDA."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The seeded CPU generator of one epoch (or round of epochs): batch orders, fresh views and view orders all
    draw from it, so a resumed run replays them exactly and any device gets the same draws."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)
