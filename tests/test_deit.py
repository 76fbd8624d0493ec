"""DeiT's distillation through a distillation token (Touvron et al., ICML 2021): the losses against a float64
transcription of the paper's formulas (values and gradients), the student's `distillation` output, evaluation of
the heads' mean, and the refusals."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import kdcache
from console import run_cli
from kdcache.config import DistillConfig
from kdcache.errors import KdcacheError
from kdcache.losses import deit_hard, deit_soft, get_loss, scaled_loss
from kdcache.models import pretrained_tag
from kdcache.models.outputs import DISTILLATION, ModelOutputs
from kdcache.stages import distill

STEP = 1e-6  # central differences in float64
# a distilled ViT at digits' 32 px, small enough that a test trains it in seconds
TINY_DEIT = "timm:deit_tiny_distilled_patch16_224,img_size=32,patch_size=8,embed_dim=32,depth=1,num_heads=2"


# -- the paper's formulas, transcribed: plain Python floats, loops over samples and classes -------------------------
def _softmax(row, temperature=1.0):
    top = max(row)
    exps = [math.exp((x - top) / temperature) for x in row]
    return [e / sum(exps) for e in exps]


def _cross_entropy(row, label):
    """−log ψ(row)[label]."""
    return -math.log(_softmax(row)[label])


def _argmax(row):
    return max(range(len(row)), key=lambda j: (row[j], -j))  # the first of equal maxima, as torch's argmax


def reference_hard(student, distillation, teacher, labels):
    """L = ½ CE(ψ(Z_s), y) + ½ CE(ψ(Z_dist), y_t), y_t = argmax Z_t; each a mean over samples."""
    n = len(labels)
    return (0.5 * sum(_cross_entropy(s, y) for s, y in zip(student, labels)) / n
            + 0.5 * sum(_cross_entropy(d, _argmax(t)) for d, t in zip(distillation, teacher)) / n)


def reference_soft(student, distillation, teacher, labels, tau):
    """L = ½ CE(ψ(Z_s), y) + ½ τ² KL(ψ(Z_t/τ) ‖ ψ(Z_dist/τ)); each a mean over samples."""
    n = len(labels)
    kl = 0.0
    for d, t in zip(distillation, teacher):
        p_t, p_d = _softmax(t, tau), _softmax(d, tau)
        kl += sum(p * math.log(p / q) for p, q in zip(p_t, p_d) if p > 0)
    return 0.5 * sum(_cross_entropy(s, y) for s, y in zip(student, labels)) / n + 0.5 * tau**2 * kl / n


def _batch(seed, batch=5, classes=7):
    generator = torch.Generator().manual_seed(seed)
    draw = lambda: 3 * torch.randn(batch, classes, generator=generator, dtype=torch.float64)  # noqa: E731
    return draw(), draw(), draw(), torch.randint(classes, (batch,), generator=generator)


CASES = {
    "hard": (lambda s, d, t, y: deit_hard(s, d, t, y),
             lambda s, d, t, y: reference_hard(s.tolist(), d.tolist(), t.tolist(), y.tolist())),
    "soft, τ 3": (lambda s, d, t, y: deit_soft(s, d, t, y, 3.0),
                  lambda s, d, t, y: reference_soft(s.tolist(), d.tolist(), t.tolist(), y.tolist(), 3.0)),
    "soft, τ 1": (lambda s, d, t, y: deit_soft(s, d, t, y, 1.0),
                  lambda s, d, t, y: reference_soft(s.tolist(), d.tolist(), t.tolist(), y.tolist(), 1.0)),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", CASES)
def test_the_value_is_the_papers_formula(name, seed):
    loss, reference = CASES[name]
    batch = _batch(seed)
    assert float(loss(*batch)) == pytest.approx(reference(*batch), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_the_gradients_of_both_heads_are_the_formulas(name):
    loss, reference = CASES[name]
    student, distillation, teacher, labels = _batch(3)
    student, distillation = student.clone().requires_grad_(), distillation.clone().requires_grad_()
    gradients = torch.autograd.grad(loss(student, distillation, teacher, labels), (student, distillation))
    for which, (head, gradient) in enumerate(zip((student, distillation), gradients)):
        numeric = torch.zeros_like(head)
        for index in range(head.numel()):
            shifted = []
            for step in (STEP, -STEP):
                moved = head.detach().clone()
                moved.view(-1)[index] += step
                heads = [student.detach(), distillation.detach()]
                heads[which] = moved
                shifted.append(reference(*heads, teacher, labels))
            numeric.view(-1)[index] = (shifted[0] - shifted[1]) / (2 * STEP)
        torch.testing.assert_close(gradient, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name, function", [("deit-hard", deit_hard), ("deit-soft", deit_soft)])
def test_the_loss_names_weigh_the_heads_half_and_half(name, function):
    """`--loss deit-hard` (deit-soft) is the pure function: ce on the class head, `deit` on the distillation head
    against the teacher's global logit, each ½; deit-soft at τ 3."""
    student, distillation, teacher, labels = _batch(4)
    spec = get_loss(name)
    terms = spec.compute({"regions": student[:, None], DISTILLATION: distillation}, {"regions": teacher[:, None]},
                         labels, 1)
    assert list(terms) == ["ce", "deit", "total"]
    extra = (3.0,) if name == "deit-soft" else ()
    assert float(terms["total"]) == pytest.approx(float(function(student, distillation, teacher, labels, *extra)),
                                                  rel=1e-12)
    assert float(terms["ce"]) == pytest.approx(0.5 * float(F.cross_entropy(student, labels)), rel=1e-12)


