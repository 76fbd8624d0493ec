"""Segmentation data: images with a label map each, held whole in memory, whose views crop and flip image and map alike.

A `DenseData` split holds uint8 images [N, 3, H, W] and uint8 label maps [N, H, W]: each pixel's class, or
`IGNORE_INDEX` (255, as VOC marks borders) where it counts for no class. Its policies (`LabelledPolicy`) are the
in-memory image policies whose geometry has an exact form on a label map: `cifar` (pad, crop, flip: the map is
padded with IGNORE_INDEX, so pixels from outside the image are never scored) and `none`. A view of the map is the
same gather as the view of the image, so the pixel at (y, x) of a view and its label come from one source pixel.

`digits-scenes`, the embedded default, composes scikit-learn's bundled digits into 48×48 scenes: 2 to 4 digits of
16×16 in distinct cells of a 3×3 grid, each tinted a colour, on black; a pixel is labelled with its digit's class + 1
where the digit's ink is at least INK (a quarter of full scale), else 0 (background): 11 classes. Train scenes use
the digits of the `digits` train split, test scenes those of its test split, drawn from a fixed seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kdcache.data.augment import CropFlip, Identity, get_policy
from kdcache.data.source import EVAL_BATCH
from kdcache.data.sources import _channel_stats, _digits_images, _digits_split, normalize, register_dataset
from kdcache.errors import KdcacheError

IGNORE_INDEX = 255  # a label map's "no class here": padding, borders, unlabelled pixels
DENSE_POLICIES = ("cifar", "none")  # the policies whose geometry applies exactly to a label map
SCENE_SIZE = 48
SCENE_GRID = 3  # cells per side; a digit fills one cell
SCENE_DIGITS = (2, 4)  # the fewest and most digits in a scene
SCENE_COUNTS = {"train": 1000, "test": 250}
SCENE_SEED = 35
INK = 64  # a digit's pixel at least this bright (of 255) is labelled with its class
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

DenseBatch = tuple[Tensor, Tensor]  # images normalised float32 [B, 3, H, W], label maps int64 [B, H, W]


@dataclass(frozen=True)
class LabelledPolicy:
    """An image policy of DENSE_POLICIES and its exact form on label maps: the same parameters, the same gathers."""

    image_policy: CropFlip | Identity

    @property
    def name(self) -> str:
        return self.image_policy.name

    @property
    def param_names(self) -> tuple[str, ...]:
        return self.image_policy.param_names

    @property
    def num_views(self) -> int:
        return self.image_policy.num_views

    def sample(self, generator: torch.Generator, n: int) -> Tensor:
        """Parameters [n, P] of n views (the image policy's draws)."""
        return self.image_policy.sample(generator, n)

    def enumerate(self) -> Tensor:
        """Every view's parameters [V, P]."""
        return self.image_policy.enumerate()

    def out_of_range(self, params: Tensor) -> Tensor:
        """[n] bool: rows the policy could not have drawn."""
        return self.image_policy.out_of_range(params)

    def apply(self, images: Tensor, params: Tensor) -> Tensor:
        """The image views [B, 3, H, W] (uint8) that params [B, P] name."""
        return self.image_policy.apply(images, params)

    def apply_masks(self, masks: Tensor, params: Tensor) -> Tensor:
        """The label maps [B, H, W] (uint8) of the same views: pixels from outside the image are IGNORE_INDEX."""
        return self.image_policy.apply(masks[:, None], params, fill=IGNORE_INDEX)[:, 0]

    def describe(self) -> dict:
        """The image policy's description and the label maps' fill, for cache metadata."""
        return {**self.image_policy.describe(), "mask_fill": IGNORE_INDEX}


@dataclass(frozen=True)
class DenseData:
    """One split of a segmentation dataset held whole: uint8 images [N, 3, H, W] and label maps [N, H, W] on the CPU."""

    streamed: ClassVar[bool] = False
    default_policy: ClassVar[str] = "cifar"
    name: str
    split: str
    images: Tensor
    masks: Tensor
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        images, masks = self.images, self.masks
        if images.dtype != torch.uint8 or images.ndim != 4 or not images.is_contiguous():
            raise KdcacheError(f"DenseData({self.name!r}): images should be a contiguous uint8 tensor [N, C, H, W], "
                               f"found {images.dtype} {list(images.shape)}")
        if masks.dtype != torch.uint8 or masks.shape != (images.shape[0], *images.shape[2:]):
            raise KdcacheError(f"DenseData({self.name!r}): label maps should be uint8 [{len(images)}, "
                               f"{images.shape[2]}, {images.shape[3]}], found {masks.dtype} {list(masks.shape)}")
        labelled = masks[masks != IGNORE_INDEX]
        if len(labelled) and int(labelled.max()) >= self.num_classes:
            raise KdcacheError(f"DenseData({self.name!r}): a label map holds class {int(labelled.max())}, beyond "
                               f"the {self.num_classes} classes named; pixels of no class should be {IGNORE_INDEX}")
        object.__setattr__(self, "fingerprint", dense_fingerprint(images, masks))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def describe(self) -> dict:
        """What identifies this data in cache metadata (JSON-able)."""
        return {"name": self.name, "split": self.split, "task": "segmentation", "num_samples": len(self),
                "image_shape": list(self.images.shape[1:]), "num_classes": self.num_classes,
                "class_names": list(self.class_names), "ignore_index": IGNORE_INDEX, "mean": list(self.mean),
                "std": list(self.std), "fingerprint": self.fingerprint}

    def policy(self, name: str, mix: dict | None = None, **options: object) -> LabelledPolicy:
        """The policy `name` (one of DENSE_POLICIES) over images and label maps alike; mixing is refused."""
        if name not in DENSE_POLICIES or mix or options:
            asked = " with mixing" if mix else " with options" if options else ""
            raise KdcacheError(f"--aug {name}{asked}: a segmentation split's views must move each label with its "
                               f"pixel, which {', '.join(DENSE_POLICIES)} do exactly (no mixing, no RandAugment); "
                               f"give --aug {' or --aug '.join(DENSE_POLICIES)}")
        return LabelledPolicy(get_policy(name, image_size=tuple(self.images.shape[-2:])))

    def at_size(self, side: int) -> DenseData:
        """Refused (what --image-size asks of a split held at its own size): a label map has no exact resize."""
        raise KdcacheError(f"--image-size {side}: {self.name}'s images and label maps are used at their own size "
                           f"({self.images.shape[-1]} px), since resizing a label map would move its classes' "
                           f"borders; drop --image-size")

    def views(self, policy: LabelledPolicy, params: Tensor, indices: Tensor, device: torch.device) -> DenseBatch:
        """Samples `indices` under their rows of params [N, P]: normalised images and int64 label maps on `device`."""
        chosen = params[indices.cpu()].to(device)
        images = policy.apply(self.images[indices.cpu()].to(device), chosen)
        masks = policy.apply_masks(self.masks[indices.cpu()].to(device), chosen)
        return normalize(images, self.mean, self.std), masks.long()

    def evaluation(self, device: torch.device, batch_size: int = EVAL_BATCH) -> Iterator[DenseBatch]:
        """The split un-augmented, in order: normalised images and int64 label maps on `device`."""
        for start in range(0, len(self), batch_size):
            images = self.images[start:start + batch_size].to(device)
            yield normalize(images, self.mean, self.std), self.masks[start:start + batch_size].to(device).long()


def is_dense(data: object) -> bool:
    """Whether a data source has a label per pixel (its stages are segmentation's), not one per image."""
    return isinstance(data, DenseData)


def dense_fingerprint(images: Tensor, masks: Tensor) -> str:
    """sha256 hex of the shapes, the image bytes and the label maps' bytes."""
    digest = hashlib.sha256(f"kdcache-dense-v1 images uint8 {list(images.shape)} masks uint8 "
                            f"{list(masks.shape)}\n".encode())
    digest.update(images.contiguous().numpy().reshape(-1))
    digest.update(masks.contiguous().numpy().reshape(-1))
    return digest.hexdigest()


def digits_scenes(root: str | Path | None, split: str) -> DenseData:
    """scikit-learn's digits composed into 48×48 scenes labelled per pixel (11 classes); `root` is unused."""
    digit_images, labels = _digits_images()
    train_indices, test_indices = _digits_split(labels.numpy())
    indices = train_indices if split == "train" else test_indices
    generator = np.random.RandomState(SCENE_SEED + (split != "train"))  # frozen stream (NEP 19)
    images, masks = compose_scenes(digit_images[indices], labels[indices], SCENE_COUNTS[split], generator)
    train_images, _ = (images, masks) if split == "train" else compose_scenes(
        digit_images[train_indices], labels[train_indices], SCENE_COUNTS["train"], np.random.RandomState(SCENE_SEED))
    mean, std = _channel_stats(train_images)
    return DenseData("digits-scenes", split, images, masks, ("background", *DIGIT_NAMES), mean, std)


register_dataset(digits_scenes, "digits-scenes")


def compose_scenes(digit_images: Tensor, labels: Tensor, count: int,
                   generator: np.random.RandomState) -> tuple[Tensor, Tensor]:
    """`count` scenes of SCENE_SIZE²: images uint8 [count, 3, S, S] and label maps [count, S, S] (see the module)."""
    cell = SCENE_SIZE // SCENE_GRID
    small = F.interpolate(digit_images[:, :1].float(), size=(cell, cell), mode="area").round().to(torch.uint8)
    images = torch.zeros(count, 3, SCENE_SIZE, SCENE_SIZE, dtype=torch.uint8)
    masks = torch.zeros(count, SCENE_SIZE, SCENE_SIZE, dtype=torch.uint8)
    for scene in range(count):
        chosen = generator.choice(len(labels), generator.randint(SCENE_DIGITS[0], SCENE_DIGITS[1] + 1))
        cells = generator.choice(SCENE_GRID * SCENE_GRID, len(chosen), replace=False)
        for digit, place in zip(chosen, cells):
            rows, cols = _cell(place, cell)
            tint = torch.from_numpy(generator.uniform(0.4, 1.0, (3, 1, 1))).float()
            ink = small[digit]
            images[scene, :, rows, cols] = (ink.float() * tint).round().to(torch.uint8)
            masks[scene, rows, cols] = torch.where(ink[0] >= INK, int(labels[digit]) + 1, 0).to(torch.uint8)
    return images, masks


def _cell(place: int, cell: int) -> tuple[slice, slice]:
    """The rows and columns of grid cell `place` (row-major)."""
    row, col = divmod(int(place), SCENE_GRID)
    return slice(row * cell, (row + 1) * cell), slice(col * cell, (col + 1) * cell)
