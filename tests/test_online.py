"""Teachers that are no cache: deep mutual learning (students teaching each other, step by step) and the student's
own weight average as teacher, each against a slow, hand-written reference."""

import json

import pytest
import torch
import torch.nn.functional as F

from small_runs import synthetic_splits
from kdcache.config import DistillConfig
from kdcache.data import get_policy
from kdcache.errors import KdcacheError
from kdcache.losses import PEERS, dml, get_loss
from kdcache.models import LogitMap, create_model
from kdcache.runtime import epoch_generator
from kdcache.stages import device_batches, distill
from kdcache.stages.loop import Run
from kdcache.stages.recipe_options import learning_rate

CLASSES, CPU = 3, torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    return synthetic_splits(24, CLASSES, seed=4)


def config(tmp_path, name, **options):
    settings = {"students": ("resnet8", "resnet8"), "epochs": 1, "batch_size": 8, "out": str(tmp_path / name),
                "device": "cpu", "mutual": True}
    return DistillConfig(**{**settings, **options})


@pytest.mark.parametrize("peers", [1, 3])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_dml_is_t2_kl_from_the_mean_of_the_peers_softened_predictions(peers, temperature):
    torch.manual_seed(peers)
    student = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    others = torch.randn(peers, 5, 7, dtype=torch.float64)
    got = dml(student, others, temperature)
    mean = sum(torch.exp(o / temperature) / torch.exp(o / temperature).sum(1, keepdim=True) for o in others) / peers
    q = torch.exp(student / temperature) / torch.exp(student / temperature).sum(1, keepdim=True)
    expected = temperature**2 * (mean * (mean.log() - q.log())).sum(1)
    torch.testing.assert_close(got, expected)
    (grad,) = torch.autograd.grad(got.sum(), student)
    (expected_grad,) = torch.autograd.grad(expected.sum(), student)
    torch.testing.assert_close(grad, expected_grad)
    # the gradient of T²·KL(p̄ ‖ q) is T·(q - p̄)
    torch.testing.assert_close(grad, temperature * (q - mean).detach())


def test_two_mutual_students_step_as_a_hand_written_dml_loop(data, tmp_path):
    runs = distill(config(tmp_path, "dml", epochs=2), show_progress=False, data=data)
    train, policy = data[0], get_policy("cifar")
    students = []
    for k in range(2):
        torch.manual_seed(k)
        students.append(create_model("resnet8", num_classes=CLASSES))
    trained = DistillConfig(epochs=2, batch_size=8)
    optimizers = [torch.optim.SGD(s.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) for s in students]
    for epoch in range(2):
        params = policy.sample(epoch_generator(0, epoch), len(train.labels))
        batches = list(device_batches(train.images, train.labels, params, policy, train.mean, train.std, None, 8,
                                      epoch_generator(0, epoch)))
        for step, (x, y, _) in enumerate(batches):
            for student in students:
                student.train()
            logits = [student(x) for student in students]
            for k, (student, optimizer) in enumerate(zip(students, optimizers)):
                peer = F.softmax(logits[1 - k].detach(), dim=1)  # temperature 1: the paper's
                loss = F.cross_entropy(logits[k], y) + F.kl_div(F.log_softmax(logits[k], 1), peer,
                                                                reduction="batchmean")
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(trained, epoch, step, len(batches))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    assert [run.name for run in runs] == ["resnet8-dml-0", "resnet8-dml-1"]
    for run, student in zip(runs, students):
        ours = torch.load(run.folder / "model.pt", weights_only=True)["model"]
        for key, value in student.state_dict().items():
            torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert json.loads((runs[0].folder / "model.json").read_text())["mutual"] == ["resnet8", "resnet8"]