def test_a_student_without_a_distillation_head_is_refused_by_the_loss_in_one_line():
    student, _, teacher, labels = _batch(5)
    with pytest.raises(KdcacheError, match="trains a distillation head.*only regions: give it 'distillation'"):
        get_loss("deit-hard")(student, teacher, labels, 1)


def test_a_deit_loss_summed_with_a_region_loss_is_refused():
    with pytest.raises(KdcacheError, match="no region logits for an SDD loss beside it"):
        scaled_loss("deit-hard,sdd-lskd", {}, 10)


# -- the student's outputs -----------------------------------------------------------------------------------------
def _tiny_deit(classes=10):
    torch.manual_seed(0)
    return kdcache.create_model(TINY_DEIT, num_classes=classes)


def test_the_distillation_output_is_the_distillation_tokens_head_and_regions_the_class_tokens():
    model, images = _tiny_deit(), torch.randn(3, 3, 32, 32)
    outputs = ModelOutputs(model, (1,), [DISTILLATION]).train()
    found = outputs(images)
    tokens = model.forward_features(images)
    torch.testing.assert_close(found["regions"][:, 0], model.head(tokens[:, 0]))
    torch.testing.assert_close(found[DISTILLATION], model.head_dist(tokens[:, 1]))
    assert model.distilled_training is False  # timm's own setting is left as it was
    model.eval()  # one prediction in eval mode: the heads' mean, as model(x)
    mean = (found["regions"][:, 0] + found[DISTILLATION]) / 2
    torch.testing.assert_close(model(images), mean)
    torch.testing.assert_close(outputs.eval()(images)["regions"][:, 0], mean)


def test_your_own_loop_gives_distill_loss_the_model_outputs_dict():
    """README: ModelOutputs(model, (1,), ["distillation"]) makes the dict DistillLoss takes."""
    outputs, images = ModelOutputs(_tiny_deit(), (1,), [DISTILLATION]).train(), torch.randn(4, 3, 32, 32)
    labels, regions = torch.tensor([0, 3, 9, 1]), torch.randn(4, 2, 10)  # a cache's targets: the loss reads region 0
    found = outputs(images)
    total = kdcache.DistillLoss("deit-hard", epochs=1)(found, (labels, {"regions": regions}))
    torch.testing.assert_close(total, deit_hard(found["regions"][:, 0], found[DISTILLATION], regions[:, 0], labels))


