"""Students start where people start them (issue 32, point 3): from a local weights file, its head replaced when the
class count differs; a pretrained tag without weights trains from fresh ones, said in a line; a student that gives
another class count is refused before training."""

import logging

import pytest
import torch

from console import run_cli
from kdcache.config import DistillConfig
from kdcache.errors import KdcacheError
from kdcache.models import create_model, head_parameters, load_student_weights, save_checkpoint
from kdcache.stages.distill import _student_model

IMAGES = torch.randn(2, 3, 32, 32)


def saved(folder, spec, num_classes, seed=1):
    """A model of `spec` with the random weights of `seed`, saved as a .pt; returns (model, path)."""
    torch.manual_seed(seed)
    model = create_model(spec, num_classes=num_classes)
    path = folder / f"{spec}-{num_classes}.pt"
    save_checkpoint(path, model)
    return model, path


def test_the_head_is_the_layer_that_gives_the_logits():
    assert head_parameters(create_model("resnet8", num_classes=10), 10) == ["fc.weight", "fc.bias"]
    assert head_parameters(create_model("timm:resnet18", num_classes=7), 7) == ["fc.weight", "fc.bias"]
    assert head_parameters(create_model("torchvision:mobilenet_v3_small", num_classes=7), 7) == \
        ["classifier.3.weight", "classifier.3.bias"]


def test_a_checkpoint_of_another_class_count_starts_all_but_the_head(tmp_path, caplog):
    source, path = saved(tmp_path, "resnet8", num_classes=100)
    torch.manual_seed(2)
    config = DistillConfig(students=("resnet8",), student_checkpoint=str(path))
    with caplog.at_level(logging.WARNING, logger="kdcache.stages.distill"):
        student = _student_model(config, "resnet8", 10, IMAGES)
    fresh = create_model("resnet8", num_classes=10).state_dict()  # shapes only
    for name, value in student.state_dict().items():
        if name in ("fc.weight", "fc.bias"):
            assert value.shape == fresh[name].shape and not torch.equal(value[:1], source.state_dict()[name][:1])
        else:
            assert torch.equal(value, source.state_dict()[name]), name
    assert "its head (fc.weight, fc.bias) replaced by a fresh one for 10 classes" in caplog.text


def test_a_checkpoint_of_the_same_class_count_loads_whole(tmp_path, caplog):
    source, path = saved(tmp_path, "resnet8", num_classes=10)
    with caplog.at_level(logging.WARNING):
        student = _student_model(DistillConfig(student_checkpoint=str(path)), "resnet8", 10, IMAGES)
    assert all(torch.equal(value, source.state_dict()[name]) for name, value in student.state_dict().items())
    assert "replaced" not in caplog.text


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
    _, path = saved(tmp_path, "resnet20", num_classes=10)
    with pytest.raises(KdcacheError, match=r"does not fit resnet8: the file has .* parameters the model lacks"):
        _student_model(DistillConfig(student_checkpoint=str(path)), "resnet8", 10, IMAGES)


def test_a_pretrained_tag_without_weights_trains_fresh_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="kdcache.stages.distill"):
        _student_model(DistillConfig(), "timm:resnet18.a1_in1k", 10, IMAGES)
    assert "timm:resnet18.a1_in1k names pretrained weights, which kdcache never downloads: the student starts " \
           "from fresh weights" in caplog.text and "--student-checkpoint" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdcache.stages.distill"):
        _student_model(DistillConfig(), "timm:resnet18", 10, IMAGES)
    assert caplog.text == ""


def test_a_student_of_another_class_count_is_refused_before_training(tmp_path, monkeypatch, digits_cache, capsys):
    (tmp_path / "fixed_head.py").write_text("from kdcache.models import create_model\n\n"
                                            "def net():\n    return create_model('resnet8', num_classes=3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(KdcacheError, match=r"student python:fixed_head:net predicts 3 classes but this run's data has "
                                           r"10: a factory should take num_classes="):
        _student_model(DistillConfig(), "python:fixed_head:net", 10, IMAGES)
    code, _, err = run_cli(["distill", "--cache", digits_cache, "--student", "python:fixed_head:net", "--loss", "kd",
                            "--epochs", 1, "--out", tmp_path / "runs", "--device", "cpu"], capsys)
    assert code == 2 and "predicts 3 classes" in err and err.count("\n") == 1
    assert not list((tmp_path / "runs").rglob("metrics.csv"))  # not one epoch was trained


def test_distill_starts_the_student_from_a_weights_file(tmp_path, digits_cache, capsys):
    source, path = saved(tmp_path, "resnet8", num_classes=100)
    code, _, err = run_cli(["distill", "--cache", digits_cache, "--student", "resnet8", "--student-checkpoint", path,
                            "--loss", "kd", "--epochs", 1, "--batch-size", 256, "--lr", 1e-9, "--out", tmp_path / "runs",
                            "--device", "cpu"], capsys)
    assert code == 0, err
    trained = torch.load(tmp_path / "runs" / "resnet8-kd" / "model.pt", weights_only=True)["model"]
    # at a learning rate of 1e-9 the convolutions are still the file's (BatchNorm's statistics move, its weights not)
    assert torch.allclose(trained["conv1.weight"], source.state_dict()["conv1.weight"], atol=1e-6)
    code, _, err = run_cli(["distill", "--cache", digits_cache, "--student", "resnet8", "--student", "resnet20",
                            "--student-checkpoint", path, "--out", tmp_path / "runs2"], capsys)
    assert code == 2 and "--student-checkpoint: one file starts one student spec" in err
