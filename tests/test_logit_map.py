"""LogitMap against slow per-cell loops and SDD's layout; the scale helpers and their errors."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from model_fixtures import load_fixture, reference_input, reference_state_dict
from torch import nn

from kdcache.errors import KdcacheError
from kdcache.models import (
    LogitMap,
    create_model,
    imagenet,
    list_models,
    num_regions,
    parse_scales,
    region_indices,
    segmentation,
)
from kdcache.models.logit_map import FeatureMapClassifier

# the CIFAR family, whose mdistiller fixtures these tests read; torchvision's are in test_imagenet_models.py
MODELS = [name for name in list_models() if name not in imagenet.NAMES + segmentation.NAMES]  # classifiers
SCALES = (1, 2, 4)


@functools.cache
def _float64_outputs(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, nn.Linear]:
    """For one model in float64 eval mode: (plain logits, region logits with scales 1,2,4, feature map, classifier)."""
    model = create_model(name).double().eval()
    # The fixtures' weights keep activations O(1) in eval mode; a fresh init decays into slow subnormals.
    model.load_state_dict(reference_state_dict(load_fixture(name)["state_dict"]))
    images = reference_input()
    with torch.no_grad():
        return model(images), LogitMap(model, SCALES)(images), model.forward_features(images), model.get_classifier()


def _slow_region_logits(features: torch.Tensor, classifier: nn.Linear, scales: tuple[int, ...]) -> torch.Tensor:
    """Region logits cell by cell, slicing the map with adaptive pooling's rule: cell i of s covers [⌊ih/s⌋, ⌈(i+1)h/s⌉)."""
    height, width = features.shape[2:]
    regions = []
    for scale in scales:
        for row in range(scale):
            for column in range(scale):
                rows = slice(row * height // scale, math.ceil((row + 1) * height / scale))
                columns = slice(column * width // scale, math.ceil((column + 1) * width / scale))
                cell = features[:, :, rows, columns].mean((2, 3))
                regions.append(cell @ classifier.weight.T + classifier.bias)
    return torch.stack(regions, dim=1)


@pytest.mark.parametrize("name", MODELS)
def test_region_logits_have_one_row_per_region(name):
    _, region_logits, _, _ = _float64_outputs(name)
    assert region_logits.shape == (2, 21, 100)


@pytest.mark.parametrize("name", MODELS)
def test_region_zero_is_the_models_logit(name):
    logits, region_logits, _, _ = _float64_outputs(name)
    torch.testing.assert_close(region_logits[:, 0], logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", MODELS)
def test_region_logits_equal_a_slow_loop_over_cells(name):
    _, region_logits, features, classifier = _float64_outputs(name)
    torch.testing.assert_close(region_logits, _slow_region_logits(features, classifier, SCALES), rtol=1e-12, atol=1e-12)


# At 32×32 every map side (8, 4 or 2) and every scale (1, 2, 4) divide one another, so each scale's
# cells cover every map position equally often and their mean is the global logit.
@pytest.mark.parametrize("name", MODELS)
def test_region_zero_is_the_mean_of_each_scales_cells(name):
    _, region_logits, _, _ = _float64_outputs(name)
    for scale in SCALES[1:]:
        cells = region_logits[:, region_indices(SCALES, (scale,))]
        torch.testing.assert_close(cells.mean(1), region_logits[:, 0], rtol=1e-12, atol=1e-12)


def test_cells_overlap_when_the_scale_does_not_tile_the_map():
    model = create_model("resnet8", num_classes=10).double().eval()
    images = torch.randn(2, 3, 24, 24, dtype=torch.float64)  # a 6×6 map: 2 tiles it, 4 does not
    with torch.no_grad():
        region_logits = LogitMap(model, SCALES)(images)
        features = model.forward_features(images)
    torch.testing.assert_close(region_logits, _slow_region_logits(features, model.get_classifier(), SCALES))
    torch.testing.assert_close(region_logits[:, 1:5].mean(1), region_logits[:, 0])
    assert not torch.allclose(region_logits[:, 5:21].mean(1), region_logits[:, 0])


def _sdd_patch_scores(features: torch.Tensor, classifier: nn.Linear) -> torch.Tensor:
    """SDD's layout (SPP with M='[1,2,4]' in its resnet.py): 4×4 pooled first, 2×2 and 1×1 from that; [B, C, 21]."""
    pooled_4x4 = F.adaptive_avg_pool2d(features, 4)
    pyramid = [F.adaptive_avg_pool2d(pooled_4x4, 1), F.adaptive_avg_pool2d(pooled_4x4, 2), pooled_4x4]
    cells = torch.cat([level.flatten(2) for level in pyramid], dim=2)  # [B, F, 21]
    return classifier(cells.permute(2, 0, 1)).permute(1, 2, 0)


@pytest.mark.parametrize("name", ["resnet8x4", "vgg8", "mobilenetv2"])
def test_layout_is_sdds_patch_scores_transposed(name):
    _, region_logits, features, classifier = _float64_outputs(name)
    torch.testing.assert_close(region_logits, _sdd_patch_scores(features, classifier).transpose(1, 2))


def test_channels_last_and_bf16_autocast_agree_with_float32():
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10).eval()
    logit_map = LogitMap(model)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = logit_map(images)
        channels_last = logit_map.to(memory_format=torch.channels_last)(images.to(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_precision = logit_map(images)
    torch.testing.assert_close(channels_last, expected, rtol=1e-4, atol=1e-4)
    assert low_precision.shape == expected.shape
    torch.testing.assert_close(low_precision.float(), expected, rtol=0.05, atol=0.05 * expected.abs().max().item())


def test_attributes_and_gradients():
    model = create_model("resnet8", num_classes=10)
    logit_map = LogitMap(model, [1, 2])
    assert logit_map.model is model
    assert logit_map.scales == (1, 2)
    assert logit_map.num_regions == 5
    logit_map(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.fc.weight.grad is not None


@pytest.mark.parametrize("scales", [(), (2, 4), (1, 4, 2), (1, 2, 2), (0, 1), (1, 2.0), (True, 2)])
def test_logit_map_refuses_bad_scales(scales):
    with pytest.raises(KdcacheError, match=r"^LogitMap\(\): expected scales as positive integers in ascending order"):
        LogitMap(create_model("resnet8"), scales)


def test_region_logits_need_the_feature_hooks_and_the_global_logit_does_not():
    with pytest.raises(KdcacheError, match=r"^Linear has no forward_features\(\) and forward_head\(\), which region "
                                           r"logits for scales 1,2,4 are made from: pass --scales 1"):
        LogitMap(nn.Linear(3, 3))
    plain = nn.Linear(3, 5)
    features = torch.randn(4, 3)
    torch.testing.assert_close(LogitMap(plain, (1,))(features), plain(features)[:, None])


def test_num_regions():
    assert num_regions((1, 2, 4)) == 21
    assert num_regions((1,)) == 1
    assert num_regions((1, 3)) == 10


def test_region_indices():
    assert region_indices((1, 2, 4), (1, 2)) == [0, 1, 2, 3, 4]
    assert region_indices((1, 2, 4), (1,)) == [0]
    assert region_indices((1, 2, 4), (4,)) == list(range(5, 21))
    assert region_indices((1, 2, 4), (2,)) == [1, 2, 3, 4]
    assert region_indices((1, 4), (4,)) == list(range(1, 17))


def test_region_indices_refuses_a_scale_outside_the_layout():
    with pytest.raises(KdcacheError) as caught:
        region_indices((1, 2, 4), (1, 3))
    assert str(caught.value) == "region_indices(): scales (1, 3) are not all in the layout (1, 2, 4); missing: 3"


class _FixedFeatures(FeatureMapClassifier):
    """A stand-in model whose final feature map is a fixed 12×12 tensor: LogitMap needs only the two hooks."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.features = torch.randn(2, 6, 12, 12, generator=generator, dtype=torch.float64)
        self.fc = nn.Linear(6, 5, dtype=torch.float64)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features

    def get_classifier(self) -> nn.Linear:
        return self.fc


_NO_IMAGES = torch.empty(2, 3, 12, 12)  # _FixedFeatures ignores its input
ascending_scales = st.sets(st.integers(2, 8), max_size=4).map(lambda rest: (1, *sorted(rest)))


@settings(max_examples=50, deadline=None)
@given(layout=ascending_scales, data=st.data())
def test_region_indices_pick_a_subsets_regions_out_of_a_layout(layout, data):
    subset = tuple(data.draw(st.lists(st.sampled_from(layout), min_size=1, max_size=3, unique=True)))
    model = _FixedFeatures()
    with torch.no_grad():
        full = LogitMap(model, layout)(_NO_IMAGES)
    assert full.shape[1] == num_regions(layout)
    expected = _slow_region_logits(model.features, model.fc, subset)
    torch.testing.assert_close(full[:, region_indices(layout, subset)], expected)


def test_logit_map_of_any_scales_equals_the_slow_loop():
    model = _FixedFeatures()
    scales = (1, 3, 5, 7, 12)  # 12×12 map: 5 and 7 make overlapping cells
    with torch.no_grad():
        region_logits = LogitMap(model, scales)(_NO_IMAGES)
    torch.testing.assert_close(region_logits, _slow_region_logits(model.features, model.fc, scales))


@pytest.mark.parametrize(
    ("text", "expected"), [("1", (1,)), ("1,2,4", (1, 2, 4)), (" 1, 2 ,4 ", (1, 2, 4)), ("1,3,10", (1, 3, 10))]
)
def test_parse_scales(text, expected):
    assert parse_scales(text) == expected


@pytest.mark.parametrize(
    "text", ["", " ", "1,,x", "2,4", "1,2,2", "1,4,2", "0,1", "-1,1", "1.0,2", "1;2", "1,2,", "+1", "\uff11", "1 2"]
)
def test_parse_scales_refuses_malformed_text(text):
    with pytest.raises(KdcacheError) as caught:
        parse_scales(text)
    assert str(caught.value) == (
        "--scales: expected comma-separated positive integers in ascending order starting with 1, "
        f"such as 1,2,4; got {text!r}"
    )


@given(ascending_scales)
def test_parse_scales_round_trips(scales):
    assert parse_scales(",".join(map(str, scales))) == scales


@given(st.text(alphabet=st.sampled_from("0123456789, -x\n"), max_size=12))
def test_parse_scales_gives_a_valid_layout_or_one_line_error(text):
    try:
        scales = parse_scales(text)
    except KdcacheError as error:
        assert "\n" not in str(error)
    else:
        assert scales[0] == 1 and list(scales) == sorted(set(scales))
        assert parse_scales(",".join(map(str, scales))) == scales
