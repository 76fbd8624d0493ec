"""Mixup and CutMix as views: each sample's partner, λ and box drawn once per view, stored, and replayed.

A mixed view of sample n is its base view mixed with the base view of its partner m under the same cached
view (m's own crop and flip), as timm and torchvision mix a batch with itself rolled, but with the partner
drawn over the whole split and kept. The teacher's cached logits are of the mixed image; the student's
cross-entropy uses both labels, λ for n's (`soft_labels`). Mixup stores λ in 1/1024ths and mixes in
integers, CutMix pastes a box, so the pixels are the same on every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kdcache.data.augment import AugmentPolicy, _checked_params
from kdcache.errors import KdcacheError

MIX_MODES = ("mixup", "cutmix")
LAMBDA_UNITS = 1024  # mixup's λ in 1/1024ths: a · λ + b · (1 - λ) is then a sum of integers, rounded half up
# the targets a mixed view adds to a batch: the partner's label and λ, the weight of the sample's own label
MIX_LABEL, MIX_WEIGHT = "mix.label", "mix.weight"


@dataclass(frozen=True)
class Mixed:
    """A base policy's views mixed with a partner's: mixup (λ·a + (1-λ)·b) or CutMix (b's box pasted into a).

    Params: the base policy's, then `partner` (the partner's sample index; itself when not mixed) and, for
    mixup, `lam` (λ·1024), for CutMix the box `top, left, box_h, box_w` (empty when not mixed). λ ~ Beta(α, α),
    a view is mixed with probability `prob`; CutMix draws its box as torchvision's CutMix does and its λ is the
    share of the image left uncovered.
    """

    base: AugmentPolicy
    mode: str
    image_size: tuple[int, int]
    alpha: float = 1.0
    prob: float = 1.0
    num_views = None

    def __post_init__(self) -> None:
        """Refuse modes, α and probabilities that mixing cannot draw from."""
        if self.mode not in MIX_MODES:
            raise KdcacheError(f"--mix: unknown mode {self.mode!r}; known: {', '.join(MIX_MODES)}")
        if not (self.alpha > 0 and 0 <= self.prob <= 1):
            raise KdcacheError(f"--mix {self.mode}: needs --mix-alpha > 0 and 0 <= --mix-prob <= 1, got alpha "
                               f"{self.alpha}, prob {self.prob}")

    @property
    def name(self) -> str:
        """The base policy's name (the mixing is in the description's `mix`)."""
        return self.base.name

    @property
    def mix_names(self) -> tuple[str, ...]:
        """The mixing parameters after the base policy's."""
        return ("partner", "lam") if self.mode == "mixup" else ("partner", "top", "left", "box_h", "box_w")

    @property
    def param_names(self) -> tuple[str, ...]:
        """The base policy's parameters, then the mixing ones."""
        return (*self.base.param_names, *self.mix_names)

    @property
    def partner_column(self) -> int:
        """Where `partner` stands in a row of parameters."""
        return len(self.base.param_names)

    def sample(self, generator: torch.Generator, n: int) -> Tensor:
        """The base's draws for samples 0..n-1, then a partner from a random permutation, λ and (CutMix) a box."""
        base = self.base.sample(generator, n)
        partner = torch.randperm(n, generator=generator)
        return torch.cat([base, self.draw_mixing(generator, partner, torch.arange(n))], dim=1)

    def draw_mixing(self, generator: torch.Generator, partner: Tensor, own: Tensor) -> Tensor:
        """The mixing columns of n views [n, M]: whether each is mixed, then λ and (CutMix) a box; a view left
        unmixed keeps `own` as its partner, λ 1 (1024/1024) or an empty box."""
        n = len(partner)
        mixed = torch.rand(n, generator=generator, dtype=torch.float64) < self.prob
        # torch has no seeded Beta: numpy's, seeded from the generator, keeps the draws a function of the seed
        beta = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        lam = torch.from_numpy(beta.beta(self.alpha, self.alpha, n))
        partner = torch.where(mixed, partner, own)
        if self.mode == "mixup":
            units = torch.where(mixed, torch.round(lam * LAMBDA_UNITS).long(), LAMBDA_UNITS)
            return torch.stack([partner, units], dim=1)
        box = self._box(generator, lam)
        return torch.cat([partner[:, None], torch.where(mixed[:, None], box, 0)], dim=1)

    def _box(self, generator: torch.Generator, lam: Tensor) -> Tensor:
        """torchvision CutMix's box per λ: centre uniform, half sides ⌊√(1-λ)/2 · side⌋, clipped: [n, 4]."""
        height, width = self.image_size
        centre_y = torch.randint(0, height, (len(lam),), generator=generator)
        centre_x = torch.randint(0, width, (len(lam),), generator=generator)
        ratio = 0.5 * torch.sqrt(1.0 - lam)
        half_h, half_w = (ratio * height).long(), (ratio * width).long()
        top, left = (centre_y - half_h).clamp(min=0), (centre_x - half_w).clamp(min=0)
        bottom, right = (centre_y + half_h).clamp(max=height), (centre_x + half_w).clamp(max=width)
        return torch.stack([top, left, bottom - top, right - left], dim=1)

    def enumerate(self) -> Tensor:
        """Refused: partners and λ are drawn per view."""
        raise KdcacheError(f"--mix {self.mode}: mixed views are drawn per view (partner, λ); sample views with "
                           "--views instead of --exhaustive")

    def apply(self, images: Tensor, params: Tensor) -> Tensor:
        """Refused: a mixed view needs its partner's image; replay it with `replay(policy, images, params, index)`."""
        raise KdcacheError(f"--mix {self.mode}: a mixed view needs its partner's image too: call "
                           "kdcache.data.mixing.replay(policy, all_images, view_params, index)")

    def mix(self, views: Tensor, partner_views: Tensor, params: Tensor) -> Tensor:
        """Base views [B, C, H, W] mixed with their partners' as their params' mixing part says (uint8)."""
        mixing = params[:, self.partner_column + 1:].to(views.device)
        if self.mode == "mixup":
            units = mixing[:, 0].to(torch.int32).view(-1, 1, 1, 1)
            total = views.to(torch.int32) * units + partner_views.to(torch.int32) * (LAMBDA_UNITS - units)
            return ((total + LAMBDA_UNITS // 2) // LAMBDA_UNITS).to(torch.uint8)
        top, left, box_h, box_w = (column.view(-1, 1, 1, 1) for column in mixing.unbind(dim=1))
        rows = torch.arange(views.shape[2], device=views.device).view(1, 1, -1, 1)
        cols = torch.arange(views.shape[3], device=views.device).view(1, 1, 1, -1)
        inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
        return torch.where(inside, partner_views, views)

    def label_weight(self, params: Tensor) -> Tensor:
        """λ, the weight of each sample's own label: mixup's stored λ, CutMix's uncovered share. float32 [B]."""
        mixing = params[:, self.partner_column + 1:]
        if self.mode == "mixup":
            return (mixing[:, 0].double() / LAMBDA_UNITS).float()
        height, width = self.image_size
        return (1.0 - (mixing[:, 2] * mixing[:, 3]).double() / (height * width)).float()

    def out_of_range(self, params: Tensor) -> Tensor:
        """Rows the base refuses, or whose mixing this policy never draws: a partner that is no whole row of the
        view (params holds a whole view [N, P]), λ not a whole number of 1/1024ths in [0, 1], a CutMix box that
        is no clipped box of torchvision's CutMix; NaN nowhere."""
        partner, mixing = params[:, self.partner_column].double(), params[:, self.partner_column + 1:].double()
        whole = torch.cat([partner[:, None], mixing], dim=1)
        bad = self.base.out_of_range(params[:, :self.partner_column]) | ~(whole == whole.round()).all(dim=1)
        bad |= ~((partner >= 0) & (partner < len(params)))  # NaN compares false: refused
        if self.mode == "mixup":
            return bad | ~((mixing[:, 0] >= 0) & (mixing[:, 0] <= LAMBDA_UNITS))
        return bad | ~self._drawable_box(*mixing.unbind(dim=1))

    def _drawable_box(self, top: Tensor, left: Tensor, box_h: Tensor, box_w: Tensor) -> Tensor:
        """Whether each box is one `_box` draws: inside the image; each side 2·⌊r·side⌋ with one r ≤ 1/2 for both,
        or cut by the edge to between ⌊r·side⌋ and that (an odd side only where it meets the edge)."""
        height, width = self.image_size
        inside = (top >= 0) & (left >= 0) & (box_h >= 0) & (box_w >= 0) & (top + box_h <= height) & \
            (left + box_w <= width)
        # ⌊r·side⌋ = half with side ∈ [half, 2·half]: r ∈ [⌈side/2⌉ / S, (side + 1) / S), for both sides at once
        low = torch.maximum(torch.ceil(box_h / 2) / height, torch.ceil(box_w / 2) / width)
        high = torch.minimum((box_h + 1) / height, (box_w + 1) / width).clamp(max=0.5 + 1e-9)
        edge_h = (box_h % 2 == 0) | (top == 0) | (top + box_h == height)
        edge_w = (box_w % 2 == 0) | (left == 0) | (left + box_w == width)
        return inside & (low < high) & edge_h & edge_w

    def describe(self) -> dict:
        """The base policy's description with every parameter's name and the mixing constants."""
        return {**self.base.describe(), "param_names": list(self.param_names), "num_views": None,
                "mix": {"mode": self.mode, "alpha": self.alpha, "prob": self.prob, "lambda_units": LAMBDA_UNITS}}


def replay(policy: AugmentPolicy, images: Tensor, params: Tensor, index: Tensor | slice) -> Tensor:
    """The views of samples `index` (uint8), where images [N, C, H, W] and params [N, P] hold every sample of the
    view: a mixed view reads its partner's image and parameters there."""
    if not isinstance(policy, Mixed):
        return policy.apply(images[index], params[index])
    own = params[index]
    count = policy.partner_column
    partner = own[:, count].to(images.device)
    _checked_params(policy, images[index], own)
    views = policy.base.apply(images[index], own[:, :count])
    partner_views = policy.base.apply(images[partner], params[partner.to(params.device), :count])
    return policy.mix(views, partner_views, own)


def mix_targets(policy: AugmentPolicy, labels: Tensor, params: Tensor, index: Tensor | slice) -> dict[str, Tensor]:
    """A mixed view's label targets for samples `index` (labels and params of every sample): the partner's label
    and λ; nothing for an unmixed policy."""
    if not isinstance(policy, Mixed):
        return {}
    own = params[index]
    partner = own[:, policy.partner_column].long().to(labels.device)  # float32 for a streamed split
    return {MIX_LABEL: labels[partner], MIX_WEIGHT: policy.label_weight(own).to(labels.device)}


def soft_labels(labels: Tensor, targets: dict[str, Tensor] | None, num_classes: int
                ) -> tuple[Tensor, dict[str, Tensor] | None]:
    """Mixed labels λ·onehot(y) + (1-λ)·onehot(partner's y) [B, C] where the targets carry them (and the targets
    without them); the labels as they are otherwise."""
    if not targets or MIX_WEIGHT not in targets:
        return labels, targets
    rest = {name: value for name, value in targets.items() if name not in (MIX_LABEL, MIX_WEIGHT)}
    weight = targets[MIX_WEIGHT].float()[:, None]
    mixed = weight * F.one_hot(labels.long(), num_classes) + (1 - weight) * F.one_hot(
        targets[MIX_LABEL].long(), num_classes)
    return mixed, rest or None


def with_mixing(policy: AugmentPolicy, mix: dict | None, image_size: tuple[int, int], kind: type[Mixed] = Mixed,
                **fields: int) -> AugmentPolicy:
    """The policy mixed as `mix` ({mode, alpha, prob}) says, by `kind` (with its further `fields`), or the policy
    itself without."""
    if not mix:
        return policy
    return kind(policy, str(mix["mode"]), image_size, float(mix.get("alpha", 1.0)), float(mix.get("prob", 1.0)),
                **fields)
