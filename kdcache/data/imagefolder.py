"""`imagefolder`: torchvision's ImageFolder layout (ImageNet's, for one), streamed from its files or preloaded.

`root/train/<class>/<images>` is the train split; `root/val/...` (ImageNet's name) or `root/test/...`
the test split. Classes and files are listed by torchvision's own `find_classes` and `make_dataset`
(sorted class folder names, sorted files with an extension in IMG_EXTENSIONS, sub-folders walked),
so labels are the indices a teacher trained with torchvision's ImageFolder on the same folder
predicts, and the order (hence the fingerprint) is deterministic. A file of another extension, or a
class folder without images, is refused by name; hidden files and folders (a name starting with a dot, such as
.DS_Store) are skipped and counted in a warning, and each real folder is walked once (a link loop is refused).

By default a split is streamed (`ImageFiles`): opening it costs its file list only, and each sample is
decoded from its file whenever a view of it is made (at image_size x image_size, in DataLoader workers).
With `preload=True` every image is decoded once, shorter side resized to image_size (bilinear,
antialiased), centre-cropped, and the split is held in memory as uint8 [N, 3, S, S] (ImageData): fast for
small folders, but ImageNet's 1.28 M training images would take 15.7 GB at 64 px and 193 GB at 224 px.
The preloaded pixels, hence the fingerprint, depend on the decoders and resize kernels of the installed
torchvision.
"""

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from kdcache.data.files import ImageFiles, read_image
from kdcache.data.source import DataSource
from kdcache.data.untrusted import DEFAULT_MAX_PIXELS
from kdcache.data.sources import ImageData, register_dataset
from kdcache.errors import KdcacheError, missing_root

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224  # the field's ImageNet setting

# The folders each split may live in, in order of preference.
SPLIT_FOLDERS = {"train": ("train",), "test": ("val", "test")}
_FILES_PER_TASK = 64  # a thread pool task decodes this many files: few futures even for 1.28 M images
_NAMES_SHOWN = 5


@register_dataset
def imagefolder(root: str | Path | None, split: str, *, image_size: int = DEFAULT_IMAGE_SIZE,
                preload: bool = False, max_image_pixels: int = DEFAULT_MAX_PIXELS) -> DataSource:
    """An ImageFolder tree (`root/train`, `root/val` or `root/test`): its files, streamed at image_size x image_size
    (or, with preload, decoded into uint8 [N, 3, image_size, image_size]); a file whose header declares more than
    max_image_pixels pixels (Pillow's limit by default) is refused before it is decoded."""
    if not isinstance(image_size, int) or image_size < 8:
        raise KdcacheError(f"load_dataset('imagefolder'): image_size should be an integer >= 8, found {image_size!r}")
    if not isinstance(max_image_pixels, int) or max_image_pixels < 1:
        raise KdcacheError(f"load_dataset('imagefolder'): max_image_pixels should be a positive integer, found "
                           f"{max_image_pixels!r}")
    folder = _split_folder(root, split)
    classes = _classes(folder)
    if split == "test":
        # Labels are class indices: they mean the same thing in both splits only if the class lists agree.
        train_classes = _classes(_split_folder(root, "train", "the test split's labels are numbered by its classes"))
        if classes != train_classes:
            raise KdcacheError(f"{folder}: its class folders differ from train's ({_difference(classes, train_classes)}), "
                               "so the same label would name different classes; give both splits the same class folders")
    paths, labels = _files(folder, classes)
    if not preload:
        start = len(os.path.join(str(folder), ""))  # make_dataset joins folder, class and name: cut the folder off
        relative = np.array([os.fsencode(path[start:].replace(os.sep, "/")) for path in paths])
        return ImageFiles("imagefolder", split, str(folder), relative, torch.tensor(labels, dtype=torch.int64),
                          len(classes), IMAGENET_MEAN, IMAGENET_STD, image_size, max_image_pixels, tuple(classes))
    images = _decode_all(paths, image_size, max_image_pixels, f"decode {folder.name}")
    return ImageData("imagefolder", split, images, torch.tensor(labels, dtype=torch.int64), len(classes),
                     IMAGENET_MEAN, IMAGENET_STD, class_names=tuple(classes))


def _split_folder(root: str | Path | None, split: str, why: str = "") -> Path:
    """The folder of `split` under `root`; one KdcacheError line (saying `why` it is needed) when there is none."""
    layout = "root/train/<class>/<images> and root/val/<class>/<images> (or root/test/...)"
    if root is None:
        raise missing_root("imagefolder", f"the folder laid out as {layout}")
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
    """The class folder names, sorted, as torchvision's ImageFolder numbers them (a dot-folder is no class)."""
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not _hidden(entry.name))
    if not classes:
        raise KdcacheError(f"{folder} has no class folders: put each class's images in a sub-folder named after "
                           "the class, as torchvision's ImageFolder expects")
    return classes


