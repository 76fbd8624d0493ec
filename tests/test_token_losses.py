"""kdcache.losses.tokens: each token loss is its formula (a slow float64 transcription below, nothing shared with
the module), in value and in the student's gradient, for both tails and several temperatures; masks, a zero
teacher tail and ids covering the vocabulary stay exact and finite; DistilBERT's loss is its three terms."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdcache import losses as L
from kdcache.errors import KdcacheError

BATCH, TIME, VOCAB, TOP = 2, 5, 50, 8
NAMES = ["token-kl", "token-reverse-kl", "token-jsd", "token-tvd"]
DYADIC = [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.0078125]  # sums to 1 exactly: m_T = 0
MASK = torch.tensor([[True, True, True, False, True], [False, True, True, True, False]])


# ---------------------------------------------------------------------------------------------
# the float64 reference: one position at a time, lists of outcomes, straight from the formulas


def ref_kl(p, q):
    return sum(p_i * torch.log(p_i / q_i) for p_i, q_i in zip(p, q) if p_i > 0)


def ref_reverse_kl(p, q):
    """KL(q ‖ p) on the teacher's support, q renormalised over it (infinite otherwise)."""
    support = [i for i, p_i in enumerate(p) if p_i > 0]
    total = sum(q[i] for i in support)
    return sum((q[i] / total) * torch.log((q[i] / total) / p[i]) for i in support if q[i] > 0)


def ref_jsd(p, q):
    m = [(p_i + q_i) / 2 for p_i, q_i in zip(p, q)]
    left = sum(p_i * torch.log(p_i / m_i) for p_i, m_i in zip(p, m) if p_i > 0)
    right = sum(q_i * torch.log(q_i / m_i) for q_i, m_i in zip(q, m) if q_i > 0)
    return (left + right) / 2


def ref_tvd(p, q):
    return sum(abs(p_i - q_i) for p_i, q_i in zip(p, q)) / 2


REFERENCE = {"token-kl": ref_kl, "token-reverse-kl": ref_reverse_kl, "token-jsd": ref_jsd, "token-tvd": ref_tvd}


def ref_outcomes(logits_row, ids, logprobs, tail, temperature):
    """(teacher, student) outcome lists at one position: float64 tensors, the student's carrying its gradient."""
    exps = torch.exp(logits_row / temperature - (logits_row / temperature).max())
    q = exps / exps.sum()
    p = [torch.tensor(math.exp(v), dtype=torch.float64) for v in logprobs]
    rest = [j for j in range(len(logits_row)) if j not in ids]
    if tail == "bucket":
        teacher = p + ([torch.clamp(1 - sum(p), min=0.0)] if rest else [])
        student = [q[i] for i in ids] + ([sum(q[j] for j in rest)] if rest else [])
    else:  # p renormalised over the ids, 0 on every other token; the student's whole distribution
        teacher = p + [torch.tensor(0.0, dtype=torch.float64)] * len(rest)
        student = [q[i] for i in ids] + [q[j] for j in rest]
    tempered = [t ** (1 / temperature) for t in teacher]
    return [t / sum(tempered) for t in tempered], student


def ref_loss(name, logits, ids, logprobs, mask, tail, temperature):
    per_position = []
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if mask is None or mask[b, t]:
                p, q = ref_outcomes(logits[b, t], ids[b, t].tolist(), logprobs[b, t].tolist(), tail, temperature)
                per_position.append(temperature**2 * REFERENCE[name](p, q))
    return sum(per_position) / len(per_position) if per_position else logits.sum() * 0


# ---------------------------------------------------------------------------------------------
# data


def batch(top=TOP, vocab=VOCAB, seed=0):
    """float64 student logits (requires grad), duplicate-free ids and the teacher's consistent log-probabilities;
    position (0, 2) has m_T = 0 exactly when top < vocab."""
    gen = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(BATCH, TIME, vocab, generator=gen, dtype=torch.float64)).requires_grad_()
    teacher = (3 * torch.randn(BATCH, TIME, vocab, generator=gen, dtype=torch.float64)).log_softmax(-1)
    ids = torch.stack([torch.stack([torch.randperm(vocab, generator=gen)[:top] for _ in range(TIME)])
                       for _ in range(BATCH)])
    logprobs = teacher.gather(-1, ids)
    if top == len(DYADIC) and top < vocab:
        logprobs[0, 2] = torch.tensor(DYADIC, dtype=torch.float64).log()
    return student, ids, logprobs


def with_padding(ids, logprobs, mask):
    """Masked positions hold padding no loss may read: id -100, log-probabilities NaN and -inf."""
    ids, logprobs = ids.clone(), logprobs.clone()
    ids[~mask] = -100
    logprobs[~mask] = float("nan")
    logprobs[~mask, 0] = float("-inf")
    return ids, logprobs


