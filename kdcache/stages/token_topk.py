"""The top-k of a language-model teacher's logits on their device, for `kdcache.cache.token_codec` to store.

Only the k ids, their r_i = z_(i) − z_(1) and the tail t = logsumexp(other logits) − z_(1) leave the device: for a
150k vocabulary that is k + 1 numbers a position instead of 150k. `TokenCodec.pack` quantises them on the host;
`TokenCodec.encode` computes the same from numpy logits (equal up to float32 rounding, and up to ties).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from kdcache.cache.token_codec import TokenCodec, TopTokens, check_logits
from kdcache.cache.topk import check_k


def top_tokens_on_device(logits: Tensor, k: int) -> TopTokens:
    """`token_codec.top_tokens` of logits [..., V] computed in float32 on their device, returned as numpy arrays."""
    z = logits.detach().to(torch.float32)
    check_k(z.shape[-1] if z.ndim else 0, k, "top_tokens_on_device()")
    if torch.isnan(z).any() or torch.isposinf(z).any() or (z.amax(dim=-1) == float("-inf")).any():
        check_logits(z.cpu().numpy(), "top_tokens_on_device()")  # says which, in the host's words
    values, ids = z.topk(k, dim=-1, largest=True, sorted=True)
    tail = z.scatter(-1, ids, float("-inf")).logsumexp(dim=-1)  # −inf when the k ids hold every token
    top = values[..., :1]
    return TopTokens(ids.cpu().numpy(), (values - top).cpu().numpy(), (tail - top[..., 0]).cpu().numpy())


def encode_tokens(codec: TokenCodec, logits: Tensor) -> dict[str, np.ndarray]:
    """The arrays `codec` stores for logits [..., V] on any device: the top-k there, the quantisation on the host."""
    return codec.pack(top_tokens_on_device(logits, codec.k))
