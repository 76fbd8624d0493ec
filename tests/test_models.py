"""The CIFAR family: mdistiller's parameter names and function, the feature-map hook, the registry."""

import pytest
import torch
from model_fixtures import FIXTURES, load_fixture, reference_input, reference_state_dict
from torch import nn

from kdcache.errors import KdcacheError
from kdcache.models import create_model, imagenet, list_models, register_model, segmentation

# the CIFAR family; torchvision's ImageNet models (kdcache.models.imagenet) are tested in test_imagenet_models.py
MODELS = [name for name in list_models() if name not in imagenet.NAMES + segmentation.NAMES]  # classifiers

# Side of the final feature map at 32×32 input.
MAP_SIDE = {
    **dict.fromkeys(["resnet8", "resnet20", "resnet32", "resnet56", "resnet110", "resnet8x4", "resnet32x4"], 8),
    **dict.fromkeys(["wrn_16_2", "wrn_40_2"], 8),
    **dict.fromkeys(["vgg8", "vgg13", "shufflev1", "shufflev2"], 4),
    "mobilenetv2": 2,
}


def test_every_fixture_has_a_model_and_every_model_a_fixture():
    assert MODELS == sorted(path.stem for path in FIXTURES.glob("*.json")) == sorted(MAP_SIDE)


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_names_and_shapes_are_mdistillers(name):
    model = create_model(name)
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert shapes == load_fixture(name)["state_dict"]


@pytest.mark.parametrize("name", MODELS)
def test_logits_equal_mdistillers_in_float64(name):
    fixture = load_fixture(name)
    model = create_model(name).double().eval()
    model.load_state_dict(reference_state_dict(fixture["state_dict"]), strict=True)
    with torch.no_grad():
        logits = model(reference_input())
    expected = torch.tensor(fixture["reference_logits"], dtype=torch.float64)
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("name", MODELS)
def test_forward_is_the_classifier_of_the_mean_feature_map(name):
    model = create_model(name).eval()
    # The fixtures' weights keep activations O(1) in eval mode; a fresh init decays into slow subnormals.
    model.load_state_dict(reference_state_dict(load_fixture(name)["state_dict"]))
    images = reference_input().float()
    with torch.no_grad():
        features = model.forward_features(images)
        logits = model(images)
    side = MAP_SIDE[name]
    classifier = model.get_classifier()
    assert isinstance(classifier, nn.Linear)
    assert features.shape == (2, classifier.in_features, side, side)
    assert logits.shape == (2, 100)
    torch.testing.assert_close(logits, classifier(features.mean((2, 3))))


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "vgg8", "mobilenetv2", "shufflev1", "shufflev2"])
def test_trains_a_step(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5).train()
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 4]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(param.grad is not None for param in model.parameters())


def test_mobilenetv2_classifier_is_its_first_classifier_layer():
    model = create_model("mobilenetv2")
    assert model.get_classifier() is model.classifier[0]


def test_vgg_pools_a_fourth_time_only_for_64_pixel_inputs():
    model = create_model("vgg8").eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 32, 32)).shape[2:] == (4, 4)
        assert model.forward_features(torch.randn(1, 3, 64, 64)).shape[2:] == (4, 4)
        assert model.forward_features(torch.randn(1, 3, 48, 48)).shape[2:] == (6, 6)


def test_create_model_sets_classes_and_arch():
    model = create_model("resnet8x4", num_classes=10)
    assert model.get_classifier().out_features == 10
    assert model.arch == "resnet8x4"


def test_create_model_unknown_name_lists_known_names():
    with pytest.raises(KdcacheError) as caught:
        create_model("resnet9")
    assert str(caught.value) == (f"model spec 'resnet9': kdcache's registry has no model 'resnet9'; known: "
                                 f"{', '.join(list_models())}; other models are named as NAME (kdcache's registry), "
                                 f"timm:NAME, torchvision:NAME, smp:ARCH,key=value,..., gpt:layers=L,width=D,heads=H, hf:PATH, "
                                 f"clip:NAME or "
                                 f"python:module.path:callable")


def test_list_models_filters_by_pattern():
    assert list_models("resnet*") == [
        "resnet101", "resnet110", "resnet152", "resnet18", "resnet20", "resnet32", "resnet32x4", "resnet34",
        "resnet50", "resnet56", "resnet8", "resnet8x4",
    ]
    assert list_models("shufflev?") == ["shufflev1", "shufflev2"]
    assert list_models("nothing*") == []


def test_register_model_refuses_a_taken_name():
    def resnet8(num_classes: int = 100) -> nn.Module:
        return nn.Linear(1, num_classes)

    with pytest.raises(ValueError, match="'resnet8' is already registered"):
        register_model(resnet8)
