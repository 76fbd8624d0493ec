"""Data sources by name: whole uint8 image tensors with labels, normalisation constants and a fingerprint.

A loader is `loader(root, split, *, option=default, ...) -> ImageData`, registered under its
function name with `@register_dataset`; `load_dataset` checks the name, split and options once
for all of them.
"""

import dataclasses
import functools
import hashlib
import inspect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kdcache.data.augment import AugmentPolicy, get_policy, resize_views
from kdcache.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES, read_cifar
from kdcache.data.mixing import replay, with_mixing
from kdcache.data.source import EVAL_BATCH, TestBatch
from kdcache.errors import KdcacheError
from kdcache.registry import Registry

SPLITS = ("train", "test")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

DIGITS_SIZE = 32
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

SYNTHETIC_NUM_SAMPLES = {"train": 2000, "test": 500}
SYNTHETIC_PATTERN_CELLS = 4  # each class pattern is a random 4×4 colour grid, smoothly upsampled
SYNTHETIC_PATTERN_AMPLITUDE = 48.0  # grey levels per unit of the pattern's normal draw
SYNTHETIC_NOISE_STD = 48.0  # grey levels of per-pixel Gaussian noise


@dataclass(frozen=True, eq=False)
class ImageData:
    """One split of a dataset as whole tensors: uint8 images [N, C, H, W] and int64 labels [N], on the CPU; a
    `DataSource` whose views are made by indexing, augmenting and normalising whole batches on the device."""

    streamed: ClassVar[bool] = False
    default_policy: ClassVar[str] = "cifar"  # CIFAR's pad-and-crop: it works only on images held in memory
    name: str
    split: str
    images: Tensor
    labels: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    view_size: int | None = None  # views made at the held size, then resized to this side (`at_size`)
    classes: tuple[int, ...] | None = None  # the classes kept (--classes), else None: every class's samples
    class_names: tuple[str, ...] = ()  # a name per class, for a zero-shot teacher's prompts; () where none is known
    fingerprint: str = field(init=False)

    def __post_init__(self):
        images, labels = self.images, self.labels
        if images.dtype != torch.uint8 or images.ndim != 4 or images.device.type != "cpu" or not images.is_contiguous():
            raise KdcacheError(
                f"ImageData({self.name!r}): images should be a contiguous CPU uint8 tensor [N, C, H, W], "
                f"found {images.dtype} {list(images.shape)} on {images.device}"
            )
        if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise KdcacheError(
                f"ImageData({self.name!r}): labels should be int64 [{len(images)}], found {labels.dtype} {list(labels.shape)}"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise KdcacheError(f"ImageData({self.name!r}): labels should lie in [0, {self.num_classes})")
        channels = images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise KdcacheError(f"ImageData({self.name!r}): mean and std need one value per channel ({channels})")
        object.__setattr__(self, "mean", tuple(float(value) for value in self.mean))
        object.__setattr__(self, "std", tuple(float(value) for value in self.std))
        object.__setattr__(self, "fingerprint", data_fingerprint(images, labels))

    def normalized(self) -> Tensor:
        """The images as float32 `(images / 255 - mean) / std` [N, C, H, W], un-augmented: for evaluation."""
        return normalize(self.images, self.mean, self.std)

    def describe(self) -> dict:
        """What identifies this data in cache metadata (JSON-able); `view_size` where views are resized to it."""
        return {
            "name": self.name,
            "split": self.split,
            "num_samples": len(self.labels),
            "image_shape": list(self.images.shape[1:]),
            "num_classes": self.num_classes,
            "mean": list(self.mean),
            "std": list(self.std),
            "fingerprint": self.fingerprint,
            **({} if self.view_size is None else {"view_size": self.view_size}),
            **({"classes": list(self.classes)} if self.classes is not None else {}),
        }

    def at_size(self, side: int) -> "ImageData":
        """The same images whose views are made at the held size (the policy's crops and boxes in its pixels), then
        resized to side × side with torchvision's resize (bilinear, antialias); a larger side is refused."""
        height, width = self.images.shape[-2:]
        if height != width or not 0 < side <= height:
            raise KdcacheError(f"--image-size {side}: {self.name}'s images are held at {height}x{width}, and their "
                               f"views can be made smaller (square images only), never larger, which would only "
                               f"interpolate pixels; give --image-size {min(height, width)} or less")
        return replace(self, view_size=None if side == height else side)

    def resized(self, views: Tensor) -> Tensor:
        """Views [..., C, H, W] at the held size as this split serves them: resized to `view_size` where set."""
        return resize_views(views, self.view_size)

    def listing(self) -> bytes:
        """No files: a cache of data held in memory records no listing."""
        return b""

    def listed_files(self) -> None:
        """No files for a cache's fit check to compare."""
        return None

    def policy(self, name: str, mix: dict | None = None, **options: object) -> AugmentPolicy:
        """The registered policy `name` at the images' size, mixed as `mix` ({mode, alpha, prob}) says."""
        size = tuple(self.images.shape[-2:])
        return with_mixing(get_policy(name, image_size=size, **options), mix, size)

    def first_images(self, count: int = 2) -> Tensor:
        """The first `count` images, uint8 [count, C, H, W] (resized to `view_size` where set)."""
        return self.resized(self.images[:count])

    def evaluation(self, device: torch.device, workers: int = 0, resident: bool = True,
                   batch_size: int = EVAL_BATCH) -> "HeldTestBatches":
        """The images normalised on the device a batch at a time, held there with `resident` (else each batch moved
        as it comes); `workers` are not needed."""
        return HeldTestBatches(self, device, resident, batch_size)

    def sample_view(self, policy: AugmentPolicy, params: Tensor, index: int, checksums: None = None) -> Tensor:
        """Sample `index` under the view params [N, P] name, replayed from memory (then resized to `view_size` where
        set): uint8 [1, C, H, W]."""
        return self.resized(replay(policy, self.images, params, [index]))


class HeldTestBatches:
    """An in-memory split's un-augmented batches (resized once to its `view_size` where set), normalised on the
    device."""

    def __init__(self, data: ImageData, device: torch.device, resident: bool, batch_size: int) -> None:
        self.data, self.device, self.batch_size = data, device, batch_size
        images = data.resized(data.images)
        self.images = images.to(device) if resident else images

    def batches(self, samples: range) -> Iterator[TestBatch]:
        """The samples of `samples`, in order, normalised, with their labels on the device."""
        for start in range(samples.start, samples.stop, self.batch_size):
            stop = min(start + self.batch_size, samples.stop)
            yield (normalize(self.images[start:stop].to(self.device), self.data.mean, self.data.std),
                   self.data.labels[start:stop].to(self.device))

    def __len__(self) -> int:
        return len(self.data.labels)


def data_fingerprint(images: Tensor, labels: Tensor) -> str:
    """sha256 hex of the shapes, the image bytes and the label bytes: another order or subset gives another digest."""
    digest = hashlib.sha256(f"kdcache-data-v1 images uint8 {list(images.shape)} labels int64 {list(labels.shape)}\n".encode())
    digest.update(images.contiguous().numpy().reshape(-1))  # a flat view of the bytes: hashed without a copy
    digest.update(labels.numpy().astype("<i8").tobytes())
    return digest.hexdigest()


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float], out: Tensor | None = None) -> Tensor:
    """float32 `(images / 255 - mean) / std` per channel of uint8 images [..., C, H, W], on their device (into `out`
    when given: the same values, one copy fewer)."""
    if images.dtype != torch.uint8 or images.ndim < 3 or images.shape[-3] != len(mean) or len(mean) != len(std):
        raise KdcacheError(
            f"normalize(): needs uint8 images [..., C, H, W] and C values of mean and std, found {images.dtype} "
            f"{list(images.shape)} with {len(mean)} means and {len(std)} stds"
        )
    mean_tensor, std_tensor = _channel_constants(tuple(mean), tuple(std), images.device)
    return torch.div(images.to(torch.float32) / 255 - mean_tensor, std_tensor, out=out)


