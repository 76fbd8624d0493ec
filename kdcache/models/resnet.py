"""CIFAR ResNets (He et al. 2016, section 4.2): three stages of basic blocks, 6n+2 layers.

Parameter names follow mdistiller's `models/cifar/resnet.py`, so its checkpoints load as they are.
"""

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.models._registry import register_model
from kdcache.models.logit_map import FeatureMapClassifier


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with a shortcut; a 1×1 conv-BN projection where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet(FeatureMapClassifier):
    """A 3×3 stem then three stages of (depth - 2) / 6 basic blocks at strides 1, 2, 2; 8×8 map at 32×32."""

    stage_modules = ("layer1", "layer2", "layer3")

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"ResNet(): depth must be 6n+2 (8, 20, 32, 56, 110, ...); got {depth}")
        blocks_per_stage = (depth - 2) // 6
        stem_width, *stage_widths = widths
        self.conv1 = nn.Conv2d(3, stem_width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        in_channels = stem_width
        for index, (width, stride) in enumerate(zip(stage_widths, (1, 2, 2)), start=1):
            blocks = [BasicBlock(in_channels, width, stride)]
            blocks += [BasicBlock(width, width, 1) for _ in range(blocks_per_stage - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
            in_channels = width
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The 8×8 (at 32×32 input) map after the last block."""
        x = F.relu(self.bn1(self.conv1(images)))
        return self.layer3(self.layer2(self.layer1(x)))

    def get_classifier(self) -> nn.Linear:
        """The final linear layer, `fc`."""
        return self.fc


@register_model
def resnet8(num_classes: int = 100) -> ResNet:
    """ResNet-8, widths 16-16-32-64."""
    return ResNet(8, (16, 16, 32, 64), num_classes)


@register_model
def resnet20(num_classes: int = 100) -> ResNet:
    """ResNet-20, widths 16-16-32-64."""
    return ResNet(20, (16, 16, 32, 64), num_classes)


@register_model
def resnet32(num_classes: int = 100) -> ResNet:
    """ResNet-32, widths 16-16-32-64."""
    return ResNet(32, (16, 16, 32, 64), num_classes)


@register_model
def resnet56(num_classes: int = 100) -> ResNet:
    """ResNet-56, widths 16-16-32-64."""
    return ResNet(56, (16, 16, 32, 64), num_classes)


@register_model
def resnet110(num_classes: int = 100) -> ResNet:
    """ResNet-110, widths 16-16-32-64."""
    return ResNet(110, (16, 16, 32, 64), num_classes)


@register_model
def resnet8x4(num_classes: int = 100) -> ResNet:
    """ResNet-8 four times as wide: widths 32-64-128-256 (CRD's student)."""
    return ResNet(8, (32, 64, 128, 256), num_classes)


@register_model
def resnet32x4(num_classes: int = 100) -> ResNet:
    """ResNet-32 four times as wide: widths 32-64-128-256 (CRD's teacher)."""
    return ResNet(32, (32, 64, 128, 256), num_classes)
