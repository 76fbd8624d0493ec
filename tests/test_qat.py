"""Quantisation-aware students (`distill --qat int8`): the loss reads the fake-quantised outputs, the int8 model
exported at the end predicts as the fake-quantised one did and is reported beside it, a run resumes its observers,
and what cannot be quantised is refused in one line."""

import copy
import csv
import json
import os
import shutil

import pytest
import torch

from console import run_cli
from interrupt import interrupted_after_first_epoch
from small_runs import saved_teacher, synthetic_splits
from kdcache.config import DistillConfig
from kdcache.data import get_policy, normalize
from kdcache.errors import KdcacheError
from kdcache.models import create_model
from kdcache.models.outputs import REGIONS, ModelOutputs
from kdcache.models.quantised import INT8_FILE, TORCHSCRIPT_FILE, QuantisedStudent, convert_int8, is_torchscript, \
    quantised_engine, rebuild_int8
from kdcache.report import distill_sweep, summary_table
from kdcache.stages.dump import dump_teacher
from kdcache.stages.loop import epoch_line

CLASSES = 3


@pytest.fixture(scope="module")
def data():
    return synthetic_splits(64, CLASSES, seed=7)


@pytest.fixture(scope="module")
def cache(data, tmp_path_factory):
    """A tiny cache of a random resnet8 over the synthetic split: 2 views, scales 1,2."""
    folder = tmp_path_factory.mktemp("qat")
    teacher, path = saved_teacher(folder, CLASSES, seed=3)
    info = {"arch": "resnet8", "checkpoint": str(path), "checkpoint_sha256": "0" * 64}
    dump_teacher(teacher, info, data[0], get_policy("cifar"), folder / "c.zarr", views=2, scales=(1, 2),
                 block_size=32, show_progress=False)
    return folder / "c.zarr"


@pytest.fixture(scope="module")
def finished(cache, data, tmp_path_factory):
    """A --qat int8 run of two epochs from the tiny cache, finished."""
    return distill_sweep(qat_config(cache, tmp_path_factory.mktemp("runs")), show_progress=False, data=data)


@pytest.fixture(scope="module")
def trained():
    """A fake-quantised resnet8 after two steps on random images (observers and BatchNorm moved), and them."""
    torch.manual_seed(0)
    images = torch.randn(16, 3, 16, 16)
    student = QuantisedStudent(create_model("resnet8", num_classes=CLASSES), images)
    optimiser = torch.optim.SGD(student.parameters(), lr=0.05)
    for _ in range(2):
        loss = student(images).logsumexp(-1).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return student, images


def last_row(folder):
    """The last row of a run's metrics.csv, as numbers."""
    with open(folder / "metrics.csv") as file:
        return {key: float(value) for key, value in list(csv.DictReader(file))[-1].items()}


def qat_config(cache, out, **options):
    settings = {"cache": str(cache), "students": ("resnet8",), "losses": ("sdd-kd",), "qat": "int8", "epochs": 2,
                "batch_size": 16, "lr": 0.05, "out": str(out), "device": "cpu"}
    return DistillConfig(**{**settings, **options})


def output_quantiser(student):
    """The fake quantiser of the head's output: the logits the loss reads are on its grid."""
    return dict(student.head.named_modules())["activation_post_process_2"]


def test_the_loss_reads_logits_on_the_int8_grid_that_the_converted_model_gives(trained):
    student, images = copy.deepcopy(trained)

    def on_the_grid(logits):  # of the output quantiser's scale and zero point as they are now (7-bit on x86)
        quantiser = output_quantiser(student)
        steps = logits / quantiser.scale + quantiser.zero_point
        return (steps - steps.round()).abs().max() < 1e-3 and steps.min() >= 0 and steps.max() <= 127

    logits = student.train()(images)  # a training step's: the observer moves, then quantises with what it saw
    assert logits.requires_grad and on_the_grid(logits)
    regions = ModelOutputs(student, (1, 2), ()).eval()(images)[REGIONS]  # every region through the quantised head
    assert regions.shape == (16, 5, CLASSES) and on_the_grid(regions)
    scale = float(output_quantiser(student).scale)
    float_network = create_model("resnet8", num_classes=CLASSES)
    float_network.load_state_dict(student.float_state())  # model.pt: the same weights without fake quantisation
    student.eval()
    with torch.no_grad():
        fake, plain, int8 = student(images), float_network.eval()(images), convert_int8(student)(images)
    assert (fake - plain).abs().max() > scale / 4  # quantisation changes the logits the loss sees
    # the int8 kernels round as fake quantisation does, up to the order of sums and the int32 bias: a value on a
    # rounding edge flips a step and the flip travels through the layers. Measured over 256 random images: 1.4
    # steps of the output grid on average, 6 at most; the bound here is 2 on average, 10 at most
    steps = (fake - int8).abs() / scale
    assert steps.mean() <= 2 and steps.max() <= 10


