"""`imagefolder`: torchvision's ImageFolder layout (ImageNet's, for one), decoded once into a uint8 tensor.

`root/train/<class>/<images>` is the train split; `root/val/...` (ImageNet's name) or `root/test/...`
the test split. Classes and files are listed by torchvision's own `find_classes` and `make_dataset`
(sorted class folder names, sorted files with an extension in IMG_EXTENSIONS, sub-folders walked),
so labels are the indices a teacher trained with torchvision's ImageFolder on the same folder
predicts, and the order (hence the fingerprint) is deterministic.

Every image is resized once, shorter side to `image_size` (bilinear, antialiased), then
center-cropped to image_size × image_size, and the whole split is held in memory as uint8
[N, 3, S, S]. That is why the default size is small: ImageNet's 1.28 M training images take
1.28 M × 3 × 64 × 64 bytes = 15.7 GB at 64 px, and 193 GB at 224 px. The pixels, hence the
fingerprint, depend on the decoders and resize kernels of the installed torchvision.
"""

import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from kdcache.data.sources import ImageData, register_dataset
from kdcache.errors import KdcacheError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 64

# The folders each split may live in, in order of preference.
SPLIT_FOLDERS = {"train": ("train",), "test": ("val", "test")}
# IMG_EXTENSIONS lists formats torchvision.io cannot decode; those go through PIL, as ImageFolder's loader does.
_PIL_ONLY_EXTENSIONS = (".bmp", ".pgm", ".ppm", ".tif", ".tiff")
_FILES_PER_TASK = 64  # a thread pool task decodes this many files: few futures even for 1.28 M images
_NAMES_SHOWN = 5


@register_dataset
def imagefolder(root: str | Path | None, split: str, *, image_size: int = DEFAULT_IMAGE_SIZE) -> ImageData:
    """An ImageFolder tree (`root/train`, `root/val` or `root/test`) as uint8 [N, 3, image_size, image_size]."""
    if not isinstance(image_size, int) or image_size < 8:
        raise KdcacheError(f"load_dataset('imagefolder'): image_size should be an integer >= 8, found {image_size!r}")
    folder = _split_folder(root, split)
    classes = _classes(folder)
    if split == "test":
        # Labels are class indices: they mean the same thing in both splits only if the class lists agree.
        train_classes = _classes(_split_folder(root, "train", "the test split's labels are numbered by its classes"))
        if classes != train_classes:
            raise KdcacheError(f"{folder}: its class folders differ from train's ({_difference(classes, train_classes)}), "
                               "so the same label would name different classes; give both splits the same class folders")
    paths, labels = _files(folder, classes)
    images = _decode_all(paths, image_size, f"decode {folder.name}")
    return ImageData("imagefolder", split, images, torch.tensor(labels, dtype=torch.int64), len(classes),
                     IMAGENET_MEAN, IMAGENET_STD)


