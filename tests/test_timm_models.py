"""timm models through their own forward_features/forward_head: region 0 is model(x), every cell equals a slow
per-cell loop, and the head kind the cache records is the head's."""

import math

import pytest
import torch
from torch import nn

from kdcache.errors import KdcacheError
from kdcache.models import LogitMap, create_model, describe_outputs

timm = pytest.importorskip("timm")

SCALES = (1, 2, 4)
CLASSES = 10
# one architecture per family: the head kind the probe must find, and the input side (a 3×3 final map at stride 32
# for the conv nets, so the cells of scales 2 and 4 overlap; the native size of models whose position embeddings or windows fix it)
ARCHITECTURES = {
    "resnet10t": ("linear", 96),
    "resnext26ts": ("linear", 96),
    "regnetx_002": ("linear", 96),
    "efficientnet_b0": ("linear", 96),
    "mobilenetv2_050": ("linear", 96),
    "mobilevit_xxs": ("linear", 96),
    "dla34": ("linear", 96),  # a 1×1 conv as its classifier
    "swin_tiny_patch4_window7_224": ("linear", 224),  # an NHWC feature map
    "mobilenetv3_small_050": ("nonlinear", 96),  # conv head after pooling
    "ghostnet_050": ("nonlinear", 96),
    "lcnet_050": ("nonlinear", 96),
    "hgnetv2_b0": ("nonlinear", 96),
    "convnext_atto": ("nonlinear", 96),  # LayerNorm in the head
    "edgenext_xx_small": ("nonlinear", 96),
    "efficientvit_b0": ("nonlinear", 96),
    "vit_tiny_patch16_224": ("token", 224),  # class token
    "deit_tiny_patch16_224": ("token", 224),
    "deit_tiny_distilled_patch16_224": ("token", 224),  # class and distillation tokens, two heads
    "mixer_s32_224": ("token", 224),  # no prefix token, average pooling
    "levit_128s": ("token", 224),  # BatchNorm heads, two of them
}


def _model_and_images(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model(f"timm:{name}", num_classes=CLASSES).eval()
    side = ARCHITECTURES[name][1]
    return model, torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))


def _cell_slices(size: int, scale: int) -> list[slice]:
    """adaptive_avg_pool2d's cells along one side: cell i covers [⌊i·size/s⌋, ⌈(i+1)·size/s⌉)."""
    return [slice(i * size // scale, math.ceil((i + 1) * size / scale)) for i in range(scale)]


def _token_head(model: nn.Module, mean: torch.Tensor) -> torch.Tensor:
    """The pooling-free part of each token family's head, transcribed from timm's forward_head."""
    name = type(model).__name__
    if name in ("VisionTransformerDistilled", "LevitDistilled"):
        return (model.head(mean) + model.head_dist(mean)) / 2
    if name == "MlpMixer":
        return model.head(mean)
    return model.head(model.fc_norm(mean))  # VisionTransformer


def _slow_regions(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Region logits cell by cell: crop the final map (or the patch grid), pool, apply the head; region 0 model(x)."""
    features = model.forward_features(images)
    regions = [model(images)]
    if features.dim() == 3:  # tokens: the patch tokens on their grid
        side = math.isqrt(features.shape[1] - getattr(model, "num_prefix_tokens", 0))
        grid = features[:, features.shape[1] - side * side:].transpose(1, 2).unflatten(2, (side, side))
    else:
        nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
        grid = features.permute(0, 3, 1, 2) if nhwc else features
    height, width = grid.shape[2:]
    for scale in SCALES[1:]:
        for rows in _cell_slices(height, scale):
            for columns in _cell_slices(width, scale):
                cell = grid[:, :, rows, columns].mean((2, 3), keepdim=True)  # [B, F, 1, 1]
                if features.dim() == 3:
                    regions.append(_token_head(model, cell.flatten(1)))
                else:
                    regions.append(model.forward_head(cell.permute(0, 2, 3, 1) if nhwc else cell))
    return torch.stack(regions, dim=1)


def _assert_close(found: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to 1e-5 of the logits' scale."""
    torch.testing.assert_close(found, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_region_logits_of_timm_models(name):
    model, images = _model_and_images(name)
    logit_map = LogitMap(model, SCALES)
    with torch.no_grad():
        regions = logit_map(images)
        _assert_close(regions[:, 0], model(images))
        _assert_close(regions, _slow_regions(model, images))
    assert regions.shape == (2, 21, CLASSES)
    outputs = describe_outputs(logit_map, images)
    assert outputs["head"] == ARCHITECTURES[name][0]
    assert outputs["num_classes"] == CLASSES


def test_the_issues_convnext_case_region_zero_keeps_the_head_norm():
    """convnext_atto's head normalises after pooling; applying its Linear alone was off by up to 0.62."""
    model, images = _model_and_images("convnext_atto")
    with torch.no_grad():
        features = model.forward_features(images)
        linear_only = model.get_classifier()(features.mean((2, 3)))
        regions = LogitMap(model, SCALES)(images)
        logits = model(images)
    assert (linear_only - logits).abs().max() > 1e-2  # the old way was wrong here
    _assert_close(regions[:, 0], logits)


def test_region_logits_train_a_timm_student():
    model, images = _model_and_images("vit_tiny_patch16_224")
    LogitMap(model.train(), SCALES)(images).square().mean().backward()
    assert model.head.weight.grad is not None and model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_a_model_with_only_a_class_token_has_no_cells_but_its_global_logit_works():
    model = create_model("timm:pit_ti_224", num_classes=CLASSES).eval()
    images = torch.randn(1, 3, 224, 224)
    with pytest.raises(KdcacheError, match=r"^timm:pit_ti_224 has a class token but no num_prefix_tokens.*--scales 1"):
        LogitMap(model, SCALES)(images)
    with torch.no_grad():
        _assert_close(LogitMap(model, (1,))(images)[:, 0], model(images))