def test_eval_mode_freezes_the_quantisation_parameters_the_int8_model_is_converted_with(trained):
    student, images = copy.deepcopy(trained)
    ranges = ("scale", "zero_point", "min_val", "max_val")
    before = {key: value.clone() for key, value in student.state_dict().items() if key.endswith(ranges)}
    with torch.no_grad():
        student.eval()(images * 10)  # test images far outside the training range change no observer
    assert len(before) > 40 and all(torch.equal(value, student.state_dict()[key]) for key, value in before.items())
    with torch.no_grad():
        student.train()(images * 10)  # while training, they observe
    assert not all(torch.equal(value, student.state_dict()[key]) for key, value in before.items())


def test_a_qat_distill_exports_an_int8_model_reported_beside_the_fake_quantised_one(finished, data):
    runs = finished
    folder = runs[0].folder
    last = last_row(folder)
    sidecar = json.loads((folder / "model.json").read_text())
    assert last["test_acc_int8"] == sidecar["test_acc_int8"] == runs[0].test_acc_int8
    assert last["test_acc"] == sidecar["test_acc"] == runs[0].test_acc  # the fake-quantised student's
    assert f"int8 {runs[0].test_acc_int8:.4f}" in epoch_line("r", 1, 2, {**last_row(folder), "epoch": 2})
    table = summary_table(runs)
    assert "int8" in table.splitlines()[0] and f"{100 * runs[0].test_acc_int8:.2f}%" in table.splitlines()[1]
    # model_int8.pt is the int8 state, weights only (data); the TorchScript beside it is a program for deployment
    assert not is_torchscript(folder / INT8_FILE) and is_torchscript(folder / TORCHSCRIPT_FILE)
    assert any(value.is_quantized for value in torch.load(folder / INT8_FILE, weights_only=True)["model"].values()
               if isinstance(value, torch.Tensor))
    record = json.loads((folder / "model_int8.json").read_text())
    assert record["int8"] == {"scheme": "int8", "backend": quantised_engine(), "input_shape": list(data[1].images.shape[1:])}
    int8 = rebuild_int8(create_model("resnet8", num_classes=CLASSES), record["int8"], folder / INT8_FILE, "record")
    student = create_model("resnet8", num_classes=CLASSES)
    student.load_state_dict(torch.load(folder / "model.pt", weights_only=True)["model"])
    resumable = torch.load(folder / "last.pt", weights_only=True)["model"]
    assert any("activation_post_process" in key for key in resumable)  # the observers, for --resume
    test = data[1]
    images = normalize(test.images, test.mean, test.std)
    with torch.no_grad():
        predicted = int8(images).argmax(-1)
        assert torch.equal(torch.jit.load(folder / TORCHSCRIPT_FILE)(images), int8(images))  # the same program
    assert (predicted == test.labels).float().mean().item() == runs[0].test_acc_int8
    # the fake-quantised model as last.pt holds it predicts the same class on at least 90 % of the test images
    fake = QuantisedStudent(create_model("resnet8", num_classes=CLASSES), images[:2])
    fake.load_state_dict(resumable)
    with torch.no_grad():
        agree = (fake.eval()(images).argmax(-1) == predicted).float().mean().item()
    assert agree >= 0.9


@pytest.fixture
def evaluated_on_test(data, monkeypatch):
    """`kdcache eval` on the synthetic test split (its description keeps no sizes to load it again by)."""
    monkeypatch.setattr("kdcache.stages.evaluate._split_of", lambda *args: data[1])


def test_eval_rebuilds_the_int8_model_from_its_weights_and_never_runs_the_torchscript(finished, tmp_path, capsys,
                                                                                      evaluated_on_test):
    folder = tmp_path / "run"
    shutil.copytree(finished[0].folder, folder)
    (folder / TORCHSCRIPT_FILE).write_bytes(b"not a program")  # never read: eval rebuilds from the weights
    for given in (folder, folder / INT8_FILE):  # a --qat run folder means its int8 model
        code, out, err = run_cli(["eval", given, "--json"], capsys)
        assert code == 0 and not err, err  # no warning of torch's rebuilding either
        found = json.loads(out)
        assert found["top1"] == finished[0].test_acc_int8
        assert found["checkpoint"] == str(folder / INT8_FILE) and found["model"] == "resnet8 (int8)"


def test_a_torchscript_file_given_to_eval_is_refused_without_running_it(finished, capsys):
    path = finished[0].folder / TORCHSCRIPT_FILE
    code, _, err = run_cli(["eval", path], capsys)
    assert code == 2 and err.strip() == (f"kdcache: error: eval: {path} is TorchScript, a program, which kdcache "
                                         f"never runs (data is never code); pass the --qat run folder it came from "
                                         f"(eval rebuilds the int8 model from its weights-only {INT8_FILE}), or run "
                                         f"it yourself with torch.jit.load")


