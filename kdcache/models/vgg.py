"""VGG with batch norm for CIFAR: five blocks of 3×3 conv-BN-ReLU, a single linear classifier.

Parameter names follow mdistiller's `models/cifar/vgg.py` (`vgg8_bn`, `vgg13_bn`), so its
checkpoints load as they are.
"""

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.models._registry import register_model
from kdcache.models.logit_map import FeatureMapClassifier


def _conv_block(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    """Conv-BN-ReLU per width, without the last ReLU (forward applies it): the checkpoints' layer indices."""
    layers = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(FeatureMapClassifier):
    """Five conv blocks with 2×2 max pools after the first three; 4×4 map at 32×32 input."""

    stage_modules = ("block0", "block1", "block2", "block3", "block4")

    def __init__(self, block_widths: tuple[tuple[int, ...], ...], num_classes: int = 100) -> None:
        super().__init__()
        in_channels = 3
        for index, widths in enumerate(block_widths):
            self.add_module(f"block{index}", _conv_block(in_channels, widths))
            in_channels = widths[-1]
        self.classifier = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The map after the last block: 4×4 at 32×32 input, also 4×4 at 64×64."""
        x = F.max_pool2d(F.relu(self.block0(images)), 2)
        x = F.max_pool2d(F.relu(self.block1(x)), 2)
        x = F.max_pool2d(F.relu(self.block2(x)), 2)
        x = F.relu(self.block3(x))
        # mdistiller pools a fourth time only for 64×64 inputs (Tiny-ImageNet); CIFAR maps stay 4×4.
        if images.shape[2] == 64:
            x = F.max_pool2d(x, 2)
        return F.relu(self.block4(x))

    def get_classifier(self) -> nn.Linear:
        """The final linear layer, `classifier`."""
        return self.classifier


@register_model
def vgg8(num_classes: int = 100) -> VGG:
    """VGG-8 with BN (mdistiller's vgg8_bn): one conv per block."""
    return VGG(((64,), (128,), (256,), (512,), (512,)), num_classes)


@register_model
def vgg13(num_classes: int = 100) -> VGG:
    """VGG-13 with BN (mdistiller's vgg13_bn): two convs per block."""
    return VGG(((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)), num_classes)
