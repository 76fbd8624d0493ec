"""One interface for every data source, whatever its storage: a source gives samples (labels, normalisation, a
description for caches) and the replayable policy that fits it; whether it holds uint8 tensors that the device
path indexes whole (`ImageData`) or lists files that DataLoader workers decode (`ImageFiles`) is its own business.

Callers ask the source: `policy(...)` (one policy registry; the source picks the form it reads), `first_images`,
`evaluation` (the un-augmented test batches), `sample_view` (one sample under a cached view), `listed_files`
(what a cache's fit check compares). The one thing a caller reads about storage is `streamed`, where it must
choose machinery the source cannot hold (the loop's split, the dump's batches).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from kdcache.errors import KdcacheError

TestBatch = tuple[Tensor, Tensor]  # images (normalised, on the device), labels
EVAL_BATCH = 250  # test images per forward pass


class Policy(Protocol):
    """A replayable augmentation policy of either form (kdcache.data.augment's in memory, files' per file)."""

    name: str
    param_names: tuple[str, ...]
    num_views: int | None

    def sample(self, generator: torch.Generator, n: int) -> Tensor | None:
        """Parameters [n, P] of n views drawn ahead; None where each view is drawn as its file is read."""
        ...

    def out_of_range(self, params: Tensor) -> Tensor:
        """[n] bool: which rows of params [n, P] this policy could not have drawn."""
        ...

    def describe(self) -> dict:
        """Name, parameter names and constants, for cache metadata (JSON-able)."""
        ...


class TestBatches(Protocol):
    """A test split's un-augmented batches, normalised on the device."""

    def batches(self, samples: range) -> Iterator[TestBatch]:
        """The samples of `samples` (a rank's share), in order."""
        ...

    def __len__(self) -> int:
        ...


class DataSource(Protocol):
    """One split of a dataset, in memory or streamed: what every stage asks of it."""

    name: str
    split: str
    labels: Tensor  # int64 [N], on the CPU
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str
    streamed: bool  # read from files in DataLoader workers (else held whole, for the device path)
    default_policy: str  # the policy a run takes when none is named: the field's for this kind of data

    def describe(self) -> dict:
        """What identifies this data in cache metadata (JSON-able)."""
        ...

    def listing(self) -> bytes:
        """The files' relative paths, newline-separated, that a cache records (empty for data held in memory)."""
        ...

    def listed_files(self) -> tuple[str, list[bytes]] | None:
        """(folder, relative paths) of a split read from files, for a cache's fit check; None in memory."""
        ...

    def policy(self, name: str, mix: dict | None = None, **options: object) -> Policy:
        """The registered policy `name` in the form this source reads, mixed as `mix` ({mode, alpha, prob}) says."""
        ...

    def first_images(self, count: int = 2) -> Tensor:
        """The first `count` samples as uint8 [count, C, S, S], un-augmented (evaluation's crop for files)."""
        ...

    def at_size(self, side: int) -> DataSource:
        """The same samples with views made at side × side (files: from the original at that side; images held in
        memory: their views at the held size, resized)."""
        ...

    def evaluation(self, device: torch.device, workers: int = 0, resident: bool = True,
                   batch_size: int = EVAL_BATCH) -> TestBatches:
        """The un-augmented batches of this split, as every evaluation reads them."""
        ...

    def sample_view(self, policy: Policy, params: Tensor, index: int, checksums: np.ndarray | None = None) -> Tensor:
        """Sample `index` under the view params [N, P] name, uint8 [1, C, S, S] (a file checked against
        `checksums`, the crc32c the teacher's dump recorded, where given)."""
        ...


def class_names(data: DataSource, names_file: str | None = None) -> tuple[str, ...]:
    """A name per class for a zero-shot teacher's prompts: the lines of `names_file` (--class-names: UTF-8, one name
    per line, in label order) where given, else the source's where it knows them (digits, CIFAR, an image folder's
    folders: `class_names`); () for one that names none (synthetic data, text)."""
    if names_file is None:
        return tuple(getattr(data, "class_names", ()))
    try:
        names = tuple(line.strip() for line in Path(names_file).read_text(encoding="utf-8").splitlines())
    except (OSError, UnicodeDecodeError) as error:
        raise KdcacheError(f"--class-names {names_file}: cannot be read as UTF-8 text ({error}); pass a text file of "
                           f"one class name per line") from None
    if "" in names:
        raise KdcacheError(f"--class-names {names_file}: line {names.index('') + 1} is empty; give one class name "
                           f"per line, in label order, and no empty lines")
    return names


def policy_for(data: DataSource, name: str | None, mix: dict | None = None, **options: object) -> Policy:
    """The augmentation policy `name` (None: the source's default; with its options, e.g. RandAugment's num_ops,
    those given as None left out) for this data, mixed as `mix` ({mode, alpha, prob}) says."""
    options = {key: value for key, value in options.items() if value is not None}
    return data.policy(name or data.default_policy, mix, **options)


def policy_settings(augmentation: dict) -> tuple[str, dict | None, dict[str, int | None]]:
    """A cache's `augmentation` metadata as policy_for's arguments: the name, the mixing ({mode, alpha, prob} or
    None) and RandAugment's options (num_ops, magnitude; None without RandAugment)."""
    randaugment = augmentation.get("randaugment", {})
    options = {"num_ops": randaugment.get("num_ops"), "magnitude": randaugment.get("magnitude")}
    return augmentation["name"], augmentation.get("mix"), options


def stored_policy(data: DataSource, augmentation: dict) -> Policy:
    """The policy a cache's `augmentation` metadata describes, for this data (RandAugment's and mixing's constants
    included)."""
    name, mix, options = policy_settings(augmentation)
    return policy_for(data, name, mix, **options)


def student_views(data: DataSource, augmentation: dict, side: int | None) -> tuple[DataSource, Policy]:
    """The source and policy that replay a cache's views (`augmentation`, its metadata, made from `data`) for a
    student at side × side: the cache's own where side is None or the cache's; a smaller side sees the same views
    at a lower resolution (cross-resolution distillation): files' boxes cut from the original file and resized to
    that side, views of images held in memory resized from the teacher's. A larger side is refused, and CutMix
    boxes of files (in the teacher's pixel grid, no whole pixels at another side)."""
    cached = int(data.describe()["image_shape"][-1])
    if side is None or side == cached:
        return data, stored_policy(data, augmentation)
    if side > cached:
        raise KdcacheError(f"--image-size {side}: the teacher's cached views are {cached}x{cached}, and a student "
                           f"sees them at that size or smaller (the same crops, fewer pixels), never larger, where it "
                           f"would see detail the teacher never saw; give --image-size {cached} or less "
                           f"(image_size= in CacheDataset), or dump the teacher at {side} px")
    if data.streamed and (augmentation.get("mix") or {}).get("mode") == "cutmix":
        raise KdcacheError(f"--image-size {side}: the cache's CutMix boxes are whole pixels of the teacher's "
                           f"{cached}x{cached} views of files, with no exact box at {side} px; train at the cache's "
                           f"size (drop --image-size), or dump a CutMix cache at {side} px")
    smaller = data.at_size(side)
    return smaller, stored_policy(smaller, augmentation)