def value_and_gradient(loss, student):
    return loss.detach(), torch.autograd.grad(loss, student)[0]


def assert_matches_reference(name, student, ids, logprobs, mask, tail, temperature, given=None):
    ids_in, logprobs_in = given or (ids, logprobs)
    value, gradient = value_and_gradient(
        L.TOKEN_LOSSES[name](student, ids_in, logprobs_in, mask, tail=tail, temperature=temperature), student)
    expected, expected_gradient = value_and_gradient(
        ref_loss(name, student, ids, logprobs, mask, tail, temperature), student)
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-8, atol=1e-11)


# ---------------------------------------------------------------------------------------------
# values and gradients


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("name", NAMES)
def test_each_token_loss_is_its_formula_in_value_and_gradient(name, tail, temperature):
    student, ids, logprobs = batch()
    assert_matches_reference(name, student, ids, logprobs, None, tail, temperature)
    assert_matches_reference(name, student, ids, logprobs, MASK, tail, temperature,
                             given=with_padding(ids, logprobs, MASK))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("name", NAMES)
def test_ids_covering_the_vocabulary_leave_no_tail_and_stay_exact(name, tail, temperature):
    student, ids, logprobs = batch(top=VOCAB, vocab=VOCAB)
    assert_matches_reference(name, student, ids, logprobs, MASK, tail, temperature)


@pytest.mark.parametrize("name", NAMES)
def test_a_zero_teacher_tail_gives_finite_values_and_gradients(name):
    student, ids, logprobs = batch()
    position = (slice(0, 1), slice(2, 3))  # the dyadic position: Σ p = 1 exactly
    assert math.fsum(logprobs[0, 2].exp().tolist()) == 1.0
    loss = L.TOKEN_LOSSES[name](student[position], ids[position], logprobs[position], tail="bucket")
    gradient = torch.autograd.grad(loss, student)[0]
    assert torch.isfinite(loss) and torch.isfinite(gradient).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bucket_with_every_id_is_kd_on_the_full_distributions(temperature):
    student, ids, logprobs = batch(top=VOCAB, vocab=VOCAB)
    teacher_logits = torch.full_like(student, float("-inf")).scatter(-1, ids, logprobs)
    expected = L.kd(student.reshape(-1, VOCAB), teacher_logits.reshape(-1, VOCAB), temperature)
    actual = L.token_kl(student, ids, logprobs, tail="bucket", temperature=temperature)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_a_fully_masked_batch_is_zero_with_a_zero_gradient(name):
    student, ids, logprobs = batch()
    nothing = torch.zeros(BATCH, TIME, dtype=torch.bool)
    ids, logprobs = with_padding(ids, logprobs, nothing)
    for tail in ("bucket", "renormalize"):
        value, gradient = value_and_gradient(L.TOKEN_LOSSES[name](student, ids, logprobs, nothing, tail=tail), student)
        assert value.item() == 0.0 and gradient.abs().max().item() == 0.0


# ---------------------------------------------------------------------------------------------
# properties


