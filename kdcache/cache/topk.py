"""Top-k storage of teacher logits: the k largest logits per region, their classes, and one number for the rest.

What a region keeps (FKD, Shen & Xing ECCV 2022; ReLabel, Yun et al. CVPR 2021 store a teacher's top-k this way):
the k largest logits z_(1) ≥ … ≥ z_(k) (values), their class indices, and `rest`, the logit r that, given
to each of the C − k other classes, keeps their total softmax mass at temperature 1:

    r = logsumexp_{i ∉ top-k} z_i − log(C − k)        so that   (C − k) · e^r = Σ_{i ∉ top-k} e^{z_i}.

Decoding writes r everywhere and the k values at their classes. k == C keeps every logit: `rest` is
then −inf (no other class; the sentinel is never read back, since every class is overwritten by a
value). A store that checks finiteness must allow −inf in `rest` for that case (fp16 holds it).

This module is the storage side, in numpy: index dtypes, bytes, and the reader's rebuild of a whole
view. Encoding, and the per-batch rebuild on the device, are `kdcache.stages.topk` (torch).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from kdcache.errors import KdcacheError

REST_SENTINEL = float("-inf")  # `rest` when k == C: no other class is left


def check_k(num_classes: int, k: int, call: str) -> None:
    """Refuse a k outside 1..C (or logits without classes), naming the call."""
    if num_classes < 1:
        raise KdcacheError(f"{call}: logits need at least one class; got {num_classes}")
    if not isinstance(k, int) or not 1 <= k <= num_classes:
        raise KdcacheError(f"{call}: k must be an integer in 1..{num_classes} (the number of classes); got {k!r}")


def decode_topk_array(values: np.ndarray, indices: np.ndarray, rest: np.ndarray, num_classes: int) -> np.ndarray:
    """Logits [..., C] in the values' dtype: `rest` for every class, then the k `values` at their `indices`.

    Exact in the stored dtype: every rebuilt value is a stored one.
    """
    if values.shape != indices.shape or values.shape[:-1] != rest.shape:
        raise KdcacheError(f"decode_topk_array(): values {values.shape} and indices {indices.shape} must be [..., k] "
                           f"and rest {rest.shape} their shape without k")
    check_k(num_classes, values.shape[-1], "decode_topk_array()")
    full = np.repeat(rest[..., None].astype(values.dtype), num_classes, axis=-1)
    np.put_along_axis(full, indices.astype(np.int64), values, axis=-1)
    return full


def index_dtype_for(num_classes: int) -> str:
    """The smallest signed int dtype that holds class indices 0..C − 1 (int16 up to C = 32768, else int32)."""
    return "int16" if num_classes <= 2**15 else "int32"


class StorageBytes(NamedTuple):
    """Bytes per sample of full and top-k storage, and how many times smaller top-k is."""

    full: int  # R · C values
    topk: int  # R · (k values + k indices + 1 rest)
    ratio: float  # full / topk


def topk_bytes(num_regions: int, num_classes: int, k: int, value_dtype: str = "float16",
               index_dtype: str | None = None) -> StorageBytes:
    """Bytes per sample, full vs. top-k; indices in `index_dtype_for(C)` unless given, rest stored like the values."""
    check_k(num_classes, k, "topk_bytes()")
    index_dtype = index_dtype or index_dtype_for(num_classes)
    if np.iinfo(index_dtype).max < num_classes - 1:
        raise KdcacheError(f"topk_bytes(): {index_dtype} cannot hold class index {num_classes - 1}")
    value_size, index_size = np.dtype(value_dtype).itemsize, np.dtype(index_dtype).itemsize
    full = num_regions * num_classes * value_size
    topk = num_regions * (k * (value_size + index_size) + value_size)  # rest stored like the values
    return StorageBytes(full, topk, full / topk)
