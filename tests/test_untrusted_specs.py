"""A run folder is data, never code (issue 29, points 1 and 8): a spec read from a file kdcache finds names no code
to import; a factory that needs arguments and a tensor of a dtype that is no float weight are each one line."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from console import run_cli
from kdcache.errors import KdcacheError
from kdcache.models import create_model, load_checkpoint, load_teacher, save_checkpoint

PAYLOAD = "import pathlib\npathlib.Path('{marker}').write_text('ran')\n\ndef net(num_classes=10):\n" \
          "    from kdcache.models import create_model\n    return create_model('resnet8', num_classes=num_classes)\n"


@pytest.fixture
def downloaded_run(tmp_path):
    """A run folder as someone else might ship it: weights, a model.json naming python:payload:net, and payload.py
    beside them, which writes a marker file when it is imported."""
    folder = tmp_path / "downloaded"
    folder.mkdir()
    save_checkpoint(folder / "model.pt", create_model("resnet8", num_classes=10))
    (folder / "model.json").write_text(json.dumps({"arch": "python:payload:net", "num_classes": 10}))
    (folder / "payload.py").write_text(PAYLOAD.format(marker=tmp_path / "ran.txt"))
    return folder


def test_a_python_spec_in_a_run_folder_is_refused_and_its_code_never_runs(downloaded_run, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(downloaded_run))  # as python -m kdcache started from that folder has it
    with pytest.raises(KdcacheError) as refused:
        load_teacher(downloaded_run, None, 10)
    message = str(refused.value)
    assert message == (f"{downloaded_run / 'model.json'} names the model 'python:payload:net': a python: spec imports "
                       f"and runs the code it names, so kdcache takes one only from you, never from a file it finds; "
                       f"if you trust that code, pass --teacher python:payload:net yourself (on the command line, or "
                       f"in a --config file you name)")
    assert not (tmp_path / "ran.txt").exists() and "payload" not in sys.modules


def test_python_m_kdcache_started_from_the_folder_runs_none_of_its_code(downloaded_run, tmp_path):
    # python -m puts the working directory first on sys.path: payload.py would be importable
    done = subprocess.run([sys.executable, "-m", "kdcache", "dump-teacher", "--checkpoint", ".", "--dataset", "digits",
                           "--out", str(tmp_path / "c.zarr"), "--device", "cpu"], cwd=downloaded_run,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "names the model 'python:payload:net'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ran.txt").exists()


def test_a_python_spec_in_a_run_folder_names_os_functions_too(downloaded_run):
    (downloaded_run / "model.json").write_text(json.dumps({"arch": "python:os:getpid"}))
    with pytest.raises(KdcacheError, match="names the model 'python:os:getpid': a python: spec imports and runs"):
        load_teacher(downloaded_run, None, 10)


def test_the_same_spec_typed_by_the_user_is_imported(downloaded_run, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(downloaded_run))
    model, info = load_teacher(downloaded_run, "python:payload:net", 10)
    assert info["arch"] == "python:payload:net" and (tmp_path / "ran.txt").read_text() == "ran"
    sys.modules.pop("payload", None)


def test_a_registry_timm_or_torchvision_spec_in_a_run_folder_is_taken(tmp_path):
    for spec in ("resnet8", "timm:resnet18", "torchvision:resnet18"):
        folder = tmp_path / spec.replace(":", "_")
        folder.mkdir()
        save_checkpoint(folder / "model.pt", create_model(spec, num_classes=4))
        (folder / "model.json").write_text(json.dumps({"arch": spec}))
        assert load_teacher(folder, None, 4)[1]["arch"] == spec


def test_a_factory_that_needs_arguments_is_one_line(tmp_path, capsys):
    with pytest.raises(KdcacheError) as refused:
        create_model("python:timm:create_model", num_classes=10)
    assert str(refused.value) == (
        "model spec 'python:timm:create_model': kdcache calls it as create_model(num_classes=N), which it refuses "
        "(missing a required argument: 'model_name'); name a factory that builds the model from num_classes alone "
        "(a function of your own around it)")
    code, _, err = run_cli(["train-teacher", "--model", "python:timm:create_model", "--epochs", 1, "--out",
                            tmp_path], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


def test_a_checkpoint_refusal_in_dump_teacher_names_teacher_not_model(tmp_path, capsys):
    save_checkpoint(tmp_path / "t.pt", create_model("resnet8", num_classes=10))
    code, _, err = run_cli(["dump-teacher", "--checkpoint", tmp_path / "t.pt", "--teacher", "resnet20", "--out",
                            tmp_path / "c.zarr", "--device", "cpu"], capsys)
    assert code == 2 and "pass the --teacher it was trained with" in err and "--model" not in err


def weights_with(model, name, tensor, path):
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    state[name] = tensor
    save_file(state, path)
    return path


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8, torch.float8_e4m3fn])
def test_a_tensor_that_is_no_float_weight_is_refused_by_its_name(tmp_path, dtype):
    model = create_model("resnet8", num_classes=10)
    weight = model.state_dict()["fc.weight"]
    path = weights_with(model, "fc.weight", weight.to(dtype), tmp_path / "w.safetensors")
    with pytest.raises(KdcacheError) as refused:
        load_checkpoint(path, create_model("resnet8", num_classes=10))
    assert str(refused.value).startswith(f"checkpoint {path}: tensor fc.weight is {str(dtype)[6:]} but the model's "
                                         f"fc.weight is float32; kdcache casts float weights between float16, bfloat16, "
                                         f"float32 and float64 only")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_float_weights_of_another_width_are_cast(tmp_path, dtype):
    model = create_model("resnet8", num_classes=10)
    state = {key: (value.to(dtype) if value.is_floating_point() else value).contiguous()
             for key, value in model.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    loaded = load_checkpoint(tmp_path / "w.safetensors", create_model("resnet8", num_classes=10))
    for key, value in loaded.state_dict().items():
        assert value.dtype == model.state_dict()[key].dtype
        torch.testing.assert_close(value, state[key].to(value.dtype), rtol=0, atol=0)


def test_a_float_for_an_integer_buffer_is_refused(tmp_path):
    model = create_model("resnet8", num_classes=10)
    path = weights_with(model, "bn1.num_batches_tracked", torch.tensor(3.5), tmp_path / "w.safetensors")
    with pytest.raises(KdcacheError, match="tensor bn1.num_batches_tracked is float32 but the model's "
                                           "bn1.num_batches_tracked is int64"):
        load_checkpoint(path, create_model("resnet8", num_classes=10))