def _split_folder(root: str | Path | None, split: str, why: str = "") -> Path:
    """The folder of `split` under `root`; one KdcacheError line (saying `why` it is needed) when there is none."""
    layout = "root/train/<class>/<images> and root/val/<class>/<images> (or root/test/...)"
    if root is None:
        raise KdcacheError(f"load_dataset('imagefolder'): needs root=, the folder laid out as {layout}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise KdcacheError(f"imagefolder root {root} is not a folder: pass the folder laid out as {layout}")
    for name in SPLIT_FOLDERS[split]:
        if (root / name).is_dir():
            return root / name
    wanted = " or ".join(f"{name}/" for name in SPLIT_FOLDERS[split])
    found = sorted(entry.name + "/" for entry in os.scandir(root) if entry.is_dir())
    raise KdcacheError(
        f"imagefolder root {root} has no {wanted} folder for the {split} split{f' ({why})' if why else ''}; "
        f"its folders: {_names(found) or 'none'}; lay it out as {layout}"
    )


def _classes(folder: Path) -> list[str]:
    """The class folder names, sorted, as torchvision's ImageFolder numbers them."""
    from torchvision.datasets.folder import (
        find_classes,  # torchvision is imported where needed: it takes seconds
    )

    try:
        classes, _ = find_classes(folder)
    except FileNotFoundError:
        raise KdcacheError(f"{folder} has no class folders: put each class's images in a sub-folder named after "
                           "the class, as torchvision's ImageFolder expects") from None
    return classes


def _files(folder: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    """Every image file of every class, in torchvision's order, and its label; refuses a class without images."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    samples = make_dataset(folder, {name: index for index, name in enumerate(classes)}, IMG_EXTENSIONS, allow_empty=True)
    empty = sorted(set(classes) - {classes[label] for _, label in samples})
    if empty:
        raise KdcacheError(
            f"{folder}: {len(empty)} of {len(classes)} class folders hold no image files ({_names(empty)}); expected "
            f"files ending in {', '.join(IMG_EXTENSIONS)}: add images or remove those folders"
        )
    return [path for path, _ in samples], [label for _, label in samples]


def _decode_all(paths: Sequence[str], image_size: int, description: str) -> Tensor:
    """All images decoded and resized into one uint8 [N, 3, S, S] tensor by a thread pool, with a progress bar."""
    # Filled in place, so the split is never held twice; torch's decoders and resize release the GIL.
    images = torch.empty(len(paths), 3, image_size, image_size, dtype=torch.uint8)
    starts = range(0, len(paths), _FILES_PER_TASK)
    # disable=None: a bar on a terminal, none in logs and pipes
    with ThreadPoolExecutor() as pool, tqdm(total=len(paths), unit="img", desc=description, disable=None) as bar:
        tasks = [pool.submit(_decode_range, paths, images, start, image_size) for start in starts]
        try:
            for task in as_completed(tasks):
                bar.update(task.result())
        except BaseException:
            pool.shutdown(cancel_futures=True)  # the first bad file stops the work that has not started
            raise
    return images


def _decode_range(paths: Sequence[str], images: Tensor, start: int, image_size: int) -> int:
    """Decode paths[start : start + _FILES_PER_TASK] into the same rows of `images`; returns how many."""
    stop = min(start + _FILES_PER_TASK, len(paths))
    for index in range(start, stop):
        images[index] = _load(paths[index], image_size)
    return stop - start


def _load(path: str, image_size: int) -> Tensor:
    """One file as uint8 [3, S, S]: RGB, shorter side resized to S (bilinear, antialiased), center-cropped."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms import functional as TF
    from torchvision.transforms.v2.functional import to_dtype

    try:
        if path.lower().endswith(_PIL_ONLY_EXTENSIONS):
            with Image.open(path) as file:
                image = TF.pil_to_tensor(file.convert("RGB"))
        else:
            # RGB mode: grey, grey+alpha, RGBA and CMYK files all become 3 channels
            image = decode_image(path, ImageReadMode.RGB)
            if image.dtype != torch.uint8:  # 16-bit PNGs decode to uint16
                image = to_dtype(image, torch.uint8, scale=True)
    except Exception as error:  # a damaged or mislabelled file fails in decoder-specific ways
        # torchvision's C++ errors start "function, source.cpp:line, ": only the rest means anything to a user
        detail = re.sub(r"^\w+, \S+:\d+, ", "", str(error).strip().split("\n")[0])
        raise KdcacheError(f"{path}: not a decodable image ({type(error).__name__}: {detail}); "
                           "delete or replace the file") from None
    # torchvision.transforms' resize (not v2's): it always interpolates in float32 and rounds, whereas v2
    # takes a native uint8 path on AVX2 and ARM CPUs only, whose pixels differ by ±1, so the fingerprint
    # would depend on the CPU.
    resized = TF.resize(image, [image_size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(resized, [image_size, image_size])


def _difference(found: list[str], expected: list[str]) -> str:
    """What `found` lacks and has beyond `expected`, a few names each."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    parts = [f"{len(missing)} missing: {_names(missing)}"] if missing else []
    parts += [f"{len(extra)} extra: {_names(extra)}"] if extra else []
    return "; ".join(parts)


def _names(names: Sequence[str]) -> str:
    """The first few names, comma-separated, with how many more there are."""
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")