class Payload:
    """Unpickling this runs a command: what a tampered state file would do if it were loaded as a pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("damage, message", [
    ("payload", "holds the Python object "),
    ("truncated", "is truncated or corrupt"),
    ("missing", "is a --qat run folder without model_int8.pt"),
    ("record", "its \"int8\" record should name a scheme"),
    ("spec", "names the model 'python:os:system': a python: spec imports and runs the code it names"),
])
def test_a_tampered_int8_state_is_refused_in_one_line_naming_it(damage, message, finished, tmp_path, capsys,
                                                                evaluated_on_test):
    folder, marker = tmp_path / "run", tmp_path / "ran"
    shutil.copytree(finished[0].folder, folder)
    state = folder / INT8_FILE
    if damage == "payload":
        torch.save({"model": Payload(marker)}, state)
    elif damage == "truncated":
        state.write_bytes(state.read_bytes()[:1000])
    elif damage == "missing":
        state.unlink()
    else:  # model_int8.json: a record kdcache cannot rebuild from, or a spec naming code
        sidecar = folder / "model_int8.json"
        changed = {"int8": {"scheme": "int4"}} if damage == "record" else {"arch": "python:os:system"}
        sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), **changed}))
    code, _, err = run_cli(["eval", folder], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert str(folder) in err and not marker.exists()
    code, _, err = run_cli(["eval", folder, "--device", "cuda"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_a_resumed_qat_run_continues_its_observers_and_ends_as_an_uninterrupted_one(finished, cache, data, tmp_path):
    whole = finished[0]
    interrupted_after_first_epoch(monkeypatch := pytest.MonkeyPatch(), lambda: distill_sweep(
        qat_config(cache, tmp_path / "parts"), show_progress=False, data=data))
    monkeypatch.undo()
    resumed = distill_sweep(qat_config(cache, tmp_path / "parts", resume=True), show_progress=False, data=data)[0]
    assert (resumed.test_acc, resumed.test_acc_int8) == (whole.test_acc, whole.test_acc_int8)
    ends = [torch.load(run.folder / "last.pt", weights_only=True)["model"] for run in (whole, resumed)]
    assert ends[0].keys() == ends[1].keys() and all(torch.equal(ends[0][key], ends[1][key]) for key in ends[0])


# a distilled ViT with a distillation token (DeiT's losses read its head), tiny
TINY_DEIT = "timm:deit_tiny_distilled_patch16_224,img_size=32,patch_size=8,embed_dim=32,depth=1,num_heads=2"


@pytest.mark.parametrize("student, flags, message", [
    ("resnet8", ["--qat", "int4"], "kdcache: error: --qat: unknown scheme 'int4'; known: int8"),
    ("resnet8", ["--qat", "int8", "--loss", "rkd"],
     "kdcache: error: --qat int8: loss rkd reads the student's embedding, which"),
    (TINY_DEIT, ["--qat", "int8", "--loss", "deit-hard"],
     "kdcache: error: --qat int8: loss deit-hard reads the student's distillation, which its quantised graphs"),
    ("resnet8", ["--qat", "int8", "--precision", "bf16"], "kdcache: error: --precision bf16: --qat int8 computes "),
])
def test_what_qat_cannot_do_is_refused_in_one_line(student, flags, message, tmp_path, capsys):
    code, _, err = run_cli(["distill", "--ema-teacher", "0.9", "--student", student, "--epochs", "1",
                            "--out", tmp_path, "--device", "cpu", *flags], capsys)
    assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_a_student_fx_cannot_trace_is_refused_naming_it_and_why():
    class Branching(torch.nn.Module):
        arch = "python:tests:branching"

        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, CLASSES)

        def forward_features(self, images):
            return images if images.sum() > 0 else -images  # control flow on values: no graph

        def forward_head(self, features, pre_logits=False):
            return self.fc(features.mean((2, 3)))

    with pytest.raises(KdcacheError, match=r"--qat int8: torch.fx cannot trace python:tests:branching"
                                           r".forward_features\(\) \(.*\); quantisation-aware training needs a "
                                           r"traceable student"):
        QuantisedStudent(Branching(), torch.randn(2, 3, 8, 8))


def test_a_student_without_forward_features_and_forward_head_is_refused_naming_them():
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, CLASSES))
    with pytest.raises(KdcacheError, match=r"^--qat int8: Sequential has no forward_features\(\) and forward_head\(\), "
                                           r"whose graphs are quantised"):
        QuantisedStudent(plain, torch.randn(2, 3, 8, 8))
