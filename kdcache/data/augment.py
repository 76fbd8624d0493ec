"""Replayable augmentation: pure batch functions whose random draws are explicit integer parameters.

A policy draws parameters with `sample(generator, n)` (or lists every view with `enumerate()`),
and `apply(images, params)` turns uint8 images into the views those parameters name. The cache
stores the parameters of each view, so the second stage replays exactly the pixels the teacher
saw. `apply` sums pixels in integers (weights come from single IEEE double ops), so CPU and
CUDA give bit-identical pixels.
"""

import inspect
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcache.errors import KdcacheError
from kdcache.registry import Registry


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

    def out_of_range(self, params: Tensor) -> Tensor:
        """[n] bool: which rows of params [n, P] this policy could not have drawn (stored ones are checked)."""
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

    def apply(self, images: Tensor, params: Tensor, fill: int = 0) -> Tensor:
        """Pad (with `fill`: zeros, as RandomCrop(padding=...) fills images; a label map's ignore index), crop and
        maybe flip each image as its params row says, in two gathers for the whole batch."""
        params = _checked_params(self, images, params)
        batch, channels, height, width = images.shape
        padded = F.pad(images, (self.padding,) * 4, value=fill)
        dx, dy, flip = params.unbind(dim=1)
        row_offsets = torch.arange(height, device=images.device)
        col_offsets = torch.arange(width, device=images.device)
        rows = dy[:, None] + row_offsets  # [B, H]
        # the flip is folded into the column index: output column j reads crop column W-1-j
        cols = dx[:, None] + torch.where(flip[:, None] != 0, width - 1 - col_offsets, col_offsets)  # [B, W]
        picked_rows = padded.gather(2, rows[:, None, :, None].expand(batch, channels, height, padded.shape[3]))
        return picked_rows.gather(3, cols[:, None, None, :].expand(batch, channels, height, width))

    def out_of_range(self, params: Tensor) -> Tensor:
        """Rows whose offsets leave [0, 2·padding] or whose flip is not 0 or 1."""
        offsets, flips = params[:, :2], params[:, 2]
        return ((offsets < 0) | (offsets > 2 * self.padding)).any(dim=1) | ((flips != 0) & (flips != 1))

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

    def apply(self, images: Tensor, params: Tensor, fill: int = 0) -> Tensor:
        """The images unchanged (the same tensor; nothing to fill)."""
        _checked_params(self, images, params)
        return images

    def out_of_range(self, params: Tensor) -> Tensor:
        """No row: there are no parameters."""
        return torch.zeros(len(params), dtype=torch.bool)

    def describe(self) -> dict:
        """Name, (no) parameter names and the view count, for cache metadata."""
        return {"name": self.name, "param_names": [], "num_views": self.num_views}


