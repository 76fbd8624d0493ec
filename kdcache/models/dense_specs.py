"""Segmentation models by spec: torchvision's and segmentation-models-pytorch's, built with no weights to fetch.

The contract every segmentation model meets (kdcache's own, `torchvision:NAME` for a segmentation NAME, `smp:ARCH`):
- `forward(x)`, x float `[B, 3, H, W]`, returns the per-pixel class logits `[B, C, H, W]` at the input's size
  (torchvision's models return a dict {"out": ..., "aux": ...}: an adapter returns its "out" tensor; smp's models
  already return the map);
- `model.num_classes` is C, `model.arch` its spec (`create_model` sets it), and `model.segmentation` is True, so a
  caller that needs per-pixel logits refuses a classifier (`require_segmentation_model`) and one that needs a
  classifier refuses a segmentation model (`is_segmentation_model`). `mark_segmentation` sets the two attributes.

- `torchvision:NAME` (fcn_resnet50/101, deeplabv3_resnet50/101/mobilenet_v3_large, lraspp_mobilenet_v3_large):
  built with weights=None and weights_backbone=None (torchvision's builders default the backbone to ImageNet's
  weights, a download) and without the auxiliary head (aux_loss=False); the model's class is swapped for a
  subclass whose forward returns the "out" tensor, so its parameter names stay torchvision's and a state dict
  saved from such a model loads strictly.
- `smp:ARCH[,key=value,...]` (`pip install "kdcache[seg]"`): `segmentation_models_pytorch.create_model(ARCH,
  encoder_weights=None, in_channels=3, classes=C, activation=None, **keys)`: the keys are the constructor's
  (`encoder_name=resnet18`, `encoder_depth=3`), never the weights, which come from a local file (--checkpoint).
  smp's models take inputs whose sides are multiples of 2**encoder_depth (32 at the default depth of 5); a model
  whose map comes out at another size than its input's (FPN below depth 5 without upsampling=2**(depth-3)) is
  refused by its forward, in one line.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools

import torch
from torch import nn

from kdcache.errors import KdcacheError
from kdcache.models.logit_map import model_name

SEGMENTATION_SPECS = "torchvision:deeplabv3_mobilenet_v3_large, smp:Unet,encoder_name=resnet18 or kdcache's fcn_resnet8"
SMP_INSTALL = 'pip install "kdcache[seg]" (or pip install segmentation-models-pytorch)'


def mark_segmentation(model: nn.Module, num_classes: int) -> nn.Module:
    """The model, marked as one that returns per-pixel logits for `num_classes` classes (the module docstring)."""
    model.num_classes = num_classes
    model.segmentation = True
    return model


def is_segmentation_model(model: nn.Module) -> bool:
    """Whether a model returns per-pixel logits [B, C, H, W] rather than a classifier's [B, C]."""
    return getattr(model, "segmentation", False) is True


def require_segmentation_model(model: nn.Module, asked_by: str) -> None:
    """Refuse, in one line naming `asked_by`, a model that is no segmentation model."""
    if not is_segmentation_model(model):
        raise KdcacheError(f"{asked_by} needs a segmentation model (per-pixel logits [B, C, H, W]), but "
                           f"{model_name(model)} is a classifier; name one such as {SEGMENTATION_SPECS}")


# -- torchvision ---------------------------------------------------------------------------------------------------
def torchvision_segmentation_names() -> list[str]:
    """The names of torchvision's segmentation models."""
    import torchvision.models

    return torchvision.models.list_models(module=torchvision.models.segmentation)


class _OutLogits:
    """A torchvision segmentation model's forward, returning the "out" map of its dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel logits [B, C, H, W] at the input's size (torchvision resizes them to it)."""
        return super().forward(x)["out"]


class _InputSizedLogits:
    """An smp model's forward, refusing a map at another size than the input's (FPN's fixed upsampling of 4 fits
    only encoder_depth=5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel logits [B, C, H, W] at the input's size."""
        logits = super().forward(x)
        if logits.shape[-2:] != x.shape[-2:]:
            raise KdcacheError(f"{model_name(self)} returned a {'x'.join(map(str, logits.shape[-2:]))} logit map for "
                               f"a {'x'.join(map(str, x.shape[-2:]))} input; a segmentation model's logits are at the "
                               f"input's size: "
                               f"choose arguments that keep it (smp's FPN at encoder_depth=D needs "
                               f"upsampling=2**(D-3))")
        return logits


