"""Tensor arithmetic that both the models (their outputs) and the losses need, importing neither: the precision
rule of every loss, and attention transfer's map of a stage's features."""

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcache.errors import KdcacheError

NORMALIZE_EPS = 1e-12  # F.normalize's: a zero vector stays zero


def upcast(x: Tensor) -> Tensor:
    """fp16/bf16 → float32; other dtypes unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def attention_map(features: Tensor, p: float = 2) -> Tensor:
    """AT's spatial attention map [B, H, W] of features [B, C, H, W]: the channel mean of |F|^p, L2-normalised
    over the H·W positions of each sample."""
    features = upcast(features)
    if features.dim() != 4:
        raise KdcacheError(f"attention_map(): needs features [B, C, H, W], found {tuple(features.shape)}")
    energy = features.abs().pow(p).mean(dim=1)
    return F.normalize(energy.flatten(1), dim=1, eps=NORMALIZE_EPS).view_as(energy)


def head_output(head: str, name: str) -> str:
    """The name of output `name` passed through the learned head of loss `head`: `crd/embedding` is CRD's
    projection of `embedding` (a student's, or the teacher's, as the dict it is found in says)."""
    return f"{head}/{name}"


def negatives_output(name: str) -> str:
    """The name of the teacher's outputs of other samples a contrastive loss reads beside output `name`:
    `negatives/embedding` [B, K, D]."""
    return f"negatives/{name}"
