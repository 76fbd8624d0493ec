"""CRD and IRG from cached embeddings: the pure functions against float64 transcriptions of their papers' formulas
(values and gradients), the negatives the cache gives, and distill runs that train and save the heads."""

import csv
import math

import pytest
import torch

import loss_reference as ref
from small_runs import saved_teacher, synthetic_splits
from kdcache.cache import open_cache
from kdcache.config import DistillConfig
from kdcache.data import get_policy
from kdcache.errors import KdcacheError
from kdcache.losses import crd, get_loss, irg, irg_edge, irg_vertex
from kdcache.models import file_sha256, read_checkpoint
from kdcache.stages import CachedTargets, distill
from kdcache.stages.dump import dump_teacher

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
    torch.testing.assert_close(gradient, ref.numeric_gradient(reference, student, STEP), rtol=1e-5, atol=1e-7)


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


# -- from a cache ----------------------------------------------------------------------------------------------------
CLASSES, SAMPLES = 3, 16


@pytest.fixture(scope="module")
def data():
    return synthetic_splits(SAMPLES, CLASSES, seed=5)


def _dump(data, folder, outputs):
    model, checkpoint = saved_teacher(folder, CLASSES, seed=4)
    info = {"arch": "resnet8", "num_classes": CLASSES, "checkpoint": str(checkpoint),
            "checkpoint_sha256": file_sha256(checkpoint)}
    path = folder / "c.zarr"
    dump_teacher(model, info, data[0], get_policy("cifar"), path, views=2, scales=(1,), block_size=8,
                 outputs=outputs, show_progress=False)
    return path


@pytest.fixture(scope="module")
def cache(data, tmp_path_factory):
    return _dump(data, tmp_path_factory.mktemp("embedding"), ("regions", "embedding"))


def _config(tmp_path, name, **fields):
    return DistillConfig(**{"students": ("resnet8",), "epochs": 1, "batch_size": 8, "out": str(tmp_path / name),
                            "device": "cpu", "seed": 1, **fields})


def test_the_negatives_are_other_samples_cached_embeddings_never_the_sample_itself(cache):
    with open_cache(cache) as opened:
        targets = CachedTargets(opened, outputs=("embedding",), negatives=50, seed=3)
        targets.begin_epoch(1)
        array = opened.spec.output_arrays["embedding"]
        bank = torch.from_numpy(opened.view_arrays(1, names=(array,))[array]).float()
        indices = torch.tensor([0, 5, 15, 5])
        given = targets(indices, torch.zeros(4))
        negatives = given["negatives/embedding"]
        assert negatives.shape == (4, SAMPLES - 1, bank.shape[1])  # K = 50 is more than the 15 others: 15
        # each negative is a row of the view held, and never the sample's own
        matches = (negatives[:, :, None, :] == bank[None, None]).all(dim=-1)  # [b, K, N]
        assert matches.any(dim=-1).all()
        assert not matches[torch.arange(4), :, indices].any()
        targets.begin_epoch(1)  # the same view again (another run's epoch): the same draws
        assert torch.equal(targets(indices, torch.zeros(4))["negatives/embedding"], negatives)


def _weights(folder, name):
    return read_checkpoint(folder / name)["model"]


