"""CRD and IRG from cached embeddings: the negatives the cache gives, the heads, and distill runs that train and save
them (the pure functions against float64 transcriptions of their formulas, values and gradients, are
tests/test_feature_losses.py's cases)."""

import csv

import pytest
import torch

from small_runs import saved_teacher, synthetic_splits
from kdcache.cache import open_cache
from kdcache.config import DistillConfig
from kdcache.data import get_policy
from kdcache.errors import KdcacheError
from kdcache.losses import crd, get_loss, irg, irg_edge, irg_vertex
from kdcache.models import file_sha256, read_checkpoint
from kdcache.stages import CachedTargets, distill
from kdcache.stages.dump import dump_teacher

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