@pytest.mark.parametrize("name", NAMES)
def test_renormalize_ignores_the_scale_of_the_teacher_probabilities(name):
    student, ids, logprobs = batch()
    loss = L.TOKEN_LOSSES[name]
    torch.testing.assert_close(loss(student, ids, logprobs + math.log(0.3), tail="renormalize", temperature=2.0),
                               loss(student, ids, logprobs, tail="renormalize", temperature=2.0))


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_tvd_is_at_most_one_and_jsd_at_most_log_2(tail):
    for seed in range(5):
        student, ids, logprobs = batch(seed=seed)
        sharp = student.detach() * 20
        for position in range(TIME):
            at = (slice(None), slice(position, position + 1))
            tvd = L.token_tvd(sharp[at], ids[at], logprobs[at], tail=tail)
            jsd = L.token_jsd(sharp[at], ids[at], logprobs[at], tail=tail)
            assert 0 <= tvd <= 1 and 0 <= jsd <= math.log(2) + 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_only_the_student_gets_a_gradient(name):
    student, ids, logprobs = batch()
    logprobs.requires_grad_()
    loss = L.TOKEN_LOSSES[name](student, ids, logprobs, temperature=2.0)
    student_gradient, teacher_gradient = torch.autograd.grad(loss, [student, logprobs], allow_unused=True)
    assert teacher_gradient is None and student_gradient.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_student_logits_are_computed_in_float32(dtype):
    student, ids, logprobs = batch()
    low = student.detach().to(dtype)
    loss = L.token_kl(low, ids, logprobs.half(), tail="bucket", temperature=2.0)
    expected = L.token_kl(low.double(), ids, logprobs.half().double(), tail="bucket", temperature=2.0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_the_registry_names_each_loss_with_the_same_arguments():
    student, ids, logprobs = batch()
    assert list(L.TOKEN_LOSSES) == NAMES
    for function in L.TOKEN_LOSSES.values():
        assert torch.isfinite(function(student_logits=student, teacher_ids=ids, teacher_logprobs=logprobs, mask=MASK,
                                       tail="renormalize", temperature=2.0))


# ---------------------------------------------------------------------------------------------
# refusals


def refusal(function, *args, **kwargs) -> str:
    with pytest.raises(KdcacheError) as error:
        function(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", NAMES)
def test_mismatched_shapes_are_refused_in_one_line_naming_both(name):
    student, ids, logprobs = batch()
    loss = L.TOKEN_LOSSES[name]
    assert "(2, 5, 8)" in refusal(loss, student, ids, logprobs[..., :4]) and "(2, 5, 4)" in refusal(
        loss, student, ids, logprobs[..., :4])
    message = refusal(loss, student[:, :4], ids, logprobs)
    assert "(2, 5, 8)" in message and "(2, 4, 50)" in message
    message = refusal(loss, student, ids, logprobs, MASK[:, :3])
    assert "(2, 3)" in message and "(2, 5, 50)" in message
    assert "'both'" in refusal(loss, student, ids, logprobs, tail="both")
    assert "positive" in refusal(loss, student, ids, logprobs, temperature=0.0)
    assert "int64" in refusal(loss, student, ids.double(), logprobs)


def distilbert_inputs(hidden_size=6, teacher_hidden_size=6):
    student, ids, logprobs = batch()
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(VOCAB, (BATCH, TIME), generator=gen)
    student_hidden = torch.randn(BATCH, TIME, hidden_size, generator=gen, dtype=torch.float64).requires_grad_()
    teacher_hidden = torch.randn(BATCH, TIME, teacher_hidden_size, generator=gen, dtype=torch.float64)
    return student, labels, ids, logprobs, student_hidden, teacher_hidden


def test_distilbert_is_its_three_terms_with_its_weights():
    student, labels, ids, logprobs, student_hidden, teacher_hidden = distilbert_inputs()
    padded_labels = labels.masked_fill(~MASK, -100)
    ids_in, logprobs_in = with_padding(ids, logprobs, MASK)
    actual = L.distilbert(student, padded_labels, ids_in, logprobs_in, student_hidden, teacher_hidden, MASK)
    cross_entropy = F.cross_entropy(student[MASK], labels[MASK])
    kd = ref_loss("token-kl", student, ids, logprobs, MASK, "bucket", 2.0)
    cosine = (1 - F.cosine_similarity(student_hidden[MASK], teacher_hidden[MASK], dim=-1)).mean()
    torch.testing.assert_close(actual, 2.0 * cross_entropy + 5.0 * kd + 1.0 * cosine, rtol=1e-9, atol=1e-11)
    weighted = L.distilbert(student, padded_labels, ids_in, logprobs_in, student_hidden, teacher_hidden, MASK,
                            temperature=1.0, ce_weight=0.5, kd_weight=0.0, cos_weight=3.0, tail="renormalize")
    torch.testing.assert_close(weighted, 0.5 * cross_entropy + 3.0 * cosine, rtol=1e-9, atol=1e-11)


def test_distilbert_refuses_other_hidden_sizes_and_shapes_in_one_line():
    student, labels, ids, logprobs, student_hidden, teacher_hidden = distilbert_inputs(teacher_hidden_size=7)
    message = refusal(L.distilbert, student, labels, ids, logprobs, student_hidden, teacher_hidden)
    assert "(2, 5, 6)" in message and "(2, 5, 7)" in message
    message = refusal(L.distilbert, student, labels[:, :3], ids, logprobs, student_hidden, teacher_hidden[..., :6])
    assert "(2, 3)" in message and "(2, 5, 50)" in message
    message = refusal(L.distilbert, student, labels, ids, logprobs, student_hidden[:1], teacher_hidden[..., :6])
    assert "(1, 5, 6)" in message and "(2, 5, 50)" in message


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("name", NAMES)
def test_a_padded_vocabulary_with_minus_inf_on_both_sides_adds_nothing_and_no_nan(name, tail):
    """A padded vocabulary: the student's logit is -inf where the teacher's log-probability is -inf too."""
    student, ids, logprobs = batch()
    logprobs = logprobs.clone()
    logprobs[..., -1] = float("-inf")
    ruled_out = torch.zeros(BATCH, TIME, VOCAB, dtype=torch.bool).scatter(-1, ids[..., -1:], True)
    padded = student.masked_fill(ruled_out, float("-inf"))
    value, gradient = value_and_gradient(L.TOKEN_LOSSES[name](padded, ids, logprobs, MASK, tail=tail), student)
    expected = L.TOKEN_LOSSES[name](student.detach().masked_fill(ruled_out, -1e4), ids, logprobs, MASK, tail=tail)
    assert torch.isfinite(gradient).all()
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-11)
