"""torchvision's classifiers through the adapter: the model's own forward, region 0 equal to it, every cell equal to
a slow per-cell loop, torchvision state dicts loading strictly, and a clear error for a family without cells."""

import math

import pytest
import torch
import torchvision.models as tv
from torch import nn

from kdcache.errors import KdcacheError
from kdcache.models import LogitMap, create_model, describe_outputs, load_checkpoint
from kdcache.models.torchvision_adapter import adapt_torchvision, supported_families

SCALES = (1, 2, 4)
CLASSES = 10
# the smallest registry model of each family the adapter knows, and the head kind it has
REGISTRY = {
    "resnet18": "linear",
    "regnet_x_400mf": "linear",
    "mobilenet_v2": "linear",
    "efficientnet_b0": "linear",
    "mnasnet0_5": "linear",
    "densenet121": "linear",
    "shufflenet_v2_x0_5": "linear",
    "swin_t": "linear",
    "mobilenet_v3_small": "nonlinear",  # Linear, Hardswish, Dropout, Linear after pooling
    "convnext_tiny": "nonlinear",  # LayerNorm2d after pooling
}
# families whose smallest registry model is large: the same class, built small
SMALL = {
    "VisionTransformer": lambda: tv.VisionTransformer(image_size=64, patch_size=16, num_layers=1, num_heads=2,
                                                      hidden_dim=16, mlp_dim=32, num_classes=CLASSES),
    "MaxVit": lambda: tv.MaxVit(input_size=(64, 64), stem_channels=8, partition_size=2, block_channels=[8, 16],
                                block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=CLASSES),
}
SMALL_KINDS = {"VisionTransformer": "token", "MaxVit": "nonlinear"}


def _images(side: int) -> torch.Tensor:
    return torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))


def _slow_regions(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Cell by cell: crop the final map (or the ViT's patch grid), pool, apply the model's own classifier."""
    features = model.forward_features(images)
    regions = [model(images)]
    if features.dim() == 3:
        side = math.isqrt(features.shape[1] - 1)
        features = features[:, 1:].transpose(1, 2).unflatten(2, (side, side))
    height, width = features.shape[2:]
    for scale in SCALES[1:]:
        for row in range(scale):
            for column in range(scale):
                rows = slice(row * height // scale, math.ceil((row + 1) * height / scale))
                columns = slice(column * width // scale, math.ceil((column + 1) * width / scale))
                cell = features[:, :, rows, columns].mean((2, 3))
                regions.append(_classify(model, cell))
    return torch.stack(regions, dim=1)


def _classify(model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """The family's classifier on pooled features [B, F], as each family's forward applies it."""
    if isinstance(model, (tv.ConvNeXt, tv.MaxVit)):
        return model.classifier(pooled[..., None, None])
    if isinstance(model, tv.VisionTransformer):
        return model.heads(pooled)
    if isinstance(model, tv.SwinTransformer):
        return model.head(pooled)
    return model.fc(pooled) if hasattr(model, "fc") else model.classifier(pooled)


def _check_regions(model: nn.Module, images: torch.Tensor, kind: str) -> None:
    logit_map = LogitMap(model.eval(), SCALES)
    with torch.no_grad():
        regions = logit_map(images)
        expected = _slow_regions(model, images)
    atol = 1e-5 * expected.abs().max().item()
    torch.testing.assert_close(regions[:, 0], expected[:, 0], rtol=0, atol=atol)
    torch.testing.assert_close(regions, expected, rtol=0, atol=atol)
    assert describe_outputs(logit_map, images)["head"] == kind


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_region_logits_of_torchvision_registry_models(name):
    torch.manual_seed(0)
    _check_regions(create_model(f"torchvision:{name}", num_classes=CLASSES), _images(96), REGISTRY[name])


@pytest.mark.parametrize("family", sorted(SMALL))
def test_region_logits_of_the_large_families_built_small(family):
    torch.manual_seed(0)
    _check_regions(adapt_torchvision(SMALL[family]()), _images(64), SMALL_KINDS[family])


def test_every_family_the_adapter_knows_is_tested():
    tested = {type(create_model(f"torchvision:{name}", num_classes=CLASSES)).__name__ for name in
              ("resnet18", "regnet_x_400mf", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "mnasnet0_5",
               "densenet121", "shufflenet_v2_x0_5", "swin_t", "convnext_tiny")}
    assert tested | set(SMALL) == set(supported_families())


def test_the_adapter_keeps_torchvisions_state_dict_and_forward(tmp_path):
    torch.manual_seed(0)
    reference = tv.mobilenet_v3_small(num_classes=CLASSES).eval()
    torch.save(reference.state_dict(), tmp_path / "weights.pth")
    model = load_checkpoint(tmp_path / "weights.pth", create_model("torchvision:mobilenet_v3_small", CLASSES)).eval()
    assert list(model.state_dict()) == list(reference.state_dict())
    images = _images(64)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images))
        torch.testing.assert_close(model.forward_head(model.forward_features(images)), reference(images))
        embedding = model.forward_head(model.forward_features(images), pre_logits=True)
    assert embedding.shape == (2, reference.classifier[-1].in_features)


def test_a_family_without_cells_is_a_clear_error_and_its_global_logit_works():
    model = create_model("torchvision:squeezenet1_1", num_classes=CLASSES).eval()
    with pytest.raises(KdcacheError, match=r"^torchvision:squeezenet1_1 has no forward_features\(\) and "
                                           r"forward_head\(\).*pass --scales 1"):
        LogitMap(model, SCALES)
    images = _images(64)
    with torch.no_grad():
        torch.testing.assert_close(LogitMap(model, (1,))(images)[:, 0], model(images))
        assert describe_outputs(LogitMap(model, (1,)), images) == {"feature_map": [1, 1], "head": "plain",
                                                                  "num_classes": CLASSES}
