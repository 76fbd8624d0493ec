"""Feature and relation losses against slow float64 transcriptions of their papers' formulas (tests/loss_reference.py):
values, and gradients against central differences of the transcription."""

import pytest
import torch
import torch.nn.functional as F

import loss_reference as ref
from kdcache.errors import KdcacheError
from kdcache.losses import at, attention_map, crd, embedding_cosine, fitnet, irg, rkd, rkd_angle, rkd_distance, sp

STEP = 1e-6  # central differences in float64: error ~ STEP² · third derivative, well under the tolerance


def _at_of_features(student_stages, teacher_stages, p=2):
    return at([attention_map(s, p) for s in student_stages], [attention_map(t, p) for t in teacher_stages])


def _at_reference(student_stages, teacher_stages, p=2):
    return ref.at([[ref.attention_map(sample, p) for sample in s.tolist()] for s in student_stages],
                  [[ref.attention_map(sample, p) for sample in t.tolist()] for t in teacher_stages])


# each case: (kdcache's loss of the student tensor, the reference of a student tensor, the student tensor)
def _cases(seed):
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    embedding_s, embedding_t = draw(5, 4), draw(5, 4)
    negatives, wide_t = draw(5, 3, 4), draw(5, 8)
    features_s, features_t = draw(3, 2, 3, 3), draw(3, 4, 3, 3)
    stages_t = [features_t, draw(3, 4, 2, 2)]
    hint_s, hint_t = draw(2, 3, 2, 2), draw(2, 3, 2, 2)
    return {
        "fitnet": (lambda s: fitnet(s, hint_t), lambda s: sum((a - b) ** 2 for a, b in zip(
            ref._flatten(s.tolist()), ref._flatten(hint_t.tolist()))) / hint_t.numel(), hint_s),
        "at (2 stages)": (lambda s: _at_of_features([s, s[..., :2, :2]], stages_t),
                          lambda s: _at_reference([s, s[..., :2, :2]], stages_t), features_s),
        "at (p = 3)": (lambda s: _at_of_features([s], [features_t], p=3),
                       lambda s: _at_reference([s], [features_t], p=3), features_s),
        "sp": (lambda s: sp(s, features_t), lambda s: ref.sp([x.flatten().tolist() for x in s],
                                                             [x.flatten().tolist() for x in features_t]), features_s),
        "rkd": (lambda s: rkd(s, embedding_t), lambda s: ref.rkd(s.tolist(), embedding_t.tolist()), embedding_s),
        "rkd (weights 1, 2)": (lambda s: rkd(s, embedding_t, 1, 2),
                               lambda s: ref.rkd(s.tolist(), embedding_t.tolist(), 1, 2), embedding_s),
        "crd": (lambda s: crd(s, embedding_t, negatives, 0.5),
                lambda s: ref.crd(s.tolist(), embedding_t.tolist(), negatives.tolist(), 0.5), embedding_s),
        "crd (τ 0.07)": (lambda s: crd(s, embedding_t, negatives),
                         lambda s: ref.crd(s.tolist(), embedding_t.tolist(), negatives.tolist(), 0.07), embedding_s),
        "crd (the negatives' gradient)": (
            lambda n: crd(embedding_s, embedding_t, n, 0.5),
            lambda n: ref.crd(embedding_s.tolist(), embedding_t.tolist(), n.tolist(), 0.5), negatives),
        "embedding_cosine": (lambda s: embedding_cosine(s, embedding_t),
                             lambda s: ref.embedding_cosine(s.tolist(), embedding_t.tolist()), embedding_s),
        "embedding_cosine (the teacher's gradient)": (
            lambda t: embedding_cosine(embedding_s, t),
            lambda t: ref.embedding_cosine(embedding_s.tolist(), t.tolist()), embedding_t),
        "irg": (lambda s: irg(s, embedding_t), lambda s: ref.irg(s.tolist(), embedding_t.tolist(), 0.1, 5.0),
                embedding_s),
        "irg (other dimensions, projected)": (
            lambda s: irg(s, wide_t, 2.0, 3.0, projected_student=s.repeat(1, 2)),
            lambda s: ref.irg(s.tolist(), wide_t.tolist(), 2.0, 3.0, s.repeat(1, 2).tolist()), embedding_s),
    }


