"""MobileNetV2 for CIFAR as the KD literature uses it (CRD's `mobile_half`: expansion 6, width 0.5).

Parameter names follow mdistiller's `models/cifar/mobilenetv2.py`, so its checkpoints load as
they are. Like mdistiller, and unlike the paper, it uses ReLU rather than ReLU6 and keeps the
1×1 expansion conv in the first block even though its expansion is 1.
"""

import torch
from torch import nn

from kdcache.models._registry import register_model
from kdcache.models.logit_map import FeatureMapClassifier

# (output channels before width scaling, blocks, stride of the first block) per stage, from the paper's table.
_STAGES = ((16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1))
_LAST_CHANNELS = 1280


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    """Conv (no bias) - BN - ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1×1 expansion, 3×3 depthwise, linear 1×1 projection; a residual when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.has_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.has_residual else self.conv(x)


class MobileNetV2(FeatureMapClassifier):
    """A stride-2 stem, seven stages of inverted residuals, a 1×1 conv to 1280 channels; 2×2 map at 32×32."""

    stage_modules = tuple(f"blocks.{index}" for index in range(len(_STAGES)))

    def __init__(self, expansion: int = 6, width: float = 0.5, num_classes: int = 100) -> None:
        super().__init__()
        in_channels = int(32 * width)
        self.conv1 = _conv_bn_relu(3, in_channels, 3, 2)
        self.blocks = nn.ModuleList()
        for stage_index, (channels, num_blocks, stride) in enumerate(_STAGES):
            out_channels = int(channels * width)
            # The paper's first stage does not expand (t = 1).
            stage_expansion = 1 if stage_index == 0 else expansion
            stage = []
            for block_stride in [stride] + [1] * (num_blocks - 1):
                stage.append(InvertedResidual(in_channels, out_channels, block_stride, stage_expansion))
                in_channels = out_channels
            self.blocks.append(nn.Sequential(*stage))
        # The last layer only grows with width above 1, as in the paper.
        last_channels = int(_LAST_CHANNELS * width) if width > 1.0 else _LAST_CHANNELS
        self.conv2 = _conv_bn_relu(in_channels, last_channels, 1, 1)
        # A one-layer Sequential for the checkpoints' `classifier.0` names.
        self.classifier = nn.Sequential(nn.Linear(last_channels, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The 2×2 (at 32×32 input) map after the final 1×1 conv-BN-ReLU."""
        x = self.conv1(images)
        for stage in self.blocks:
            x = stage(x)
        return self.conv2(x)

    def get_classifier(self) -> nn.Linear:
        """The final linear layer, `classifier.0`."""
        return self.classifier[0]


@register_model
def mobilenetv2(num_classes: int = 100) -> MobileNetV2:
    """MobileNetV2 with expansion 6 and width 0.5 (mdistiller's / CRD's `mobile_half`)."""
    return MobileNetV2(6, 0.5, num_classes)
