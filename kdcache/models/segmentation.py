"""kdcache's own small segmentation models: a CIFAR ResNet's feature map, a 3×3 conv-BN-ReLU, a 1×1 classifier,
bilinear upsampling to the input's size: an FCN (Long et al. 2015) small enough to train on a CPU.

Every segmentation model kdcache uses (these, torchvision's and smp's by spec) meets one contract: `model(x)` on
float [B, 3, H, W] gives per-pixel class logits [B, C, H, W] at the input's size; `model.num_classes` is C and
`model.segmentation` is True. kdcache's own also speak timm's interface: `forward_features(x)` is the backbone's
map [B, F, H/4, W/4], `forward_head(features)` the class logits at that map's size, before upsampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.models._registry import register_model
from kdcache.models.resnet import ResNet


class FCNResNet(nn.Module):
    """A CIFAR ResNet backbone (stride 4) with an FCN head; logits upsampled bilinearly to the input's size."""

    segmentation = True

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int, head_width: int = 64) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = ResNet(depth, widths, num_classes=1)
        del self.backbone.fc  # the classifier of whole images has no use here
        self.head = nn.Sequential(nn.Conv2d(widths[-1], head_width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(head_width), nn.ReLU(inplace=True),
                                  nn.Conv2d(head_width, num_classes, 1))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's last map [B, F, H/4, W/4]."""
        return self.backbone.forward_features(images)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits [B, C, h, w] at the feature map's size."""
        return self.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits [B, C, H, W] at the input's size (bilinear, align_corners=False)."""
        logits = self.forward_head(self.forward_features(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

NAMES = ("fcn_resnet8", "fcn_resnet20")  # the registry's segmentation models (the rest are classifiers)


@register_model
def fcn_resnet8(num_classes: int = 21) -> FCNResNet:
    """FCN on ResNet-8 (widths 16, 16, 32, 64): a student."""
    return FCNResNet(8, (16, 16, 32, 64), num_classes)


@register_model
def fcn_resnet20(num_classes: int = 21) -> FCNResNet:
    """FCN on ResNet-20 (widths 16, 16, 32, 64): a teacher."""
    return FCNResNet(20, (16, 16, 32, 64), num_classes, head_width=128)

