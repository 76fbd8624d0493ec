"""torchvision's classifiers given timm's interface (`forward_features`, `forward_head`) without forking them.

`adapt_torchvision(model)` swaps the model's class for a subclass that adds the two methods, so its parameters,
their names (a torchvision state dict loads strictly), its initialisation and its `forward` stay torchvision's.
Each family is described by where its final feature map comes from and which attribute holds its classifier;
the head is the family's own: global average pooling, then that classifier (dropout, norms and MLPs included).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class _Family:
    """How one torchvision family computes its final features, and which attribute holds its head."""

    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    classifier: str
    keeps_map: bool = False  # the classifier takes the pooled map [B, F, 1, 1] (it starts with a 2-d norm or pool)
    prefix_tokens: int = 0  # a token model: its class token precedes the patch tokens
    stages: tuple[str, ...] = ()  # the modules whose outputs are its stages, where the family has named ones


def _resnet_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


def _shufflenet_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.conv5(model.stage4(model.stage3(model.stage2(model.maxpool(model.conv1(x))))))


def _maxvit_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = model.stem(x)
    for block in model.blocks:
        x = block(x)
    return x


def _vit_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = model._process_input(x)
    return model.encoder(torch.cat([model.class_token.expand(len(x), -1, -1), x], dim=1))


@functools.cache
def _families() -> dict[type, _Family]:
    """Each torchvision family the adapter knows, by class (torchvision imported only once a model needs it)."""
    import torchvision.models as tv

    return {
        tv.ResNet: _Family(_resnet_features, "fc", stages=("layer1", "layer2", "layer3", "layer4")),
        tv.RegNet: _Family(lambda model, x: model.trunk_output(model.stem(x)), "fc",
                           stages=tuple(f"trunk_output.block{index}" for index in range(1, 5))),
        tv.MobileNetV2: _Family(lambda model, x: model.features(x), "classifier"),
        tv.MobileNetV3: _Family(lambda model, x: model.features(x), "classifier"),
        tv.EfficientNet: _Family(lambda model, x: model.features(x), "classifier"),
        tv.MNASNet: _Family(lambda model, x: model.layers(x), "classifier"),
        tv.DenseNet: _Family(lambda model, x: F.relu(model.features(x)), "classifier"),
        tv.ShuffleNetV2: _Family(_shufflenet_features, "fc", stages=("stage2", "stage3", "stage4")),
        tv.ConvNeXt: _Family(lambda model, x: model.features(x), "classifier", keeps_map=True,
                             stages=("features.1", "features.3", "features.5", "features.7")),
        tv.MaxVit: _Family(_maxvit_features, "classifier", keeps_map=True),
        tv.SwinTransformer: _Family(lambda model, x: model.permute(model.norm(model.features(x))), "head"),
        tv.VisionTransformer: _Family(_vit_tokens, "heads", prefix_tokens=1),
    }


def supported_families() -> tuple[str, ...]:
    """The class names of the torchvision families the adapter knows."""
    return tuple(family.__name__ for family in _families())


class _Adapter:
    """The two methods timm's models have, for a torchvision model of the family `_family`."""

    _family: _Family

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The final feature map [B, F, h, w] before global pooling (tokens [B, N, D] for a ViT)."""
        return self._family.features(self, images)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits [B, C] as the model's forward computes them from its features; pre_logits: the last layer's input."""
        family = self._family
        if family.prefix_tokens:
            pooled = features[:, 0]  # torchvision's ViT classifies its class token
        else:
            pooled = F.adaptive_avg_pool2d(features, 1)
            pooled = pooled if family.keeps_map else pooled.flatten(1)
        head = getattr(self, family.classifier)
        if not pre_logits:
            return head(pooled)
        return head[:-1](pooled) if isinstance(head, nn.Sequential) else pooled.flatten(1)

    @property
    def feature_info(self) -> list[dict[str, str]]:
        """The family's stages as timm lists them (empty where kdcache names none)."""
        return [{"module": name} for name in self._family.stages]

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens (timm's name): the ViT's class token."""
        return self._family.prefix_tokens


@functools.cache
def _adapted_class(model_class: type, family: _Family) -> type:
    """The subclass of a torchvision class with the adapter's methods (one per class, so instances share it)."""
    return type(model_class.__name__, (_Adapter, model_class), {"_family": family, "__module__": __name__})


def adapt_torchvision(model: nn.Module) -> nn.Module:
    """The model itself, given forward_features and forward_head where its family is known; else unchanged."""
    families = _families()
    family = next((family for family in families if isinstance(model, family)), None)
    if family is not None and not isinstance(model, _Adapter):
        model.__class__ = _adapted_class(type(model), families[family])
    return model
