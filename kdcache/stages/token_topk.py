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


# where the k ids hold more than this share of a position's mass, its tail is summed from the other logits (exact)
# rather than taken as the complement of theirs (which cancels: float32 values hold ~1e-7 each)
COMPLEMENT_SAFE = 1 - 1e-3


def top_tokens_on_device(logits: Tensor, k: int) -> TopTokens:
    """`token_codec.top_tokens` of logits [..., V] computed in float32 on their device, returned as numpy arrays.

    Two passes over the vocabulary, the top-k and one logsumexp: the tail's mass is the complement of the k ids'
    (summed in float64), and only where they hold more than COMPLEMENT_SAFE of it, the logsumexp of the others."""
    z = logits.detach().to(torch.float32)
    check_k(z.shape[-1] if z.ndim else 0, k, "top_tokens_on_device()")
    values, ids = z.topk(k, dim=-1, largest=True, sorted=True)
    top = values[..., :1]
    if not torch.isfinite(top).all():  # NaN sorts first in topk; +inf, or a row all −inf, shows in its top value
        check_logits(z.cpu().numpy(), "top_tokens_on_device()")  # says which, in the host's words
    log_total = z.logsumexp(dim=-1)
    kept = (values - log_total.unsqueeze(-1)).double().exp().sum(dim=-1)
    tail = log_total + torch.log1p(-kept.clamp(max=COMPLEMENT_SAFE)).to(z.dtype)
    exact = kept > COMPLEMENT_SAFE
    if exact.any():  # −inf where the k ids hold every token
        tail[exact] = z[exact].scatter(-1, ids[exact], float("-inf")).logsumexp(dim=-1)
    return TopTokens(ids.cpu().numpy(), (values - top).cpu().numpy(), (tail - top[..., 0]).cpu().numpy())


def encode_tokens(codec: TokenCodec, logits: Tensor) -> dict[str, np.ndarray]:
    """The arrays `codec` stores for logits [..., V] on any device: the top-k there, the quantisation on the host."""
    return codec.pack(top_tokens_on_device(logits, codec.k))
