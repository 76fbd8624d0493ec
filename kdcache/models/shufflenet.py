"""ShuffleNet V1 (Zhang et al. 2018) and V2 (Ma et al. 2018) for CIFAR, as the KD literature uses them.

Parameter names follow mdistiller's `models/cifar/ShuffleNetv1.py` and `ShuffleNetv2.py`, so
its checkpoints load as they are. Like mdistiller (and kuangliu's pytorch-cifar before it), the
stem is a 1×1 conv without pooling, and V1 applies ReLU after its depthwise conv.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.models._registry import register_model
from kdcache.models.logit_map import FeatureMapClassifier


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of `groups` equal groups: [g0c0, g1c0, ..., g0c1, g1c1, ...]."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


class ShuffleV1Block(nn.Module):
    """Grouped 1×1, shuffle, 3×3 depthwise, grouped 1×1; stride 2 concatenates an average-pooled shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int, first_groups: int) -> None:
        super().__init__()
        mid_channels = out_channels // 4
        self.stride = stride
        self.first_groups = first_groups
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, mid_channels, 3, stride, 1, groups=mid_channels, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = nn.Conv2d(mid_channels, out_channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], dim=1))
        return F.relu(out + x)


class _ShuffleNet(FeatureMapClassifier):
    """What both ShuffleNets share: a 1×1 stem to 24 channels, then three stages `layer1`-`layer3`; `linear` last."""

    stage_modules = ("layer1", "layer2", "layer3")

    def _build_stages(self, stage_channels: tuple[int, ...], stage_blocks: tuple[int, ...],
                      make_stage: Callable[[int, int, int, int], list[nn.Module]]) -> int:
        """The stem and the stages, make_stage(index, in, out, blocks) giving each one's blocks; the last width."""
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_channels = 24
        for index, (channels, num_blocks) in enumerate(zip(stage_channels, stage_blocks), start=1):
            self.add_module(f"layer{index}", nn.Sequential(*make_stage(index, in_channels, channels, num_blocks)))
            in_channels = channels
        return in_channels

    def _stages(self, images: torch.Tensor) -> torch.Tensor:
        """The map after the stem and the three stages."""
        x = F.relu(self.bn1(self.conv1(images)))
        return self.layer3(self.layer2(self.layer1(x)))

    def get_classifier(self) -> nn.Linear:
        """The final linear layer, `linear`."""
        return self.linear


class ShuffleNetV1(_ShuffleNet):
    """A 1×1 stem to 24 channels, three stages each starting at stride 2; 4×4 map at 32×32."""

    def __init__(
        self, stage_channels: tuple[int, ...], stage_blocks: tuple[int, ...], groups: int, num_classes: int = 100
    ) -> None:
        super().__init__()

        def stage(index: int, in_channels: int, channels: int, num_blocks: int) -> list[nn.Module]:
            # The first block's output is concatenated with its pooled input, so it adds the difference.
            # The paper leaves the very first 1×1 conv ungrouped: its input is the narrow stem.
            first = ShuffleV1Block(in_channels, channels - in_channels, 2, groups, 1 if index == 1 else groups)
            return [first] + [ShuffleV1Block(channels, channels, 1, groups, groups) for _ in range(num_blocks - 1)]

        self.linear = nn.Linear(self._build_stages(stage_channels, stage_blocks, stage), num_classes)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The 4×4 (at 32×32 input) map after the last block."""
        return self._stages(images)


class ShuffleV2Block(nn.Module):
    """Half the channels pass through, the other half go 1×1, 3×3 depthwise, 1×1; then concat and shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.half = channels // 2
        self.conv1 = nn.Conv2d(self.half, self.half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.half)
        self.conv2 = nn.Conv2d(self.half, self.half, 3, 1, 1, groups=self.half, bias=False)
        self.bn2 = nn.BatchNorm2d(self.half)
        self.conv3 = nn.Conv2d(self.half, self.half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, transformed = x[:, : self.half], x[:, self.half :]
        out = F.relu(self.bn1(self.conv1(transformed)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([kept, out], dim=1), 2)


class ShuffleV2DownBlock(nn.Module):
    """Stride-2 unit: two branches (depthwise-then-1×1, and 1×1-depthwise-1×1) concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid_channels = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = nn.Conv2d(in_channels, mid_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid_channels)
        self.conv4 = nn.Conv2d(mid_channels, mid_channels, 3, 2, 1, groups=mid_channels, bias=False)
        self.bn4 = nn.BatchNorm2d(mid_channels)
        self.conv5 = nn.Conv2d(mid_channels, mid_channels, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], dim=1), 2)


class ShuffleNetV2(_ShuffleNet):
    """A 1×1 stem to 24 channels, three stages (a stride-2 unit, then basic units), a 1×1 conv; 4×4 map."""

    def __init__(
        self, stage_channels: tuple[int, ...], stage_blocks: tuple[int, ...], last_channels: int, num_classes: int = 100
    ) -> None:
        super().__init__()

        def stage(index: int, in_channels: int, channels: int, num_blocks: int) -> list[nn.Module]:
            return [ShuffleV2DownBlock(in_channels, channels)] + [ShuffleV2Block(channels) for _ in range(num_blocks)]

        in_channels = self._build_stages(stage_channels, stage_blocks, stage)
        self.conv2 = nn.Conv2d(in_channels, last_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last_channels)
        self.linear = nn.Linear(last_channels, num_classes)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The 4×4 (at 32×32 input) map after the final 1×1 conv-BN-ReLU."""
        return F.relu(self.bn2(self.conv2(self._stages(images))))


@register_model
def shufflev1(num_classes: int = 100) -> ShuffleNetV1:
    """ShuffleNet V1, 3 groups, stages of 240-480-960 channels (mdistiller's ShuffleV1)."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes)


@register_model
def shufflev2(num_classes: int = 100) -> ShuffleNetV2:
    """ShuffleNet V2 1×: stages of 116-232-464 channels, 1024 last (mdistiller's ShuffleV2)."""
    return ShuffleNetV2((116, 232, 464), (3, 7, 3), 1024, num_classes)
