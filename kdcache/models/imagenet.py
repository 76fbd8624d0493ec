"""torchvision's ImageNet ResNets and MobileNetV2 under kdcache's own names, through the torchvision adapter.

The names are torchvision's (`resnet18`, `mobilenet_v2`, ...) and so are the modules, the parameter names (a
torchvision or mdistiller ImageNet state dict loads strictly), the initialisation and `forward`. They predate
`torchvision:NAME` specs, which reach every torchvision classifier; caches made with these names stay readable.
The CIFAR models of the KD literature keep theirs (`resnet20`, `mobilenetv2`, ...), and none of those collide.
"""

from functools import partial

from torch import nn

from kdcache.models._registry import register_model
from kdcache.models.torchvision_adapter import adapt_torchvision

NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "resnext50_32x4d",
         "mobilenet_v2")


def _torchvision(name: str, num_classes: int = 1000) -> nn.Module:
    """torchvision's architecture `name`, fresh weights, with forward_features and forward_head."""
    import torchvision.models  # imported where needed: torchvision takes seconds to import

    return adapt_torchvision(torchvision.models.get_model(name, weights=None, num_classes=num_classes))


for _name in NAMES:
    register_model(partial(_torchvision, _name), _name)
