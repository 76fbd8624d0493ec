"""RandAugment as a replayable policy: crop and flip, then N of torchvision's 14 ops, each drawn op and its signed
magnitude stored as parameters and replayed through torchvision's own functional ops.

torchvision's `RandAugment(num_ops, magnitude, num_magnitude_bins=31)` draws, for each of its N ops, an op
uniformly from its op set and, for a signed op, a fair sign. Here the draws are explicit: parameters
(op_k, magnitude_k) per op, magnitude_k = ± the magnitude bin (negative: the op's magnitude negated).
Replay applies `torchvision.transforms.functional` exactly as `RandAugment.forward` does (nearest
interpolation, fill 0), to every sample sharing an (op, magnitude) at once, so the pixels equal torchvision's
for the same draws on the same device. The colour ops blend in float32 and the geometric ops sample a float
grid, so CPU and CUDA may differ by rounding there (one grey level in a blend, a neighbouring pixel at a tie).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kdcache.data.augment import AugmentPolicy, _checked_params
from kdcache.errors import KdcacheError

# torchvision's op set, in its order (RandAugment._augmentation_space): an op's index is its stored number
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
SIGNED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
                    "Sharpness"})
# the ops whose magnitude is linspace(0, top, bins)[bin]; the translations' top is a fraction of the image's side
LINEAR_TOP = {"ShearX": 0.3, "ShearY": 0.3, "Rotate": 30.0, "Brightness": 0.9, "Color": 0.9, "Contrast": 0.9,
              "Sharpness": 0.9}
TRANSLATE_FRACTION = 150.0 / 331.0


def op_magnitude(op: str, magnitude_bin: int, num_bins: int, image_size: tuple[int, int]) -> float:
    """The magnitude torchvision's RandAugment gives op at that bin (negative bins negate it), for an image (H, W)."""
    sign, level = (-1.0 if magnitude_bin < 0 else 1.0), abs(magnitude_bin)
    if op in LINEAR_TOP:
        return sign * float(torch.linspace(0.0, LINEAR_TOP[op], num_bins)[level])
    if op in ("TranslateX", "TranslateY"):
        side = image_size[1] if op == "TranslateX" else image_size[0]
        return sign * float(torch.linspace(0.0, TRANSLATE_FRACTION * side, num_bins)[level])
    if op == "Posterize":
        return float((8 - (torch.arange(num_bins) / ((num_bins - 1) / 4)).round().int())[level])
    if op == "Solarize":
        return float(torch.linspace(255.0, 0.0, num_bins)[level])
    return 0.0  # Identity, AutoContrast, Equalize take no magnitude


def apply_op(images: Tensor, op: str, magnitude: float) -> Tensor:
    """torchvision's RandAugment op on uint8 images [B, C, H, W]: nearest interpolation, zero fill."""
    # imported here: torchvision takes seconds to import, which every kdcache command would pay at start
    from torchvision.transforms import functional as TF

    nearest = TF.InterpolationMode.NEAREST
    if op in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        return TF.affine(images, angle=0.0, translate=[0, 0], scale=1.0, interpolation=nearest, center=[0, 0],
                         shear=[shear, 0.0] if op == "ShearX" else [0.0, shear])
    if op in ("TranslateX", "TranslateY"):
        shift = [int(magnitude), 0] if op == "TranslateX" else [0, int(magnitude)]
        return TF.affine(images, angle=0.0, translate=shift, scale=1.0, interpolation=nearest, shear=[0.0, 0.0])
    adjust = {"Rotate": lambda x: TF.rotate(x, magnitude, interpolation=nearest),
              "Brightness": lambda x: TF.adjust_brightness(x, 1.0 + magnitude),
              "Color": lambda x: TF.adjust_saturation(x, 1.0 + magnitude),
              "Contrast": lambda x: TF.adjust_contrast(x, 1.0 + magnitude),
              "Sharpness": lambda x: TF.adjust_sharpness(x, 1.0 + magnitude),
              "Posterize": lambda x: TF.posterize(x, int(magnitude)),
              "Solarize": lambda x: TF.solarize(x, magnitude),
              "AutoContrast": TF.autocontrast, "Equalize": TF.equalize, "Identity": lambda x: x}
    return adjust[op](images)


