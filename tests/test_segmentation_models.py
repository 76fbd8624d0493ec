"""Segmentation models by spec (issue 35, point 1): torchvision's and smp's, built with no weights to fetch, returning
per-pixel logits [B, C, H, W] at the input's size, and loading weights from a local file only."""

import json
import socket
import sys

import pytest
import torch
from safetensors.torch import save_file

from console import run_cli
from kdcache.errors import KdcacheError
from kdcache.models import create_model, list_models, load_checkpoint, load_teacher, save_checkpoint
from kdcache.models.dense_specs import is_segmentation_model, require_segmentation_model

smp = pytest.importorskip("segmentation_models_pytorch")

TORCHVISION_SEGMENTATION = ("fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101",
                            "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large")
UNET = "smp:Unet,encoder_name=resnet18"


class Downloaded(Exception):
    """What a download raises while `no_downloads` is in force."""


@pytest.fixture
def no_downloads(monkeypatch):
    """Every way torchvision, smp and timm fetch weights raises Downloaded, a weights file already cached
    included, and so does opening any network connection."""
    import huggingface_hub
    import timm.models._builder
    import torchvision.models._api

    def refuse(*args, **kwargs):
        raise Downloaded(f"download attempted: {args} {kwargs}")

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(smp.encoders, "hf_hub_download", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _refusal(call, *args, **kwargs) -> str:
    with pytest.raises(KdcacheError) as caught:
        call(*args, **kwargs)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_the_guard_sees_the_downloads_the_libraries_default_to(no_downloads):
    """Without weights_backbone=None and encoder_weights=None the builders fetch weights: the guard catches both."""
    import torchvision.models

    with torch.device("meta"), pytest.raises(Downloaded):
        torchvision.models.get_model("deeplabv3_mobilenet_v3_large", weights=None, num_classes=3)
    with torch.device("meta"), pytest.raises(Downloaded):
        smp.Unet(encoder_name="resnet18", classes=3)


@pytest.mark.parametrize("name", TORCHVISION_SEGMENTATION)
def test_torchvision_segmentation_models_build_without_a_download_and_return_the_logit_map(name, no_downloads):
    with torch.device("meta"):  # the shapes without the cost of initialising a ResNet-101
        model = create_model(f"torchvision:{name}", num_classes=5)
        logits = model(torch.empty(2, 3, 48, 40))
    assert logits.shape == (2, 5, 48, 40)
    assert is_segmentation_model(model) and model.num_classes == 5 and model.arch == f"torchvision:{name}"
    assert getattr(model, "aux_classifier", None) is None  # no auxiliary head computed for nothing


def test_the_adapter_returns_torchvisions_out_map_unchanged(no_downloads):
    torch.manual_seed(0)
    model = create_model("torchvision:lraspp_mobilenet_v3_large", num_classes=4).eval()
    images = torch.randn(2, 3, 32, 40)
    torchvision_class = type(model).__mro__[2]
    assert torchvision_class.__module__ == "torchvision.models.segmentation.lraspp"
    with torch.no_grad():
        logits = model(images)
        torch.testing.assert_close(logits, torchvision_class.forward(model, images)["out"], rtol=0, atol=0)
    assert logits.shape == (2, 4, 32, 40)


def test_torchvision_classifiers_are_built_as_before(no_downloads):
    with torch.device("meta"):
        classifier = create_model("torchvision:resnet18", num_classes=7)
        assert classifier(torch.empty(2, 3, 32, 32)).shape == (2, 7)
    assert not is_segmentation_model(classifier) and hasattr(classifier, "forward_head")


def test_listing_torchvisions_segmentation_models(capsys):
    assert list_models("deeplab*", source="torchvision") == [
        "torchvision:deeplabv3_mobilenet_v3_large", "torchvision:deeplabv3_resnet101", "torchvision:deeplabv3_resnet50"]
    code, out, _ = run_cli(["models", "--source", "torchvision", "*_resnet50"], capsys)
    assert code == 0 and out.splitlines()[:2] == ["torchvision:deeplabv3_resnet50", "torchvision:fcn_resnet50"]


def test_an_smp_model_builds_without_a_download_and_returns_the_logit_map(no_downloads):
    model = create_model(UNET, num_classes=3).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 64))
    assert logits.shape == (2, 3, 32, 64)
    assert is_segmentation_model(model) and model.num_classes == 3 and model.arch == UNET
    assert type(model).__mro__[2] is smp.Unet


def test_an_smp_spec_passes_numbers_booleans_and_names_to_the_constructor(no_downloads):
    fpn = create_model("smp:fpn,encoder_name=resnet18,encoder_depth=3,upsampling=1", num_classes=2).eval()
    assert len(fpn.encoder.out_channels) == 4  # the input and 3 stages: encoder_depth=3 reached it as an integer
    with torch.no_grad():
        assert fpn(torch.randn(2, 3, 32, 32)).shape == (2, 2, 32, 32)
    plain = create_model(f"{UNET},decoder_use_norm=false", num_classes=2)
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in plain.decoder.modules())