CASES = list(_cases(0))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", CASES)
def test_the_value_is_the_papers_formula(name, seed):
    loss, reference, student = _cases(seed)[name]
    assert float(loss(student)) == pytest.approx(reference(student), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_the_gradient_is_the_formulas(name):
    loss, reference, student = _cases(3)[name]
    student = student.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(loss(student), student)
    torch.testing.assert_close(gradient, ref.numeric_gradient(reference, student, STEP), rtol=1e-5, atol=1e-7)


def test_the_attention_map_is_the_channel_energy_normalised_over_positions():
    features = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]], [[1.0, 0.0], [2.0, -1.0]]]])  # [1, 2, 2, 2]
    energy = torch.tensor([[1.0, 2.0], [2.0, 5.0]])  # mean over the 2 channels of F²
    torch.testing.assert_close(attention_map(features), (energy / energy.norm())[None])
    assert attention_map(torch.zeros(2, 3, 4, 4)).eq(0).all()  # a zero map stays zero, as F.normalize leaves it


def test_a_student_map_of_another_size_is_resized_to_the_teachers_and_normalised_again():
    generator = torch.Generator().manual_seed(0)
    student, teacher = attention_map(torch.randn(2, 3, 8, 8, generator=generator)), \
        attention_map(torch.randn(2, 5, 4, 4, generator=generator))
    resized = F.interpolate(student[:, None], size=(4, 4), mode="bilinear", align_corners=False)[:, 0]
    resized = resized / resized.flatten(1).norm(dim=1)[:, None, None]
    torch.testing.assert_close(at(student, teacher), ((resized - teacher) ** 2).mean())


def test_outputs_with_the_same_relations_cost_nothing():
    generator = torch.Generator().manual_seed(0)
    embedding, features = torch.randn(6, 8, generator=generator), torch.randn(4, 3, 5, 5, generator=generator)
    assert float(rkd(3 * embedding, embedding)) == pytest.approx(0, abs=1e-6)  # distances over their mean
    assert float(sp(features, 2 * features)) == pytest.approx(0, abs=1e-7)  # rows normalised
    assert float(_at_of_features([features], [features])) == 0 and float(fitnet(features, features)) == 0
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=generator))  # keeps every distance and angle
    assert float(rkd(embedding @ rotation, embedding)) == pytest.approx(0, abs=1e-5)
    assert float(rkd_distance(embedding, embedding.flip(0))) > 0  # relations are compared sample by sample
    assert float(rkd_angle(embedding, torch.randn(6, 8, generator=generator))) > 0


def test_half_inputs_are_computed_in_float32():
    generator = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    for loss in (rkd, sp, fitnet):
        value = loss(s.half(), t.half())
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, loss(s.half().float(), t.half().float()))


def test_mismatched_inputs_are_named():
    with pytest.raises(KdcacheError, match=r"fitnet\(\): the regressed student feature \(2, 3\).*regressor"):
        fitnet(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(KdcacheError, match=r"at least 2 samples"):
        rkd(torch.zeros(1, 3), torch.zeros(1, 3))
    with pytest.raises(KdcacheError, match=r"one student map per teacher map, found 1 and 2"):
        at([torch.zeros(2, 3, 3)], [torch.zeros(2, 3, 3)] * 2)
    with pytest.raises(KdcacheError, match=r"needs features \[B, C, H, W\]"):
        attention_map(torch.zeros(2, 3))
    with pytest.raises(KdcacheError, match=r"same batch on both sides"):
        sp(torch.zeros(2, 3), torch.zeros(3, 3))
