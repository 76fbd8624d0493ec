"""torchvision's ImageNet ResNets and MobileNetV2, adapted for LogitMap without forking them.

Each class subclasses torchvision's own and adds only `forward_features` and `get_classifier`:
the modules, the parameter names (so a torchvision or mdistiller ImageNet state dict loads
strictly), the initialisation and `forward` are torchvision's. Weights are never downloaded;
load a checkpoint with `load_checkpoint`.

The names are torchvision's (`resnet18`, `mobilenet_v2`, ...); the CIFAR models of the KD
literature keep theirs (`resnet20`, `mobilenetv2`, ...), and none of those collide.
"""

import torch
from torch import nn
from torchvision.models import mobilenetv2 as tv_mobilenetv2
from torchvision.models import resnet as tv_resnet

from kdcache.models._registry import register_model


class TorchvisionResNet(tv_resnet.ResNet):
    """torchvision's ResNet (its `forward` and state dict) with the final feature map exposed."""

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The map after layer4 (7×7 at 224×224 input, stride 32), before global pooling."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def get_classifier(self) -> nn.Linear:
        """The final linear layer, `fc`."""
        return self.fc


class TorchvisionMobileNetV2(tv_mobilenetv2.MobileNetV2):
    """torchvision's MobileNetV2 (its `forward` and state dict) with the final feature map exposed."""

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The map after the last 1×1 conv-BN-ReLU6 (1280 channels, stride 32), before global pooling."""
        return self.features(images)

    def get_classifier(self) -> nn.Linear:
        """The Linear in `classifier` (Dropout, Linear).

        LogitMap applies this Linear alone, so the Dropout before it is skipped: region logits are
        the eval-mode logits, which is what a teacher's cache holds. `forward` keeps the Dropout.
        """
        return self.classifier[1]


def _resnet(
    block: type[tv_resnet.BasicBlock | tv_resnet.Bottleneck], layers: list[int], num_classes: int, **options: int
) -> TorchvisionResNet:
    """A TorchvisionResNet with the block counts (and width options) of torchvision's builder of the same name."""
    return TorchvisionResNet(block, layers, num_classes=num_classes, **options)


@register_model
def resnet18(num_classes: int = 1000) -> TorchvisionResNet:
    """torchvision's ImageNet ResNet-18 (basic blocks 2-2-2-2)."""
    return _resnet(tv_resnet.BasicBlock, [2, 2, 2, 2], num_classes)


@register_model
def resnet34(num_classes: int = 1000) -> TorchvisionResNet:
    """torchvision's ImageNet ResNet-34 (basic blocks 3-4-6-3)."""
    return _resnet(tv_resnet.BasicBlock, [3, 4, 6, 3], num_classes)


@register_model
def resnet50(num_classes: int = 1000) -> TorchvisionResNet:
    """torchvision's ImageNet ResNet-50 (bottlenecks 3-4-6-3)."""
    return _resnet(tv_resnet.Bottleneck, [3, 4, 6, 3], num_classes)


@register_model
def resnet101(num_classes: int = 1000) -> TorchvisionResNet:
    """torchvision's ImageNet ResNet-101 (bottlenecks 3-4-23-3)."""
    return _resnet(tv_resnet.Bottleneck, [3, 4, 23, 3], num_classes)


@register_model
def resnet152(num_classes: int = 1000) -> TorchvisionResNet:
    """torchvision's ImageNet ResNet-152 (bottlenecks 3-8-36-3)."""
    return _resnet(tv_resnet.Bottleneck, [3, 8, 36, 3], num_classes)


@register_model
def wide_resnet50_2(num_classes: int = 1000) -> TorchvisionResNet:
    """torchvision's ImageNet Wide ResNet-50-2 (ResNet-50 with bottlenecks twice as wide inside)."""
    return _resnet(tv_resnet.Bottleneck, [3, 4, 6, 3], num_classes, width_per_group=128)


@register_model
def resnext50_32x4d(num_classes: int = 1000) -> TorchvisionResNet:
    """torchvision's ImageNet ResNeXt-50 32×4d (ResNet-50 with 32 groups of width 4)."""
    return _resnet(tv_resnet.Bottleneck, [3, 4, 6, 3], num_classes, groups=32, width_per_group=4)


@register_model
def mobilenet_v2(num_classes: int = 1000) -> TorchvisionMobileNetV2:
    """torchvision's ImageNet MobileNetV2 (width 1.0, ReLU6); not the CIFAR `mobilenetv2`."""
    return TorchvisionMobileNetV2(num_classes=num_classes)