def test_a_crd_run_trains_both_heads_with_the_student_saves_them_and_repeats_itself_in_a_sweep(cache, data, tmp_path):
    alone = distill(_config(tmp_path, "alone", cache=str(cache), losses=("crd",)), show_progress=False, data=data)[0]
    with open(alone.folder / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert {"loss_ce", "loss_crd", "loss_total"} <= set(rows[0]) and all(float(row["loss_crd"]) > 0 for row in rows)
    saved = read_checkpoint(alone.folder / "regressors.pt")
    assert saved["outputs"] == ["crd/embedding", "teacher:crd/embedding"]
    # resnet8's embedding (64) on both sides, each projected to CRD's 128 dimensions
    assert saved["model"]["0.weight"].shape == saved["model"]["1.weight"].shape == (128, 64)
    momentum = read_checkpoint(alone.folder / "last.pt")["optimizer"]["state"]
    heads = sorted(momentum)[-4:]  # the last parameters the optimiser holds: both heads' weights and biases
    assert all(momentum[index]["momentum_buffer"].abs().sum() > 0 for index in heads)  # both had gradients
    # the same seed again, after another run of the sweep drew its own negatives from the same views: the same run
    swept = distill(_config(tmp_path, "sweep", cache=str(cache), losses=("irg", "crd")), show_progress=False,
                    data=data)[1]
    for name in ("model.pt", "regressors.pt"):
        a, b = (_weights(run.folder, name) for run in (alone, swept))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name


def test_an_irg_run_has_its_terms_in_metrics(cache, data, tmp_path):
    run = distill(_config(tmp_path, "irg", cache=str(cache), losses=("irg",)), show_progress=False,
                  data=data)[0]
    with open(run.folder / "metrics.csv") as file:
        row = next(csv.DictReader(file))
    assert float(row["loss_irg_vertex"]) > 0 and float(row["loss_irg_edge"]) > 0
    assert not (run.folder / "regressors.pt").exists()  # the same embedding dimension: no projection to learn


@pytest.mark.parametrize("loss", ["crd", "irg"])
def test_a_cache_without_embeddings_is_refused_with_the_command_that_adds_them(data, tmp_path, loss):
    plain = _dump(data, tmp_path, ("regions",))
    with pytest.raises(KdcacheError, match=rf"loss {loss} reads the teacher's embedding outputs.*--outputs "
                                           rf"regions,embedding"):
        distill(_config(tmp_path, "no", cache=str(plain), losses=(loss,)), show_progress=False, data=data)


def test_crd_without_a_cache_view_to_draw_from_is_refused(cache, data, tmp_path):
    with pytest.raises(KdcacheError, match=r"CRD draws each sample's negatives .* --batch-path device"):
        distill(_config(tmp_path, "ds", cache=str(cache), losses=("crd",), batch_path="dataset"), show_progress=False,
                data=data)


def test_negatives_sets_k_and_a_loss_without_negatives_refuses_it(cache, data, tmp_path, monkeypatch):
    from kdcache.losses import scaled_loss

    assert scaled_loss("crd", _config(tmp_path, "k", negatives=5).loss_overrides(), 1).negatives == 5
    with pytest.raises(KdcacheError, match=r"--negatives does not apply to loss 'kd'"):
        distill(_config(tmp_path, "kd", cache=str(cache), losses=("kd",), negatives=5), show_progress=False, data=data)
    drawn = []
    original = CachedTargets._negatives
    monkeypatch.setattr(CachedTargets, "_negatives", lambda self, *args: drawn.append(original(self, *args)) or drawn[-1])
    distill(_config(tmp_path, "k3", cache=str(cache), losses=("crd",), negatives=3), show_progress=False, data=data)
    assert drawn and all(found.shape[1] == 3 for found in drawn)


def test_a_language_models_run_refuses_negatives_rather_than_ignoring_it():
    from kdcache.stages.text_train import refuse_image_options

    with pytest.raises(KdcacheError, match=r"trains without --negatives"):
        refuse_image_options(DistillConfig(negatives=5))


def test_irgs_vertex_term_reads_the_students_embedding_through_a_head_where_the_dimensions_differ(data):
    from kdcache.data import normalize
    from kdcache.models import create_model
    from kdcache.models.outputs import ModelOutputs, TeacherOutputs, student_outputs

    images = normalize(data[0].images[:4], data[0].mean, data[0].std)
    model = create_model("wrn_16_2", num_classes=CLASSES)  # a 128-dimension embedding against the teacher's 64
    outputs, sources, heads = student_outputs(model, ("embedding",), [TeacherOutputs({"embedding": [64]}, [])],
                                              images, heads=get_loss("irg").heads)
    assert list(heads) == ["irg/embedding"] and heads["irg/embedding"].weight.shape == (64, 128)
    student = ModelOutputs(model, (1,), outputs, sources, heads)(images)
    teacher = {"regions": torch.randn(4, 1, CLASSES), "embedding": torch.randn(4, 64)}
    terms = get_loss("irg").compute(student, teacher, torch.tensor([0, 1, 2, 0]), 1)
    torch.testing.assert_close(terms["irg_vertex"], 0.1 * irg_vertex(student["irg/embedding"], teacher["embedding"]))
    torch.testing.assert_close(terms["irg_edge"], 5.0 * irg_edge(student["embedding"], teacher["embedding"]))
