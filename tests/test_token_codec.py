"""The token codec: ids bit-packed exactly, log-probabilities within their stated error, the k + 1-way distribution
summing to one, descriptions checked, and the error of realistic distributions bounded."""

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.cache.token_codec import (WIDTHS, TokenCodec, bucket_kl, logsumexp, pack_bits, reconstruction_kl,
                                       top_tokens, unpack_bits)
from kdcache.errors import CorruptCacheError, KdcacheError
from kdcache.stages.token_topk import encode_tokens

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("token_cache", ROOT / "benchmarks" / "token_cache.py")
token_cache = importlib.util.module_from_spec(_spec)  # the benchmark, imported from its file
_spec.loader.exec_module(token_cache)

FP16_RELATIVE = 2.0 ** -11  # half an fp16 ulp, relative


def zipf_logits(positions: int, vocab: int, seed: int = 0) -> np.ndarray:
    return token_cache.synthetic_logits(positions, vocab, seed)


@pytest.mark.parametrize("bits", [1, 7, 12, 17, 18, 31, 32])
def test_ids_round_trip_exactly_at_every_width(bits):
    rng = np.random.default_rng(bits)
    count = 13  # 13 * bits is not a multiple of 8 for any odd width
    ids = rng.integers(0, 2 ** bits, size=(4, 3, count), dtype=np.int64)
    ids[0, 0, :] = 2 ** bits - 1  # the largest id, every bit set
    ids[0, 1, :] = 0
    packed = pack_bits(ids, bits)
    assert packed.dtype == np.uint8 and packed.shape == (4, 3, math.ceil(count * bits / 8))
    np.testing.assert_array_equal(unpack_bits(packed, count, bits), ids)


def test_bit_order_is_little_endian_as_documented():
    # ids 1 and 2 at 3 bits: bits 0..2 = 1,0,0 and bits 3..5 = 0,1,0 -> byte 0b00010001
    assert pack_bits(np.array([1, 2]), 3).tolist() == [0b00010001]


@pytest.mark.parametrize("vocab, k", [(2, 1), (128, 5), (4096, 33), (131_073, 7)])
def test_codec_round_trips_ids_and_the_max_id(vocab, k):
    logits = np.random.default_rng(0).normal(size=(6, vocab)).astype(np.float32)
    logits[0, vocab - 1] = 100.0  # the largest id is the top token
    codec = TokenCodec(k, vocab, "q8")
    assert codec.id_bits == max(1, math.ceil(math.log2(vocab)))
    ids, _ = codec.decode(codec.encode(logits))
    np.testing.assert_array_equal(ids, top_tokens(logits, k).ids)
    assert ids[0, 0] == vocab - 1