@functools.cache
def _with_forward(model_class: type, forward: type) -> type:
    """The subclass of a model class whose forward is `forward`'s (one per pair, so instances share it); parameter
    names, initialisation and everything else stay the class's own."""
    return type(model_class.__name__, (forward, model_class), {"__module__": __name__})


def build_torchvision_segmentation(name: str, num_classes: int) -> nn.Module:
    """torchvision's segmentation model `name`, with fresh weights everywhere (no backbone weights fetched), no
    auxiliary head, and the contract's forward."""
    import torchvision.models

    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, aux_loss=False,
                                         num_classes=num_classes)
    model.__class__ = _with_forward(type(model), _OutLogits)
    return mark_segmentation(model, num_classes)


# -- segmentation-models-pytorch -----------------------------------------------------------------------------------
def _smp():
    try:
        import segmentation_models_pytorch
    except ImportError:
        raise KdcacheError(f"smp: models named smp:ARCH need segmentation-models-pytorch; install it with "
                           f"{SMP_INSTALL}") from None
    return segmentation_models_pytorch


def _smp_architectures() -> dict[str, type]:
    """smp's architectures by class name (Unet, FPN, DeepLabV3Plus, ...)."""
    return {model_class.__name__: model_class for model_class in _smp().MODEL_ARCHITECTURES_MAPPING.values()}


def smp_names(pattern: str) -> list[str]:
    """smp's architectures matching a shell-style pattern, in either case (`unet*` finds Unet and UnetPlusPlus)."""
    return sorted(name for name in _smp_architectures() if fnmatch.fnmatchcase(name.lower(), pattern.lower()))


def smp_architecture(spec: str, architecture: str) -> type:
    """The smp model class an architecture names, in either case (smp's own rule); one line listing the known
    ones if none."""
    known = _smp_architectures()
    found = {name.lower(): model_class for name, model_class in known.items()}.get(architecture.lower())
    if found is None:
        raise KdcacheError(f"model spec {spec!r}: segmentation-models-pytorch has no architecture {architecture!r}; "
                           f"known: {', '.join(sorted(known))}")
    return found


def _check_encoder(spec: str, encoder: object) -> None:
    """Refuse an encoder smp does not have, naming the close ones (a tu- encoder is any timm model: timm checks)."""
    if not isinstance(encoder, str):
        raise KdcacheError(f"model spec {spec!r}: encoder_name={encoder!r} is no encoder's name; name one such as "
                           f"encoder_name=resnet18")
    names = _smp().encoders.get_encoder_names()
    if not encoder.startswith("tu-") and encoder not in names:
        close = difflib.get_close_matches(encoder, names, n=8, cutoff=0.6)
        raise KdcacheError(f"model spec {spec!r}: segmentation-models-pytorch has no encoder {encoder!r}; "
                           f"{'close names: ' + ', '.join(close) if close else 'no name is close'} (smp.encoders."
                           f"get_encoder_names() lists them; tu-NAME takes any timm model)")


def build_smp(spec: str, architecture: str, arguments: dict[str, object], num_classes: int) -> nn.Module:
    """smp's `architecture` with fresh weights (encoder_weights=None), C classes and the constructor's `arguments`;
    what the constructor refuses is one line."""
    model_class = smp_architecture(spec, architecture)
    if "encoder_name" in arguments:
        _check_encoder(spec, arguments["encoder_name"])
    try:
        model = model_class(encoder_weights=None, in_channels=3, classes=num_classes, activation=None, **arguments)
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as error:
        detail = str(error).strip().split("\n", 1)[0].rstrip(".")
        raise KdcacheError(f"model spec {spec!r}: smp's {model_class.__name__} refused "
                           f"{', '.join(f'{key}={value}' for key, value in arguments.items())}: {detail}; give "
                           f"arguments and values its constructor takes") from None
    model.__class__ = _with_forward(model_class, _InputSizedLogits)
    return mark_segmentation(model, num_classes)
