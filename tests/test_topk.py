"""kdcache.cache.topk: top-k storage keeps the top-k and the rest mass at T = 1, its KL matches a slow formula."""

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcache import losses as L
from kdcache.cache.topk import REST_SENTINEL, decode_topk_array, index_dtype_for, topk_bytes
from kdcache.stages.topk import decode_topk, encode_topk, kl_rows, rebuild_topk, topk_kl
from kdcache.errors import KdcacheError

SETTINGS = settings(max_examples=60, deadline=None)
EPS32 = torch.finfo(torch.float32).eps
ROOT = Path(__file__).resolve().parents[1]


@st.composite
def logit_batches(draw, max_classes=1000):
    """(logits [*lead, C] in fp16 or fp32, k in 1..C): scales 0.01-50, some with ties (integer-rounded logits)."""
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    classes = draw(st.one_of(st.integers(2, 12), st.integers(2, max_classes)))
    k = draw(st.integers(1, classes))
    scale = draw(st.sampled_from([0.01, 0.1, 1.0, 4.0, 20.0, 50.0]))
    dtype = draw(st.sampled_from([torch.float16, torch.float32]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = scale * torch.randn(*lead, classes, generator=generator)
    if draw(st.booleans()):
        logits = logits.round()  # many ties, at the top-k boundary too
    return logits.to(dtype), k


def log_tol(logits: torch.Tensor, temperature: float = 1.0) -> float:
    """Float32 rounding of log-probabilities of these logits: a few ulps of their largest magnitude / T."""
    return 1e-6 + 8 * EPS32 * float(logits.float().abs().max()) / temperature


# --- encoding and decoding ------------------------------------------------------------------


@SETTINGS
@given(data=logit_batches())
def test_decode_of_encode_with_every_class_gives_the_logits_back_exactly(data):
    logits, _ = data
    classes = logits.shape[-1]
    values, indices, rest = encode_topk(logits, classes)
    assert torch.equal(rest, torch.full(logits.shape[:-1], REST_SENTINEL))
    decoded = decode_topk(values, indices, rest, classes)
    assert decoded.dtype == torch.float32 and torch.equal(decoded, logits.float())
    assert float(topk_kl(logits, classes).abs().max()) == 0.0


@SETTINGS
@given(data=logit_batches())
def test_values_and_classes_are_torch_topk_and_k_distinct_classes(data):
    logits, k = data
    values, indices, rest = encode_topk(logits, k)
    assert (values.dtype, indices.dtype, rest.dtype) == (torch.float32, torch.int64, torch.float32)
    assert values.shape == indices.shape == (*logits.shape[:-1], k) and rest.shape == logits.shape[:-1]
    expected = torch.topk(logits.float(), k, dim=-1)
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)
    assert torch.equal(logits.float().gather(-1, indices), values)  # the values are the logits of those classes
    assert (values[..., 1:] <= values[..., :-1]).all()  # descending
    flat = indices.reshape(-1, k)
    assert all(len(set(row.tolist())) == k for row in flat) and 0 <= int(flat.min()) and int(flat.max()) < logits.shape[-1]


@SETTINGS
@given(data=logit_batches())
def test_at_t1_the_rebuilt_softmax_equals_the_full_one_on_the_topk_and_in_rest_mass(data):
    logits, k = data
    classes = logits.shape[-1]
    values, indices, rest = encode_topk(logits, k)
    decoded = decode_topk(values, indices, rest, classes)
    z = logits.double()  # the reference in float64; tolerance: float32 rounding of r and of the log-sum-exp
    log_p = torch.log_softmax(z, -1)
    log_q = torch.log_softmax(decoded.double(), -1)
    tol = log_tol(logits) + 1e-5  # rtol 1e-5 on the probabilities, in log space
    torch.testing.assert_close(log_q.gather(-1, indices), log_p.gather(-1, indices), rtol=0, atol=tol)
    if k < classes:
        others = z.scatter(-1, indices, -math.inf)
        log_rest_p = others.logsumexp(-1) - z.logsumexp(-1)  # log of the mass outside the top k
        log_rest_q = math.log(classes - k) + rest.double() - decoded.double().logsumexp(-1)
        torch.testing.assert_close(log_rest_q, log_rest_p, rtol=0, atol=tol)
        assert torch.equal(decoded.scatter(-1, indices, 0.0), rest.unsqueeze(-1).expand_as(decoded).scatter(-1, indices, 0.0))


def reference_kl(row: np.ndarray, k: int, temperature: float) -> float:
    """KL(p_full ‖ p_rebuilt) of one row from the definition, float64: the rest r = log(mean(e^z) over the others)."""
    order = np.argsort(-row, kind="stable")
    top, others = order[:k], order[k:]
    rebuilt = np.empty_like(row)
    if len(others):
        m = row[others].max()
        rebuilt[others] = m + math.log(np.exp(row[others] - m).mean())
    rebuilt[top] = row[top]

    def softmax(z):
        e = np.exp((z - z.max()) / temperature)
        return e / e.sum()

    p, q = softmax(row), softmax(rebuilt)
    keep = p > 0
    return float((p[keep] * np.log(p[keep] / q[keep])).sum())


@SETTINGS
@given(data=logit_batches(), temperature=st.sampled_from([0.5, 1.0, 2.0, 4.0]))
def test_topk_kl_equals_the_slow_formula(data, temperature):
    logits, k = data
    actual = topk_kl(logits, k, temperature)
    assert actual.shape == logits.shape[:-1] and actual.dtype == torch.float32
    rows = logits.float().double().reshape(-1, logits.shape[-1]).numpy()
    expected = [reference_kl(row, k, temperature) for row in rows]  # ties: KL does not depend on which tie is kept
    tol = 4 * log_tol(logits, temperature)
    for a, e in zip(actual.reshape(-1).tolist(), expected):
        assert math.isclose(a, e, rel_tol=1e-4, abs_tol=tol), (a, e)


@SETTINGS
@given(data=logit_batches(max_classes=300))
def test_kl_at_t1_is_non_increasing_in_k_and_zero_at_every_class(data):
    logits, _ = data
    classes = logits.shape[-1]
    ks = range(1, classes + 1) if classes <= 40 else sorted({1, 2, 3, 5, 10, 20, classes // 2, classes - 1, classes})
    kls = torch.stack([topk_kl(logits, k) for k in ks])
    assert torch.isfinite(kls).all() and (kls >= -log_tol(logits)).all()
    assert (kls[1:] <= kls[:-1] + 2 * log_tol(logits)).all()
    assert float(kls[-1].abs().max()) == 0.0


def test_kl_below_t1_can_rise_with_k():
    """Monotonicity in k is a T = 1 property (Jensen per removed class); at T < 1 a larger k can lose more."""
    logits = torch.tensor([0.0, 0, -35, 0, -35, 0, -35, 0, 0, -35])
    kl = [float(topk_kl(logits, k, temperature=0.5)) for k in (1, 2)]
    assert kl[1] > kl[0] + 1e-3


def test_rest_temperature_keeps_the_topk_and_rest_mass_at_that_temperature():
    logits = 5 * torch.randn(16, 100, generator=torch.Generator().manual_seed(0))
    for temperature in (2.0, 4.0):
        values, indices, rest = encode_topk(logits, 10, rest_temperature=temperature)
        decoded = decode_topk(values, indices, rest, 100)
        log_p, log_q = (torch.log_softmax(z.double() / temperature, -1) for z in (logits, decoded))
        torch.testing.assert_close(log_q.gather(-1, indices), log_p.gather(-1, indices), rtol=0, atol=1e-5)
        # the rest kept at T = 1 gives the others too much mass at T > 1 (Jensen): the top-k get less
        plain = torch.log_softmax(rebuild_topk(logits, 10).double() / temperature, -1).gather(-1, indices)
        assert (plain < log_p.gather(-1, indices)).all()
        assert (topk_kl(logits, 10, temperature) > kl_rows(logits, decoded, temperature)).all()


def test_a_rest_temperature_per_row_of_t_sigma_keeps_what_ls_sees_given_the_full_rows_mean_and_std():
    """softmax(standardize(z) / T) = softmax((z − μ) / (T (σ + eps))): LS at base T is a raw softmax at T·(σ + eps)."""
    logits = 5 * torch.randn(2, 21, 100, generator=torch.Generator().manual_seed(1))
    mean, std = logits.mean(-1, keepdim=True), logits.std(-1, keepdim=True)
    seen = torch.log_softmax(L.standardize(logits) / 4.0, -1)
    values, indices, rest = encode_topk(logits, 10, rest_temperature=4.0 * (std.squeeze(-1) + 1e-7))
    rebuilt = torch.log_softmax((decode_topk(values, indices, rest, 100) - mean) / (std + 1e-7) / 4.0, -1)
    torch.testing.assert_close(rebuilt.gather(-1, indices), seen.gather(-1, indices), rtol=0, atol=1e-5)
    torch.testing.assert_close(rebuilt.scatter(-1, indices, -math.inf).logsumexp(-1),
                               seen.scatter(-1, indices, -math.inf).logsumexp(-1), rtol=0, atol=1e-5)
    with pytest.raises(KdcacheError, match="shaped like"):
        encode_topk(logits, 10, rest_temperature=std)


# --- extreme logits -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("classes", [2, 10, 1000])
def test_extreme_and_equal_logits_stay_finite_and_ties_give_k_distinct_classes(dtype, classes):
    one_high = torch.full((3, classes), -60.0)
    one_high[torch.arange(3), torch.tensor([0, classes // 2, classes - 1])] = 60.0
    huge = torch.full((1, classes), -6e4)
    huge[0, 1] = 6e4  # near fp16's largest finite value
    equal = torch.full((2, classes), 3.0)
    zeros = torch.zeros(1, classes)
    for logits in (one_high.to(dtype), huge.to(dtype), equal.to(dtype), zeros.to(dtype)):
        for k in sorted({1, 2, classes // 2, classes - 1, classes} - {0}):
            values, indices, rest = encode_topk(logits, k)
            assert not values.isnan().any() and not rest.isnan().any()
            if k < classes:
                assert torch.isfinite(rest).all()
            assert all(len(set(row.tolist())) == k for row in indices)
            assert torch.equal(logits.float().gather(-1, indices), values)
            decoded = decode_topk(values, indices, rest, classes)
            assert torch.isfinite(decoded).all()
            for temperature in (1.0, 4.0):
                kl = topk_kl(logits, k, temperature)
                assert torch.isfinite(kl).all() and (kl > -1e-6).all()
        # equal logits: the rest is their common value, the rebuilt row is the row itself
        if logits is not one_high.to(dtype) and logits is not huge.to(dtype):
            torch.testing.assert_close(rebuild_topk(logits, 1), logits.float(), rtol=0, atol=1e-5)


# --- the losses on rebuilt teacher logits ---------------------------------------------------


def test_losses_on_the_teacher_rebuilt_with_every_class_equal_those_on_the_full_teacher():
    generator = torch.Generator().manual_seed(0)
    student = 3 * torch.randn(4, 21, 100, generator=generator)
    teacher = (3 * torch.randn(4, 21, 100, generator=generator)).half()  # as a cache stores it
    labels = torch.randint(0, 100, (4,), generator=generator)
    rebuilt = rebuild_topk(teacher, 100, storage_dtype=torch.float16)
    assert torch.equal(L.kd(student[:, 0], rebuilt[:, 0], 4.0), L.kd(student[:, 0], teacher[:, 0], 4.0))
    for base, args in ((L.dkd, {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}), (L.kd, {"temperature": 2.0})):
        assert torch.equal(L.sdd_lskd(student, rebuilt, labels, base, **args),
                           L.sdd_lskd(student, teacher, labels, base, **args))
    # with fewer classes kept the teacher changes, and so does the loss
    assert not torch.equal(L.kd(student[:, 0], rebuild_topk(teacher, 10)[:, 0], 4.0),
                           L.kd(student[:, 0], teacher[:, 0], 4.0))


# --- bytes and arguments --------------------------------------------------------------------


def test_topk_bytes_counts_values_indices_and_rest():
    cifar = topk_bytes(21, 100, 10)
    assert (cifar.full, cifar.topk) == (21 * 100 * 2, 21 * (10 * (2 + 2) + 2)) and cifar.ratio == cifar.full / cifar.topk
    imagenet = topk_bytes(21, 1000, 10, value_dtype="float32")
    assert (imagenet.full, imagenet.topk) == (21 * 1000 * 4, 21 * (10 * (4 + 2) + 4))
    assert index_dtype_for(32768) == "int16" and index_dtype_for(32769) == "int32"
    assert topk_bytes(1, 40000, 5).topk == 5 * (2 + 4) + 2
    with pytest.raises(KdcacheError, match="cannot hold"):
        topk_bytes(1, 40000, 5, index_dtype="int16")


@pytest.mark.parametrize("k", [0, 11, 2.0])
def test_k_outside_one_to_classes_is_refused(k):
    with pytest.raises(KdcacheError, match="k must be"):
        encode_topk(torch.zeros(2, 10), k)


def test_decode_refuses_mismatched_shapes():
    values, indices, rest = encode_topk(torch.randn(3, 10), 4)
    with pytest.raises(KdcacheError, match="must be"):
        decode_topk(values, indices[:, :3], rest, 10)
    with pytest.raises(KdcacheError, match="must be"):
        decode_topk(values, indices, rest[:2], 10)


def test_indices_stored_as_int16_and_values_as_fp16_decode_the_same():
    logits = torch.randn(5, 21, 100).half()
    values, indices, rest = encode_topk(logits, 10)
    stored = decode_topk(values.half(), indices.to(torch.int16), rest.half(), 100)
    assert torch.equal(stored, decode_topk(values, indices, rest.half().float(), 100))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_encode_runs_on_the_device_and_agrees_with_the_cpu():
    logits = 4 * torch.randn(64, 21, 100)
    on_device = encode_topk(logits.cuda(), 10)
    assert all(part.device.type == "cuda" for part in on_device)
    for cpu, gpu in zip(encode_topk(logits, 10), on_device):
        torch.testing.assert_close(gpu.cpu(), cpu)


# --- the benchmark's core (benchmarks/topk.py) ------------------------------------------------


def load_benchmark():
    spec = importlib.util.spec_from_file_location("topk_benchmark", ROOT / "benchmarks" / "topk.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_benchmark_table_has_consistent_bytes_and_kl_non_increasing_in_k():
    bench = load_benchmark()
    generator = torch.Generator().manual_seed(0)
    classes, regions = 12, 5
    labels = torch.randint(0, classes, (16,), generator=generator)
    logits = 3 * torch.randn(16, regions, classes, generator=generator)
    logits[torch.arange(16), :, labels] += 4.0  # a teacher that mostly knows the label
    metrics = bench.loss_metrics()
    assert [m.temperature for m in metrics] == [1.0, 4.0, 2.0, 4.0, 4.0]  # kd, kd+ls/sdd-lskd-kd, sdd-lskd
    for rest_temperature, stored_stats in ((1.0, False), (4.0, False), (1.0, True), ("ls:4", True)):
        rows = bench.measure(logits, labels, (1, 2, 5, 50), metrics, rest_temperature=rest_temperature,
                             stored_stats=stored_stats, chunk=5)
        assert [row["k"] for row in rows] == [0, 1, 2, 5, classes]
        assert rows[0]["bytes_topk"] == 0  # k = 0: the uniform reference, nothing stored
        for row in rows[1:]:
            size = topk_bytes(regions, classes, row["k"])
            stored = size.topk + (regions * 2 * 2 if stored_stats else 0)  # μ and σ in fp16 per region
            assert (row["bytes_full"], row["bytes_topk"]) == (size.full, stored)
            assert row["ratio"] == size.full / stored
        for metric in metrics:
            means = [row[f"{metric.name} mean"] for row in rows[1:]]  # k >= 1 (under LS k = 0 can lose less than k = 1)
            assert all(later <= earlier + 1e-6 for earlier, later in itertools.pairwise(means)), (metric.name, means)
            assert means[-1] == 0.0 and rows[-1][f"{metric.name} p99"] == 0.0
            assert all(row[f"{metric.name} p99"] >= -1e-6 for row in rows)
        table = bench.kl_table(rows, metrics).splitlines()
        assert len(table) == 2 + len(rows) and all(line.count("|") == 4 + len(metrics) for line in table)
        assert [line.split("|")[3].strip() for line in table[3:]] == [f"{row['ratio']:.2f}" for row in rows[1:]]