@dataclass(frozen=True)
class RandAugmentOps:
    """The RandAugment part of a view: `num_ops` ops of magnitude bin `magnitude`, drawn and replayed.

    Params per view: (op_k, magnitude_k) for k < num_ops: op_k indexes OPS, magnitude_k is the bin
    (0..num_magnitude_bins-1), negated where a signed op's sign came up negative.
    """

    num_ops: int = 2
    magnitude: int = 9
    num_magnitude_bins: int = 31

    def __post_init__(self) -> None:
        """Refuse op counts and magnitudes torchvision's RandAugment could not use."""
        if self.num_ops < 1 or not 0 <= self.magnitude < self.num_magnitude_bins:
            raise KdcacheError(f"randaugment: needs --ra-ops >= 1 and 0 <= --ra-magnitude < {self.num_magnitude_bins}"
                               f" (the magnitude bins), got {self.num_ops} ops of magnitude {self.magnitude}")

    @property
    def param_names(self) -> tuple[str, ...]:
        """op_k and magnitude_k for each op k."""
        return tuple(f"{part}{k}" for k in range(self.num_ops) for part in ("op", "magnitude"))

    def draw(self, generator: torch.Generator, n: int) -> Tensor:
        """Per view and op a uniform op and a fair sign (kept for signed ops): int64 [n, 2·num_ops]."""
        ops = torch.randint(0, len(OPS), (n, self.num_ops), generator=generator)
        negative = torch.randint(0, 2, (n, self.num_ops), generator=generator).bool()
        signed = torch.tensor([op in SIGNED for op in OPS])[ops]
        magnitudes = torch.where(signed & negative, -self.magnitude, self.magnitude)
        return torch.stack([ops, magnitudes], dim=2).flatten(1)  # op0, magnitude0, op1, ...

    def apply(self, views: Tensor, params: Tensor) -> Tensor:
        """Each op in turn on uint8 views [B, C, H, W], at once to the samples that share (op, magnitude)."""
        size = tuple(views.shape[-2:])
        for k in range(self.num_ops):
            pairs, group = torch.unique(params[:, 2 * k:2 * k + 2].long(), dim=0, return_inverse=True)
            changed = views.clone()
            for g, (op, magnitude_bin) in enumerate(pairs.tolist()):
                members = torch.nonzero(group == g).flatten()
                name = OPS[op]
                changed[members] = apply_op(views[members], name,
                                            op_magnitude(name, magnitude_bin, self.num_magnitude_bins, size))
            views = changed
        return views

    def out_of_range(self, params: Tensor) -> Tensor:
        """Rows with an unknown op, a magnitude not ±magnitude, a negated unsigned op, or a fraction."""
        ops, magnitudes = params[:, 0::2], params[:, 1::2]
        known = (ops >= 0) & (ops < len(OPS)) & (ops == ops.round())
        signed = torch.tensor([op in SIGNED for op in OPS])[ops.long().clamp(0, len(OPS) - 1)]
        allowed = (magnitudes == self.magnitude) | (signed & (magnitudes == -self.magnitude))
        return ~(known & allowed).all(dim=1)

    def describe(self) -> dict:
        """RandAugment's constants, for cache metadata."""
        return {"num_ops": self.num_ops, "magnitude": self.magnitude, "num_magnitude_bins": self.num_magnitude_bins,
                "ops": list(OPS), "interpolation": "nearest", "fill": 0}


@dataclass(frozen=True)
class RandAugmented:
    """A base policy's view (crop and flip), then RandAugment's ops (`RandAugmentOps`): the base's parameters,
    then (op_k, magnitude_k) per op."""

    base: AugmentPolicy
    ops: RandAugmentOps = RandAugmentOps()
    name = "randaugment"
    num_views = None

    @property
    def param_names(self) -> tuple[str, ...]:
        """The base policy's parameters, then op_k and magnitude_k per op."""
        return (*self.base.param_names, *self.ops.param_names)

    def sample(self, generator: torch.Generator, n: int) -> Tensor:
        """The base's draws and the ops' (drawn first, as the caches of 25c6ec1 were): int64 [n, P]."""
        ops = self.ops.draw(generator, n)
        return torch.cat([self.base.sample(generator, n), ops], dim=1)

    def enumerate(self) -> Tensor:
        """Refused: sample views with --views."""
        raise KdcacheError(f"{self.name}.enumerate(): {len(OPS)}^{self.ops.num_ops} op choices on top of every crop "
                           "are too many views to cache each; sample views with --views instead of --exhaustive")

    def apply(self, images: Tensor, params: Tensor) -> Tensor:
        """The base views, then each op in turn."""
        params = _checked_params(self, images, params)
        count = len(self.base.param_names)
        return self.ops.apply(self.base.apply(images, params[:, :count]), params[:, count:])

    def out_of_range(self, params: Tensor) -> Tensor:
        """Rows the base refuses, or whose ops RandAugment could not have drawn."""
        count = len(self.base.param_names)
        return self.base.out_of_range(params[:, :count]) | self.ops.out_of_range(params[:, count:])

    def describe(self) -> dict:
        """Name, parameter names, the base policy's description and RandAugment's constants, for cache metadata."""
        return {"name": self.name, "param_names": list(self.param_names), "num_views": None,
                "base": self.base.describe(), "randaugment": self.ops.describe()}
