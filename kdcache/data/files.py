"""Image files streamed from disk: the listing, per-file reading and decoding, and views drawn relative to each
original image, read in DataLoader workers.

`ImageFiles` holds a split's file list and labels only; nothing is decoded up front. A view of a file is
drawn for that image's own size (`FileResizedCropFlip`, torchvision's RandomResizedCrop + flip) and stored as
fractions of it, so it is replayed from the original file at any time; `FileCenterCrop` is the evaluation
transform; `FileMixed` mixes a view with a partner file's (mixup, CutMix). `FileBatches` reads whole batches in
DataLoader workers and returns the crc32c of every file it read, which the dump records; given the recorded ones
(distill), it checks every file it reads against them.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar, Protocol

import google_crc32c
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info

from kdcache.data.augment import get_policy, resize
from kdcache.data.mixing import Mixed, with_mixing
from kdcache.data.randaugment import RandAugmentOps
from kdcache.data.source import EVAL_BATCH, TestBatch
from kdcache.data.sources import normalize
from kdcache.data.untrusted import DEFAULT_MAX_PIXELS, BadImageError, TooManyPixelsError, check_image_bytes
from kdcache.errors import CorruptCacheError, KdcacheError

# IMG_EXTENSIONS lists formats torchvision.io cannot decode; those go through PIL, as ImageFolder's loader does.
PIL_ONLY_EXTENSIONS = (".bmp", ".pgm", ".ppm", ".tif", ".tiff")
EVAL_RESIZE_RATIO = 8 / 7  # the field's evaluation: shorter side to 256 for a 224 crop, then the centre crop
DRAW_STREAMS = {"views": 0, "fresh": 1}  # the dump's cached views and training's fresh epochs draw apart


@dataclass(frozen=True, eq=False)
class ImageFiles:
    """One split as a list of image files (relative to `root`, torchvision's order) and int64 labels; decoded
    only when read, each sample's view made at `image_size` × `image_size`: a `DataSource` whose views DataLoader
    workers make from the original files."""

    streamed: ClassVar[bool] = True
    default_policy: ClassVar[str] = "imagenet"  # a streamed folder is ImageNet-like
    name: str
    split: str
    root: str
    paths: np.ndarray  # bytes: the files' paths relative to root, '/'-separated
    labels: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    max_pixels: int = DEFAULT_MAX_PIXELS  # a file whose header declares more is refused before it is decoded
    class_names: tuple[str, ...] = ()  # a name per class (its folder's), for a zero-shot teacher's prompts
    fingerprint: str = field(init=False)
    listing_bytes: int = field(init=False)  # the size of listing(), which describe() names

    def __post_init__(self) -> None:
        if self.paths.dtype.kind != "S" or self.paths.shape != tuple(self.labels.shape):
            raise KdcacheError(f"ImageFiles({self.name!r}): paths should be a bytes array with one path per label, "
                               f"found {self.paths.dtype} {list(self.paths.shape)} for {len(self.labels)} labels")
        object.__setattr__(self, "mean", tuple(float(value) for value in self.mean))
        object.__setattr__(self, "std", tuple(float(value) for value in self.std))
        listing = self.listing()
        digest = hashlib.sha256(f"kdcache-files-v1 {len(self.paths)} files\n".encode())
        digest.update(listing)
        object.__setattr__(self, "listing_bytes", len(listing))
        digest.update(self.labels.numpy().astype("<i8").tobytes())
        object.__setattr__(self, "fingerprint", digest.hexdigest())

    def path(self, index: int) -> str:
        """The file of sample `index`, a path on this machine."""
        return os.path.join(self.root, os.fsdecode(self.paths[index]))

    def listing(self) -> bytes:
        """The relative paths, newline-separated: what a cache records to name the first file that differs."""
        return b"\n".join(self.paths.tolist())

    def describe(self) -> dict:
        """What identifies this data in cache metadata (JSON-able); `source: files` says it is read from files."""
        return {"name": self.name, "split": self.split, "source": "files", "num_samples": len(self.labels),
                "image_shape": [3, self.image_size, self.image_size], "num_classes": self.num_classes,
                "mean": list(self.mean), "std": list(self.std), "fingerprint": self.fingerprint,
                "listing_bytes": self.listing_bytes}

    def listed_files(self) -> tuple[str, list[bytes]]:
        """(folder, relative paths): what a cache's fit check compares with the listing the dump read."""
        return self.root, self.paths.tolist()

    def policy(self, name: str, mix: dict | None = None, **options: object) -> FilePolicy:
        """The registered policy `name` in its form for files (views drawn relative to each original file, made at
        image_size), mixed with a partner file's view as `mix` ({mode, alpha, prob}) says."""
        size = (self.image_size, self.image_size)
        return with_mixing(get_policy(name, size, on_files=True, **options), mix, size, FileMixed,
                           num_samples=len(self.labels))

    def at_size(self, side: int) -> ImageFiles:
        """The same files, each view made at side × side from the original file: the same boxes (fractions of
        the file) resized to that side, and the evaluation crop at that side."""
        return replace(self, image_size=side)

    def first_images(self, count: int = 2) -> Tensor:
        """The first `count` files through the evaluation crop, uint8 [count, 3, S, S]."""
        policy = FileCenterCrop(self.image_size)
        return torch.stack([policy.apply(read_image(self.path(index), self.max_pixels)[0], torch.zeros(0))
                            for index in range(count)])

    def evaluation(self, device: torch.device, workers: int = 0, resident: bool = True,
                   batch_size: int = EVAL_BATCH) -> StreamedTestBatches:
        """The files through the evaluation crop, read by `workers` DataLoader processes (normalised by them on the
        CPU, else on the device); nothing is held (`resident` concerns data held in memory)."""
        return StreamedTestBatches(self, device, workers, batch_size)

    def sample_view(self, policy: FilePolicy, params: Tensor, index: int, checksums: np.ndarray | None = None) -> Tensor:
        """Sample `index` under the view params [N, P] name, made from its file (checked against `checksums`, the
        crc32c the teacher's dump recorded, where given): uint8 [1, 3, S, S]."""
        files = FileBatches(self, policy, checksums=checksums)
        files.replay(params)
        return files.sample_view(0, index)[0][None]


def read_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Tensor, int]:
    """A file as a uint8 RGB image [3, H, W] and the crc32c of its bytes (computed from the bytes read anyway); a
    file above `max_pixels` or whose bytes are no whole image is refused before a decoder sees it."""
    raw = read_file_bytes(path)
    # the decoders want a writable buffer, google_crc32c a bytes object: one copy of the (small, encoded) bytes
    return decode_image_bytes(np.frombuffer(raw, np.uint8).copy(), path, max_pixels), google_crc32c.value(raw)


