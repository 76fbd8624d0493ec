"""Region logits: the model's own head applied to pooled cells of its final features (SDD's multi-scale logits).

Every model speaks timm's interface: `forward_features(x)` gives the final feature map `[B, F, h, w]` (or
`[B, h, w, F]` where the model says `output_fmt = "NHWC"`, or tokens `[B, N, D]`), and
`forward_head(features, pre_logits=False)` the logits. `LogitMap` pools the features over a pyramid of grids
(scale s: an s×s grid, as SDD does) and passes every cell through `forward_head`, so a norm, conv layer or
dropout in the head applies as the model applies it. Region 0 is the model's own output; then come each
scale's cells in row-major order.

- Feature maps: each cell average-pooled to 1×1 and passed through `forward_head`.
- Tokens (ViT, DeiT, Mixer): the patch tokens laid out on their grid, each cell's tokens averaged, and that
  mean passed through the head as a sequence in which every token is the mean, so the head's pooling (class
  token, average, distillation token) gives the mean itself and only its pooling-free part acts.

Only a head that is affine after pooling makes region 0 the mean of each evenly tiling scale's cells;
`describe_outputs` finds out which kind a model has, and caches record it so that `verify` checks that identity
only where it holds.
"""

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.errors import KdcacheError

_SCALES_FORM = "positive integers in ascending order starting with 1"
HEAD_KINDS = {
    "linear": "an affine layer after average pooling: region 0 is the mean of each evenly tiling scale's cells",
    "nonlinear": "a norm, MLP or conv layer after pooling: region 0 is not the mean of the cells",
    "token": "a token model's head: region 0 is the model's own output (its class token or pool)",
    "plain": "no spatial features: region 0 only (scales 1)",
}


