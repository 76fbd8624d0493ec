"""Model specs (kdcache names, timm:, torchvision:, python:), weights from .pt, .safetensors and run folders, and a
timm teacher and student end to end through the CLI."""

import json
import sys

import numpy as np
import pytest
import torch
from console import run_cli
from safetensors.torch import save_file
from torch import nn

from kdcache.cache import open_cache, verify
from kdcache.data import get_policy, load_dataset, normalize
from kdcache.errors import KdcacheError
from kdcache.models import (
    LogitMap,
    create_model,
    list_models,
    load_checkpoint,
    load_teacher,
)

pytest.importorskip("timm")

FACTORY_MODULE = '''
from torch import nn

class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward_features(self, x):
        return self.conv(x).relu()

    def forward_head(self, features, pre_logits=False):
        pooled = features.mean((2, 3))
        return pooled if pre_logits else self.fc(pooled)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

def make_net(num_classes=100):
    return Net(num_classes)

def make_plain():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 7))

def make_nothing():
    return 42
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """An importable module of the user's own factories."""
    (tmp_path / "my_models.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_models"
    sys.modules.pop("my_models", None)


def _refusal(call, *args, **kwargs) -> str:
    with pytest.raises(KdcacheError) as caught:
        call(*args, **kwargs)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_each_spec_form_makes_its_model_and_names_it(user_module):
    assert type(create_model("resnet8", 10)).__module__ == "kdcache.models.resnet"
    timm_model = create_model("timm:resnet10t", 10)
    assert type(timm_model).__module__.startswith("timm.") and timm_model.arch == "timm:resnet10t"
    assert create_model("timm:resnet10t.c3_in1k", 10).get_classifier().out_features == 10  # a pretrained tag
    vision = create_model("torchvision:shufflenet_v2_x0_5", 10)
    assert vision.fc.out_features == 10 and vision.arch == "torchvision:shufflenet_v2_x0_5"
    own = create_model(f"python:{user_module}:make_net", 5)
    assert own.fc.out_features == 5 and own.arch == f"python:{user_module}:make_net"
    assert create_model(f"python:{user_module}:make_plain", 5)[1].out_features == 7  # num_classes not accepted


def test_a_bad_spec_is_one_line_naming_scheme_lookup_and_what_exists(user_module, monkeypatch):
    assert _refusal(create_model, "hub:resnet18").startswith("model spec 'hub:resnet18': unknown source 'hub'; a "
                                                             "model is named as NAME (kdcache's registry), timm:NAME")
    message = _refusal(create_model, "timm:convnext_atoo")
    assert message.startswith("model spec 'timm:convnext_atoo': timm has no model 'convnext_atoo'; close names: "
                              "convnext_atto, ")
    assert message.endswith(" (`kdcache models --source timm PATTERN` lists them)")
    assert "timm has no model 'resnet10t.no_such_tag'" in _refusal(create_model, "timm:resnet10t.no_such_tag")
    assert _refusal(create_model, "torchvision:resnet_18").startswith(
        "model spec 'torchvision:resnet_18': torchvision has no model 'resnet_18'; close "
        "names: resnet18")
    assert "cannot import module 'nowhere'" in _refusal(create_model, "python:nowhere:make")
    assert _refusal(create_model, f"python:{user_module}:make_it") == (
        f"model spec 'python:{user_module}:make_it': module '{user_module}' has no callable 'make_it'; it has: Net, "
        "make_net, make_nothing, make_plain")
    assert "expected python:module.path:callable" in _refusal(create_model, f"python:{user_module}")
    assert "made a int; expected a torch.nn.Module" in _refusal(create_model, f"python:{user_module}:make_nothing")
    monkeypatch.setitem(sys.modules, "timm", None)  # timm not installed
    assert _refusal(create_model, "timm:resnet10t") == (
        'timm: models named timm:NAME need timm; install it with pip install "kdcache[timm]" (or pip install timm)')


def test_pretrained_weights_are_never_downloaded():
    message = _refusal(create_model, "timm:resnet10t", pretrained=True)
    assert "kdcache never downloads weights" in message and "pass it with --checkpoint" in message


def test_listing_by_source():
    assert list_models("resnet8*") == ["resnet8", "resnet8x4"]
    assert list_models("convnext_at*", source="timm") == ["timm:convnext_atto", "timm:convnext_atto_ols",
                                                           "timm:convnext_atto_rms"]
    assert list_models("shufflenet*", source="torchvision") == [
        f"torchvision:shufflenet_v2_x{width}" for width in ("0_5", "1_0", "1_5", "2_0")]


def test_weights_from_pt_safetensors_and_run_folders_give_the_same_model(tmp_path):
    torch.manual_seed(0)
    source = create_model("timm:resnet10t", 10).eval()
    state = source.state_dict()
    torch.save(state, tmp_path / "w.pth")
    save_file(state, tmp_path / "w.safetensors")
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": state}, run / "model.pt")
    (run / "model.json").write_text(json.dumps({"arch": "timm:resnet10t"}))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source(images)
        for weights in ("w.pth", "w.safetensors"):
            loaded = load_checkpoint(tmp_path / weights, create_model("timm:resnet10t", 10)).eval()
            torch.testing.assert_close(loaded(images), expected, rtol=0, atol=0)
        teacher, info = load_teacher(run, None, 10)  # the spec from the run's sidecar
        torch.testing.assert_close(teacher(images), expected, rtol=0, atol=0)
    assert info["arch"] == "timm:resnet10t" and info["checkpoint"] == str(run / "model.pt")


def test_a_damaged_safetensors_file_is_one_line(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"weight": torch.ones(4, 4)}, path)
    path.write_bytes(path.read_bytes()[:-9])
    assert _refusal(load_checkpoint, path, nn.Linear(4, 4)).startswith(
        f"checkpoint {path} is truncated or corrupt (not a readable safetensors file")


def test_weights_of_another_class_count_name_the_parameter(tmp_path):
    save_file(create_model("timm:resnet10t", 1000).state_dict(), tmp_path / "w.safetensors")
    assert "does not fit timm:resnet10t: fc.weight has shape [1000, 512] in the file but [10, 512]" in \
        _refusal(load_checkpoint, tmp_path / "w.safetensors", create_model("timm:resnet10t", 10))


def test_a_users_model_with_only_forward_serves_scales_1(user_module):
    model = create_model(f"python:{user_module}:make_plain", 7)
    assert "has no forward_features() and forward_head()" in _refusal(LogitMap, model, (1, 2))
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(LogitMap(model, (1,))(images)[:, 0], model(images))


TEACHER, OTHER, STUDENT = "timm:convnext_atto", "timm:convnext_femto", "timm:mobilenetv3_small_050"


def _cli(capsys, *argv):
    code, out, err = run_cli([*argv, "--device", "cpu"], capsys)
    assert code == 0, err
    return out


def _refused(capsys, *argv) -> str:
    code, _, err = run_cli([*argv, "--device", "cpu"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.slow
def test_a_timm_teacher_and_student_end_to_end_through_the_cli(tmp_path, capsys):
    torch.manual_seed(0)
    save_file(create_model(TEACHER, 10).state_dict(), tmp_path / "teacher.safetensors")
    _cli(capsys, "dump-teacher", "--teacher", TEACHER, "--checkpoint", tmp_path / "teacher.safetensors",
         "--dataset", "digits", "--views", 2, "--scales", "1,2", "--out", tmp_path / "c.zarr")

    teacher = load_checkpoint(tmp_path / "teacher.safetensors", create_model(TEACHER, 10)).eval()
    data, policy = load_dataset("digits", split="train"), get_policy("cifar", image_size=(32, 32))
    with open_cache(tmp_path / "c.zarr") as cache:
        assert cache.spec.teacher["arch"] == TEACHER and cache.spec.head == "nonlinear"
        assert verify(cache) == []
        for view in range(2):  # the cache is the live teacher on the replayed views, fp16 aside
            params = torch.from_numpy(cache.aug_params(view)).long()
            with torch.no_grad():
                live = LogitMap(teacher, (1, 2))(normalize(policy.apply(data.images, params), data.mean, data.std))
            np.testing.assert_allclose(cache.view(view).astype(np.float32), live.numpy(), rtol=0,
                                       atol=2 ** -10 * float(live.abs().max()))
    code, out, _ = run_cli(["inspect", tmp_path / "c.zarr"], capsys)
    assert code == 0 and "verify's self-check: skipped: the teacher's head is not affine after pooling" in out

    _cli(capsys, "distill", "--cache", tmp_path / "c.zarr", "--pair", f"{STUDENT}:sdd-lskd", "--epochs", 1,
         "--batch-size", 256, "--out", tmp_path / "s")
    run = tmp_path / "s" / "timm_mobilenetv3_small_050-sdd-lskd"
    assert json.loads((run / "model.json").read_text())["arch"] == STUDENT

    # another spec, or other weights of the same spec, are refused naming both
    err = _refused(capsys, "distill", "--cache", tmp_path / "c.zarr", "--teacher", OTHER, "--student", STUDENT,
                   "--epochs", 1, "--out", tmp_path / "s2")
    assert f"teacher.arch {TEACHER} but this run has {OTHER}" in err
    save_file(create_model(TEACHER, 10).state_dict(), tmp_path / "other.safetensors")
    err = _refused(capsys, "distill", "--cache", tmp_path / "c.zarr", "--live-teacher", tmp_path / "other.safetensors",
                   "--teacher", TEACHER, "--student", STUDENT, "--epochs", 1, "--out", tmp_path / "s2")
    assert "teacher.checkpoint_sha256" in err and "but this run has" in err

    # a run folder serves as --checkpoint (its spec read from the sidecar) and as --live-teacher
    _cli(capsys, "dump-teacher", "--checkpoint", run, "--dataset", "digits", "--views", 1, "--scales", "1,2",
         "--out", tmp_path / "from-run.zarr")
    with open_cache(tmp_path / "from-run.zarr") as cache:
        assert cache.spec.teacher["arch"] == STUDENT and cache.spec.head == "nonlinear"
    out = _cli(capsys, "distill", "--live-teacher", run, "--dataset", "digits", "--student", "resnet8", "--loss", "kd",
               "--epochs", 1, "--batch-size", 256, "--out", tmp_path / "online")
    assert "resnet8-kd" in out


def _cache_with_cells_that_do_not_average(path, head):
    """A finished 8-sample cache, scales 1,2 on a 2×2 map, whose cells do not average to region 0."""
    from kdcache.cache import CacheSpec, CacheWriter

    dataset = {"name": "synthetic", "split": "train", "num_samples": 8, "image_shape": [3, 8, 8], "num_classes": 2,
               "mean": [0.5] * 3, "std": [0.5] * 3, "fingerprint": "0" * 64}
    teacher = {"arch": "timm:convnext_atto", "num_classes": 2, "checkpoint_sha256": "0" * 64, "precision": "float32",
               "feature_map": [2, 2], **({"head": head} if head else {})}
    spec = CacheSpec(teacher=teacher, dataset=dataset, augmentation={"name": "none", "param_names": []},
                     num_views=1, exhaustive=False, seed=0, scales=(1, 2), block_size=8)
    logits = np.zeros((8, 5, 2), np.float16)
    logits[:, 0, 0] = 4.0  # region 0 says class 0 strongly; the cells average to 0
    with CacheWriter.open(path, spec, np.zeros(8, np.int64), np.zeros((1, 8, 0), np.int32)) as writer:
        writer.write_block(0, 0, {"logits": logits}, 8)
        writer.finish()
    return path


@pytest.mark.parametrize(("head", "checked"), [("linear", True), (None, True), ("nonlinear", False), ("token", False)])
def test_verify_checks_the_mean_of_the_cells_only_for_a_linear_head(tmp_path, head, checked):
    from kdcache.cache.verify import self_check_scope

    path = _cache_with_cells_that_do_not_average(tmp_path / "c.zarr", head)
    with open_cache(path) as cache:
        problems = [str(problem) for problem in verify(cache)]
        scope = self_check_scope(cache)
    if checked:  # a cache written before the head kind was recorded had a linear head
        assert len(problems) == 1 and "region 0 differs from the mean of the scale-2 cells" in problems[0]
        assert scope == ([2], "region 0 = the mean of the scale 2 cells (a linear head)")
    else:
        assert problems == [] and scope[0] == [] and scope[1].startswith("skipped: the teacher")
