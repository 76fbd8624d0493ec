"""Checkpoints: the layouts people have load, wrong and unsafe files give one clear line, saves are atomic."""

import hashlib
import os
import pickle
import random
from collections import OrderedDict

import pytest
import torch
from torch import nn

from kdcache.errors import KdcacheError
from kdcache.models import create_model, file_sha256, load_checkpoint, save_checkpoint


def _trained_like(name: str, num_classes: int = 100) -> nn.Module:
    """A model whose every tensor, buffers included, differs from a fresh one's."""
    model = create_model(name, num_classes=num_classes)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randint_like(tensor, 1, 9) if tensor.dtype == torch.long else torch.rand_like(tensor))
    return model


def _assert_same_state(loaded: nn.Module, source: nn.Module) -> None:
    expected = source.state_dict()
    actual = loaded.state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def _refusal(path, model: nn.Module | None = None) -> str:
    """The message of the KdcacheError that loading `path` raises; it must be one line."""
    with pytest.raises(KdcacheError) as caught:
        load_checkpoint(path, model or create_model("resnet8"))
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "wrap",
    [
        lambda state: state,
        lambda state: {"model": state, "epoch": 240, "best_acc": torch.tensor(73.2)},  # mdistiller's teachers
        lambda state: {"state_dict": state},
        lambda state: {"model": {f"module.{name}": tensor for name, tensor in state.items()}},  # DataParallel
        lambda state: OrderedDict((f"module.{name}", tensor) for name, tensor in state.items()),
    ],
    ids=["bare", "under-model", "under-state_dict", "module-prefix", "bare-module-prefix"],
)
def test_loads_the_layouts_people_have(tmp_path, wrap):
    source = _trained_like("resnet8")
    path = tmp_path / "teacher.pth"
    torch.save(wrap(source.state_dict()), path)
    model = create_model("resnet8")
    assert load_checkpoint(path, model) is model
    _assert_same_state(model, source)