def _files(folder: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    """Every image file of every class, in torchvision's order (make_dataset's: classes sorted, folders walked and
    sorted, files sorted), and its label; refuses a class without images, a file that is no image by its extension
    (torchvision would skip it silently) and a name a listing cannot hold; skips hidden files and folders (a
    name starting with a dot: .DS_Store, .ipynb_checkpoints), saying how many."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    listed, hidden, seen = [], [], set()
    for label, name in enumerate(classes):
        for root, names in sorted(_walk(os.path.join(folder, name), seen, hidden)):
            listed += [(os.path.join(root, file), label) for file in sorted(names)]
    others = [path for path, _ in listed if not has_file_allowed_extension(path, IMG_EXTENSIONS)]
    if others:
        raise KdcacheError(f"{folder}: {len(others)} files in its class folders are not images by their extension "
                           f"({_names(others)}); expected files ending in {', '.join(IMG_EXTENSIONS)}: move the "
                           f"others out of the class folders")
    unlistable = [path for path, _ in listed if "\n" in path or "\r" in path]
    if unlistable:  # a cache records the listing one name a line
        raise KdcacheError(f"{unlistable[0]!r}: a file name with a line break cannot be recorded in a cache's listing "
                           f"({len(unlistable)} such files); rename it")
    empty = sorted(set(classes) - {classes[label] for _, label in listed})
    if empty:
        raise KdcacheError(
            f"{folder}: {len(empty)} of {len(classes)} class folders hold no image files ({_names(empty)}); expected "
            f"files ending in {', '.join(IMG_EXTENSIONS)}: add images or remove those folders"
        )
    if hidden:
        log.warning("%s: skipped %d hidden files and folders (names starting with a dot: %s)", folder, len(hidden),
                    _names(sorted({os.path.basename(path) for path in hidden})))
    return [path for path, _ in listed], [label for _, label in listed]


def _walk(top: str, seen: set[tuple[int, int]], hidden: list[str]) -> list[tuple[str, list[str]]]:
    """(folder, its file names) for `top` and every folder below it, as os.walk(followlinks=True) gives them, but
    each real folder once: a link to a folder already walked (a link loop, which os.walk follows for ever) is
    refused, naming the link. Hidden names are left out and added to `hidden`."""
    walked, pending = [], [top]
    while pending:
        path = pending.pop()
        status = os.stat(path)
        if (status.st_dev, status.st_ino) in seen:
            raise KdcacheError(f"{path} is a link to {os.path.realpath(path)}, a folder already listed (a link loop, "
                               f"or a second link to one folder): remove the link, or copy the folder")
        seen.add((status.st_dev, status.st_ino))
        entries = sorted(os.scandir(path), key=lambda entry: entry.name)
        hidden += [entry.path for entry in entries if _hidden(entry.name)]
        shown = [entry for entry in entries if not _hidden(entry.name)]
        walked.append((path, [entry.name for entry in shown if not entry.is_dir()]))
        pending += [entry.path for entry in reversed(shown) if entry.is_dir()]
    return walked


def _hidden(name: str) -> bool:
    """A hidden file or folder's name (.DS_Store, .ipynb_checkpoints): what Finder, Jupyter and git leave."""
    return name.startswith(".")


def _decode_all(paths: Sequence[str], image_size: int, max_pixels: int, description: str) -> Tensor:
    """All images decoded and resized into one uint8 [N, 3, S, S] tensor by a thread pool, with a progress bar."""
    # Filled in place, so the split is never held twice; torch's decoders and resize release the GIL.
    images = torch.empty(len(paths), 3, image_size, image_size, dtype=torch.uint8)
    starts = range(0, len(paths), _FILES_PER_TASK)
    # disable=None: a bar on a terminal, none in logs and pipes
    with ThreadPoolExecutor() as pool, tqdm(total=len(paths), unit="img", desc=description, disable=None) as bar:
        tasks = [pool.submit(_decode_range, paths, images, start, image_size, max_pixels) for start in starts]
        try:
            for task in as_completed(tasks):
                bar.update(task.result())
        except BaseException:
            pool.shutdown(cancel_futures=True)  # the first bad file stops the work that has not started
            raise
    return images


def _decode_range(paths: Sequence[str], images: Tensor, start: int, image_size: int, max_pixels: int) -> int:
    """Decode paths[start : start + _FILES_PER_TASK] into the same rows of `images`; returns how many."""
    stop = min(start + _FILES_PER_TASK, len(paths))
    for index in range(start, stop):
        images[index] = _load(paths[index], image_size, max_pixels)
    return stop - start


def _load(path: str, image_size: int, max_pixels: int) -> Tensor:
    """One file as uint8 [3, S, S]: RGB, shorter side resized to S (bilinear, antialiased), center-cropped."""
    from torchvision.transforms import functional as TF

    image, _ = read_image(path, max_pixels)
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
