"""Adversarial distillation (`--loss adversarial`): the discriminator's loss and the student's term against float64
transcriptions, values and gradients; the discriminator trained beside the student, each by its own optimiser, before
the student's step; resumed exactly; its loss in metrics.csv; refused under torchrun in one line."""

import csv

import pytest
import torch

from interrupt import interrupted_after_first_epoch
from small_runs import saved_teacher, synthetic_splits
from kdcache.config import DistillConfig
from kdcache.distributed import World
from kdcache.errors import KdcacheError
from kdcache.losses import get_loss, scaled_loss
from kdcache.losses.adversarial import VERDICT, adversarial_loss, discriminator_inputs, discriminator_loss
from kdcache.models import create_model, read_checkpoint
from kdcache.stages import distill
from kdcache.stages.adversarial import loss_critics
from kdcache.stages.loop import Run

CLASSES, CPU = 3, torch.device("cpu")


def sigmoid(x):
    return 1 / (1 + torch.exp(-x))


def reference_discriminator_loss(teacher_scores, student_scores):
    """½ (mean −log σ(s_t) + mean −log(1 − σ(s_s))), written out in float64."""
    return 0.5 * (-torch.log(sigmoid(teacher_scores)).mean() - torch.log(1 - sigmoid(student_scores)).mean())


def reference_adversarial_loss(student_scores):
    """The non-saturating generator loss mean −log σ(s_s), written out in float64."""
    return -torch.log(sigmoid(student_scores)).mean()


def reference_inputs(logits, temperature):
    """exp(z / T) / Σ exp(z / T), written out in float64."""
    e = torch.exp(logits / temperature)
    return e / e.sum(-1, keepdim=True)


@pytest.mark.parametrize("spread", [0.1, 1.0, 5.0])
def test_both_losses_and_the_inputs_are_their_formulas_values_and_gradients(spread):
    generator = torch.Generator().manual_seed(int(spread * 10))
    teacher, student = (spread * torch.randn(6, dtype=torch.float64, generator=generator, requires_grad=True)
                        for _ in range(2))
    logits = spread * torch.randn(6, 5, dtype=torch.float64, generator=generator)
    logits.requires_grad_()
    pairs = [(discriminator_loss(teacher, student), reference_discriminator_loss(teacher, student), (teacher, student)),
             (adversarial_loss(student), reference_adversarial_loss(student), (student,)),
             ((discriminator_inputs(logits, 3.0) * torch.arange(5.0)).sum(),
              (reference_inputs(logits, 3.0) * torch.arange(5.0)).sum(), (logits,))]
    for ours, reference, inputs in pairs:
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
        for a, b in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(reference, inputs)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_discriminator_that_cannot_tell_costs_ln2_and_extreme_scores_stay_finite():
    zeros = torch.zeros(4)
    assert discriminator_loss(zeros, zeros).item() == pytest.approx(0.6931471805599453)
    huge = torch.tensor([1e4, -1e4])
    assert torch.isfinite(discriminator_loss(huge, huge)) and torch.isfinite(adversarial_loss(huge))


def adversarial_run(tmp_path):
    torch.manual_seed(0)
    loss = scaled_loss("kd,adversarial", {}, 2)
    return Run("r", create_model("resnet8", num_classes=CLASSES), loss, (1,), DistillConfig(batch_size=8, lr=0.1),
               tmp_path, CPU, {}, critics=loss_critics(loss, CLASSES, CPU))


def batches(count):
    torch.manual_seed(1)
    return [(torch.randn(8, 3, 16, 16), torch.arange(8) % CLASSES, {"regions": 3 * torch.randn(8, 1, CLASSES)})
            for _ in range(count)]