def read_file_bytes(path: str) -> bytes:
    """A file's bytes; one line naming it where it cannot be read."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise KdcacheError(f"{path}: cannot be read ({error.strerror or error}); restore the file or check the "
                           f"folder's permissions") from None


def check_file_bytes(raw: bytes, path: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                     advice: str | None = None) -> tuple[int, int]:
    """(width, height) of an image file's bytes, checked by data.untrusted before any decoder sees them; a bad or
    huge file is one line naming it and saying what to do (`advice`, BAD_FILE_ADVICE by default)."""
    try:
        return check_image_bytes(raw, max_pixels)
    except TooManyPixelsError as error:
        raise KdcacheError(f"{path}: {error}; an image this large takes gigabytes to decode: raise the limit with "
                           f"--max-image-pixels N (max_image_pixels= in load_dataset) if you trust the file, or "
                           f"shrink it") from None
    except BadImageError as error:
        raise KdcacheError(f"{path}: not a decodable image ({error}); {advice or BAD_FILE_ADVICE}") from None


def decode_image_bytes(data: np.ndarray, path: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                       advice: str | None = None) -> Tensor:
    """Encoded image bytes as uint8 RGB [3, H, W]: torchvision.io, or PIL for the formats torchvision cannot decode;
    checked first (data.untrusted), so a bad or huge file is one line naming it (and `advice`), never a crash."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms import functional as TF
    from torchvision.transforms.v2.functional import to_dtype

    check_file_bytes(data.tobytes(), path, max_pixels, advice)
    try:
        if path.lower().endswith(PIL_ONLY_EXTENSIONS):
            with Image.open(io.BytesIO(data.tobytes())) as file:
                return TF.pil_to_tensor(file.convert("RGB"))
        # RGB mode: grey, grey+alpha, RGBA and CMYK files all become 3 channels
        image = decode_image(torch.from_numpy(data), ImageReadMode.RGB)
        return to_dtype(image, torch.uint8, scale=True) if image.dtype != torch.uint8 else image  # 16-bit PNGs
    except Exception as error:  # a damaged or mislabelled file fails in decoder-specific ways
        raise KdcacheError(f"{path}: not a decodable image ({decoder_error(error)}); "
                           f"{advice or BAD_FILE_ADVICE}") from None


