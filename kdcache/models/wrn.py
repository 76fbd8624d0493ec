"""Wide ResNets (Zagoruyko & Komodakis 2016): pre-activation blocks, WRN-depth-widen.

Parameter names follow mdistiller's `models/cifar/wrn.py` (itself from the WRN authors' port),
camelCase `convShortcut` included, so its checkpoints load as they are.
"""

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.models._registry import register_model
from kdcache.models.logit_map import FeatureMapClassifier


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3×3 twice, plus the input or a 1×1 projection of it."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.convShortcut = None
        if stride != 1 or in_channels != out_channels:
            self.convShortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        # The identity shortcut carries the raw input; the projection reads the activated one.
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return out + shortcut


class WideStage(nn.Module):
    """A stage of wide blocks; the first one changes width and stride."""

    def __init__(self, num_blocks: int, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        # A wrapper module only for the `blockN.layer.M` parameter names of the checkpoints.
        self.layer = nn.Sequential(
            WideBlock(in_channels, out_channels, stride),
            *(WideBlock(out_channels, out_channels, 1) for _ in range(num_blocks - 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(FeatureMapClassifier):
    """A 3×3 stem, three stages of (depth - 4) / 6 wide blocks at strides 1, 2, 2, then BN-ReLU; 8×8 map."""

    stage_modules = ("block1", "block2", "block3")

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet(): depth must be 6n+4 (16, 22, 28, 40, ...); got {depth}")
        blocks_per_stage = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.block1 = WideStage(blocks_per_stage, 16, widths[0], 1)
        self.block2 = WideStage(blocks_per_stage, widths[0], widths[1], 2)
        self.block3 = WideStage(blocks_per_stage, widths[1], widths[2], 2)
        self.bn1 = nn.BatchNorm2d(widths[2])
        self.fc = nn.Linear(widths[2], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The 8×8 (at 32×32 input) map after the final BN-ReLU."""
        x = self.block3(self.block2(self.block1(self.conv1(images))))
        return F.relu(self.bn1(x))

    def get_classifier(self) -> nn.Linear:
        """The final linear layer, `fc`."""
        return self.fc


@register_model
def wrn_16_2(num_classes: int = 100) -> WideResNet:
    """WRN-16-2: depth 16, widths 32-64-128."""
    return WideResNet(16, 2, num_classes)


@register_model
def wrn_40_2(num_classes: int = 100) -> WideResNet:
    """WRN-40-2: depth 40, widths 32-64-128."""
    return WideResNet(40, 2, num_classes)