def test_loads_a_file_without_batchnorm_counters(tmp_path):
    source = _trained_like("resnet8")
    state = {name: tensor for name, tensor in source.state_dict().items() if not name.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    model = load_checkpoint(tmp_path / "old.pth", create_model("resnet8"))
    torch.testing.assert_close(model.bn1.weight, source.bn1.weight)


def test_save_then_load_round_trips_with_extras(tmp_path):
    source = _trained_like("wrn_16_2")
    path = tmp_path / "runs" / "teacher.pt"
    save_checkpoint(path, source, arch="wrn_16_2", epoch=3, config={"lr": 0.05, "scales": [1, 2, 4]}, acc=None)
    _assert_same_state(load_checkpoint(path, create_model("wrn_16_2")), source)
    content = torch.load(path, weights_only=True)
    assert content["arch"] == "wrn_16_2" and content["epoch"] == 3 and content["acc"] is None
    assert content["config"] == {"lr": 0.05, "scales": [1, 2, 4]}
    assert os.listdir(path.parent) == ["teacher.pt"]


def test_save_accepts_a_state_dict_and_replaces_the_old_file(tmp_path):
    path = tmp_path / "t.pt"
    save_checkpoint(path, create_model("resnet8").state_dict())
    source = _trained_like("resnet8")
    save_checkpoint(path, source.state_dict())
    _assert_same_state(load_checkpoint(path, create_model("resnet8")), source)


def test_save_refuses_objects_that_would_not_load_weights_only_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "t.pt"
    save_checkpoint(path, create_model("resnet8"), epoch=1)
    before = path.read_bytes()
    with pytest.raises(TypeError, match=r"checkpoint\['config'\]\['when'\] is a object"):
        save_checkpoint(path, create_model("resnet8"), config={"when": object()})
    with pytest.raises(TypeError, match="'model' is the state dict's key"):
        save_checkpoint(path, create_model("resnet8"), model={})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["t.pt"]


def test_wrong_class_count_names_the_parameter_and_both_shapes(tmp_path):
    path = tmp_path / "t.pt"
    save_checkpoint(path, create_model("resnet8x4", num_classes=10))
    assert _refusal(path, create_model("resnet8x4")) == (
        f"checkpoint {path} does not fit resnet8x4: fc.weight has shape [10, 256] in the file but [100, 256] "
        "in the model; load it into the model and class count it was trained with"
    )


def test_wrong_width_names_the_first_differing_parameter(tmp_path):
    path = tmp_path / "t.pt"
    save_checkpoint(path, create_model("resnet8"))
    assert "does not fit resnet8x4: conv1.weight has shape [16, 3, 3, 3] in the file but [32, 3, 3, 3]" in _refusal(
        path, create_model("resnet8x4")
    )


def test_missing_and_unexpected_parameters_are_named_and_counted(tmp_path):
    shallow, deep = tmp_path / "resnet8.pt", tmp_path / "resnet20.pt"
    save_checkpoint(shallow, create_model("resnet8"))
    save_checkpoint(deep, create_model("resnet20"))
    # resnet20 has two more blocks per stage: 3 × 2 × (2 convs + 2 BNs × 5 tensors) = 72 tensors, of which
    # 12 are BatchNorm counters that load_state_dict fills when missing.
    assert _refusal(shallow, create_model("resnet20")) == (
        f"checkpoint {shallow} does not fit resnet20: the file lacks layer1.1.conv1.weight and 59 more of the "
        "model's parameters; load it into the model and class count it was trained with"
    )
    assert _refusal(deep, create_model("resnet8")) == (
        f"checkpoint {deep} does not fit resnet8: the file has layer1.1.conv1.weight and 71 more parameters "
        "the model lacks; load it into the model and class count it was trained with"
    )


def test_a_model_from_outside_the_registry_is_named_by_its_class(tmp_path):
    path = tmp_path / "t.pt"
    torch.save(nn.Linear(3, 2).state_dict(), path)
    assert "does not fit Linear: weight has shape [2, 3] in the file but [4, 3]" in _refusal(path, nn.Linear(3, 4))


def test_missing_file_and_a_folder_that_is_no_run(tmp_path):
    assert _refusal(tmp_path / "nope.pt") == (
        f"checkpoint {tmp_path / 'nope.pt'} does not exist: pass a weights file (.pt, .pth or .safetensors) or a "
        "kdcache run folder"
    )
    assert _refusal(tmp_path) == (
        f"checkpoint {tmp_path} is a folder without model.pt: pass a weights file (.pt, .pth or .safetensors) or a "
        "run folder written by kdcache train-teacher or distill"
    )


@pytest.mark.parametrize("keep", [0, 10, 0.5, 0.98])
def test_truncated_file_is_refused(tmp_path, keep):
    path = tmp_path / "t.pt"
    save_checkpoint(path, create_model("resnet8"))
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    message = _refusal(path)
    assert message.startswith(f"checkpoint {path} is truncated or corrupt (")
    assert message.endswith("): copy or download it again")


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "t.pt"
    path.write_bytes(random.Random(0).randbytes(4096))
    assert _refusal(path).startswith(f"checkpoint {path} is truncated or corrupt (")


def test_a_file_without_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "t.pt"
    torch.save({"epoch": 3, "accuracy": 71.5}, path)
    assert _refusal(path) == (
        f"checkpoint {path} holds no state dict: expected a dict of tensors, bare or under 'model' or 'state_dict'"
    )


class _Exploit:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_malicious_pickle_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "exploit-ran"
    path = tmp_path / "teacher.pth"
    if writer == "torch.save":
        torch.save({"model": create_model("resnet8").state_dict(), "payload": _Exploit(marker)}, path)
    else:  # torch.load reads a bare pickle as a pre-1.6 checkpoint, whose first object it unpickles
        path.write_bytes(pickle.dumps({"payload": _Exploit(marker)}, protocol=2))
    message = _refusal(path)
    assert message.startswith(f"checkpoint {path} holds the Python object {os.system.__module__}.system, which")
    assert not marker.exists()


def test_a_pickled_module_is_refused_naming_its_class(tmp_path):
    path = tmp_path / "whole-model.pth"
    torch.save(create_model("resnet8"), path)
    assert "holds the Python object kdcache.models.resnet.ResNet" in _refusal(path)


def test_file_sha256(tmp_path):
    path = tmp_path / "t.pt"
    save_checkpoint(path, create_model("resnet8"))
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(file_sha256(str(path))) == 64
