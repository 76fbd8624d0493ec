"""The training recipe (#19, point 1): optimiser, learning rate per step, warm-up, label smoothing, weight EMA,
precision and clipping; the defaults compute what kdcache computed before them."""

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F

from kdcache.config import DistillConfig, TrainConfig
from kdcache.data import load_dataset
from kdcache.errors import KdcacheError
from kdcache.losses import get_loss
from kdcache.models import create_model, read_checkpoint
from kdcache.stages.loop import Run, _what_it_computes
from kdcache.stages.recipe_options import WeightEMA, learning_rate, make_optimizer, training_dtype

CPU = torch.device("cpu")


def papers_step_decay(config: TrainConfig, epoch: int) -> float:
    """The learning rate kdcache set before the recipe options, once per epoch."""
    return config.lr * config.lr_decay_rate ** sum(epoch >= m for m in config.lr_milestones())


@pytest.mark.parametrize("epochs", [1, 8, 240])
def test_the_default_schedule_sets_every_step_the_rate_of_its_epoch_as_before(epochs):
    config = TrainConfig(epochs=epochs)
    for epoch in range(epochs):
        assert {learning_rate(config, epoch, step, 7) for step in range(7)} == {papers_step_decay(config, epoch)}


def test_cosine_with_warm_up_rises_linearly_then_falls_to_zero_per_step():
    config = TrainConfig(epochs=10, lr=0.1, schedule="cosine", lr_warmup_epochs=2)
    steps = 5
    rates = [learning_rate(config, epoch, step, steps) for epoch in range(10) for step in range(steps)]
    assert rates[:10] == pytest.approx([0.1 * (i + 1) / 10 for i in range(10)])  # 2 epochs of 5 steps
    for i, rate in enumerate(rates[10:], start=10):
        assert rate == pytest.approx(0.05 * (1 + math.cos(math.pi * (i / steps - 2) / 8)))
    assert rates[-1] < 0.001 and all(a >= b for a, b in zip(rates[10:], rates[11:]))
    step = TrainConfig(epochs=10, lr=0.1, lr_warmup_epochs=1)
    assert learning_rate(step, 0, 0, 4) == pytest.approx(0.025) and learning_rate(step, 1, 0, 4) == 0.1


def test_the_optimizers_are_the_papers_sgd_and_adamw():
    model = torch.nn.Linear(3, 2)
    sgd = make_optimizer(model.parameters(), TrainConfig())
    adamw = make_optimizer(model.parameters(), TrainConfig(optimizer="adamw", weight_decay=0.05))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.05
    with pytest.raises(KdcacheError, match="unknown optimizer 'lamb'; known: sgd, adamw"):
        make_optimizer(model.parameters(), TrainConfig(optimizer="lamb"))


def test_after_k_steps_the_ema_equals_a_slow_reference_update():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = WeightEMA(model, 0.9)
    reference = {name: value.double().clone() for name, value in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)
        for name, value in model.named_parameters():
            reference[name] = 0.9 * reference[name] + 0.1 * value.detach().double()
    for name, value in ema.model.state_dict().items():
        expected = reference[name] if name in dict(model.named_parameters()) else model.state_dict()[name]
        torch.testing.assert_close(value.double(), expected.double(), rtol=1e-6, atol=1e-7, msg=name)
    with pytest.raises(KdcacheError, match="--ema-decay: expected a decay in"):
        WeightEMA(model, 1.0)


def test_a_precision_the_device_cannot_run_is_one_line_naming_what_to_use(monkeypatch):
    assert training_dtype("auto", CPU) is None and training_dtype("fp32", CPU) is None
    with pytest.raises(KdcacheError, match="--precision fp16 .* use --precision fp32"):
        training_dtype("fp16", CPU)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.raises(KdcacheError, match="--precision bf16: cpu has no bfloat16 arithmetic; use --precision fp32"):
        training_dtype("bf16", CPU)