def error_bound(codec: TokenCodec, arrays: dict, relative: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """The module docstring's bound, 2δ per position."""
    tail_error = FP16_RELATIVE * np.abs(np.where(np.isfinite(tail), tail, 0)) + 2.0 ** -25
    width = WIDTHS[codec.width]
    if not width.codes:
        lowest = np.abs(np.where(np.isfinite(relative), relative, 0)).max(axis=-1)
        return 2 * np.maximum(FP16_RELATIVE * lowest + 2.0 ** -25, tail_error)
    step = arrays["token_step"].astype(np.float64) if width.fixed_step is None else width.fixed_step
    return 2 * np.maximum(step / 2, tail_error)


@pytest.mark.parametrize("width", ["fp16", "q8", "q6", "q4"])
def test_decoded_logprobs_are_within_the_stated_error_and_sum_to_one_with_the_tail(width):
    logits = zipf_logits(64, 4096)
    codec = TokenCodec(33, 4096, width)
    arrays = codec.encode(logits)
    ids, logprobs, log_tail = codec.decode_full(arrays)
    top = top_tokens(logits, 33)
    true = np.take_along_axis(logits - logsumexp(logits)[:, None], ids, axis=-1).astype(np.float64)
    bound = error_bound(codec, arrays, top.relative, top.relative_tail)
    assert (np.abs(logprobs - true) <= bound[:, None] + 1e-5).all()  # + float32 arithmetic
    total = np.exp(logprobs.astype(np.float64)).sum(-1) + np.exp(log_tail.astype(np.float64))
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_fixed_step_codes_are_within_half_a_step_above_their_range():
    logits = zipf_logits(32, 4096)
    codec = TokenCodec(20, 4096, "q8f")
    _, logprobs = codec.decode(codec.encode(logits))
    top = top_tokens(logits, 20)
    decoded_relative = logprobs - logprobs[:, :1]
    in_range = top.relative >= -254 / 16
    assert (np.abs(decoded_relative - top.relative)[in_range] <= 1 / 32 + 1e-5).all()


@pytest.mark.parametrize("width", list(WIDTHS))
def test_k_equal_to_the_vocabulary_stores_no_tail(width):
    logits = np.random.default_rng(1).normal(size=(3, 16)).astype(np.float32)
    codec = TokenCodec(16, 16, width)
    arrays = codec.encode(logits)
    assert (arrays["token_tail"] == -np.inf).all()
    ids, logprobs, log_tail = codec.decode_full(arrays)
    assert (log_tail == -np.inf).all() and np.isfinite(logprobs).all()
    assert np.sort(ids, axis=-1).tolist() == [list(range(16))] * 3
    kl = reconstruction_kl(logits, ids, logprobs, log_tail)
    np.testing.assert_allclose(kl, bucket_kl(logits, ids, logprobs, log_tail), atol=1e-12)  # nothing truncated
    bound = {"q4": 1e-2, "q6": 1e-3, "q8f": 1e-3}.get(width, 1e-4)  # about step² / 24
    assert np.isfinite(kl).all() and kl.max() < bound


@pytest.mark.parametrize("width", list(WIDTHS))
def test_masked_and_peaked_logits_decode_without_nan(width):
    logits = np.zeros((3, 64), np.float32)
    logits[0, 5] = 80.0  # p ≈ 1 on one token: the others e^-80
    logits[1, 10:] = -np.inf  # only 10 tokens have mass, k = 12 > 10
    logits[2, :] = -np.inf
    logits[2, 3] = 0.0  # a single possible token
    codec = TokenCodec(12, 64, width)
    ids, logprobs, log_tail = codec.decode_full(codec.encode(logits))
    assert not np.isnan(logprobs).any() and not np.isnan(log_tail).any()
    # q8f keeps the others at e^-15.9 instead of e^-80: 11 · 1.3e-7 of the top token's mass moves to them
    assert ids[0, 0] == 5 and logprobs[0, 0] == pytest.approx(0.0, abs=2e-6 if width == "q8f" else 1e-6)
    assert (logprobs[1, 10:] == -np.inf).all() and log_tail[1] == -np.inf  # no mass stays no mass
    assert ids[2, 0] == 3 and logprobs[2, 0] == 0.0
    kl = reconstruction_kl(logits, ids, logprobs, log_tail)
    assert np.isfinite(kl).all() and kl.max() < 1e-3 and np.isfinite(bucket_kl(logits, ids, logprobs, log_tail)).all()


def test_bad_logits_and_k_are_refused_in_one_line():
    codec = TokenCodec(4, 8, "q8")
    with pytest.raises(KdcacheError, match="NaN or \\+inf"):
        codec.encode(np.full((2, 8), np.nan, np.float32))
    with pytest.raises(KdcacheError, match="all -inf"):
        codec.encode(np.full((2, 8), -np.inf, np.float32))
    with pytest.raises(KdcacheError, match=r"logits must be \[..., 8\]"):
        codec.encode(np.zeros((2, 9), np.float32))
    top = top_tokens(np.zeros((1, 8), np.float32), 4)
    with pytest.raises(KdcacheError, match=r"token ids must be in 0..7 \(the vocabulary\); got 0..8"):
        codec.pack(top._replace(ids=np.array([[0, 1, 2, 8]])))
    with pytest.raises(KdcacheError, match="k must be an integer in 1..8"):
        TokenCodec(9, 8, "q8")
    with pytest.raises(KdcacheError, match="width must be one of fp16, q8, q6, q4, q8f"):
        TokenCodec(4, 8, "int3")


@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize("k, vocab", [(1, 2), (33, 4096), (40, 150_000), (7, 1000)])
def test_bytes_per_token_are_the_arrays_bytes(width, k, vocab):
    codec = TokenCodec(k, vocab, width)
    arrays = codec.encode(np.random.default_rng(0).normal(size=(2, vocab)).astype(np.float32))
    assert set(arrays) == set(codec.arrays())
    for name, (shape, dtype) in codec.arrays().items():
        assert arrays[name].shape == (2, *shape) and arrays[name].dtype == np.dtype(dtype)
    assert codec.bytes_per_token() == sum(array[0].nbytes for array in arrays.values())
    assert TokenCodec(k, 4096, width).bytes_per_token(150_000) == TokenCodec(k, 150_000, width).bytes_per_token()


def test_bytes_of_the_recommended_default_fit_the_budget():
    assert TokenCodec.default(150_000) == TokenCodec(36, 150_000, "q6")
    assert TokenCodec.default(150_000).bytes_per_token() == 112  # 81 ids + 27 codes + step + tail
    assert TokenCodec.default(4096).bytes_per_token() == 85
    assert TokenCodec.default(10) == TokenCodec(10, 10, "q6")
    assert TokenCodec(40, 150_000, "q4").bytes_per_token() == 114  # 90 ids + 20 codes + step + tail
    assert TokenCodec(33, 150_000, "q8").bytes_per_token() == 112
    assert TokenCodec(40, 4096, "q4").bytes_per_token() == 84


def test_a_description_round_trips_and_a_malformed_one_is_refused():
    codec = TokenCodec(33, 151_646, "q8")
    description = codec.describe()
    assert description["id_bits"] == 18 and description["id_bit_order"].startswith("little")
    assert TokenCodec.from_description(dict(description)) == codec
    # prose a later kdcache words otherwise, or a field it adds, leaves a cache written before readable
    reworded = {**description, "decode": "said otherwise", "token_tail": "also", "added_later": 1}
    assert TokenCodec.from_description(reworded) == codec
    for broken, message in [({**description, "id_bits": 17}, "id_bits is 17, expected 18"),
                            ({**description, "width": "q3"}, "width must be one of"),
                            ({**description, "k": 0}, "k must be an integer"),

                            ({k: v for k, v in description.items() if k != "bytes_per_token"},
                             "bytes_per_token is None"),
                            ("q8", "must be a mapping with codec 'token-topk'")]:
        with pytest.raises(CorruptCacheError, match=message) as caught:
            TokenCodec.from_description(broken)
        assert "\n" not in str(caught.value) and "dump the teacher again" in str(caught.value)


def test_arrays_of_another_codec_are_refused_as_corrupt():
    codec = TokenCodec(8, 4096, "q8")
    arrays = codec.encode(zipf_logits(2, 4096))
    with pytest.raises(CorruptCacheError, match=r"token_logprobs must be float16 \[..., 8\] .*found uint8"):
        TokenCodec(8, 4096, "fp16").decode(arrays)
    with pytest.raises(CorruptCacheError, match="token_step must be float16 .*found missing"):
        codec.decode({name: array for name, array in arrays.items() if name != "token_step"})


@pytest.mark.parametrize("width, bound", [("q8", 2e-5), ("q6", 5e-4), ("q4", 5e-3), ("q8f", 1e-4), ("fp16", 1e-6)])
def test_the_quantisation_error_of_a_realistic_distribution_is_bounded(width, bound):
    """k+1-way KL on Zipf-like logits, V = 4096, k = 33 (benchmarks/TOKENS.md measures the same on 2,048 positions)."""
    logits = zipf_logits(256, 4096, seed=3)
    codec = TokenCodec(33, 4096, width)
    ids, logprobs, log_tail = codec.decode_full(codec.encode(logits))
    assert bucket_kl(logits, ids, logprobs, log_tail).mean() < bound


def test_device_top_k_encodes_the_same_arrays_as_numpy():
    logits = torch.from_numpy(zipf_logits(16, 4096))
    codec = TokenCodec(33, 4096, "q4")
    on_device, on_host = encode_tokens(codec, logits), codec.encode(logits.numpy())
    for name in on_host:
        np.testing.assert_array_equal(on_device[name], on_host[name])
    with pytest.raises(KdcacheError, match="NaN or \\+inf"):
        encode_tokens(codec, torch.full((2, 4096), float("nan")))


def test_the_benchmark_measures_every_row_and_the_baseline():
    rows = token_cache.measure(torch.from_numpy(zipf_logits(64, 512)), [(33, "q8"), (40, "q4")])
    assert [row["what"] for row in rows] == ["top-33 q8", "top-40 q4", "baseline top-32 bf16 + int32 ids",
                                             "full logits fp16", "full logits fp32"]
    assert rows[0]["bytes"] == TokenCodec(33, 512, "q8").bytes_per_token() and rows[0]["bytes_large"] == 112
    assert rows[1]["full_kl"] < rows[2]["full_kl"] and all(math.isfinite(row["full_kl"]) for row in rows)
    assert 0 <= rows[1]["worse_than_baseline"] < 0.5 and rows[2]["worse_than_baseline"] is None
    table = token_cache.markdown_table(rows, 512)
    assert "| top-40 q4 | " in table and table.count("\n") == len(rows) + 1


def test_the_benchmark_command_reads_logits_from_safetensors_and_prints_the_table(tmp_path):
    from safetensors.numpy import save_file

    save_file({"logits": zipf_logits(32, 256)}, str(tmp_path / "teacher.safetensors"))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "token_cache.py"), "--logits",
                             str(tmp_path / "teacher.safetensors"), "--rows", "40:q4,8:fp16"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "logits [32, 256]" in result.stdout
    assert "| top-40 q4 | 64 | 114 | " in result.stdout and "| top-8 fp16 | 26 | 36 | " in result.stdout
    assert "| baseline top-32 bf16 + int32 ids" in result.stdout