def decoder_error(error: Exception) -> str:
    """A decoder's exception as one line: its type and first line, less torchvision's C++ source location."""
    # torchvision's C++ errors start "function, source.cpp:line, ": only the rest means anything to a user
    detail = re.sub(r"^\w+, \S+:\d+, ", "", str(error).strip().split("\n")[0])
    return f"{type(error).__name__}: {detail}"


# a dump resumes over the same listing (names and labels): a replacement under the same name resumes it unless the
# dump had recorded the file's bytes already, which then say to restore them
BAD_FILE_ADVICE = ("put a readable image under the same name and rerun the same command (a file a dump read before "
                   "must be restored as it was), or delete it and rerun (a dump begun over the folder then needs "
                   "--overwrite, which starts it anew)")


class FilePolicy(Protocol):
    """A view of one decoded file: parameters drawn for the image's own size, and their replay at a fixed size."""

    name: str
    param_names: tuple[str, ...]
    num_views: int | None
    size: int

    def sample(self, generator: torch.Generator, n: int) -> None:
        """Nothing: a file's view is drawn for its own size where the file is decoded (`DrawnWhereRead`)."""
        ...

    def draw(self, generator: torch.Generator, height: int, width: int) -> Tensor:
        """float32 [P] parameters of one view of an image of that size."""
        ...

    def apply(self, image: Tensor, params: Tensor) -> Tensor:
        """The uint8 view [C, size, size] of a uint8 image [C, H, W] that params [P] name."""
        ...

    def out_of_range(self, params: Tensor) -> Tensor:
        """[n] bool: which rows of params [n, P] this policy could not have drawn."""
        ...

    def drawn_for(self, params: Tensor, height: int, width: int) -> bool:
        """Whether params [P] are a view this policy draws for an image of that size (what out_of_range cannot
        tell without it: a box's pixels)."""
        ...

    def describe(self) -> dict:
        """Name, parameter names and constants, for cache metadata (JSON-able)."""
        ...


class DrawnWhereRead:
    """What every file policy shares: no parameters are drawn ahead, each view is drawn for its image's own size
    where its file is decoded (FileBatches: from the seed, the stream, the view and the sample)."""

    def sample(self, generator: torch.Generator, n: int) -> None:
        """Nothing to draw ahead: views of files are drawn where the files are read."""
        return None


def crop_box(generator: torch.Generator, height: int, width: int, scale: tuple[float, float],
             ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, h, w) drawn as torchvision's `RandomResizedCrop.get_params` draws it, from `generator`."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    return central_box(height, width, ratio)