def test_label_smoothing_is_the_cross_entropy_terms():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 5), torch.randint(0, 5, (6,))
    terms = get_loss("kd", label_smoothing=0.1).compute(logits, torch.randn(6, 5), labels, 1)
    torch.testing.assert_close(terms["ce"], 0.1 * F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_clipping_bounds_the_update_of_a_step(tmp_path):
    torch.manual_seed(0)
    batch = (torch.randn(8, 3, 8, 8), torch.arange(8) % 3, None)
    updates = {}
    for clip in (None, 1e-3):
        torch.manual_seed(1)
        run = Run("r", create_model("resnet8", num_classes=3), get_loss("ce"), (1,),
                  TrainConfig(batch_size=8, lr=1.0, momentum=0.0, weight_decay=0.0, clip_grad=clip), tmp_path, CPU, {})
        before = torch.cat([p.detach().flatten().clone() for p in run.model.parameters()])
        run.train_epoch(0, iter([batch]), 1, show_progress=False)
        updates[clip] = torch.cat([p.detach().flatten() for p in run.model.parameters()]) - before
    assert updates[None].norm() > 1e-2 and updates[1e-3].norm() == pytest.approx(1e-3, rel=1e-4)


def test_a_run_with_the_recipe_records_lr_and_ema_and_saves_the_averaged_weights(tmp_path):
    from kdcache.data import get_policy
    from kdcache.stages.loop import fit
    from kdcache.stages.splits import make_split
    from kdcache.stages.views import FreshViews

    options = dict(num_samples=64, num_classes=3, image_size=16)
    data, test = (load_dataset("synthetic", split=split, **options) for split in ("train", "test"))
    config = TrainConfig(epochs=2, batch_size=16, optimizer="adamw", lr=1e-3, weight_decay=0.05, schedule="cosine",
                         lr_warmup_epochs=1, label_smoothing=0.1, ema_decay=0.9, clip_grad=5.0, precision="fp32")
    torch.manual_seed(0)
    run = Run("r", create_model("resnet8", num_classes=3), get_loss("ce", label_smoothing=0.1), (1,), config,
              tmp_path / "r", CPU, {})
    policy = get_policy("cifar")
    fit([run], make_split(data, test, policy, CPU), FreshViews(policy, 64, 0), None, config, CPU, show_progress=False)
    checkpoint = run.finish()
    with open(tmp_path / "r" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert [float(row["lr"]) for row in rows] == pytest.approx([learning_rate(config, e, 3, 4) for e in range(2)])
    assert all(0 <= float(row["test_acc_ema"]) <= 1 for row in rows)
    ema = read_checkpoint(tmp_path / "r" / "model_ema.pt")["model"]
    last = read_checkpoint(tmp_path / "r" / "last.pt")
    assert all(torch.equal(ema[key], last["ema"][key]) for key in ema)
    assert all(torch.equal(ema[key], value) for key, value in run.ema.model.state_dict().items())
    assert json.loads(checkpoint.with_suffix(".json").read_text())["test_acc_ema"] == float(rows[-1]["test_acc_ema"])


def test_a_run_recorded_before_the_options_resumes_as_one_that_keeps_their_defaults():
    old = {"arch": "resnet8", "config": {"epochs": 3, "lr": 0.05}}
    new = {"arch": "resnet8", "config": {"epochs": 3, "lr": 0.05, "optimizer": "sgd", "schedule": "step",
                                         "lr_warmup_epochs": 0.0, "label_smoothing": 0.0, "ema_decay": None,
                                         "precision": "auto", "clip_grad": None, "teacher_weights": [],
                                         "views_per_step": 1, "mutual": False, "ema_teacher": None,
                                         "qat": None}}
    assert _what_it_computes(old) == _what_it_computes(new)
    for changed in ({"optimizer": "adamw"}, {"views_per_step": 2}, {"mutual": True}, {"ema_teacher": 0.99},
                    {"qat": "int8"}):
        assert _what_it_computes(old) != _what_it_computes({**new, "config": {**new["config"], **changed}})


def test_the_distill_config_passes_label_smoothing_to_the_loss():
    assert DistillConfig(label_smoothing=0.2).loss_overrides() == {"label_smoothing": 0.2}
    assert DistillConfig().loss_overrides() == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a gradient scaler runs on CUDA")
def test_fp16_trains_with_a_gradient_scaler_on_cuda(tmp_path):
    device = torch.device("cuda")
    torch.manual_seed(0)
    run = Run("r", create_model("resnet8", num_classes=3), get_loss("ce"), (1,),
              TrainConfig(batch_size=8, precision="fp16", clip_grad=1.0), tmp_path, device, {})
    batch = (torch.randn(8, 3, 8, 8, device=device), torch.arange(8, device=device) % 3, None)
    metrics = run.train_epoch(0, iter([batch]), 1, show_progress=False)
    assert run.scaler.is_enabled() and math.isfinite(metrics["loss_total"])
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