@functools.lru_cache(maxsize=32)
def _channel_constants(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """mean and std as [C, 1, 1] float32 tensors on the device, made once: on CUDA each making is a blocking copy,
    which every batch would otherwise pay twice."""
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1))


# loader(root, split, *, options...) -> ImageData, under its function name
DATASETS: Registry[ImageData] = Registry("load_dataset()")
register_dataset = DATASETS.register
list_datasets = DATASETS.names


def load_dataset(name: str, root: str | Path | None = None, split: str = "train",
                 classes: str | Sequence[int] | None = None, **options: object) -> ImageData:
    """One split of a registered dataset; `options` are the loader's keyword options; `classes` (such as "0-4")
    keeps only those classes' samples (`only_classes`)."""
    loader = DATASETS.entry(name)
    if split not in SPLITS:
        raise KdcacheError(f"load_dataset({name!r}): unknown split {split!r}; known: {', '.join(SPLITS)}")
    known = dataset_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise KdcacheError(
            f"load_dataset({name!r}): unknown option(s) {', '.join(unknown)}; known: {', '.join(known) or 'none'}"
        )
    data = loader(root, split, **options)
    return data if classes is None else only_classes(data, classes)


def parse_classes(classes: str | Sequence[int], num_classes: int | None, flag: str = "--classes") -> tuple[int, ...]:
    """The sorted classes that "0-4", "0,2,5" or "0-4,7" (or the numbers themselves) name, each below num_classes
    (unchecked where None)."""
    bound = "" if num_classes is None else f", each from 0 to {num_classes - 1}"
    problem = KdcacheError(f"{flag}: expected classes such as 0-4 or 0,2,5{bound}; got {classes!r}")
    named: set[int] = set()
    for item in classes.split(",") if isinstance(classes, str) else classes:
        first, dash, last = str(item).strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()) or (dash and int(last) < int(first)):
            raise problem
        named.update(range(int(first), int(last if dash else first) + 1))
    if not named or (num_classes is not None and max(named) >= num_classes):
        raise problem
    return tuple(sorted(named))