class FeatureMapClassifier(nn.Module):
    """A classifier whose logits are a linear layer applied to the mean of its final feature map.

    Subclasses define `forward_features` (the final map [B, F, h, w], after the last activation, before global
    pooling) and `get_classifier` (the final nn.Linear); `forward_head` and `forward` follow, as in timm.
    `stage_modules` names the modules whose outputs are its stages (feature and attention distillation).
    """

    stage_modules: tuple[str, ...] = ()

    @property
    def feature_info(self) -> list[dict[str, str]]:
        """The stages as timm lists them: one dict per stage, its module's name under "module"."""
        return [{"module": name} for name in self.stage_modules]

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The final feature map [B, F, h, w]."""
        raise NotImplementedError

    def get_classifier(self) -> nn.Linear:
        """The final linear layer."""
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits [B, C] of a feature map: global average pooling, then the classifier (skipped for pre_logits)."""
        pooled = features.mean((2, 3))
        return pooled if pre_logits else self.get_classifier()(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Plain logits [B, C]."""
        return self.forward_head(self.forward_features(images))


def num_regions(scales: Sequence[int]) -> int:
    """How many regions a layout of these scales has: the sum of their squares."""
    return sum(scale * scale for scale in scales)


def region_indices(scales: Sequence[int], subset: Sequence[int]) -> list[int]:
    """Positions, in a layout of `scales`, of the regions of the scales in `subset` (in subset order)."""
    missing = [scale for scale in subset if scale not in scales]
    if missing:
        raise KdcacheError(
            f"region_indices(): scales {tuple(subset)} are not all in the layout {tuple(scales)}; "
            f"missing: {', '.join(map(str, missing))}"
        )
    first_region = {}
    position = 0
    for scale in scales:
        first_region[scale] = position
        position += scale * scale
    return [
        index
        for scale in subset
        for index in range(first_region[scale], first_region[scale] + scale * scale)
    ]


def _is_valid_layout(scales: Sequence) -> bool:
    """Whether `scales` are positive ints, strictly ascending, starting with 1 (region 0 is the global logit)."""
    return (
        len(scales) > 0
        and all(isinstance(scale, int) and not isinstance(scale, bool) for scale in scales)
        and scales[0] == 1
        and all(smaller < larger for smaller, larger in zip(scales, scales[1:]))
    )


def parse_scales(text: str) -> tuple[int, ...]:
    """Scales from their command-line form, e.g. "1,2,4" -> (1, 2, 4)."""
    items = text.split(",")
    well_formed = all(re.fullmatch(r"\s*[0-9]+\s*", item) for item in items)
    scales = tuple(int(item) for item in items) if well_formed else ()
    if not _is_valid_layout(scales):
        raise KdcacheError(f"--scales: expected comma-separated {_SCALES_FORM}, such as 1,2,4; got {text!r}")
    return scales


def model_name(model: nn.Module) -> str:
    """How messages name a model: the spec it was created from, else its class."""
    return getattr(model, "arch", None) or type(model).__name__


def speaks_timm(model: nn.Module) -> bool:
    """Whether a model has forward_features and forward_head, which region logits are made from."""
    return callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))


class LogitMap(nn.Module):
    """Adapter from a model to region logits [B, R, C], R = sum of squared scales, region 0 the model's output."""

    def __init__(self, model: nn.Module, scales: Sequence[int] = (1, 2, 4)) -> None:
        super().__init__()
        scales = tuple(scales)
        if not _is_valid_layout(scales):
            raise KdcacheError(f"LogitMap(): expected scales as {_SCALES_FORM}, such as (1, 2, 4); got {scales}")
        if scales != (1,) and not speaks_timm(model):
            raise KdcacheError(
                f"{model_name(model)} has no forward_features() and forward_head(), which region logits for scales "
                f"{','.join(map(str, scales))} are made from: pass --scales 1 (the model's own logits only), or give "
                f"the model those two methods as timm's models have them (README, 'Your own models')")
        self.model = model
        self.scales = scales
        self.num_regions = num_regions(scales)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Region logits [B, R, C]: one feature pass, the head once on the whole features and once on all cells."""
        if not speaks_timm(self.model):
            return self.model(images)[:, None]
        return self.regions(self.model.forward_features(images), images.shape[-2:])

    def regions(self, features: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
        """Region logits [B, R, C] of the model's final features (of images of image_size)."""
        logits = self.model.forward_head(features)[:, None]
        if len(self.scales) == 1:
            return logits
        cells = self.cells(features, image_size)  # [B, R-1, *one head input]
        cell_logits = self.model.forward_head(cells.flatten(0, 1)).unflatten(0, cells.shape[:2])
        return torch.cat([logits, cell_logits], dim=1)

    def cells(self, features: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
        """Every cell of scales 2 and up as one input of the head: [B, R-1, F, 1, 1] (a map) or [B, R-1, T, D]."""
        grid = self.feature_grid(features, image_size)  # [B, F, h, w]
        pooled = torch.cat([F.adaptive_avg_pool2d(grid, scale).flatten(2) for scale in self.scales[1:]], dim=2)
        pooled = pooled.transpose(1, 2)  # [B, R-1, F], cells row-major, so concatenated scales give the region order
        if features.dim() == 3:  # a sequence of identical tokens, as long as the prefix plus one patch
            return pooled[:, :, None, :].expand(-1, -1, _prefix_tokens(self.model) + 1, -1)
        if _channels_last(self.model):
            return pooled[:, :, None, None, :]
        return pooled[..., None, None]

    def feature_grid(self, features: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
        """The final features as a map [B, F, h, w]: a map as it is, NHWC permuted, patch tokens laid on their grid."""
        if features.dim() == 4:
            return features.permute(0, 3, 1, 2) if _channels_last(self.model) else features
        if features.dim() != 3:
            raise KdcacheError(f"{model_name(self.model)}: forward_features() gives shape {list(features.shape)}, "
                               f"neither a map [B, F, h, w] nor tokens [B, N, D], so it has no cells: pass --scales 1")
        patches = features[:, _prefix_tokens(self.model):]
        height, width = _patch_grid(patches.shape[1], image_size)
        if height * width != patches.shape[1]:
            raise KdcacheError(
                f"{model_name(self.model)}: forward_features() gives {features.shape[1]} tokens, of which "
                f"{patches.shape[1]} after its {_prefix_tokens(self.model)} prefix tokens (num_prefix_tokens) form "
                f"no grid of the {image_size[0]}×{image_size[1]} image's shape: pass --scales 1, or set the model's "
                f"num_prefix_tokens")
        return patches.transpose(1, 2).unflatten(2, (height, width))

    def extra_repr(self) -> str:
        return f"scales={self.scales}, num_regions={self.num_regions}"


def _prefix_tokens(model: nn.Module) -> int:
    """How many class, distillation or register tokens precede a token model's patch tokens (timm's attribute)."""
    if hasattr(model, "num_prefix_tokens"):
        return int(model.num_prefix_tokens)
    if getattr(model, "cls_token", None) is not None:  # PiT, CoaT: a class token, but where it sits is not said
        raise KdcacheError(f"{model_name(model)} has a class token but no num_prefix_tokens, so which of its tokens "
                           f"are patches is unknown: pass --scales 1, or set num_prefix_tokens on the model")
    return 0


def _channels_last(model: nn.Module) -> bool:
    """Whether the model's feature map is [B, h, w, F] (timm's Swin says so with output_fmt)."""
    return str(getattr(model, "output_fmt", "NCHW")) == "NHWC"


def _patch_grid(num_patches: int, image_size: Sequence[int]) -> tuple[int, int]:
    """The grid (rows, columns) of patches of an image of this size: its aspect ratio, num_patches cells."""
    image_height, image_width = image_size
    height = max(1, round(math.sqrt(num_patches * image_height / image_width)))
    return height, num_patches // height


def describe_outputs(logit_map: LogitMap, images: torch.Tensor) -> dict[str, Any]:
    """What a cache records of a model's outputs, found on a few images: feature_map [h, w], head, num_classes."""
    model = logit_map.model
    with torch.no_grad():
        if not speaks_timm(model):
            return {"feature_map": [1, 1], "head": "plain", "num_classes": model(images).shape[-1]}
        features = model.forward_features(images)
        num_classes = model.forward_head(features).shape[-1]
        grid = logit_map.feature_grid(features, images.shape[-2:])
        kind = "token" if features.dim() == 3 else _map_head_kind(model, grid)
    return {"feature_map": list(grid.shape[2:]), "head": kind, "num_classes": num_classes}


def _map_head_kind(model: nn.Module, grid: torch.Tensor) -> str:
    """"linear" if forward_head is affine on pooled features (checked between two points), else "nonlinear".

    The points are random, of unit scale, rather than the features of the images: an untrained model's features
    can be so small that a conv head's activation is nearly linear on them.
    """
    generator = torch.Generator().manual_seed(0)
    points = 2 * torch.randn(2, grid.shape[1], 1, 1, generator=generator).to(grid)  # two pooled maps [2, F, 1, 1]
    if _channels_last(model):
        points = points.permute(0, 2, 3, 1)
    ends = model.forward_head(points).double()
    between = model.forward_head(0.25 * points[:1] + 0.75 * points[1:]).double()
    # an affine head maps the point a quarter of the way between two inputs to the same point between their logits
    error = (between - (0.25 * ends[0] + 0.75 * ends[1])).abs().max().item()
    return "linear" if error <= 1e-4 * ends.abs().max().item() + 1e-30 else "nonlinear"
