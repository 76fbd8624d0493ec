"""torchvision's ImageNet models: torchvision's state dicts load strictly and give torchvision's logits; LogitMap fits."""

import pytest
import torch
import torchvision
from torch import nn

from kdcache.models import LogitMap, create_model, list_models, load_checkpoint

# kdcache's name -> torchvision's builder of the same architecture
BUILDERS = {
    name: getattr(torchvision.models, name)
    for name in [
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "resnext50_32x4d", "mobilenet_v2",
    ]
}
NAMES = sorted(BUILDERS)
# The deeper and wider ResNets run the same TorchvisionResNet code with other block counts and widths,
# which the state-dict test checks; running their forward too would only make the suite slower.
FORWARD_NAMES = ["mobilenet_v2", "resnet18", "resnet34", "resnet50"]
NUM_CLASSES = 10  # small heads keep the tests fast; the class count changes only the last layer


def _torchvision_model(name: str, seed: int = 0) -> nn.Module:
    """torchvision's model, seeded, with BatchNorm running statistics away from their (0, 1) defaults.

    Random buffers make the test see whether the running statistics are loaded, not only the weights.
    """
    torch.manual_seed(seed)
    model = BUILDERS[name](weights=None, num_classes=NUM_CLASSES)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
    return model.eval()


def _images(side: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))


def _assert_logits_close(found: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_every_torchvision_name_is_registered_and_the_cifar_names_are_kept():
    assert set(NAMES) <= set(list_models())
    for name in NAMES:  # torchvision's own class, given forward_features and forward_head by the adapter
        model = create_model(name, num_classes=NUM_CLASSES)
        family = torchvision.models.MobileNetV2 if name == "mobilenet_v2" else torchvision.models.ResNet
        assert isinstance(model, family) and hasattr(model, "forward_head")
    # the CIFAR MobileNetV2 of the KD literature keeps its name and its architecture
    assert type(create_model("mobilenetv2")).__module__ == "kdcache.models.mobilenetv2"


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_names_and_shapes_are_torchvisions(name):
    found = {key: tuple(value.shape) for key, value in create_model(name, num_classes=NUM_CLASSES).state_dict().items()}
    expected = {key: tuple(value.shape) for key, value in _torchvision_model(name).state_dict().items()}
    assert list(found) == list(expected) and found == expected


@pytest.mark.parametrize("name", FORWARD_NAMES)
def test_torchvision_checkpoint_loads_strictly_and_gives_torchvisions_logits(name, tmp_path):
    reference = _torchvision_model(name)
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)
    model = load_checkpoint(path, create_model(name, num_classes=NUM_CLASSES)).eval()
    images = _images(64)
    with torch.no_grad():
        expected = reference(images)
        logits = model(images)
        features = model.forward_features(images)
    assert features.shape[2:] == (2, 2)  # stride 32
    _assert_logits_close(logits, expected)
    with torch.no_grad():
        _assert_logits_close(model.forward_head(features), expected)


@pytest.mark.parametrize("name", FORWARD_NAMES)
def test_logit_map_region_zero_is_the_logit_and_cells_average_to_it(name):
    model = create_model(name, num_classes=NUM_CLASSES)
    model.load_state_dict(_torchvision_model(name).state_dict())
    model.eval()
    images = _images(128, batch=1)  # a 4×4 final map: the 2×2 and 4×4 grids tile it evenly
    with torch.no_grad():
        logits = model(images)
        regions = LogitMap(model, (1, 2, 4))(images)
    assert regions.shape == (1, 1 + 4 + 16, NUM_CLASSES)
    _assert_logits_close(regions[:, 0], logits)
    _assert_logits_close(regions[:, 1:5].mean(1), logits)
    _assert_logits_close(regions[:, 5:21].mean(1), logits)


def test_resnet18_has_its_published_parameter_count():
    assert sum(parameter.numel() for parameter in create_model("resnet18", num_classes=1000).parameters()) == 11_689_512


def test_registered_names_default_to_imagenets_1000_classes():
    from kdcache.models._registry import MODELS

    for name in ("resnet18", "mobilenet_v2"):
        with torch.no_grad():
            assert MODELS.get(name).eval()(_images(32, batch=1)).shape == (1, 1000)