def central_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box after ten misses: the whole image cut to the nearest allowed aspect ratio, centred."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class FileResizedCropFlip(DrawnWhereRead):
    """RandomResizedCrop(size, scale, ratio) then RandomHorizontalFlip, on the original file.

    Params (top, left, height, width, flip): the box as fractions of the image's height and width (float32),
    so the same row names the same box of that file at any time; flip is 0 or 1. Replay rounds each
    fraction × the image's side back to the integer that was drawn, exactly (float32 keeps 24 bits).
    """

    name: ClassVar[str] = "imagenet"
    param_names: ClassVar[tuple[str, ...]] = ("top", "left", "height", "width", "flip")
    num_views: ClassVar[None] = None
    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def draw(self, generator: torch.Generator, height: int, width: int) -> Tensor:
        """One box for an image of that size and a fair flip, as fractions: float32 [5]."""
        top, left, h, w = crop_box(generator, height, width, self.scale, self.ratio)
        flip = float(torch.rand(1, generator=generator).item() < 0.5)  # RandomHorizontalFlip's draw
        return torch.tensor([top / height, left / width, h / height, w / width, flip], dtype=torch.float32)

    def box(self, params: Tensor, height: int, width: int) -> tuple[int, int, int, int, bool]:
        """(top, left, h, w, flip) in pixels of an image of that size."""
        top, left, h, w, flip = params.tolist()
        return round(top * height), round(left * width), round(h * height), round(w * width), flip != 0

    def apply(self, image: Tensor, params: Tensor) -> Tensor:
        """torchvision's `resized_crop` of the box to size × size (bilinear, antialias), then the flip."""
        top, left, h, w, flip = self.box(params, *image.shape[-2:])
        view = resize(image[..., top:top + h, left:left + w], [self.size, self.size])
        return view.flip(-1) if flip else view

    def out_of_range(self, params: Tensor) -> Tensor:
        """Rows whose box is empty or leaves the image, or whose flip is not 0 or 1."""
        top, left, h, w, flip = params.double().unbind(dim=1)
        slack = 1e-6  # float32 fractions of a box that ends on the image's edge may exceed 1 by an ulp
        inside = (top >= 0) & (left >= 0) & (h > 0) & (w > 0) & (top + h <= 1 + slack) & (left + w <= 1 + slack)
        return ~inside | ((flip != 0) & (flip != 1))

    def drawn_for(self, params: Tensor, height: int, width: int) -> bool:
        """Whether params [P] are a view this policy draws for an image of that size: whole pixels, a flip of 0 or
        1, and a box RandomResizedCrop draws (its scale and ratio, each side rounded to the pixel) or its central
        fallback."""
        pixels = params[:4].double() * torch.tensor([height, width, height, width], dtype=torch.float64)
        if not bool(torch.isfinite(params).all()) or float((pixels - pixels.round()).abs().max()) > 1e-3 or \
                float(params[4]) not in (0.0, 1.0):
            return False
        top, left, h, w = (int(value) for value in pixels.round().tolist())
        if not (h > 0 and w > 0 and top >= 0 and left >= 0 and top + h <= height and left + w <= width):
            return False
        # w = round(√(area·s·a)), h = round(√(area·s/a)): s and a within half a pixel of each side
        area = height * width
        scale = (w - 0.5) * (h - 0.5) <= area * self.scale[1] and (w + 0.5) * (h + 0.5) >= area * self.scale[0]
        ratio = (w - 0.5) / (h + 0.5) <= self.ratio[1] and (w + 0.5) / (h - 0.5) >= self.ratio[0]
        return (scale and ratio) or (top, left, h, w) == central_box(height, width, self.ratio)

    def describe(self) -> dict:
        """Name, parameter names, output size, draw ranges, resampling and what the fractions are relative to."""
        return {"name": self.name, "param_names": list(self.param_names), "num_views": None,
                "size": [self.size, self.size], "scale": list(self.scale), "ratio": list(self.ratio),
                "interpolation": "bilinear", "antialias": True,
                "relative_to": "the original image: top, left, height and width are float32 fractions of its "
                               "height and width; pixels = round(fraction x side)"}


@dataclass(frozen=True)
class FileCenterCrop(DrawnWhereRead):
    """Evaluation as the field does it: shorter side resized to round(size × 8/7) (256 for 224), centre crop."""

    name: ClassVar[str] = "none"
    param_names: ClassVar[tuple[str, ...]] = ()
    num_views: ClassVar[int] = 1
    size: int

    @property
    def resize_size(self) -> int:
        """The shorter side before the crop."""
        return round(self.size * EVAL_RESIZE_RATIO)

    def draw(self, generator: torch.Generator, height: int, width: int) -> Tensor:
        """No parameters: float32 [0]."""
        return torch.zeros(0, dtype=torch.float32)

    def apply(self, image: Tensor, params: Tensor) -> Tensor:
        """Resize the shorter side, then crop the centre size × size."""
        from torchvision.transforms import functional as TF

        return TF.center_crop(resize(image, [self.resize_size]), [self.size, self.size])

    def out_of_range(self, params: Tensor) -> Tensor:
        """No row: there are no parameters."""
        return torch.zeros(len(params), dtype=torch.bool)

    def drawn_for(self, params: Tensor, height: int, width: int) -> bool:
        """Whether params are the no parameters this policy draws."""
        return len(params) == 0

    def describe(self) -> dict:
        """Name, (no) parameters, the view count, resize and crop sizes."""
        return {"name": self.name, "param_names": [], "num_views": 1, "size": [self.size, self.size],
                "resize": self.resize_size, "crop": "center"}