def test_mutual_students_resume_together_to_the_weights_of_an_uninterrupted_run(data, tmp_path, monkeypatch):
    whole = distill(config(tmp_path, "whole", epochs=2), show_progress=False, data=data)
    evaluate = Run.evaluate

    def stop_in_the_second_epoch(self, split):  # every student's first epoch is checkpointed by then
        if len(self.history) == 1:
            raise KeyboardInterrupt
        return evaluate(self, split)

    monkeypatch.setattr(Run, "evaluate", stop_in_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        distill(config(tmp_path, "resumed", epochs=2), show_progress=False, data=data)
    monkeypatch.setattr(Run, "evaluate", evaluate)
    resumed = distill(config(tmp_path, "resumed", epochs=2, resume=True), show_progress=False, data=data)
    for a, b in zip(whole, resumed):
        ours, theirs = (torch.load(run.folder / "model.pt", weights_only=True)["model"] for run in (a, b))
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)


def test_the_ema_teacher_is_the_slow_average_of_the_students_weights_after_every_step(tmp_path):
    torch.manual_seed(0)
    batches = [(torch.randn(8, 3, 16, 16), torch.arange(8) % CLASSES, None) for _ in range(4)]
    run = Run("r", create_model("resnet8", num_classes=CLASSES), get_loss("kd"), (1,),
              DistillConfig(batch_size=8, lr=0.1), tmp_path, CPU, {}, ema_teacher=0.9)
    average = {name: value.clone().double() for name, value in run.model.state_dict().items()}
    first_target = LogitMap(run.ema_teacher.model.eval(), (1,))(batches[0][0])
    targets = []
    compute = run.loss.compute
    run.loss = type("Recording", (), {"compute": lambda _, s, t, y, e: targets.append(t) or compute(s, t, y, e),
                                      "term_names": run.loss.term_names, "settings": run.loss.settings})()
    for batch in batches:
        run.train_epoch(0, iter([batch]), 1, show_progress=False)
        for name, value in run.model.state_dict().items():
            is_parameter = name in dict(run.model.named_parameters())
            average[name] = 0.9 * average[name] + 0.1 * value.double() if is_parameter else value.clone().double()
    for name, value in run.ema_teacher.model.state_dict().items():
        torch.testing.assert_close(value.double(), average[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(targets[0]["regions"], first_target.detach())  # step 1: the initial weights
    assert not torch.equal(targets[-1]["regions"], targets[0]["regions"])


def test_distill_with_an_ema_teacher_records_it_and_resumes_its_average(data, tmp_path):
    runs = distill(DistillConfig(students=("resnet8",), losses=("kd",), ema_teacher=0.99, epochs=1, batch_size=8,
                                 out=str(tmp_path / "ema"), device="cpu"), show_progress=False, data=data)
    state = torch.load(runs[0].folder / "last.pt", weights_only=True)
    assert "ema_teacher" in state and json.loads(state["record"])["ema_teacher"] == 0.99


@pytest.mark.parametrize("options,message", [
    ({"students": ("resnet8",)}, "--mutual: trains two or more students together"),
    ({"losses": ("kd", "dkd")}, "--mutual: trains two or more students together"),
    ({"mutual": False, "ema_teacher": 1.0}, "--ema-teacher: expected a decay in \\(0, 1\\)"),
    ({"mutual": False, "ema_teacher": 0.0}, "--ema-teacher: expected a decay in \\(0, 1\\)"),
    ({"ema_teacher": 0.9}, "--ema-teacher: the student's weight average is the teacher"),
    ({"mutual": False}, "give --cache CACHE .* --mutual .* --ema-teacher"),
])
def test_online_options_that_cannot_run_are_one_line_naming_the_fix(data, tmp_path, options, message):
    with pytest.raises(KdcacheError, match=message):
        distill(config(tmp_path, "x", **options), show_progress=False, data=data)


def test_the_dml_loss_without_peers_names_mutual():
    with pytest.raises(KdcacheError, match="distill --mutual"):
        get_loss("dml").compute(torch.randn(2, 1, 3), {}, torch.tensor([0, 1]), 1)
    terms = get_loss("dml").compute(torch.randn(2, 1, 3), {PEERS: torch.randn(1, 2, 3)}, torch.tensor([0, 1]), 1)
    assert set(terms) == {"ce", "mutual", "total"} and terms["mutual"] > 0