def test_a_model_without_a_distillation_token_is_refused_naming_the_models_that_have_one():
    plain = kdcache.create_model("timm:vit_tiny_patch16_224,img_size=32,patch_size=8,embed_dim=32,depth=1,num_heads=2",
                                 num_classes=10)
    with pytest.raises(KdcacheError, match=r"has no distillation token: use a timm \*_distilled_\* model"):
        ModelOutputs(plain, (1,), [DISTILLATION])
    with pytest.raises(KdcacheError, match="global logit only, not region logits of scales 1,2"):
        ModelOutputs(_tiny_deit(), (1, 2), [DISTILLATION])


@pytest.mark.parametrize("spec, message", [
    ("timm:vit_tiny_patch16_224,img_size=x", "value 'x' is not a number, true or false"),
    ("timm:vit_tiny_patch16_224,img", "'img' is not a new key=value"),
    ("timm:vit_tiny_patch16_224,num_classes=3", "num_classes and pretrained are kdcache's to set"),
    ("timm:vit_tiny_patch16_224,colour=1", "timm's vit_tiny_patch16_224 refused colour"),
])
def test_a_timm_specs_arguments_are_numbers_or_booleans_and_a_mistake_is_one_line(spec, message):
    with pytest.raises(KdcacheError, match=message):
        kdcache.create_model(spec, num_classes=10)


def test_a_timm_specs_float_argument_is_no_pretrained_tag():
    assert not pretrained_tag("timm:vit_tiny_patch16_224,img_size=32,drop_rate=0.1")
    assert pretrained_tag("timm:vit_tiny_patch16_224.augreg_in21k,img_size=32")


# -- a run ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deit_run(digits_cache, tmp_path_factory):
    """One epoch of deit-hard from the digits cache: the run folder."""
    out = tmp_path_factory.mktemp("deit")
    [summary] = distill(DistillConfig(students=(TINY_DEIT,), losses=("deit-hard",), cache=str(digits_cache),
                                      epochs=1, batch_size=64, out=str(out), device="cpu"), show_progress=False)
    return summary.folder


def _head_logits(folder):
    """The saved model's class head, distillation head and model(x) on the digits test split, in eval mode."""
    model = kdcache.create_model(TINY_DEIT, num_classes=10)
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True)["model"])
    model.eval()
    images = kdcache.load_dataset("digits", split="test")
    with torch.no_grad():
        tokens = model.forward_features(images.normalized())
        return model.head(tokens[:, 0]), model.head_dist(tokens[:, 1]), model(images.normalized()), images.labels


def test_a_run_trains_the_distillation_head_and_evaluates_the_heads_mean(deit_run):
    with open(deit_run / "metrics.csv") as file:
        header, row = file.read().splitlines()[:2]
    metrics = dict(zip(header.split(","), map(float, row.split(","))))
    assert {"loss_ce", "loss_deit"} <= set(metrics) and metrics["loss_deit"] > 0
    cls, dist, mean, labels = _head_logits(deit_run)
    torch.testing.assert_close(mean, (cls + dist) / 2)
    assert metrics["test_acc"] == pytest.approx(float((mean.argmax(-1) == labels).double().mean()))
    assert metrics["test_loss"] == pytest.approx(float(F.cross_entropy(mean, labels)), rel=1e-4)
    assert metrics["test_loss"] != pytest.approx(float(F.cross_entropy(cls, labels)), rel=1e-4)


def test_kdcache_eval_of_the_saved_model_gives_the_heads_mean(deit_run, capsys):
    code, out, err = run_cli(["eval", deit_run, "--json"], capsys)
    assert code == 0, err
    found = json.loads(out)
    cls, dist, _, labels = _head_logits(deit_run)
    mean = (cls + dist) / 2
    assert found["top1"] == pytest.approx(float((mean.argmax(-1) == labels).double().mean()))
    assert found["loss"] == pytest.approx(float(F.cross_entropy(mean, labels)), rel=1e-4)


def test_distill_refuses_a_student_without_a_distillation_token_before_writing(digits_cache, tmp_path, capsys):
    code, _, err = run_cli(["distill", "--cache", digits_cache, "--student", "resnet8", "--loss", "deit-hard",
                            "--epochs", "1", "--out", tmp_path / "runs"], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "--loss deit-hard (student resnet8) trains a distillation token's head, and resnet8 has no " \
           "distillation token: use a timm *_distilled_* model" in err
    assert not (tmp_path / "runs").exists()