@dataclass(frozen=True)
class FileRandAugmented(DrawnWhereRead):
    """RandomResizedCrop + flip on the original file (`FileResizedCropFlip`), then RandAugment's ops on the view:
    its params, then (op_k, magnitude_k) per op (float32, as every streamed parameter is stored)."""

    name: ClassVar[str] = "randaugment"
    num_views: ClassVar[None] = None
    size: int
    num_ops: int = 2
    magnitude: int = 9

    @property
    def base(self) -> FileResizedCropFlip:
        """The crop and flip of the original file."""
        return FileResizedCropFlip(self.size)

    @property
    def ops(self) -> RandAugmentOps:
        """The RandAugment ops on the view."""
        return RandAugmentOps(self.num_ops, self.magnitude)

    @property
    def param_names(self) -> tuple[str, ...]:
        """The crop's parameters, then op_k and magnitude_k per op."""
        return (*self.base.param_names, *self.ops.param_names)

    def draw(self, generator: torch.Generator, height: int, width: int) -> Tensor:
        """The box and flip for an image of that size, then the ops: float32 [P]."""
        return torch.cat([self.base.draw(generator, height, width), self.ops.draw(generator, 1)[0].float()])

    def apply(self, image: Tensor, params: Tensor) -> Tensor:
        """The resized crop and flip, then each op: uint8 [C, size, size]."""
        count = len(self.base.param_names)
        return self.ops.apply(self.base.apply(image, params[:count])[None], params[None, count:])[0]

    def out_of_range(self, params: Tensor) -> Tensor:
        """Rows whose box the base refuses, or whose ops RandAugment could not have drawn."""
        count = len(self.base.param_names)
        return self.base.out_of_range(params[:, :count]) | self.ops.out_of_range(params[:, count:])

    def drawn_for(self, params: Tensor, height: int, width: int) -> bool:
        """Whether params [P] are a view this policy draws for an image of that size."""
        count = len(self.base.param_names)
        return self.base.drawn_for(params[:count], height, width) and not bool(self.ops.out_of_range(
            params[None, count:])[0])

    def describe(self) -> dict:
        """The base's description with every parameter's name, and RandAugment's constants."""
        return {**self.base.describe(), "name": self.name, "param_names": list(self.param_names),
                "randaugment": self.ops.describe()}


@dataclass(frozen=True)
class FileMixed(DrawnWhereRead, Mixed):
    """A file policy's views mixed with a partner file's view (mixup or CutMix), as `Mixed` mixes images in memory.

    Params: the base's (float32 fractions of the file), then the partner's sample index, λ·1024 or the box in
    the view's pixels. The partner is drawn uniformly over the split's `num_samples` files, and its view is its
    own under the same view (drawn from its own generator, or replayed from its row), so `FileBatches` reads and
    crops the partner's file too. A view left unmixed keeps its drawn partner, with λ 1 or an empty box.
    """

    num_samples: int = 0

    def __post_init__(self) -> None:
        """Refuse what `Mixed` refuses, and splits whose sample indices float32 parameters cannot hold exactly."""
        super().__post_init__()
        if not 0 < self.num_samples <= 2**24:
            raise KdcacheError(f"--mix on files: a streamed split's partner index is stored as float32, exact for "
                               f"1 to 2^24 files, and this split has {self.num_samples}; split the folder")

    @property
    def size(self) -> int:
        """The view's side, the base's."""
        return self.base.size

    def draw(self, generator: torch.Generator, height: int, width: int) -> Tensor:
        """The base's draw for an image of that size (first, so a partner's base view is its own), then a partner
        and the mixing: float32 [P]."""
        base = self.base.draw(generator, height, width)
        partner = torch.randint(0, self.num_samples, (1,), generator=generator)
        return torch.cat([base, self.draw_mixing(generator, partner, partner)[0].float()])

    def drawn_for(self, params: Tensor, height: int, width: int) -> bool:
        """Whether the base part of params [P] is a view the base draws for an image of that size (the mixing
        part is checked over a whole view, `out_of_range`)."""
        return self.base.drawn_for(params[:self.partner_column], height, width)

    def apply(self, image: Tensor, params: Tensor) -> Tensor:
        """Refused: a mixed view needs its partner's file; read it with `FileBatches(files, policy).sample_view`."""
        raise KdcacheError(f"--mix {self.mode}: a mixed view of a file needs its partner's file too: call "
                           "kdcache.data.FileBatches(files, policy).sample_view(view, index), after .replay(params) "
                           "to replay a cache's view")


