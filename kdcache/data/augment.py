"""Replayable augmentation: pure batch functions whose random draws are explicit integer parameters.

A policy draws parameters with `sample(generator, n)` (or lists every view with `enumerate()`),
and `apply(images, params)` turns uint8 images into the views those parameters name. The cache
stores the parameters of each view, so the second stage replays exactly the pixels the teacher
saw. `apply` uses integer tensor ops only, so CPU and CUDA give bit-identical pixels.
"""

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcache.errors import KdcacheError, unknown_name


class AugmentPolicy(Protocol):
    """What every policy offers: parameter draws, the list of all views when finite, and their replay."""

    name: str
    param_names: tuple[str, ...]
    num_views: int | None

    def sample(self, generator: torch.Generator, n: int) -> Tensor:
        """Random parameters of n views: a CPU int64 tensor [n, P]."""
        ...

    def enumerate(self) -> Tensor:
        """Every distinct view's parameters [V, P] of a finite policy; a KdcacheError otherwise."""
        ...

    def apply(self, images: Tensor, params: Tensor) -> Tensor:
        """The views [B, C, H, W] (uint8, images' device) that params [B, P] name."""
        ...

    def describe(self) -> dict:
        """Name, parameter names and constants, for cache metadata (JSON-able)."""
        ...


@dataclass(frozen=True)
class CropFlip:
    """torchvision's `RandomCrop(size, padding)` (zero fill) then `RandomHorizontalFlip`, as params (dx, dy, flip).

    The image is zero-padded by `padding` on every side and cropped back to its own size with the
    top-left corner at column dx, row dy of the padded image (dx, dy in [0, 2·padding]); flip = 1
    then mirrors the crop left-right.
    """

    name: ClassVar[str] = "cifar"
    param_names: ClassVar[tuple[str, ...]] = ("dx", "dy", "flip")
    padding: int = 4

    @property
    def num_views(self) -> int:
        """(2·padding + 1)² offsets × 2 flips: 162 for padding 4."""
        return (2 * self.padding + 1) ** 2 * 2

    def sample(self, generator: torch.Generator, n: int) -> Tensor:
        """Uniform offsets in [0, 2·padding] and a fair flip for n views: int64 [n, 3] on the CPU."""
        offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=generator)
        flips = torch.randint(0, 2, (n, 1), generator=generator)
        return torch.cat([offsets, flips], dim=1)

    def enumerate(self) -> Tensor:
        """All views in lexicographic (dx, dy, flip) order: row v = (dx·(2·padding + 1) + dy)·2 + flip."""
        offsets = torch.arange(2 * self.padding + 1)
        return torch.cartesian_prod(offsets, offsets, torch.arange(2))

    def apply(self, images: Tensor, params: Tensor) -> Tensor:
        """Pad, crop and maybe flip each image as its params row says, in two gathers for the whole batch."""
        params = _checked_params(self, images, params)
        batch, channels, height, width = images.shape
        padded = F.pad(images, (self.padding,) * 4)  # zeros, as RandomCrop(padding=...) fills
        dx, dy, flip = params.unbind(dim=1)
        row_offsets = torch.arange(height, device=images.device)
        col_offsets = torch.arange(width, device=images.device)
        rows = dy[:, None] + row_offsets  # [B, H]
        # the flip is folded into the column index: output column j reads crop column W-1-j
        cols = dx[:, None] + torch.where(flip[:, None] != 0, width - 1 - col_offsets, col_offsets)  # [B, W]
        picked_rows = padded.gather(2, rows[:, None, :, None].expand(batch, channels, height, padded.shape[3]))
        return picked_rows.gather(3, cols[:, None, None, :].expand(batch, channels, height, width))

    def describe(self) -> dict:
        """Name, parameter names, view count, padding and fill, for cache metadata."""
        return {
            "name": self.name,
            "param_names": list(self.param_names),
            "num_views": self.num_views,
            "padding": self.padding,
            "fill": 0,
        }


@dataclass(frozen=True)
class Identity:
    """No augmentation: no parameters, one view, the images themselves."""

    name: ClassVar[str] = "none"
    param_names: ClassVar[tuple[str, ...]] = ()
    num_views: ClassVar[int] = 1

    def sample(self, generator: torch.Generator, n: int) -> Tensor:
        """n empty parameter rows: int64 [n, 0]."""
        return torch.zeros(n, 0, dtype=torch.int64)

    def enumerate(self) -> Tensor:
        """The one view: int64 [1, 0]."""
        return torch.zeros(1, 0, dtype=torch.int64)

    def apply(self, images: Tensor, params: Tensor) -> Tensor:
        """The images unchanged (the same tensor)."""
        _checked_params(self, images, params)
        return images

    def describe(self) -> dict:
        """Name, (no) parameter names and the view count, for cache metadata."""
        return {"name": self.name, "param_names": [], "num_views": self.num_views}


def _checked_params(policy: AugmentPolicy, images: Tensor, params: Tensor) -> Tensor:
    """params as int64 on the images' device, after checking shapes and dtypes (no device sync)."""
    count = len(policy.param_names)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise KdcacheError(
            f"{policy.name}.apply(): needs uint8 images [B, C, H, W], found {images.dtype} {list(images.shape)}"
        )
    if params.is_floating_point() or params.is_complex() or params.dtype == torch.bool or params.shape != (len(images), count):
        raise KdcacheError(
            f"{policy.name}.apply(): needs integer params [{len(images)}, {count}] "
            f"({', '.join(policy.param_names) or 'none'}), found {params.dtype} {list(params.shape)}"
        )
    return params.to(device=images.device, dtype=torch.int64)


_POLICIES: dict[str, AugmentPolicy] = {policy.name: policy for policy in (CropFlip(padding=4), Identity())}


def list_policies() -> list[str]:
    """The registered policy names, sorted."""
    return sorted(_POLICIES)


def get_policy(name: str) -> AugmentPolicy:
    """The registered policy of that name (policies are immutable and stateless)."""
    policy = _POLICIES.get(name)
    if policy is None:
        raise unknown_name("get_policy()", name, list_policies())
    return policy
