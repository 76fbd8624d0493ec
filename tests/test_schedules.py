"""Loss schedules: a temperature or weight per epoch (`--temperature 'linear(8,2)'`), in the loss, the run's
metrics.csv, its config.yaml and --resume."""

import csv
import math
import re

import pytest
import torch

from small_runs import saved_teacher, synthetic_splits
from console import run_cli
from kdcache.config import DistillConfig, load_config
from kdcache.data import get_policy
from kdcache.errors import KdcacheError
from kdcache.losses import get_loss, scaled_loss
from kdcache.models import file_sha256
from kdcache.schedules import GRAMMAR, Schedule, parse_schedule
from kdcache.stages import distill
from kdcache.stages.criterion import DistillLoss
from kdcache.stages.dump import dump_teacher
from kdcache.stages.text_train import refuse_image_options

CLASSES, EPOCHS = 4, 7


def cosine(start, end, epoch, epochs):
    """The hand formula: half a cosine from start (epoch 1) to end (epoch E)."""
    return end + (start - end) * (1 + math.cos(math.pi * (epoch - 1) / (epochs - 1))) / 2


@pytest.mark.parametrize("text, first, middle, last", [
    ("linear(8,2)", 8.0, 8 + (2 - 8) * 3 / 6, 2.0),  # epoch 4 of 7: half way
    ("linear(0.1,1)", 0.1, 0.1 + 0.9 * 3 / 6, 1.0),
    ("cosine(8,2)", 8.0, cosine(8, 2, 4, EPOCHS), 2.0),
    ("cosine(0.9,0.1)", 0.9, 0.5, 0.1),  # the middle of a half cosine is the mean
    ("step(0.1,1@4)", 0.1, 1.0, 1.0),
    ("step(4,2@5,1@7)", 4.0, 4.0, 1.0),
])
def test_each_schedule_at_the_first_middle_and_last_epoch_follows_its_formula(text, first, middle, last):
    schedule = parse_schedule(text).over(EPOCHS)
    assert [schedule.at(epoch) for epoch in (1, 4, 7)] == pytest.approx([first, middle, last], abs=1e-12)


def test_values_between_and_around_the_run():
    assert [parse_schedule("cosine(8,2)").over(EPOCHS).at(e) for e in (2, 3)] == \
        pytest.approx([cosine(8, 2, 2, EPOCHS), 8 - 6 * 0.25])  # cos(pi/3) = 1/2 at epoch 3 of 7
    steps = parse_schedule("step(4,2@5,1@7)").over(EPOCHS)
    assert [steps.at(epoch) for epoch in range(1, 8)] == [4, 4, 4, 4, 2, 2, 1]  # a new value from its epoch on
    assert parse_schedule("linear(8,2)").over(1).at(1) == 8  # a run of one epoch has START
    assert parse_schedule("linear(8,2)").over(EPOCHS).at(9) == 2  # held to the run's epochs


@pytest.mark.parametrize("text", ["linear(8,2)", "cosine(0.9,0.1)", "step(0.1,1@20)", "step(0.1,0.5@3,1@20)",
                                  "linear(-1.5,1e-07)", "cosine(0.30000000000000004,2)"])
def test_a_schedules_text_reads_back_as_an_equal_schedule(text):
    schedule = parse_schedule(text)
    assert isinstance(schedule, Schedule) and parse_schedule(str(schedule)) == schedule
    assert parse_schedule(" 4 ") == 4.0 and parse_schedule(3) == 3.0  # a number is a constant, as before


def logits(seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(6, CLASSES, generator=generator, dtype=torch.float64) * 3,
            torch.randn(6, CLASSES, generator=generator, dtype=torch.float64) * 3,
            torch.randint(0, CLASSES, (6,), generator=generator))