def test_the_discriminator_and_the_student_each_train_by_their_own_optimiser_only(tmp_path):
    run = adversarial_run(tmp_path)
    (game,) = run.critics
    before = {name: value.clone() for name, value in game.model.state_dict().items()}
    student_before = {name: value.clone() for name, value in run.model.state_dict().items()}
    metrics = run.train_epoch(0, iter(batches(3)), 3, show_progress=False)
    held = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    held_by_game = {id(p) for group in game.optimizer.param_groups for p in group["params"]}
    assert held_by_game == {id(p) for p in game.model.parameters()} and not held & held_by_game
    assert not held_by_game & {id(p) for p in run.model.parameters()}
    assert all(not torch.equal(before[name], value) for name, value in game.model.state_dict().items())
    assert any(not torch.equal(student_before[name], value) for name, value in run.model.state_dict().items())
    assert {"loss_ce", "loss_kd", "loss_adv", "loss_total", "loss_discriminator"} <= set(metrics)
    assert metrics["loss_total"] == pytest.approx(metrics["loss_ce"] + metrics["loss_kd"] + metrics["loss_adv"])


def test_the_discriminator_steps_first_and_its_scores_carry_gradient_to_the_student_alone(tmp_path):
    run = adversarial_run(tmp_path)
    (game,) = run.critics
    student = [{"regions": torch.randn(8, 1, CLASSES, requires_grad=True)}]
    teacher = [{"regions": torch.randn(8, 1, CLASSES)}]
    old = {name: value.clone() for name, value in game.model.state_dict().items()}
    (judged,), terms = game.judge(student, teacher)
    assert student[0]["regions"].grad is None  # the discriminator's step read the student's predictions detached
    softened = discriminator_inputs(student[0]["regions"][:, 0], game.temperature)
    # the scores are the stepped discriminator's: this step's D, not the previous one
    torch.testing.assert_close(judged[VERDICT], game.model(softened).detach())
    assert any(not torch.equal(old[name], value) for name, value in game.model.state_dict().items())
    gradients = torch.autograd.grad(judged[VERDICT].sum(), [student[0]["regions"], *game.model.parameters()],
                                    allow_unused=True)
    assert gradients[0].abs().sum() > 0 and all(g is None for g in gradients[1:])
    # its loss was computed on the detached student predictions, with the teacher's labelled 1
    assert terms["discriminator"].requires_grad is False and terms["discriminator"] > 0


def config(tmp_path, name, teacher, **options):
    return DistillConfig(live_teacher=str(teacher), teacher="resnet8", students=("resnet8",),
                         losses=("kd,adversarial",), epochs=2, batch_size=8, out=str(tmp_path / name), device="cpu",
                         **options)


def test_a_resumed_adversarial_run_ends_as_an_uninterrupted_one_discriminator_included(tmp_path, monkeypatch):
    _, teacher = saved_teacher(tmp_path, CLASSES, seed=3)
    data = synthetic_splits(16, CLASSES, seed=4)
    whole = distill(config(tmp_path, "whole", teacher), show_progress=False, data=data)
    interrupted_after_first_epoch(monkeypatch, lambda: distill(config(tmp_path, "part", teacher), show_progress=False,
                                                               data=data))
    resumed = distill(config(tmp_path, "part", teacher, resume=True), show_progress=False, data=data)
    a, b = (read_checkpoint(run[0].folder / "last.pt") for run in (whole, resumed))
    for part in ("model", "discriminator"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    moments = [state["discriminator_optimizer"]["state"][0]["exp_avg"] for state in (a, b)]
    assert torch.equal(*moments) and a["discriminator_optimizer"]["state"][0]["step"] == 2 * 2  # 2 steps an epoch
    with open(whole[0].folder / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2 and {"loss_adv", "loss_discriminator"} <= set(rows[0])
    assert all(0 < float(row["loss_discriminator"]) < 2 for row in rows)


def test_the_adversarial_term_without_a_discriminator_and_torchrun_are_refused_in_one_line():
    with pytest.raises(KdcacheError, match="reads a discriminator.s scores .*the judge of .*loss_critics"):
        get_loss("adversarial").compute(torch.randn(2, 1, 3), torch.randn(2, 1, 3), torch.tensor([0, 1]), 1)
    with pytest.raises(KdcacheError, match="--loss kd,adversarial: the discriminator .* 2 ranks.*without torchrun"):
        loss_critics(scaled_loss("kd,adversarial", {}, 2), CLASSES, CPU, World(rank=0, size=2))
    assert loss_critics(get_loss("kd"), CLASSES, CPU, World(rank=0, size=2)) == []