def test_an_smp_map_at_another_size_than_the_input_is_refused_in_one_line(no_downloads):
    fpn = create_model("smp:FPN,encoder_name=resnet18,encoder_depth=3", num_classes=2).eval()
    with torch.no_grad():
        message = _refusal(fpn, torch.randn(1, 3, 32, 32))
    assert message == ("smp:FPN,encoder_name=resnet18,encoder_depth=3 returned a 128x128 logit map for a 32x32 input; "
                       "a segmentation model's logits are at the input's size: choose arguments that keep it (smp's "
                       "FPN at encoder_depth=D needs upsampling=2**(D-3))")


def test_bad_smp_specs_are_one_line(monkeypatch):
    assert _refusal(create_model, "smp:Unet,encoder_weights=imagenet", 3) == (
        "model spec 'smp:Unet,encoder_weights=imagenet': kdcache builds smp's models with encoder_weights=None and "
        "downloads no weights; drop encoder_weights and pass the weights as a local file with --checkpoint")
    assert _refusal(create_model, "smp:Unett,encoder_name=resnet18", 3) == (
        "model spec 'smp:Unett,encoder_name=resnet18': segmentation-models-pytorch has no architecture 'Unett'; "
        "known: DPT, DeepLabV3, DeepLabV3Plus, FPN, Linknet, MAnet, PAN, PSPNet, Segformer, UPerNet, Unet, "
        "UnetPlusPlus")
    assert _refusal(create_model, "smp:Unet,encoder_name=resnet19", 3).startswith(
        "model spec 'smp:Unet,encoder_name=resnet19': segmentation-models-pytorch has no encoder 'resnet19'; close "
        "names: resnet18")
    assert "'classes=4' is not a new key=value (classes, in_channels and activation are kdcache's to set)" in \
        _refusal(create_model, "smp:Unet,classes=4", 3)
    assert "value '' is not a number, true or false or a name" in _refusal(create_model, "smp:Unet,encoder_name=", 3)
    assert _refusal(create_model, "smp:Unet,encoder_depth=9", 3) == (
        "model spec 'smp:Unet,encoder_depth=9': smp's Unet refused encoder_depth=9: ResNetEncoder depth should be in "
        "range [1, 5], got 9; give arguments and values its constructor takes")
    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)  # smp not installed
    hint = ('smp: models named smp:ARCH need segmentation-models-pytorch; install it with pip install "kdcache[seg]" '
            '(or pip install segmentation-models-pytorch)')
    assert _refusal(create_model, UNET, 3) == hint
    assert _refusal(list_models, "*", "smp") == hint


def test_listing_smps_architectures(capsys):
    assert list_models("unet*", source="smp") == ["smp:Unet", "smp:UnetPlusPlus"]
    code, out, _ = run_cli(["models", "--source", "smp"], capsys)
    assert code == 0 and "smp:DeepLabV3Plus" in out.splitlines() and out.splitlines()[-1].startswith("(12 smp models")
    assert "smp:ARCH,key=value" in run_cli(["models", "--help"], capsys)[1]


SPECS = (UNET, "torchvision:lraspp_mobilenet_v3_large")


@pytest.mark.parametrize("spec", SPECS)
def test_weights_from_pt_and_safetensors_give_the_same_model(spec, tmp_path, no_downloads):
    torch.manual_seed(0)
    source = create_model(spec, num_classes=3).eval()
    torch.save(source.state_dict(), tmp_path / "w.pt")
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = source(images)
        for weights in ("w.pt", "w.safetensors"):
            loaded = load_checkpoint(tmp_path / weights, create_model(spec, num_classes=3)).eval()
            torch.testing.assert_close(loaded(images), expected, rtol=0, atol=0)


@pytest.mark.parametrize("spec", (UNET, "torchvision:deeplabv3_mobilenet_v3_large"))
def test_a_run_folder_naming_a_segmentation_spec_is_read_as_data(spec, tmp_path, no_downloads):
    torch.manual_seed(0)
    source = create_model(spec, num_classes=3).eval()
    save_checkpoint(tmp_path / "model.pt", source)
    (tmp_path / "model.json").write_text(json.dumps({"arch": spec, "num_classes": 3}))
    teacher, info = load_teacher(tmp_path, None, 3)  # the spec from the folder's model.json
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(images), source(images), rtol=0, atol=0)
    assert info["arch"] == spec and is_segmentation_model(teacher)


def test_a_classifier_where_a_segmentation_model_is_needed_is_one_line():
    classifier = create_model("resnet8", num_classes=10)
    assert not is_segmentation_model(classifier)
    assert _refusal(require_segmentation_model, classifier, "--task segmentation") == (
        "--task segmentation needs a segmentation model (per-pixel logits [B, C, H, W]), but resnet8 is a "
        "classifier; name one such as torchvision:deeplabv3_mobilenet_v3_large, smp:Unet,encoder_name=resnet18 or "
        "kdcache's fcn_resnet8")
    with torch.device("meta"):
        require_segmentation_model(create_model(UNET, num_classes=2), "--task segmentation")  # accepted