@pytest.mark.parametrize("loss, scheduled, constant", [
    ("kd", {"temperature": "linear(8,2)", "ce_weight": "step(0.1,1@4)", "distill_weight": "cosine(0.9,0.1)"},
     {"temperature": 5.0, "ce_weight": 1.0, "distill_weight": 0.5}),
    ("dkd", {"alpha": "linear(2,1)", "beta": "step(8,4@3)"}, {"alpha": 1.5, "beta": 4.0}),
    ("kd,dkd=2", {"temperature": "linear(8,2)"}, {"temperature": 5.0}),  # a sum: the flag applies to both
])
def test_the_loss_at_an_epoch_equals_the_constant_loss_at_the_schedules_values(loss, scheduled, constant):
    student, teacher, labels = logits(0)
    at_epoch_4 = scaled_loss(loss, scheduled, EPOCHS).compute(student, teacher, labels, 4)
    expected = scaled_loss(loss, constant, EPOCHS).compute(student, teacher, labels, 4)
    assert at_epoch_4.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(at_epoch_4[name], expected[name], rtol=1e-12, atol=0, msg=name)
    first = scaled_loss(loss, scheduled, EPOCHS).compute(student, teacher, labels, 1)
    assert not torch.equal(first["total"], at_epoch_4["total"])  # the schedule did change the loss


def test_distill_loss_takes_a_schedules_text_or_value_and_the_epoch_set_epoch_names():
    student, teacher, labels = logits(1)
    targets = (labels, {"regions": teacher[:, None]})
    for temperature in ("linear(8,2)", parse_schedule("linear(8,2)")):
        criterion = DistillLoss("kd", epochs=EPOCHS, temperature=temperature)
        criterion.set_epoch(3)  # counted from 0, as samplers count: the loss's epoch 4
        torch.testing.assert_close(criterion(student, targets),
                                   DistillLoss("kd", epochs=EPOCHS, temperature=5.0)(student, targets), rtol=1e-12,
                                   atol=0)
    with pytest.raises(KdcacheError, match=r"--temperature: expected a number, linear\(START,END\)"):
        DistillLoss("kd", epochs=EPOCHS, temperature="linear 8 2")


@pytest.mark.parametrize("loss, overrides, message", [
    ("kd", {"ce_weight": "step(0.1,1@20)"}, r"--ce-weight: step\(0.1,1@20\): the step at epoch 20 comes after the "
                                            r"run's last epoch, 7"),
    ("sp", {"temperature": "linear(8,2)"}, "--temperature does not apply to loss 'sp'"),
    ("kd,sp", {"alpha": "linear(2,1)"}, "--alpha applies to none of the losses"),
])
def test_a_schedule_the_run_cannot_follow_is_refused_as_a_constant_is(loss, overrides, message):
    with pytest.raises(KdcacheError, match=message):
        scaled_loss(loss, overrides, EPOCHS)


@pytest.mark.parametrize("value", ["linear(8,2)", Schedule("linear", (8.0, 2.0))])
def test_a_loss_spec_refuses_a_schedule_without_the_runs_epochs(value):
    with pytest.raises(KdcacheError, match=r"LossSpec\('kd'\): temperature linear\(8,2\) needs the run's epochs"):
        get_loss("kd", temperature=value)


def test_pairs_and_sums_still_parse_beside_schedules():
    config = load_config(DistillConfig, None, {"pairs": ("timm:resnet18:kd,dkd=2", "resnet8:kd"), "epochs": 5,
                                               "temperature": parse_schedule("linear(8,2)")})
    assert config.runs() == [("timm:resnet18", "kd,dkd=2"), ("resnet8", "kd")]
    total, alone = (scaled_loss(loss, config.loss_overrides(), config.epochs) for _, loss in config.runs())
    assert total.settings(3) == {"ce_weight": 0.1, "kd.temperature": 5.0, "kd.distill_weight": 0.9,
                                 "dkd.temperature": 5.0, "dkd.distill_weight": 2.0, "dkd.alpha": 1.0, "dkd.beta": 8.0}
    assert alone.settings(5) == {"temperature": 2.0, "ce_weight": 0.1, "distill_weight": 0.9}


