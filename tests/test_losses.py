"""kdcache.losses: each loss is its paper's formula (loss_reference.py), stays finite; the registry has its values."""

import dataclasses
import json
import math

import loss_reference as ref
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcache import losses as L
from kdcache.errors import KdcacheError
from kdcache.losses.adversarial import VERDICT
from kdcache.losses.spec import LOGIT_MAP

SETTINGS = settings(max_examples=40, deadline=None)
SCALE_SETS = [(1,), (1, 2), (1, 4), (1, 2, 4)]


def close(actual: torch.Tensor, expected: float, rel: float = 1e-9, abs_: float = 1e-10) -> bool:
    return math.isclose(actual.item(), expected, rel_tol=rel, abs_tol=abs_)


@st.composite
def region_batches(draw, scale_sets=SCALE_SETS):
    """float64 region logits [B, R, C] and labels, with the teacher right or wrong per (sample, region) as drawn.

    The drawn right/wrong pattern makes every SDD case occur: global and local both right, both wrong,
    global right/local wrong, global wrong/local right.
    """
    batch = draw(st.integers(1, 4))
    regions = sum(s * s for s in draw(st.sampled_from(scale_sets)))
    classes = draw(st.integers(2, 6))
    spread = draw(st.sampled_from([0.1, 1.0, 4.0, 20.0]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    student = spread * torch.randn(batch, regions, classes, generator=generator, dtype=torch.float64)
    teacher = spread * torch.randn(batch, regions, classes, generator=generator, dtype=torch.float64)
    labels = torch.tensor(draw(st.lists(st.integers(0, classes - 1), min_size=batch, max_size=batch)))
    right = draw(st.lists(st.lists(st.booleans(), min_size=regions, max_size=regions), min_size=batch, max_size=batch))
    for b in range(batch):
        y = labels[b]
        for r in range(regions):
            row = teacher[b, r]
            if right[b][r]:
                row[y] = row.max() + 1.0
            elif row.argmax() == y:
                row[y] = row.min() - 1.0
    return student, teacher, labels


temperatures = st.floats(0.5, 8.0)


# --- each loss equals the paper's formula -----------------------------------------------------


@SETTINGS
@given(data=region_batches(), eps=st.sampled_from([1e-7, 1e-3]))
def test_standardize_is_the_ls_z_score(data, eps):
    logits = data[0][:, 0]
    out = L.standardize(logits, eps)
    for row, row_out in zip(logits.tolist(), out):
        for expected, actual in zip(ref.standardize(row, eps), row_out):
            assert close(actual, expected, abs_=1e-12)
    # the LS code's expression: torch.std is the unbiased std
    ls_code = (logits - logits.mean(-1, keepdim=True)) / (eps + logits.std(-1, keepdim=True))
    torch.testing.assert_close(out, ls_code)


@SETTINGS
@given(data=region_batches(), temperature=temperatures, standardize=st.booleans())
def test_kd_is_hinton(data, temperature, standardize):
    student, teacher, _ = data
    s, t = student[:, 0], teacher[:, 0]
    expected = ref.kd(s.tolist(), t.tolist(), temperature, standardize)
    assert close(L.kd(s, t, temperature, standardize=standardize), expected)


@SETTINGS
@given(
    data=region_batches(),
    temperature=temperatures,
    alpha=st.floats(0.0, 4.0),
    beta=st.floats(0.0, 10.0),
    standardize=st.booleans(),
)
def test_dkd_is_tckd_plus_nckd(data, temperature, alpha, beta, standardize):
    student, teacher, labels = data
    s, t = student[:, 0], teacher[:, 0]
    expected = ref.dkd(s.tolist(), t.tolist(), labels.tolist(), alpha, beta, temperature, standardize)
    assert close(L.dkd(s, t, labels, alpha, beta, temperature, standardize=standardize), expected)


@SETTINGS
@given(
    data=region_batches(),
    base=st.sampled_from(["kd", "dkd"]),
    temperature=temperatures,
    complementary_weight=st.sampled_from([1.0, 2.0, 3.5]),
)
def test_sdd_weights_and_normalises_regions_as_the_paper(data, base, temperature, complementary_weight):
    student, teacher, labels = data
    args = {"temperature": temperature} | ({"alpha": 1.0, "beta": 8.0} if base == "dkd" else {})
    expected = ref.sdd(student.tolist(), teacher.tolist(), labels.tolist(), base, complementary_weight, **args)
    actual = L.sdd(student, teacher, labels, getattr(L, base), complementary_weight, **args)
    assert close(actual, expected)


@SETTINGS
@given(data=region_batches(), base=st.sampled_from(["kd", "dkd"]), temperature=temperatures)
def test_sdd_lskd_standardises_every_region(data, base, temperature):
    student, teacher, labels = data
    args = {"temperature": temperature} | ({"alpha": 1.0, "beta": 8.0} if base == "dkd" else {})
    student_, teacher_, labels_ = student.tolist(), teacher.tolist(), labels.tolist()
    expected = ref.sdd(student_, teacher_, labels_, base, 2.0, standardize_logits=True, **args)
    assert close(L.sdd_lskd(student, teacher, labels, getattr(L, base), 2.0, **args), expected)


@SETTINGS
@given(
    data=region_batches(scale_sets=[(1,)]), epoch=st.sampled_from([1, 150, 151, 240]), switch=st.sampled_from([0, 150])
)
def test_sld_is_swapped_kd_over_temperatures(data, epoch, switch):
    student, teacher, labels = data
    s, t = student[:, 0], teacher[:, 0]
    temps = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    expected = ref.sld(s.tolist(), t.tolist(), labels.tolist(), temps, epoch, switch)
    assert close(L.sld(s, t, labels, temps, epoch, switch), expected)


@SETTINGS
@given(data=region_batches(scale_sets=[(1,)]), temperature=temperatures)
def test_sdd_on_one_region_is_the_base_loss(data, temperature):
    student, teacher, labels = data
    s, t = student[:, 0], teacher[:, 0]
    sdd_kd = L.sdd(student, teacher, labels, L.kd, 2.0, temperature=temperature)
    torch.testing.assert_close(sdd_kd, L.kd(s, t, temperature))
    dkd_args = {"alpha": 1.0, "beta": 8.0, "temperature": temperature}
    torch.testing.assert_close(L.sdd(student, teacher, labels, L.dkd, 2.0, **dkd_args), L.dkd(s, t, labels, **dkd_args))
    torch.testing.assert_close(
        L.sdd_lskd(student, teacher, labels, L.dkd, 2.0, **dkd_args), L.dkd(s, t, labels, **dkd_args, standardize=True)
    )


def test_sdd_region_weights_cover_every_case():
    # one sample per case of (global, local) right/wrong; 2 classes, label 0, regions: global + one cell
    right, wrong = [5.0, 0.0], [0.0, 5.0]
    teacher = torch.tensor([[right, right], [wrong, wrong], [right, wrong], [wrong, right]])
    weights = L.sdd_region_weights(teacher, torch.zeros(4, dtype=torch.long), complementary_weight=2.0)
    # global right/local right, global wrong/local wrong: consistent; the other two: complementary
    assert weights.tolist() == [[1.0, 1.0], [1.0, 1.0], [1.0, 2.0], [1.0, 2.0]]


def test_swap_exchanges_target_and_max_only_when_they_differ():
    logits = torch.tensor([[1.0, 9.0, 3.0], [7.0, 2.0, 3.0]])
    swapped = L.swap_target_max(logits, torch.tensor([0, 0]))
    assert swapped.tolist() == [[9.0, 1.0, 3.0], [7.0, 2.0, 3.0]]


def test_sld_lets_gradient_through_the_swapped_student_as_the_official_code_unless_asked_to_detach():
    torch.manual_seed(0)
    s = torch.randn(4, 5, requires_grad=True)
    t, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    grads = []
    for detach in (True, False):
        value = L.sld(s, t, y, (1.0, 4.0), epoch=200, switch_epoch=150, detach_student_teacher=detach)
        (grad,) = torch.autograd.grad(value, s)
        grads.append((value.detach(), grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])  # same value
    assert not torch.allclose(grads[0][1], grads[1][1])  # different gradient (the official code's is the second)
    # the default of the function and of `--loss sld` is the official gradient; detaching is an option
    official = torch.autograd.grad(L.sld(s, t, y, (1.0, 4.0), epoch=200, switch_epoch=150), s)[0]
    torch.testing.assert_close(official, grads[1][1])
    for detach, (_, expected) in ((True, grads[0]), (False, grads[1])):
        spec = L.get_loss("sld", temperatures=(1.0, 4.0), detach_swapped_student=detach, ce_weight=0.0,
                          distill_weight=1.0)
        (grad,) = torch.autograd.grad(spec(s, t, y, epoch=200), s)
        torch.testing.assert_close(grad, expected)


# --- finite values and gradients --------------------------------------------------------------

B, R, C = 3, 21, 10


def extreme_case(case):
    generator = torch.Generator().manual_seed(0)
    if case == "constant":  # std 0 for student and teacher
        return torch.full((B, R, C), 3.0), torch.full((B, R, C), 3.0)
    if case == "constant student":
        return torch.full((B, R, C), 3.0), torch.randn(B, R, C, generator=generator)
    signs = lambda: torch.randint(0, 2, (B, R, C), generator=generator) * 2.0 - 1.0  # noqa: E731
    return 1e4 * signs(), 1e4 * signs()  # ±1e4


# the others read features, or (dml) peer students' logits: tests/test_online.py, or (adversarial) a discriminator's
# scores of the student's: tests/test_adversarial.py, or (DeiT) the student's distillation head: tests/test_deit.py
LOGIT_LOSSES = [name for name in L.list_losses()
                if not L.get_loss(name).needs and not L.get_loss(name).student_outputs
                and name not in ("dml", "adversarial")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["constant", "constant student", "±1e4"])
@pytest.mark.parametrize("name", LOGIT_LOSSES)
def test_extreme_logits_give_finite_values_and_gradients(name, case, dtype):
    spec = L.get_loss(name)
    student, teacher = extreme_case(case)
    student = student.to(dtype).requires_grad_()
    labels = torch.tensor([0, 3, 9])
    terms = spec.compute(student, teacher.to(dtype), labels, epoch=200)
    assert all(term.dtype == torch.float32 and term.isfinite() for term in terms.values())
    terms["total"].backward()
    if case == "constant student" and spec.standardizes and dtype == torch.float16:
        # LS's z-score has gradient ~1/eps at a constant row: finite in float32, beyond float16's range
        s32 = student.detach().float().requires_grad_()
        spec.compute(s32, teacher.float(), labels, epoch=200)["total"].backward()
        assert s32.grad.isfinite().all() and s32.grad.abs().max() > torch.finfo(torch.float16).max
    else:
        assert student.grad.isfinite().all()


@pytest.mark.parametrize("name", LOGIT_LOSSES)
def test_half_inputs_are_computed_in_float32(name):
    torch.manual_seed(0)
    student, teacher = torch.randn(B, R, C).half(), (3 * torch.randn(B, R, C)).half()
    labels = torch.randint(0, C, (B,))
    spec = L.get_loss(name)
    half = spec.compute(student, teacher, labels, epoch=200)["total"]
    full = spec.compute(student.float(), teacher.float(), labels, epoch=200)["total"]
    assert half.dtype == torch.float32 and half.item() == full.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert spec.compute(student.bfloat16(), teacher, labels, epoch=200)["total"].dtype == torch.float32


# --- the registry ------------------------------------------------------------------------------

NAMES = ["ce", "kd", "dkd", "kd+ls", "dkd+ls", "sdd-kd", "sdd-dkd", "sdd-lskd", "sdd-lskd-kd", "sld",
         "fitnet", "at", "sp", "rkd", "dml", "adversarial", "deit-hard", "deit-soft", "crd", "irg", "pixel-kd", "cwd", "clip"]
# each loss's own terms, besides ce and total: what metrics.csv has a column for
OWN_TERMS = {"ce": set(), "kd": {"kd"}, "kd+ls": {"kd"}, "dkd": {"tckd", "nckd"}, "dkd+ls": {"tckd", "nckd"},
             "sdd-kd": {"sdd"}, "sdd-dkd": {"sdd"}, "sdd-lskd": {"sdd"}, "sdd-lskd-kd": {"sdd"},
             "sld": {"teacher_swap", "student_swap"}, "fitnet": {"fitnet"}, "at": {"at"}, "sp": {"sp"},
             "rkd": {"rkd_distance", "rkd_angle"}, "dml": {"mutual"}, "adversarial": {"adv"}, "deit-hard": {"deit"},
             "deit-soft": {"deit"}, "crd": {"crd"}, "irg": {"irg_vertex", "irg_edge"}, "pixel-kd": {"pixel_kd"},
             "cwd": {"cwd"},
             "clip": {"zero_shot_kd", "embedding_cos"}}
# what the feature and relation losses read besides the region logits (the adversarial one: its discriminator's
# scores of the student's predictions; DeiT's: the student's distillation head; CRD's and CLIP's: their heads'
# outputs), for the registry's test
FEATURES = {"hint/layer2": (B, 8, 4, 4), "attention/layer1": (B, 4, 4), "embedding": (B, 16), L.PEERS: (2, B, C),
            VERDICT: (B,), "distillation": (B, C), "crd/embedding": (B, 8), "crd/negatives/embedding": (B, 5, 8),
            LOGIT_MAP: (B, C, 4, 4), "clip/embedding": (B, 16)}


def distillation(terms: dict) -> torch.Tensor:
    """The sum of a step's distillation terms (all but ce and total)."""
    return sum(value for name, value in terms.items() if name not in ("ce", "total"))


def test_every_name_resolves_and_totals_its_terms():
    assert L.list_losses() == NAMES
    torch.manual_seed(0)
    student, teacher = ({"regions": torch.randn(B, R, C), **{k: torch.randn(s) for k, s in FEATURES.items()}}
                        for _ in range(2))
    labels = torch.randint(0, C, (B,))
    for name in NAMES:
        spec = L.get_loss(name)
        assert spec.name == name and spec.paper and spec.code
        assert spec.function in ("ce", "kd", "dkd", "sdd", "sdd_lskd", "sld", "fitnet", "at", "sp", "rkd", "dml",
                                 "adversarial", "deit_hard", "deit_soft", "crd", "irg", "pixel_kd", "cwd", "clip")
        terms = spec.compute(student, teacher, labels, epoch=200)
        assert set(terms) == {"ce", "total"} | OWN_TERMS[name] and list(terms) == list(spec.term_names)
        torch.testing.assert_close(terms["total"], sum(v for k, v in terms.items() if k != "total"))
        json.dumps(dataclasses.asdict(spec))  # plain values: saved with checkpoints


def test_defaults_are_the_papers():
    kd, dkd, kd_ls, dkd_ls = (L.get_loss(n) for n in ["kd", "dkd", "kd+ls", "dkd+ls"])
    # mdistiller cfg.py: KD T 4, CE 0.1, KD 0.9; DKD CE 1, alpha 1, beta 8, T 4, warm-up 20
    assert (kd.temperature, kd.ce_weight, kd.distill_weight, kd.warmup_epochs) == (4.0, 0.1, 0.9, 0)
    assert (dkd.alpha, dkd.beta, dkd.temperature, dkd.ce_weight, dkd.warmup_epochs) == (1.0, 8.0, 4.0, 1.0, 20)
    # LS: base temperature 2, KD weight 9 (CE 0.1); DKD+LS multiplies alpha, beta by 9
    assert (kd_ls.temperature, kd_ls.distill_weight, kd_ls.ce_weight, kd_ls.standardize) == (2.0, 9.0, 0.1, True)
    assert (dkd_ls.distill_weight * dkd_ls.alpha, dkd_ls.distill_weight * dkd_ls.beta) == (9.0, 72.0)
    assert dkd_ls.temperature == 2.0
    # SDD: SD-KD is KD's defaults without warm-up; SD-DKD is DKD's with warm-up 20; complementary weight 2
    sdd_kd, sdd_dkd = L.get_loss("sdd-kd"), L.get_loss("sdd-dkd")
    assert (sdd_kd.base, sdd_kd.temperature, sdd_kd.warmup_epochs, sdd_kd.complementary_weight) == ("kd", 4.0, 0, 2.0)
    assert (sdd_dkd.base, sdd_dkd.beta, sdd_dkd.warmup_epochs) == ("dkd", 8.0, 20)
    # SDD-LSKD README recipe; the KD-based variant takes LS's KD defaults
    fused = L.get_loss("sdd-lskd")
    assert (fused.function, fused.base, fused.alpha, fused.beta, fused.temperature) == ("sdd_lskd", "dkd", 1.0, 8.0, 4.0)
    assert (fused.warmup_epochs, fused.complementary_weight, fused.ce_weight) == (20, 2.0, 1.0)
    fused_kd = L.get_loss("sdd-lskd-kd")
    assert (fused_kd.base, fused_kd.temperature, fused_kd.distill_weight) == ("kd", 2.0, 9.0)
    # SLD.py: temperatures 1..6, second teacher after epoch 150; cfg.py CE 0.1, KD 0.9
    sld = L.get_loss("sld")
    assert sld.temperatures == (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    assert (sld.switch_epoch, sld.ce_weight, sld.distill_weight) == (150, 0.1, 0.9)
    # segmentation: SKD's pixel-wise term (lambda_pi 10, no temperature); CWD on the logits (weight 3, T 4)
    pixel, channel = L.get_loss("pixel-kd"), L.get_loss("cwd")
    assert (pixel.ce_weight, pixel.distill_weight, pixel.temperature) == (1.0, 10.0, 1.0)
    assert (channel.ce_weight, channel.distill_weight, channel.temperature) == (1.0, 3.0, 4.0)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(KdcacheError, match=r"get_loss\(\): unknown name 'sdd-lksd'; known: ") as info:
        L.get_loss("sdd-lksd")
    assert all(name in str(info.value) for name in NAMES)


def test_overrides_replace_fields_and_unknown_fields_are_named():
    assert L.get_loss("sdd-lskd", temperature=3.0).temperature == 3.0
    assert L.get_loss("sld", temperatures=[1, 2]).temperatures == (1, 2)  # lists become the spec's tuples
    with pytest.raises(KdcacheError, match="tempreature"):
        L.get_loss("kd", tempreature=3.0)
    with pytest.raises(KdcacheError, match="needs alpha"):
        L.get_loss("dkd", alpha=None)


def test_compute_applies_warmup_weights_and_region_0_as_the_papers():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(B, R, C), torch.randn(B, R, C), torch.randint(0, C, (B,))
    s0, t0 = student[:, 0], teacher[:, 0]
    ce = F.cross_entropy(s0, labels)
    dkd = L.get_loss("dkd")
    terms = dkd.compute(student, teacher, labels, epoch=1)
    torch.testing.assert_close(terms["ce"], ce)
    torch.testing.assert_close(terms["tckd"], L.tckd(s0, t0, labels, 4.0).mean() / 20)  # warm-up 1/20 at epoch 1
    torch.testing.assert_close(terms["nckd"], 8.0 * L.nckd(s0, t0, labels, 4.0).mean() / 20)  # alpha 1, beta 8
    after_warmup = distillation(dkd.compute(student, teacher, labels, epoch=25))
    torch.testing.assert_close(after_warmup, L.dkd(s0, t0, labels, 1.0, 8.0, 4.0))
    kd_terms = L.get_loss("kd").compute(student, teacher, labels, epoch=1)  # KD has no warm-up
    torch.testing.assert_close(kd_terms["kd"], 0.9 * L.kd(s0, t0, 4.0))
    torch.testing.assert_close(kd_terms["ce"], 0.1 * ce)
    fused = L.get_loss("sdd-lskd").compute(student, teacher, labels, epoch=10)["sdd"]
    expected = L.sdd_lskd(student, teacher, labels, L.dkd, 2.0, alpha=1.0, beta=8.0, temperature=4.0)
    torch.testing.assert_close(fused, 0.5 * expected)  # warm-up 10/20
    # non-SDD losses read region 0 only; SDD losses every region
    other = teacher.clone()
    other[:, 1:] += torch.randn(B, R - 1, C)
    for name in LOGIT_LOSSES[1:]:
        spec = L.get_loss(name)
        with_other = distillation(spec.compute(student, other, labels, 30))
        same = torch.equal(distillation(spec.compute(student, teacher, labels, 30)), with_other)
        assert same != spec.uses_regions, name


def test_sld_second_teacher_joins_after_the_switch_epoch():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(B, 1, C), torch.randn(B, 1, C), torch.randint(0, C, (B,))
    spec, temps = L.get_loss("sld"), (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    # epochs count from 1; the trainer's fractional epoch e + step/steps switches like the integer e
    for epoch, with_student in [(150, False), (150.99, False), (151, True), (151.5, True)]:
        expected = 0.9 * L.sld(student[:, 0], teacher[:, 0], labels, temps, epoch, 150)
        terms = spec.compute(student, teacher, labels, epoch)
        torch.testing.assert_close(distillation(terms), expected)
        assert (terms["student_swap"] != 0) == with_student
        only_teacher = 0.9 * L.sld(student[:, 0], teacher[:, 0], labels, temps, 0, 150)
        assert torch.equal(expected, only_teacher) != with_student


def test_teacher_is_needed_except_for_cross_entropy():
    student, labels = torch.randn(2, 1, C), torch.tensor([1, 2])
    assert set(L.get_loss("ce").compute(student, None, labels, epoch=1)) == {"ce", "total"}
    with pytest.raises(KdcacheError, match="needs the teacher's outputs; got None"):
        L.get_loss("sdd-lskd").compute(student, None, labels, epoch=1)


def test_bad_shapes_and_bases_are_named():
    s, t, y = torch.randn(2, 5, C), torch.randn(2, 5, C), torch.tensor([1, 2])
    with pytest.raises(KdcacheError, match="base must be"):
        L.sdd(s, t, y, L.sld, temperature=4.0)
    with pytest.raises(KdcacheError, match=r"logits must be \[B, C\] or region logits \[B, R, C\]"):
        L.sdd(s[:, 0, 0], t[:, 0, 0], y, L.kd, temperature=4.0)
    with pytest.raises(KdcacheError, match="differ in shape"):
        L.kd(s, t[:, :3], 4.0)
    with pytest.raises(KdcacheError, match="at least 2 classes"):
        L.kd(s[..., :1], t[..., :1], 4.0)
