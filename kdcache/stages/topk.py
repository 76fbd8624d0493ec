"""Top-k logits as tensors on the device: encoding a teacher's logits, rebuilding them, and what that loses.

The storage side (dtypes, bytes, the reader's numpy rebuild) is `kdcache.cache.topk`.

What a region keeps (FKD, Shen & Xing ECCV 2022; ReLabel, Yun et al. CVPR 2021 store a teacher's top-k this way):
the k largest logits z_(1) ≥ … ≥ z_(k) (values), their class indices, and `rest`, the logit r that, given
to each of the C − k other classes, keeps their total softmax mass at temperature 1:

    r = logsumexp_{i ∉ top-k} z_i − log(C − k)        so that   (C − k) · e^r = Σ_{i ∉ top-k} e^{z_i}.

Decoding writes r everywhere and the k values at their classes. At T = 1 softmax(decoded) then equals
softmax(z) on each top-k class and in the total mass of the others, exactly up to float rounding; within
the others the mass is spread evenly. At T ≠ 1, and after logit standardisation, the rebuilt distribution
differs on the top-k classes too (`topk_kl` measures how much; benchmarks/topk.py reports it).

k == C keeps every logit: `rest` is then −inf (no other class, no mass; the sentinel is never read back,
since every class is overwritten by a value) and decoding gives the logits back exactly. A store that
checks finiteness must allow −inf in `rest` for that case (fp16 holds it).

Everything is computed in float32 on the input's device (fp16/bf16/fp64 inputs are converted), without a
loop over samples and without host syncs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdcache.cache.topk import REST_SENTINEL, check_k
from kdcache.errors import KdcacheError


def encode_topk(logits: Tensor, k: int, *, rest_temperature: float | Tensor = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(values [..., k] float32 descending, indices [..., k] int64, rest [...] float32) of logits [..., C].

    `rest_temperature` τ (default 1, FKD/ReLabel; a float or a tensor [...] per row) is where the rest keeps the
    others' mass: r = τ · (logsumexp(z_others / τ) − log(C − k)), so softmax(decoded / τ) matches softmax(z / τ)
    on the top-k classes and in the others' total mass.
    """
    z = logits.to(torch.float32)
    num_classes = z.shape[-1]
    check_k(num_classes, k, "encode_topk()")
    if isinstance(rest_temperature, Tensor):
        if rest_temperature.shape != z.shape[:-1]:
            raise KdcacheError(f"encode_topk(): a rest_temperature tensor must be shaped like the logits without "
                               f"classes, {tuple(z.shape[:-1])}; got {tuple(rest_temperature.shape)}")
        rest_temperature = rest_temperature.to(device=z.device, dtype=torch.float32)
    elif not rest_temperature > 0:
        raise KdcacheError(f"encode_topk(): rest_temperature must be > 0; got {rest_temperature!r}")
    values, indices = z.topk(k, dim=-1, largest=True, sorted=True)  # ties: k distinct classes, torch's choice
    if k == num_classes:
        return values, indices, torch.full(z.shape[:-1], REST_SENTINEL, dtype=torch.float32, device=z.device)
    others = z.scatter(-1, indices, float("-inf"))  # the top-k classes carry no mass in the logsumexp
    if not isinstance(rest_temperature, Tensor) and rest_temperature == 1.0:
        return values, indices, others.logsumexp(dim=-1) - math.log(num_classes - k)  # r = LSE(z_∉topk) − log(C − k)
    tau = rest_temperature.unsqueeze(-1) if isinstance(rest_temperature, Tensor) else rest_temperature
    rest = rest_temperature * ((others / tau).logsumexp(dim=-1) - math.log(num_classes - k))
    return values, indices, rest


def decode_topk(values: Tensor, indices: Tensor, rest: Tensor, num_classes: int) -> Tensor:
    """Logits [..., C] float32: `rest` for every class, then the k `values` at their `indices`."""
    call = "decode_topk()"
    if values.shape != indices.shape or values.shape[:-1] != rest.shape:
        raise KdcacheError(f"{call}: values {tuple(values.shape)} and indices {tuple(indices.shape)} must be [..., k] "
                           f"and rest {tuple(rest.shape)} their shape without k")
    check_k(num_classes, values.shape[-1], call)
    full = rest.to(torch.float32).unsqueeze(-1).expand(*rest.shape, num_classes)
    return full.scatter(-1, indices.long(), values.to(torch.float32))  # scatter returns a new tensor


def rebuild_topk(logits: Tensor, k: int, storage_dtype: torch.dtype | None = None, *,
                 rest_temperature: float | Tensor = 1.0) -> Tensor:
    """decode(encode(logits, k)) in float32; with `storage_dtype` (e.g. float16), values and rest rounded to it first."""
    values, indices, rest = encode_topk(logits, k, rest_temperature=rest_temperature)
    if storage_dtype is not None:
        values, rest = values.to(storage_dtype), rest.to(storage_dtype)
    return decode_topk(values, indices, rest, logits.shape[-1])


def kl_rows(full: Tensor, rebuilt: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-row KL(softmax(full/T) ‖ softmax(rebuilt/T)) over the last axis, float32 (0 · log 0 = 0)."""
    log_p = torch.log_softmax(full.to(torch.float32) / temperature, dim=-1)
    log_q = torch.log_softmax(rebuilt.to(torch.float32) / temperature, dim=-1)
    p = log_p.exp()
    # where p underflows to 0 its term is 0, even if q is 0 too (−inf − −inf would be NaN)
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


def topk_kl(logits: Tensor, k: int, temperature: float = 1.0) -> Tensor:
    """Per-row KL(p_full ‖ p_rebuilt) at temperature T, p = softmax(z/T), the rebuilt logits from top-k storage."""
    return kl_rows(logits, rebuild_topk(logits, k), temperature)