@pytest.mark.parametrize("text, detail", [
    ("lin(8,2)", "expected a number, linear"),
    ("linear(8)", r"linear\(START,END\) takes two numbers"),
    ("cosine(8,x)", "expected numbers in"),
    ("step(0.1,1)", "step.* takes the value from epoch 1"),
    ("step(0.1,1@1)", "must increase from 2 on"),
    ("step(0.1,1@5,2@3)", "must increase from 2 on"),
    ("linear(nan,2)", "expected finite numbers"),
])
def test_bad_schedule_text_is_one_line_with_the_grammar(text, detail, capsys):
    code, out, err = run_cli(["distill", "--temperature", text], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("kdcache: error: Invalid value for '--temperature': ")
    assert re.search(detail, err) and text in err


def test_distill_help_says_the_loss_flags_take_a_schedule(capsys):
    code, out, _ = run_cli(["distill", "--help"], capsys)
    flat = " ".join(out.split())
    for flag in ("--temperature", "--ce-weight", "--distill-weight", "--alpha", "--beta"):
        assert f"{flag} NUMBER|SCHEDULE" in flat
    assert "a schedule over the epochs: linear(START,END) or cosine(START,END)" in flat


def test_a_config_file_takes_the_same_text_and_refuses_anything_else(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("temperature: cosine(8,2)\nce-weight: 0.5\ndistill_weight: '0.25'\n")
    config = load_config(DistillConfig, path)
    assert (config.temperature, config.ce_weight, config.distill_weight) == (Schedule("cosine", (8.0, 2.0)), 0.5, 0.25)
    for value in ("{schedule: linear, start: 8, end: 2}", "linear(8,2"):
        path.write_text(f"temperature: {value}\n")
        with pytest.raises(KdcacheError, match=f"{re.escape(str(path))}: temperature: expected {re.escape(GRAMMAR)}"):
            load_config(DistillConfig, path)


def test_a_language_models_losses_refuse_a_schedule():
    with pytest.raises(KdcacheError, match=r"--temperature linear\(8,2\): a token cache's losses take a constant"):
        refuse_image_options(DistillConfig(temperature=parse_schedule("linear(8,2)")))


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    data = synthetic_splits(32, CLASSES, seed=5, image_size=8)
    model, checkpoint = saved_teacher(tmp_path_factory.mktemp("teacher"), CLASSES, seed=1)
    info = {"arch": "resnet8", "num_classes": CLASSES, "checkpoint": str(checkpoint),
            "checkpoint_sha256": file_sha256(checkpoint)}
    path = tmp_path_factory.mktemp("cache") / "c.zarr"
    dump_teacher(model, info, data[0], get_policy("cifar"), path, views=2, scales=(1,), block_size=16,
                 show_progress=False)
    return path, data


def test_a_run_logs_the_epochs_values_saves_the_schedule_and_resumes_only_with_it(small_cache, tmp_path, monkeypatch):
    from interrupt import interrupted_after_first_epoch

    path, data = small_cache
    settings = dict(students=("resnet8",), losses=("kd",), cache=str(path), epochs=3, batch_size=16, device="cpu",
                    out=str(tmp_path / "runs"), temperature=parse_schedule("linear(8,2)"),
                    ce_weight=parse_schedule("step(0.1,1@3)"))
    interrupted_after_first_epoch(monkeypatch, lambda: distill(DistillConfig(**settings), False, data))
    folder = tmp_path / "runs" / "resnet8-kd"
    assert "temperature: linear(8,2)\n" in (folder / "config.yaml").read_text()
    saved = load_config(DistillConfig, folder / "config.yaml")
    assert saved == DistillConfig(**settings).one_run("resnet8", "kd")
    with pytest.raises(KdcacheError, match=r"--resume: .* other settings \(config\)"):
        distill(DistillConfig(**{**settings, "temperature": parse_schedule("linear(8,1)"), "resume": True}), False,
                data)
    [run] = distill(load_config(DistillConfig, folder / "config.yaml", {"resume": True}), False, data)
    with open(run.folder / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3]
    assert [float(row["temperature"]) for row in rows] == [8, 5, 2]
    assert [float(row["ce_weight"]) for row in rows] == [0.1, 0.1, 1]
    assert [float(row["distill_weight"]) for row in rows] == [0.9, 0.9, 0.9]  # kd's default, unscheduled