def draw_generator(seed: int, stream: str, view: int, index: int) -> torch.Generator:
    """The generator of one sample's draw under one view: the same whichever worker, batch or rank reads it."""
    state = np.random.SeedSequence([seed, DRAW_STREAMS[stream], view, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


FileBatch = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]  # images, labels, params, crc32c [b, 2], indices
NO_FILE = -1  # the crc32c column of a partner file that was not read (no mixing, or a view left unmixed)


class FileBatches(Dataset):
    """Whole batches of files under their views, for a DataLoader with batch_size=None.

    Key `(view, indices)`: the samples' views are drawn from (seed, stream, view, index), or, after
    `replay(params)`, taken from params [N, P]. Item: (views [b, 3, S, S], labels [b], params [b, P]
    float32, crc32c [b, 2] int64 of each sample's file's bytes and of its partner's (NO_FILE where none was
    read), indices [b]). The views are uint8, for a GPU to normalise
    (a quarter of the bytes to move), or with `normalized` float32 normalised here, each image while it is in
    the cache: on the CPU the workers' time is what is free. A mixed view (`FileMixed`) reads its partner's file
    too. `checksums` [N], where given, is the crc32c every file read must have (the teacher's dump recorded it):
    a changed file is refused, naming it. Pickles by path, as workers need.
    """

    def __init__(self, files: ImageFiles, policy: FilePolicy, seed: int = 0, stream: str = "views",
                 normalized: bool = False, checksums: np.ndarray | None = None) -> None:
        self.files, self.policy, self.seed, self.stream = files, policy, seed, stream
        self.normalized, self.checksums = normalized, checksums
        self.params: Tensor | None = None

    def replay(self, params: Tensor | None) -> None:
        """Replay these [N, P] parameters from now on (None: draw); set before a loader's iteration starts."""
        self.params = params

    def __len__(self) -> int:
        return len(self.files.labels)

    def __getitem__(self, key: tuple[int, Sequence[int]]) -> FileBatch:
        view, indices = key
        size, count = self.policy.size, len(self.policy.param_names)
        images = _batch_tensor((len(indices), 3, size, size), torch.float32 if self.normalized else torch.uint8)
        params = torch.empty(len(indices), count, dtype=torch.float32)
        checksums = torch.empty(len(indices), 2, dtype=torch.int64)
        for row, index in enumerate(indices):
            pixels, params[row], (checksums[row, 0], checksums[row, 1]) = self.sample_view(view, index)
            if self.normalized:
                normalize(pixels, self.files.mean, self.files.std, out=images[row])
            else:
                images[row] = pixels
        index_tensor = torch.as_tensor(list(indices), dtype=torch.int64)
        return images, self.files.labels[index_tensor], params, checksums, index_tensor

    def sample_view(self, view: int, index: int) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """Sample `index` under `view`: its uint8 view [3, S, S], its params [P] and the crc32c of its file and of
        its partner's (NO_FILE where no partner file was read)."""
        image, checksum = self._read(index)
        params = self._params(view, index, image)
        if not isinstance(self.policy, FileMixed):
            return self.policy.apply(image, params), params, (checksum, NO_FILE)
        own = self.policy.base.apply(image, params[:self.policy.partner_column])
        if self.policy.label_weight(params[None])[0] == 1:  # unmixed: the partner's pixels would not show
            return own, params, (checksum, NO_FILE)
        partner = int(params[self.policy.partner_column])
        partner_image, partner_checksum = self._read(partner)
        partner_view = self.policy.base.apply(partner_image, self._params(view, partner, partner_image, base=True))
        mixed = self.policy.mix(own[None], partner_view[None], params[None])[0]
        return mixed, params, (checksum, partner_checksum)

    def _read(self, index: int) -> tuple[Tensor, int]:
        """The file of sample `index` decoded, and its crc32c, checked against `checksums` where given."""
        image, checksum = read_image(self.files.path(index), self.files.max_pixels)
        if self.checksums is not None:
            check_checksums(self.files, torch.tensor([index]), torch.tensor([checksum]),
                            self.checksums[index:index + 1], "the teacher's dump")
        return image, checksum

    def _params(self, view: int, index: int, image: Tensor, base: bool = False) -> Tensor:
        """Sample `index`'s parameters under `view` (with `base`, a mixed policy's base part only): replayed, or
        drawn for the image's size from the sample's own generator, whose first draws are the base's."""
        if self.params is not None:
            params = self.params[index]
            if not self.policy.drawn_for(params, *image.shape[-2:]):
                raise CorruptCacheError(
                    f"{self.files.path(index)}: sample {index}'s stored view "
                    f"{dict(zip(self.policy.param_names, params.tolist()))} is no view the {self.policy.name} policy "
                    f"draws for its {image.shape[-2]}x{image.shape[-1]} image; the cache was altered: rebuild it with "
                    f"`kdcache dump-teacher --overwrite`")
        else:
            policy = self.policy.base if base else self.policy
            params = policy.draw(draw_generator(self.seed, self.stream, view, index), *image.shape[-2:])
        return params[:self.policy.partner_column] if base else params


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An empty tensor; inside a DataLoader worker, in shared memory, as default_collate makes its batches: the
    loader then hands it to the main process without copying it (tens of MB per batch at 224 px)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    strides = torch.empty(shape, device="meta").stride()
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape, strides)


