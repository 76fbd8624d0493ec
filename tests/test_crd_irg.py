"""CRD and IRG from cached embeddings: the pure functions against float64 transcriptions of their papers' formulas
(values and gradients), the negatives the cache gives, and distill runs that train and save the heads."""

import math

import pytest
import torch

from kdcache.errors import KdcacheError
from kdcache.losses import crd, get_loss, irg, irg_edge, irg_vertex

STEP = 1e-6  # central differences in float64


def _unit(vector):
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / max(norm, 1e-12) for x in vector]


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def crd_reference(student, teacher, negatives, temperature):
    """Tian et al. 2020 (InfoNCE form): mean over i of −log[e^{s_i·t_i/τ} / (e^{s_i·t_i/τ} + Σ_k e^{s_i·n_ik/τ})],
    every vector L2-normalised."""
    losses = []
    for s, t, others in zip(student, teacher, negatives):
        s, t = _unit(s), _unit(t)
        positive = math.exp(_dot(s, t) / temperature)
        against = sum(math.exp(_dot(s, _unit(n)) / temperature) for n in others)
        losses.append(-math.log(positive / (positive + against)))
    return sum(losses) / len(losses)


def irg_edges_reference(rows):
    """Liu et al. 2019 (as the reference code): ‖x_i − x_j‖², 0 for i = j, over the largest entry."""
    b = len(rows)
    d = [[0.0 if i == j else max(sum((x - y) ** 2 for x, y in zip(rows[i], rows[j])), 1e-12) for j in range(b)]
         for i in range(b)]
    top = max(max(row) for row in d)
    return [[value / top for value in row] for row in d]


def irg_reference(student, teacher, vertex_weight, edge_weight, projected=None):
    """λ_v · mean_i ‖s_i − t_i‖² / D + λ_e · mean_ij (A^s_ij − A^t_ij)²."""
    vertex_rows = projected if projected is not None else student
    vertex = sum(sum((a - b) ** 2 for a, b in zip(s, t)) for s, t in zip(vertex_rows, teacher)) / (
        len(teacher) * len(teacher[0]))
    a_s, a_t = irg_edges_reference(student), irg_edges_reference(teacher)
    edge = sum((x - y) ** 2 for row_s, row_t in zip(a_s, a_t) for x, y in zip(row_s, row_t)) / len(student) ** 2
    return vertex_weight * vertex + edge_weight * edge


def _cases(seed):
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    s, t, negatives, wide_t = draw(4, 3), draw(4, 3), draw(4, 5, 3), draw(4, 6)
    return {
        "crd": (lambda x: crd(x, t, negatives, 0.5),
                lambda x: crd_reference(x.tolist(), t.tolist(), negatives.tolist(), 0.5), s),
        "crd (τ 0.07)": (lambda x: crd(x, t, negatives),
                         lambda x: crd_reference(x.tolist(), t.tolist(), negatives.tolist(), 0.07), s),
        "crd (the negatives' gradient)": (lambda x: crd(s, t, x, 0.5),
                                          lambda x: crd_reference(s.tolist(), t.tolist(), x.tolist(), 0.5), negatives),
        "irg": (lambda x: irg(x, t), lambda x: irg_reference(x.tolist(), t.tolist(), 0.1, 5.0), s),
        "irg (other dimensions, projected)": (
            lambda x: irg(x, wide_t, 2.0, 3.0, projected_student=x.repeat(1, 2)),
            lambda x: irg_reference(x.tolist(), wide_t.tolist(), 2.0, 3.0, x.repeat(1, 2).tolist()), s),
    }


CASES = list(_cases(0))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", CASES)
def test_the_value_is_the_papers_formula(name, seed):
    loss, reference, student = _cases(seed)[name]
    assert float(loss(student)) == pytest.approx(reference(student), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_the_gradient_is_the_formulas(name):
    loss, reference, student = _cases(2)[name]
    student = student.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(loss(student), student)
    numeric = torch.zeros_like(student)
    flat = student.detach().view(-1)
    for index in range(flat.numel()):
        ahead, behind = flat.clone(), flat.clone()
        ahead[index] += STEP
        behind[index] -= STEP
        numeric.view(-1)[index] = (reference(ahead.view_as(student)) - reference(behind.view_as(student))) / (2 * STEP)
    torch.testing.assert_close(gradient, numeric, rtol=1e-5, atol=1e-7)


def test_irg_is_its_weighted_terms():
    s, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(irg(s, t, 0.1, 5.0), 0.1 * irg_vertex(s, t) + 5.0 * irg_edge(s, t))


def test_shapes_that_cannot_be_compared_are_refused_in_one_line():
    with pytest.raises(KdcacheError, match=r"crd\(\): needs embeddings \[B, D\].*project both sides"):
        crd(torch.randn(4, 3), torch.randn(4, 5), torch.randn(4, 2, 5))
    with pytest.raises(KdcacheError, match=r"irg_vertex\(\).*differ in dimension"):
        irg_vertex(torch.randn(4, 3), torch.randn(4, 5))


def test_the_losses_are_registered_with_their_papers_defaults():
    contrast, graph = get_loss("crd"), get_loss("irg")
    assert (contrast.ce_weight, contrast.distill_weight, contrast.temperature, contrast.embed_dim) == (1, 0.8, 0.07, 128)
    assert contrast.term_names == ("ce", "crd", "total") and contrast.needs == ("embedding",)
    assert (graph.distill_weight, graph.vertex_weight, graph.edge_weight) == (1, 0.1, 5.0)
    assert graph.term_names == ("ce", "irg_vertex", "irg_edge", "total") and graph.needs == ("embedding",)