def only_classes(data: ImageData, classes: str | Sequence[int]) -> ImageData:
    """The split's samples of these classes alone, their labels (and the class count, mean and std) unchanged, so
    that a model's head still spans every class; recorded in its description as `classes`."""
    if not isinstance(data, ImageData):
        raise KdcacheError(f"--classes: keeps some classes of images held in memory (digits, cifar10, cifar100, "
                           f"synthetic, an imagefolder with --preload); {data.name} {data.split} is not: drop --classes"
                           + (" or add --preload" if getattr(data, "streamed", False) else ""))
    kept = parse_classes(classes, data.num_classes)
    chosen = torch.isin(data.labels, torch.tensor(kept))
    return dataclasses.replace(data, images=data.images[chosen].contiguous(), labels=data.labels[chosen],
                               classes=kept)


def load_at_size(name: str, root: str | Path | None = None, split: str = "train", **options: object) -> ImageData:
    """One split of a registered dataset with its loader's `options`; an `image_size` its loader does not take
    (digits, CIFAR: held at their own size) makes the views there and resizes them to that side (`at_size`)."""
    side = None if "image_size" in dataset_options(name) else options.pop("image_size", None)
    data = load_dataset(name, root, split, **options)
    return data if side is None else data.at_size(side)


def load_splits(name: str, root: str | Path | None = None, **options: object) -> tuple[ImageData, ImageData]:
    """The train and test splits of a registered dataset, as `load_at_size` loads each."""
    return tuple(load_at_size(name, root, split, **options) for split in SPLITS)


