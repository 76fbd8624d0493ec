"""Per-token storage of a language-model teacher: the top-k token ids, their log-probabilities, and the tail mass.

A token position's teacher distribution p = softmax(z) over a vocabulary of V tokens is kept as the k + 1-way
distribution (p_(1), …, p_(k), m): the k most probable ids in descending order and m = 1 − Σ p_(i), the mass of
the V − k others. Every value is stored relative to the top token, so no normaliser needs storing:

    r_i = z_(i) − z_(1) = log p_(i) − log p_(1)   (r_1 = 0, descending),
    t   = logsumexp_{j ∉ top-k} z_j − z_(1) = log m − log p_(1)   (−inf when m = 0: k == V, or every other logit −inf).

Decoding renormalises the stored r̂_i and t̂ jointly, log p̂_(i) = r̂_i − logsumexp(r̂_1, …, r̂_k, t̂), so the decoded
k + 1-way distribution sums to one (up to float32 rounding): a loss takes m̂ = 1 − Σ exp(log p̂_(i)), or m̂ itself
from `decode_full`. Each decoded log-probability is within 2δ of the true one, δ the largest error of a stored
r̂_i or t̂ (the joint renormalisation shifts them all by a weighted mean of those errors); δ per width:

    fp16   r_i, t rounded to fp16: δ = 2⁻¹¹ · max(|r_k|, |t|) + 2⁻²⁵ (half an fp16 ulp, subnormals included).
    q8     r_i as uint8 codes c_i = round(−r_i / s), r̂_i = −c_i · s, with a per-position step
           s = −r_k / 254 (the lowest finite r of the k, rounded up to fp16, stored as `token_step`): δ = s / 2,
           and t̂ in fp16 as for fp16. Code 255 is kept for r = −inf (a token with no mass), decoded exactly.
    q6     the same with 6-bit codes, s = −r_k / 62, code 63 for −inf.
    q4     the same with 4-bit codes (two a byte), s = −r_k / 14, code 15 for −inf.
    q8f    uint8 codes with the fixed step s = 1/16 nat (no `token_step`): δ = s / 2 for r ≥ −254 s; an r below that
           (a token e^15.9 times less probable than the top one) is stored as −254 s, so it gains probability.

Ids are bit-packed, id_bits = ⌈log2 V⌉ (at least 1) each, in little-endian bit order: id j of a position occupies
bits j · id_bits … (j + 1) · id_bits − 1 of the position's bytes, its least significant bit first, and bit n of
the bytes is bit n mod 8 (counted from the least significant) of byte ⌊n / 8⌋; the last byte is zero-padded.
4- and 6-bit codes are packed the same way. This module is the storage side, in numpy (encoding included, from numpy
logits); `kdcache.stages.token_topk` takes the top-k of torch logits on their device before `TokenCodec.pack`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np

from kdcache.cache.topk import check_k
from kdcache.errors import CorruptCacheError, KdcacheError

CODEC_NAME = "token-topk"
ID_BIT_ORDER = "little"
MAX_ID_BITS = 32
FIXED_STEP = 1 / 16  # q8f's step in nats
FP16_MAX = float(np.finfo(np.float16).max)
# kdcache's default: 112 bytes a token at a 150k vocabulary (18-bit ids: 81 + 27 codes + step + tail), within
# DistillKit's budget (114 B), with less full-vocabulary KL than top-32 bf16 log-probs and 32-bit ids (192 B), at
# all but 1 of the 2,304 synthetic positions measured; q4 keeps 40 ids in 114 B, with less KL on average, but its
# 4x coarser step loses more than that baseline at 6-9 % of the positions (benchmarks/TOKENS.md)
DEFAULT_K, DEFAULT_WIDTH = 36, "q6"
DEFINING_FIELDS = ("codec", "k", "vocab", "width", "id_bits", "bytes_per_token")  # of describe(): how the bytes read


@dataclass(frozen=True)
class _Width:
    """How the relative log-probabilities r_i are stored: fp16 values, or `bits`-bit codes of a step."""

    bits: int  # 16: fp16 values; 8 or 4: codes
    fixed_step: float | None = None  # None: a per-position step, stored
    text: str = ""

    @property
    def codes(self) -> bool:
        return self.bits < 16

    @property
    def infinite_code(self) -> int:
        """The code of r = −inf (no mass); finite r take 0 … infinite_code − 1."""
        return 2 ** self.bits - 1


WIDTHS = {
    "fp16": _Width(16, text="r_i = log p_i - log p_top as float16"),
    "q8": _Width(8, text="uint8 codes c_i = round(-r_i / step), step = -r_k / 254 per position rounded up to float16 "
                         "(token_step), r_i = -c_i * step; code 255: r_i = -inf"),
    "q6": _Width(6, text="6-bit codes c_i = round(-r_i / step), packed like the ids, step = -r_k / 62 per position "
                         "rounded up to float16 (token_step), r_i = -c_i * step; code 63: r_i = -inf"),
    "q4": _Width(4, text="4-bit codes c_i = round(-r_i / step), two a byte (packed like the ids), step = -r_k / 14 per "
                         "position rounded up to float16 (token_step), r_i = -c_i * step; code 15: r_i = -inf"),
    "q8f": _Width(8, FIXED_STEP, text=f"uint8 codes c_i = min(round(-r_i / {FIXED_STEP}), 254), "
                                      f"r_i = -c_i * {FIXED_STEP}; code 255: r_i = -inf"),
}


class TopTokens(NamedTuple):
    """What encoding keeps of each position before quantisation: ids and r descending, t (module docstring)."""

    ids: np.ndarray  # int64 [..., k]
    relative: np.ndarray  # float32 [..., k]: r_i = z_(i) − z_(1)
    relative_tail: np.ndarray  # float32 [...]: t = logsumexp(other logits) − z_(1)


def id_bits_for(vocab: int) -> int:
    """Bits one token id takes: ⌈log2 V⌉, at least 1."""
    return max(1, math.ceil(math.log2(vocab))) if vocab > 1 else 1


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., ⌈n · bits / 8⌉] of unsigned values [..., n] < 2**bits, little-endian bit order (module docstring)."""
    shifts = np.arange(bits, dtype=np.uint64)
    planes = ((values.astype(np.uint64)[..., None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(planes.reshape(*values.shape[:-1], -1), axis=-1, bitorder=ID_BIT_ORDER)


def unpack_bits(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
    """int64 [..., count] from `pack_bits`' bytes: the 8 bytes from each value's first byte read as one little-endian
    uint64 (bits ≤ 32 plus a shift < 8 fit), then shifted and masked, all values at once."""
    starts = np.arange(count, dtype=np.int64) * bits
    padded = np.concatenate([packed, np.zeros((*packed.shape[:-1], 8), np.uint8)], axis=-1)
    words = np.take(padded, (starts // 8)[:, None] + np.arange(8), axis=-1).view("<u8")[..., 0]
    mask = np.uint64((1 << bits) - 1)
    return ((words >> (starts % 8).astype(np.uint64)) & mask).astype(np.int64)


def logsumexp(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """log Σ exp over an axis, stable; −inf where every value is −inf."""
    top = np.max(values, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    with np.errstate(divide="ignore"):
        return (np.log(np.exp(values - top).sum(axis=axis, keepdims=True)) + top).squeeze(axis)


def top_tokens(logits: np.ndarray, k: int) -> TopTokens:
    """The k largest logits' ids and r, and t, in float32, of logits [..., V] (no NaN or +inf; −inf allowed)."""
    z = np.asarray(logits, dtype=np.float32)
    vocab = z.shape[-1] if z.ndim else 0
    check_k(vocab, k, "top_tokens()")
    check_logits(z, "top_tokens()")
    candidates = (np.argpartition(-z, k - 1, axis=-1)[..., :k] if k < vocab
                  else np.broadcast_to(np.arange(vocab), z.shape))
    values = np.take_along_axis(z, candidates, axis=-1)
    order = np.argsort(-values, axis=-1, kind="stable")
    ids, values = np.take_along_axis(candidates, order, axis=-1), np.take_along_axis(values, order, axis=-1)
    others = z.copy()
    np.put_along_axis(others, ids, -np.inf, axis=-1)  # the k ids carry no mass in the tail's logsumexp
    top = values[..., :1]
    return TopTokens(ids.astype(np.int64), values - top, logsumexp(others) - top[..., 0])


def check_logits(logits: np.ndarray, call: str) -> None:
    """Refuse NaN or +inf logits, and a position whose logits are all −inf."""
    if np.isnan(logits).any() or np.isposinf(logits).any():
        raise KdcacheError(f"{call}: the teacher's logits hold NaN or +inf; check the teacher and its precision")
    if (logits.max(axis=-1) == -np.inf).any():
        raise KdcacheError(f"{call}: a position's logits are all -inf (no token has mass); mask such positions out")


@dataclass(frozen=True)
class TokenCodec:
    """How a cache stores each token position's teacher distribution: k ids, their r at `width`, and the tail."""

    k: int
    vocab: int
    width: str = DEFAULT_WIDTH

    @classmethod
    def default(cls, vocab: int) -> TokenCodec:
        """kdcache's default codec for a vocabulary: DEFAULT_K ids (fewer in a smaller vocabulary), DEFAULT_WIDTH."""
        return cls(min(DEFAULT_K, vocab), vocab, DEFAULT_WIDTH)

    def __post_init__(self) -> None:
        if not isinstance(self.vocab, int) or not 1 <= self.vocab <= 2 ** MAX_ID_BITS:
            raise KdcacheError(f"TokenCodec: vocab must be an integer in 1..2**{MAX_ID_BITS}; got {self.vocab!r}")
        check_k(self.vocab, self.k, "TokenCodec")
        if self.width not in WIDTHS:
            raise KdcacheError(f"TokenCodec: width must be one of {', '.join(WIDTHS)}; got {self.width!r}")

    @property
    def id_bits(self) -> int:
        """Bits one token id takes: ⌈log2 vocab⌉, at least 1."""
        return id_bits_for(self.vocab)

    @property
    def _width(self) -> _Width:
        return WIDTHS[self.width]

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Stored array name -> (shape of one position's entry, dtype)."""
        width = self._width
        values = (((math.ceil(self.k * width.bits / 8),), "uint8") if width.codes else ((self.k,), "float16"))
        layout = {"token_ids": ((math.ceil(self.k * self.id_bits / 8),), "uint8"), "token_logprobs": values}
        if width.codes and width.fixed_step is None:
            layout["token_step"] = ((), "float16")
        layout["token_tail"] = ((), "float16")
        return layout

    def bytes_per_token(self, vocab: int | None = None) -> int:
        """Bytes one position takes in every array; with `vocab`, as if the ids were of that vocabulary."""
        codec = self if vocab is None else replace(self, vocab=vocab)
        return sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in codec.arrays().values())

    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        """The stored arrays, leading shape [...], of float logits [..., vocab] (top-k taken in float32)."""
        if logits.shape[-1:] != (self.vocab,):
            raise KdcacheError(f"TokenCodec.encode(): logits must be [..., {self.vocab}] (the vocabulary); "
                               f"got {logits.shape}")
        return self.pack(top_tokens(logits, self.k))

    def pack(self, top: TopTokens) -> dict[str, np.ndarray]:
        """The stored arrays of `top_tokens`' result (or the device's top-k, `kdcache.stages.token_topk`)."""
        ids, relative, tail = top
        if ids.shape[-1:] != (self.k,) or relative.shape != ids.shape or tail.shape != ids.shape[:-1]:
            raise KdcacheError(f"TokenCodec.pack(): ids {ids.shape} and relative {relative.shape} must be [..., "
                               f"{self.k}] and the tail {tail.shape} their shape without k")
        if ids.size and not 0 <= ids.min() <= ids.max() < self.vocab:
            raise KdcacheError(f"TokenCodec.pack(): token ids must be in 0..{self.vocab - 1} (the vocabulary); got "
                               f"{ids.min()}..{ids.max()}")
        arrays = {"token_ids": pack_bits(ids, self.id_bits)}
        if self._width.codes:
            codes, step = self._codes(relative)
            arrays["token_logprobs"] = pack_bits(codes, self._width.bits) if self._width.bits < 8 else codes
            if step is not None:
                arrays["token_step"] = step.astype(np.float16)
        else:
            arrays["token_logprobs"] = relative.astype(np.float16)
        arrays["token_tail"] = np.asarray(tail, np.float32).astype(np.float16)
        return arrays

    def _codes(self, relative: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 codes [..., k] of r (the infinite code for −inf), and the per-position step (None if fixed)."""
        width = self._width
        step = self._step(relative) if width.fixed_step is None else None
        divisor = np.float32(width.fixed_step) if step is None else np.where(step > 0, step, 1)[..., None]
        finite = np.clip(np.rint(-relative / divisor), 0, width.infinite_code - 1)  # step 0: every finite r is 0
        return np.where(relative == -np.inf, width.infinite_code, finite).astype(np.uint8), step

    def _step(self, relative: np.ndarray) -> np.ndarray:
        """float32 [...]: the per-position step that reaches the lowest finite r, rounded up to a float16 value."""
        lowest = np.where(np.isfinite(relative), relative, 0).min(axis=-1)
        step = np.minimum(-lowest / (self._width.infinite_code - 1), FP16_MAX).astype(np.float32)
        rounded = step.astype(np.float16)
        rounded = np.where(rounded.astype(np.float32) < step, np.nextafter(rounded, np.float16(np.inf)), rounded)
        return rounded.astype(np.float32)

    def decode(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [..., k], log-probabilities float32 [..., k]) renormalised jointly with the stored tail."""
        ids, logprobs, _ = self.decode_full(arrays)
        return ids, logprobs

    def decode_full(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`decode`'s ids and log-probabilities, and log m̂ float32 [...], the tail's: Σ exp(log p̂) + m̂ = 1."""
        self._check_arrays(arrays)
        ids = unpack_bits(arrays["token_ids"], self.k, self.id_bits)
        width = self._width
        if width.codes:
            stored = arrays["token_logprobs"]
            codes = unpack_bits(stored, self.k, width.bits) if width.bits < 8 else stored.astype(np.int64)
            step = (arrays["token_step"].astype(np.float32)[..., None] if width.fixed_step is None
                    else np.float32(width.fixed_step))
            relative = np.where(codes == width.infinite_code, -np.inf, -codes * step).astype(np.float32)
        else:
            relative = arrays["token_logprobs"].astype(np.float32)
        relative, tail = relative.astype(np.float64), arrays["token_tail"].astype(np.float64)
        norm = logsumexp(np.concatenate([relative, tail[..., None]], axis=-1))  # in float64: sums to 1 within 1e-6
        return ids, (relative - norm[..., None]).astype(np.float32), (tail - norm).astype(np.float32)

    def _check_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for name, (shape, dtype) in self.arrays().items():
            found = arrays.get(name)
            if found is None or found.dtype != np.dtype(dtype) or found.shape[found.ndim - len(shape):] != shape:
                what = "missing" if found is None else f"{found.dtype} {found.shape}"
                raise CorruptCacheError(f"token arrays: {name} must be {dtype} [..., {', '.join(map(str, shape))}] "
                                        f"for {self.describe_short()}; found {what}")
        if (arrays["token_ids"].shape[:-1] != arrays["token_tail"].shape):
            raise CorruptCacheError(f"token arrays: token_ids {arrays['token_ids'].shape} and token_tail "
                                    f"{arrays['token_tail'].shape} must have the same positions")

    def describe_short(self) -> str:
        """'k=33 q8, 18-bit ids (vocab 150000)'."""
        return f"k={self.k} {self.width}, {self.id_bits}-bit ids (vocab {self.vocab})"

    def describe(self) -> dict[str, Any]:
        """JSON-able description for the cache metadata: the fields, and in words how to read the arrays."""
        return {"codec": CODEC_NAME, "k": self.k, "vocab": self.vocab, "width": self.width, "id_bits": self.id_bits,
                "id_bit_order": f"{ID_BIT_ORDER}: id j in bits j*id_bits .. (j+1)*id_bits-1 of token_ids, least "
                                "significant first; bit n is bit n % 8 of byte n // 8",
                "token_logprobs": WIDTHS[self.width].text + "; r_i = z_i - z_top for the k most probable ids, "
                                                            "descending",
                "token_tail": "log m - log p_top as float16, m the mass outside the k ids; -inf when m = 0",
                "decode": "log p_i = r_i - logsumexp(r_1..r_k, tail); m = exp(tail - logsumexp(r_1..r_k, tail))",
                "bytes_per_token": self.bytes_per_token()}

    @classmethod
    def from_description(cls, description: Any) -> TokenCodec:
        """The codec a cache's metadata describes; CorruptCacheError where a field that fixes how its bytes read
        (DEFINING_FIELDS) is not what `describe` writes for it."""
        where = "the cache's token codec description"
        if not isinstance(description, dict) or description.get("codec") != CODEC_NAME:
            raise CorruptCacheError(f"{where} must be a mapping with codec {CODEC_NAME!r}; found {description!r:.200}: "
                                    f"the metadata was edited or damaged; dump the teacher again")
        try:
            codec = cls(description.get("k"), description.get("vocab"), description.get("width"))
        except KdcacheError as error:
            raise CorruptCacheError(f"{where}: {error}; dump the teacher again") from None
        expected = codec.describe()
        # the fields that fix how the bytes read; the others are prose for people, which a later kdcache may reword
        # without making a cache written before unreadable (formats last)
        for field in DEFINING_FIELDS:
            if description.get(field) != expected[field]:
                raise CorruptCacheError(f"{where}: {field} is {description.get(field)!r:.120}, expected "
                                        f"{expected.get(field)!r:.120} for {codec.describe_short()}; the metadata "
                                        f"was edited or damaged; dump the teacher again")
        return codec


class _TrueBuckets(NamedTuple):
    """The full distribution, float64, seen through k ids: Σ p log p, log p of the ids, log of the others' mass."""

    negative_entropy: np.ndarray  # [...]
    log_p_ids: np.ndarray  # [..., k]
    log_p_others: np.ndarray  # [...]


def _true_buckets(full_logits: np.ndarray, ids: np.ndarray) -> _TrueBuckets:
    z = np.asarray(full_logits, dtype=np.float64)
    log_p = z - logsumexp(z)[..., None]
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):
        negative_entropy = np.where(p > 0, p * log_p, 0.0).sum(axis=-1)  # 0 · log 0 = 0
    log_p_ids = np.take_along_axis(log_p, ids, axis=-1)
    np.put_along_axis(log_p, ids, -np.inf, axis=-1)
    return _TrueBuckets(negative_entropy, log_p_ids, logsumexp(log_p))


def _cross(p_log: np.ndarray, q_log: np.ndarray) -> np.ndarray:
    """p · log q elementwise, 0 where p = 0 (even where q = 0)."""
    with np.errstate(invalid="ignore"):
        return np.where(p_log > -np.inf, np.exp(p_log) * q_log, 0.0)


def _decoded_log_tail(logprobs: np.ndarray, log_tail: np.ndarray | None) -> np.ndarray:
    """log m̂: the decoded tail's, or log(1 − Σ exp(log p̂)) floored at 0 mass (−inf) when it is not given."""
    if log_tail is not None:
        return np.asarray(log_tail, np.float64)
    mass = 1.0 - np.exp(np.asarray(logprobs, np.float64)).sum(axis=-1)
    with np.errstate(divide="ignore"):
        return np.log(np.maximum(mass, 0.0))


def reconstruction_kl(full_logits: np.ndarray, ids: np.ndarray, logprobs: np.ndarray,
                      log_tail: np.ndarray | None = None) -> np.ndarray:
    """Per-position KL(p_full ‖ q) in float64, q giving the k ids exp(logprobs) and the tail m̂ spread evenly over
    the V − k other ids (as the region top-k rebuilds); m̂ from `log_tail`, else 1 − Σ exp(logprobs) (≥ 0)."""
    vocab, k = full_logits.shape[-1], ids.shape[-1]
    true = _true_buckets(full_logits, ids)
    log_q = np.asarray(logprobs, np.float64)
    log_q_other = _decoded_log_tail(logprobs, log_tail) - (math.log(vocab - k) if k < vocab else 0.0)
    cross = _cross(true.log_p_ids, log_q).sum(axis=-1) + _cross(true.log_p_others, log_q_other)
    return true.negative_entropy - cross


def bucket_kl(full_logits: np.ndarray, ids: np.ndarray, logprobs: np.ndarray,
              log_tail: np.ndarray | None = None) -> np.ndarray:
    """Per-position KL of the k + 1-way distributions, float64: the full one bucketed into the k ids and the rest,
    against the decoded k and m̂ (the quantisation's error alone, no truncation)."""
    true = _true_buckets(full_logits, ids)
    log_q = np.asarray(logprobs, np.float64)
    log_q_tail = _decoded_log_tail(logprobs, log_tail)
    with np.errstate(invalid="ignore"):
        terms = _cross(true.log_p_ids, true.log_p_ids - log_q).sum(axis=-1)
        return terms + _cross(true.log_p_others, true.log_p_others - log_q_tail)
