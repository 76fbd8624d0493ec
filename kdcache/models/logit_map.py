"""Region logits: the classifier applied to pooled cells of a model's final feature map.

A model exposes `forward_features(x) -> [B, F, h, w]` (the final map, after the last activation)
and `get_classifier() -> nn.Linear`. `LogitMap` pools that map over a pyramid of grids (scale s:
an s×s grid, as SDD does) and applies the classifier to every cell. Region 0 is the 1×1 grid, so
it is the model's own logit; then come each scale's cells in row-major order.
"""

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.errors import KdcacheError

_SCALES_FORM = "positive integers in ascending order starting with 1"


class FeatureMapClassifier(nn.Module, ABC):
    """A classifier whose logits are a linear layer applied to the mean of its final feature map."""

    @abstractmethod
    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The final feature map [B, F, h, w], after the last activation and before global pooling."""

    @abstractmethod
    def get_classifier(self) -> nn.Linear:
        """The final linear layer."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Plain logits [B, C]."""
        return self.get_classifier()(self.forward_features(images).mean((2, 3)))


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


class LogitMap(nn.Module):
    """Adapter from a model to region logits [B, R, C], R = sum of squared scales, region 0 the global logit."""

    def __init__(self, model: nn.Module, scales: Sequence[int] = (1, 2, 4)) -> None:
        super().__init__()
        scales = tuple(scales)
        if not _is_valid_layout(scales):
            raise KdcacheError(f"LogitMap(): expected scales as {_SCALES_FORM}, such as (1, 2, 4); got {scales}")
        if not (hasattr(model, "forward_features") and hasattr(model, "get_classifier")):
            raise TypeError(f"LogitMap(): {type(model).__name__} has no forward_features() and get_classifier()")
        self.model = model
        self.scales = scales
        self.num_regions = num_regions(scales)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Region logits [B, R, C] from one feature pass and one classifier matmul over all cells."""
        features = self.model.forward_features(images)
        # [B, F, s, s] -> [B, s*s, F]: cells row-major, so concatenating scales gives the region order.
        cells = [F.adaptive_avg_pool2d(features, scale).flatten(2).transpose(1, 2) for scale in self.scales]
        return self.model.get_classifier()(torch.cat(cells, dim=1))

    def extra_repr(self) -> str:
        return f"scales={self.scales}, num_regions={self.num_regions}"