def dataset_options(name: str) -> list[str]:
    """The keyword options a registered dataset's loader takes (such as image_size)."""
    loader = DATASETS.entry(name)
    return [p.name for p in inspect.signature(loader).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


@register_dataset
def cifar10(root: str | Path | None, split: str) -> ImageData:
    """CIFAR-10 from `root` in torchvision's layout (`root/cifar-10-batches-py/`); never downloads."""
    images, labels = read_cifar("cifar10", root, split)
    return ImageData("cifar10", split, images, labels, 10, CIFAR10_MEAN, CIFAR10_STD, class_names=CIFAR10_CLASSES)


@register_dataset
def cifar100(root: str | Path | None, split: str) -> ImageData:
    """CIFAR-100 (fine labels) from `root` in torchvision's layout (`root/cifar-100-python/`); never downloads."""
    images, labels = read_cifar("cifar100", root, split)
    return ImageData("cifar100", split, images, labels, 100, CIFAR100_MEAN, CIFAR100_STD, class_names=CIFAR100_CLASSES)


@register_dataset
def digits(root: str | Path | None, split: str) -> ImageData:
    """scikit-learn's bundled 8×8 digits as 3×32×32 uint8 images, a fixed stratified 80/20 split; `root` is unused."""
    images, labels = _digits_images()
    train_indices, test_indices = _digits_split(labels.numpy())
    mean, std = _channel_stats(images[train_indices])
    indices = train_indices if split == "train" else test_indices
    return ImageData("digits", split, images[indices].contiguous(), labels[indices], 10, mean, std,
                     class_names=DIGIT_NAMES)


def _digits_images() -> tuple[Tensor, Tensor]:
    """All 1797 digits upsampled bilinearly ×4 to 32×32, scaled 0..16 → 0..255, grey replicated to 3 channels."""
    from sklearn.datasets import load_digits  # a heavy import, needed only here

    bunch = load_digits()
    grid = torch.from_numpy(bunch.images).to(torch.float64).unsqueeze(1)  # [N, 1, 8, 8], integers 0..16
    # With scale 4 and align_corners=False the bilinear weights are multiples of 1/8 per axis, so every
    # product and sum below is exact in float64: the pixels (and the fingerprint) are the same on every
    # machine and torch version. torch.round breaks the ties that remain half-to-even.
    upsampled = F.interpolate(grid, scale_factor=DIGITS_SIZE // 8, mode="bilinear", align_corners=False)
    grey = torch.round(upsampled * (255 / 16)).to(torch.uint8)
    return grey.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(bunch.target).to(torch.int64)


def _digits_split(labels: np.ndarray) -> tuple[Tensor, Tensor]:
    """Sorted train and test indices: per class, a seeded random 20% to test, the rest to train."""
    # NumPy's legacy RandomState stream is frozen (NEP 19), so the split never changes with its version
    generator = np.random.RandomState(DIGITS_SPLIT_SEED)
    test_parts = []
    for label in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == label)
        test_parts.append(members[generator.permutation(len(members))[: round(len(members) * DIGITS_TEST_FRACTION)]])
    test = np.sort(np.concatenate(test_parts))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return torch.from_numpy(train), torch.from_numpy(test)


def _channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1], from exact integer sums, to 4 decimals."""
    pixels = images.transpose(0, 1).reshape(images.shape[1], -1).to(torch.int64)
    count = pixels.shape[1]
    sums, square_sums = pixels.sum(1).tolist(), (pixels * pixels).sum(1).tolist()
    mean = tuple(round(total / (count * 255), 4) for total in sums)
    # population variance from Python integers: exact until the final division and square root
    std = tuple(
        round(math.sqrt((count * squares - total * total) / (count * count * 255 * 255)), 4)
        for total, squares in zip(sums, square_sums)
    )
    return mean, std


@register_dataset
def synthetic(
    root: str | Path | None,
    split: str,
    *,
    num_samples: int | None = None,
    num_classes: int = 10,
    image_size: int = 32,
    seed: int = 0,
) -> ImageData:
    """Seeded learnable images: each class a smooth random colour pattern, randomly shifted, plus noise; `root` is unused.

    Both splits share the class patterns of `seed` and draw their samples from separate streams;
    `num_samples` defaults to 2000 (train) or 500 (test).
    """
    num_samples = SYNTHETIC_NUM_SAMPLES[split] if num_samples is None else num_samples
    minimums = (("num_samples", num_samples, 1), ("num_classes", num_classes, 2), ("image_size", image_size, 8), ("seed", seed, 0))
    for option, value, least in minimums:
        if not isinstance(value, int) or value < least:
            raise KdcacheError(f"load_dataset('synthetic'): {option} should be an integer >= {least}, found {value!r}")
    max_shift = image_size // 8
    canvas = image_size + 2 * max_shift
    pattern_generator = torch.Generator().manual_seed(_stream_seed(seed, "patterns"))
    cells = torch.randn(num_classes, 3, SYNTHETIC_PATTERN_CELLS, SYNTHETIC_PATTERN_CELLS, generator=pattern_generator)
    patterns = F.interpolate(cells, size=(canvas, canvas), mode="bilinear", align_corners=False) * SYNTHETIC_PATTERN_AMPLITUDE

    sample_generator = torch.Generator().manual_seed(_stream_seed(seed, split))
    labels = torch.randperm(num_samples, generator=sample_generator) % num_classes  # balanced classes, random order
    shifts = torch.randint(0, 2 * max_shift + 1, (num_samples, 2), generator=sample_generator)
    noise = torch.randn(num_samples, 3, image_size, image_size, generator=sample_generator) * SYNTHETIC_NOISE_STD
    offsets = torch.arange(image_size)
    rows = (shifts[:, 0, None] + offsets)[:, None, :, None]
    cols = (shifts[:, 1, None] + offsets)[:, None, None, :]
    shifted = patterns[labels[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    images = (128 + shifted + noise).round().clamp(0, 255).to(torch.uint8)

    # Normalisation from the shared patterns and the noise level (ignoring clipping), so both splits agree
    channel_mean = 128 + patterns.mean(dim=(0, 2, 3))
    channel_std = (patterns.var(dim=(0, 2, 3), unbiased=False) + SYNTHETIC_NOISE_STD**2).sqrt()
    mean = tuple(round(value / 255, 4) for value in channel_mean.tolist())
    std = tuple(round(value / 255, 4) for value in channel_std.tolist())
    return ImageData("synthetic", split, images, labels, num_classes, mean, std)


def _stream_seed(seed: int, stream: str) -> int:
    """An independent torch seed for one named random stream of the synthetic dataset."""
    stream_index = ("patterns", *SPLITS).index(stream)
    return int(np.random.SeedSequence([seed, stream_index]).generate_state(1, dtype=np.uint64)[0])