def default_workers(requested: int | None = None) -> int:
    """`requested` DataLoader workers; by default (None) one per CPU this process may use, less one for the main
    process, at most 16."""
    if requested is not None:
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cpus - 1))


def stream(dataset: FileBatches, keys: Sequence[tuple[int, Sequence[int]]], workers: int,
           device: torch.device) -> Iterator[FileBatch]:
    """The batches of `keys`, in order, read by `workers` processes (0: in this one); a worker's KdcacheError is
    raised here as the one line it was, not wrapped in the worker's traceback."""
    loader = DataLoader(dataset, batch_size=None, sampler=keys, num_workers=workers,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    return worker_batches(loader)


def worker_batches(loader: DataLoader) -> Iterator:
    """The loader's batches; a worker's KdcacheError is raised here as the one line it was, not wrapped in the
    worker's traceback, and the workers are stopped at once."""
    batches = iter(loader)
    try:
        yield from batches
    except KdcacheError as error:
        # left to the garbage collector (the error's traceback holds the iterator), the workers' shutdown waits
        # out DataLoader's 5 s join timeout before the process can exit
        getattr(batches, "_shutdown_workers", lambda: None)()
        raise type(error)(worker_message(str(error))) from None


def worker_message(text: str) -> str:
    """The original message of an error a DataLoader worker raised (the loader prefixes the worker's traceback)."""
    if not text.startswith("Caught "):
        return text
    last = text.rstrip().splitlines()[-1]
    return re.sub(r"^[\w.]*Error: ", "", last)


def check_checksums(files: ImageFiles, indices: Tensor, found: Tensor, expected: np.ndarray, what: str,
                    advice: str = "restore the file, or dump the teacher again over the folder as it is now") -> None:
    """Refuse files whose bytes (crc32c `found`) are not the ones `what` read (`expected`), naming the first."""
    changed = np.flatnonzero(found.numpy() != expected)
    if changed.size:
        first = int(changed[0])
        raise KdcacheError(f"{files.path(int(indices[first]))} changed since {what} read it (crc32c "
                           f"{int(found[first]):08x}, recorded {int(expected[first]):08x}): the cached targets are "
                           f"of other pixels; {advice}")


class StreamedTestBatches:
    """A streamed split's un-augmented batches: each file through the evaluation crop, read by DataLoader workers
    (normalised by them on the CPU, else on the device)."""

    def __init__(self, files: ImageFiles, device: torch.device, workers: int, batch_size: int) -> None:
        self.files, self.device, self.workers, self.batch_size = files, device, workers, batch_size
        self.dataset = FileBatches(files, FileCenterCrop(files.image_size), normalized=device.type == "cpu")

    def batches(self, samples: range) -> Iterator[TestBatch]:
        """The samples of `samples`, in order, normalised, with their labels on the device."""
        keys = [(0, range(start, min(start + self.batch_size, samples.stop)))
                for start in range(samples.start, samples.stop, self.batch_size)]
        for images, labels, _, _, _ in stream(self.dataset, keys, self.workers, self.device):
            yield batch_on_device(images, self.files, self.device), labels.to(self.device)

    def __len__(self) -> int:
        return len(self.files.labels)


def batch_on_device(images: Tensor, files: ImageFiles, device: torch.device) -> Tensor:
    """A FileBatches batch as normalised float32 on the device (normalised there when it came as uint8)."""
    if images.dtype == torch.uint8:
        return normalize(images.to(device, non_blocking=True), files.mean, files.std)
    return images.to(device, non_blocking=True)