@dataclass(frozen=True)
class ResizedCropFlip:
    """torchvision's `RandomResizedCrop(size, scale, ratio)` (bilinear, antialias) then `RandomHorizontalFlip`.

    Params (i, j, h, w, flip): the crop box's top row, left column, height and width in the stored
    image, which is resampled back to the stored size `size` = (H, W); flip = 1 then mirrors the
    view left-right. The boxes come from a continuous range, so the policy has no finite view list.
    """

    name: ClassVar[str] = "imagenet"
    param_names: ClassVar[tuple[str, ...]] = ("i", "j", "h", "w", "flip")
    num_views: ClassVar[None] = None
    size: tuple[int, int]
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        """Refuse sizes and ranges RandomResizedCrop could not draw from."""
        if len(self.size) != 2 or min(self.size) < 1:
            raise KdcacheError(f"{self.name}: needs an image size (H, W) of at least 1 pixel, got {self.size}")
        if not (0 < self.scale[0] <= self.scale[1] and 0 < self.ratio[0] <= self.ratio[1]):
            raise KdcacheError(f"{self.name}: needs 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], "
                               f"got scale {self.scale}, ratio {self.ratio}")

    def sample(self, generator: torch.Generator, n: int) -> Tensor:
        """n boxes drawn as `RandomResizedCrop.get_params` draws them, and a fair flip each: int64 [n, 5] on the CPU."""
        height, width = self.size
        tries = 10  # get_params tries 10 (area, aspect) draws before its central-crop fallback
        # float32 draws, then double arithmetic, as get_params mixes float32 tensors and Python floats
        area_fraction = torch.empty(n, tries).uniform_(self.scale[0], self.scale[1], generator=generator)
        log_ratio = torch.log(torch.tensor(self.ratio, dtype=torch.float32)).tolist()
        log_aspect = torch.empty(n, tries).uniform_(log_ratio[0], log_ratio[1], generator=generator)
        target_area = area_fraction.double() * (height * width)
        aspect = torch.exp(log_aspect).double()
        w = torch.round(torch.sqrt(target_area * aspect)).long()  # round half to even, like Python's round
        h = torch.round(torch.sqrt(target_area / aspect)).long()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.long().argmax(dim=1, keepdim=True)  # the first try that fits (0 when none does)
        found = fits.any(dim=1)
        fallback_h, fallback_w = self._central_fallback()
        h = torch.where(found, h.gather(1, first)[:, 0], fallback_h)
        w = torch.where(found, w.gather(1, first)[:, 0], fallback_w)
        # the corner is uniform over the positions that keep the box inside; a 62-bit draw modulo
        # their count is uniform to within 2^-50 and needs no per-row bound in randint
        raw = torch.randint(0, 2**62, (n, 2), generator=generator)
        i = torch.where(found, raw[:, 0] % (height - h + 1), (height - h) // 2)
        j = torch.where(found, raw[:, 1] % (width - w + 1), (width - w) // 2)
        flips = torch.randint(0, 2, (n,), generator=generator)
        return torch.stack([i, j, h, w, flips], dim=1)

    def _central_fallback(self) -> tuple[int, int]:
        """get_params' box (h, w) after 10 misses: the whole image, cut to the nearest allowed aspect ratio."""
        height, width = self.size
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            return int(round(width / min(self.ratio))), width
        if in_ratio > max(self.ratio):
            return height, int(round(height * max(self.ratio)))
        return height, width

    def enumerate(self) -> Tensor:
        """Refused: crop boxes come from a continuous range, so there is no finite list of views."""
        raise KdcacheError(f"{self.name}.enumerate(): the policy has no finite list of views (RandomResizedCrop "
                           "draws boxes from a continuous range); sample views with --views instead of --exhaustive")

    def apply(self, images: Tensor, params: Tensor) -> Tensor:
        """Resample each image's box to (H, W) and maybe flip it, rounding as torch's uint8 kernel, for the whole batch."""
        params = _checked_params(self, images, params)
        if tuple(images.shape[-2:]) != self.size:
            raise KdcacheError(f"{self.name}.apply(): the policy was made for images of size {list(self.size)}, "
                               f"found {list(images.shape[-2:])}")
        height, width = self.size
        top, left, box_h, box_w, flip = params.unbind(dim=1)
        cols, col_weights, col_precision = _linear_taps(left, box_w, width)  # [B, W, K], [B, W, K], [B]
        rows, row_weights, row_precision = _linear_taps(top, box_h, height)  # [B, H, K], [B, H, K], [B]
        # the flip is folded into the column taps: output column x takes the taps of column W-1-x
        mirrored = flip[:, None, None] != 0
        cols = torch.where(mirrored, cols.flip(1), cols)
        col_weights = torch.where(mirrored, col_weights.flip(1), col_weights)
        # horizontal pass first, rounded and clamped to uint8, then vertical: the order torch's kernel uses
        across = _resample(images, cols, col_weights, col_precision, dim=3)
        return _resample(across, rows, row_weights, row_precision, dim=2)

    def out_of_range(self, params: Tensor) -> Tensor:
        """Rows whose box is empty or leaves the image, or whose flip is not 0 or 1."""
        top, left, box_h, box_w, flip = params.unbind(dim=1)
        height, width = self.size
        inside = (top >= 0) & (left >= 0) & (box_h >= 1) & (box_w >= 1) & (top + box_h <= height) & \
            (left + box_w <= width)
        return ~inside | ((flip != 0) & (flip != 1))

    def describe(self) -> dict:
        """Name, parameter names, (no) view count, output size, draw ranges and resampling, for cache metadata."""
        return {
            "name": self.name,
            "param_names": list(self.param_names),
            "num_views": None,
            "size": list(self.size),
            "scale": list(self.scale),
            "ratio": list(self.ratio),
            "interpolation": "bilinear",
            "antialias": True,
        }


def _linear_taps(start: Tensor, length: Tensor, out_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Source indices [B, N, K], int16-range integer weights [B, N, K] and precision [B] of one axis.

    Each row b resamples the span [start, start + length) to out_size pixels with the triangle
    filter, in torch's antialiased uint8 arithmetic (UpSampleKernel.cpp: weights in double,
    normalised, scaled by 2^precision with precision fixed by the largest weight, rounded half up).
    Every float op is a single IEEE double op on tensors, never a CPU-scalar divisor (CUDA would
    multiply by its reciprocal), so CPU and CUDA give the same bits. Since length <= out_size the
    filter support is 1 pixel and torch's tap count ceil(1)·2 + 1 = 3 bounds every output's taps.
    """
    device, taps = start.device, 3
    length_f = length.double()[:, None]  # [B, 1]
    scale = length_f / torch.full_like(length_f, out_size)
    center = scale * (torch.arange(out_size, device=device, dtype=torch.float64) + 0.5)  # [B, N]
    first = ((center - 1.0) + 0.5).long().clamp(min=0)  # truncation toward zero, as the C++ cast
    count = (torch.minimum(((center + 1.0) + 0.5).long(), length[:, None]) - first).clamp(0, taps)
    offsets = torch.arange(taps, device=device)
    index = first[..., None] + offsets  # [B, N, K]
    distance = ((index.double() - center[..., None]) + 0.5).abs()
    weights = torch.where((offsets < count[..., None]) & (distance < 1.0), 1.0 - distance, 0.0)
    # the C++ loop sums the taps left to right; keep that order so the total rounds the same way
    total = (weights[..., 0] + weights[..., 1]) + weights[..., 2]
    weights = weights / torch.where(total != 0.0, total, 1.0)[..., None]
    largest = weights.flatten(1).amax(dim=1)  # [B]
    # torch's precision: the first p in 0..21 at which round(largest·2^(p+1)) reaches 2^15, else 22
    # powers of two come from integer shifts: exp2 need not be exact on every device
    powers = (1 << torch.arange(1, 23, device=device)).double()
    reaches = torch.floor(largest[:, None] * powers + 0.5) >= 2**15  # [B, 22]
    precision = torch.where(reaches.any(dim=1), reaches.long().argmax(dim=1), 22)
    fixed = torch.floor(weights * (1 << precision).double()[:, None, None] + 0.5).to(torch.int32)
    # weightless taps may point past the span; any in-span pixel serves, so clamp them to its last one
    index = start[:, None, None] + torch.minimum(index, (length - 1)[:, None, None])
    return index, fixed, precision


def _resample(images: Tensor, index: Tensor, weights: Tensor, precision: Tensor, dim: int) -> Tensor:
    """One separable pass along dim (2: rows, 3: columns) of uint8 [B, C, H, W], rounded as torch's uint8 kernel.

    Output pixel n of image b is Σ_k images[index[b, n, k]]·weights[b, n, k] in int32, plus half
    an LSB, shifted right by precision[b] and clamped to [0, 255]. The loop runs over the K taps.
    """
    batch = images.shape[0]
    along = [batch, 1, 1, 1]
    along[dim] = images.shape[dim]  # index[..., k] [B, N] lies along dim; N = the image's own size there
    shift = precision.to(torch.int32).view(batch, 1, 1, 1)
    total = torch.ones_like(shift) << (shift - 1)
    for k in range(index.shape[2]):
        picked = images.gather(dim, index[..., k].view(along).expand(images.shape))
        total = total + picked.to(torch.int32) * weights[..., k].view(along)
    return (total >> shift).clamp(0, 255).to(torch.uint8)


def resize(images: Tensor, size: list[int]) -> Tensor:
    """Bilinear antialiased resize of uint8 [..., C, H, W] with torchvision.transforms' resize (not v2's): it
    interpolates in float32 and rounds on every CPU, where v2's native uint8 path differs by ±1 on some."""
    from torchvision.transforms import functional as TF

    return TF.resize(images, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


def resize_views(views: Tensor, side: int | None) -> Tensor:
    """uint8 views [..., C, H, W] resized to side × side (`resize`), or as they are where side is None: a student's
    views at a smaller size than the teacher's (cross-resolution distillation)."""
    return views if side is None else resize(views, [side, side])


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


# each entry makes its policy for the stored images' (H, W) (None when that is not known); an entry that has a
# form for files streamed from disk takes `on_files` (kdcache.data.policies registers them all)
POLICIES: Registry[AugmentPolicy] = Registry("get_policy()")
list_policies = POLICIES.names
ON_FILES = "on_files"


def get_policy(name: str, image_size: tuple[int, int] | None = None, on_files: bool = False,
               **options: object) -> AugmentPolicy:
    """The registered policy of that name for images of image_size (H, W) (cifar and none ignore the size), with
    its options (randaugment's num_ops and magnitude); `on_files`: its form for files streamed from disk, whose
    views are drawn relative to each original file (what an ImageFiles source asks for)."""
    entry = POLICIES.entry(name)
    if on_files and not _takes_files(name):
        raise KdcacheError(f"--aug {name}: works on images held in memory, and this split is streamed from files; "
                           f"use {', '.join(filter(_takes_files, POLICIES.names()))} (RandomResizedCrop + flip, the "
                           f"evaluation crop, or both then RandAugment), or load the folder into memory with --preload")
    unknown = set(options) - set(inspect.signature(entry).parameters) - {ON_FILES}
    if unknown:
        raise KdcacheError(f"get_policy({name!r}): the policy takes no option {', '.join(sorted(unknown))} (those of "
                           f"randaugment: --ra-ops, --ra-magnitude); drop it or use --aug randaugment")
    return entry(image_size=image_size, **options, **({ON_FILES: True} if on_files else {}))


def _takes_files(name: str) -> bool:
    """Whether the registered policy has a form for files streamed from disk."""
    return ON_FILES in inspect.signature(POLICIES.entry(name)).parameters
