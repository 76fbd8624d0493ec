"""`voc` and `cityscapes`: segmentation datasets read from folders in torchvision's layouts, held whole as DenseData.

Nothing is downloaded: --data-root (root= in load_dataset) names the folder.

`voc` reads torchvision's VOCSegmentation layout of VOC2012: ROOT/VOCdevkit/VOC2012/JPEGImages/ID.jpg, its label map
SegmentationClass/ID.png (a palette PNG whose indices are the classes, 255 on object borders) and the IDs of each split
in ImageSets/Segmentation/: the train split is train.txt's, the test split val.txt's (VOC's test labels are not
public). 21 classes: background and VOC's 20. Only 2012's folder is read: a cache records its data by name and
fingerprint, and the commands reload it by name, with no year to pass.

`cityscapes` reads torchvision's Cityscapes layout with fine labels: ROOT/leftImg8bit/train/CITY/NAME_leftImg8bit.png
and its label map ROOT/gtFine/train/CITY/NAME_gtFine_labelIds.png; the test split is val/ (test/'s labels are not
public). Label ids become the 19 training classes by torchvision's `Cityscapes.classes` table (its train_id), every
other id 255 (ignored), as Cityscapes' benchmark scores them.

Each image and its label map are checked before a decoder sees them (data.untrusted), the map must have the image's
size and hold only class values (or 255); then the shorter side is resized to image_size (the image bilinear with
antialiasing, as imagefolder's --preload; the map to the source pixel nearest each output pixel's centre,
torchvision's NEAREST_EXACT, which keeps it on the bilinear image where NEAREST takes each output pixel's top-left
source pixel) and both are centre-cropped to image_size × image_size. mean and std are ImageNet's (imagefolder's):
the same for both splits without decoding the train split to open the test split, and those torchvision's
segmentation models are trained with. The pixels, hence the fingerprint, are those of the installed torchvision's
decoders and resize.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from kdcache.data.dense import IGNORE_INDEX, DenseData
from kdcache.data.files import check_file_bytes, decode_image_bytes, decoder_error, read_file_bytes
from kdcache.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from kdcache.data.imagefolder import _names as names_shown
from kdcache.data.sources import register_dataset
from kdcache.data.untrusted import DEFAULT_MAX_PIXELS, PNG_SIGNATURE
from kdcache.errors import KdcacheError, missing_root

if TYPE_CHECKING:
    from torchvision.transforms import InterpolationMode

DEFAULT_IMAGE_SIZE = 64  # small enough to train on a CPU; --image-size for more
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
VOC_LISTS = {"train": "train", "test": "val"}  # split -> ImageSets/Segmentation/<list>.txt
VOC_LAYOUT = ("ROOT/VOCdevkit/VOC2012/ holding JPEGImages/ID.jpg, SegmentationClass/ID.png and "
              "ImageSets/Segmentation/train.txt and val.txt (torchvision's VOCSegmentation layout)")
CITYSCAPES_FOLDERS = {"train": "train", "test": "val"}  # split -> leftImg8bit/<folder> and gtFine/<folder>
CITYSCAPES_IMAGE, CITYSCAPES_LABELS = "_leftImg8bit.png", "_gtFine_labelIds.png"
CITYSCAPES_LAYOUT = ("ROOT/leftImg8bit/{train,val}/CITY/NAME_leftImg8bit.png and "
                     "ROOT/gtFine/{train,val}/CITY/NAME_gtFine_labelIds.png (torchvision's Cityscapes layout, fine "
                     "labels)")
LABEL_MAP_MODES = ("P", "L")  # PIL's palette and 8-bit grey: one 8-bit value per pixel
NOT_A_LABEL = -1  # in a value table: a value no label map of the dataset holds

Pair = tuple[str, str]  # an image file and its label map's


@dataclass(frozen=True)
class FolderLabels:
    """How one dataset's folder reads: the class of each 8-bit label value (IGNORE_INDEX, or NOT_A_LABEL where no
    map of the dataset holds it), the class names, and for its errors what its maps hold and how to fix a file."""

    dataset: str
    class_of_value: Tensor  # int16 [256]
    class_names: tuple[str, ...]
    expected: str  # the values its maps hold, in words
    remove: str  # how to leave a sample out, as "remove the sample's ..."
    original: str  # who ships a good copy of each file

    @property
    def advice(self) -> str:
        """What to do about one bad file."""
        return f"replace it with the file as {self.original} ships it, or {self.remove}"


@register_dataset
def voc(root: str | Path | None, split: str, *, image_size: int = DEFAULT_IMAGE_SIZE,
        max_image_pixels: int = DEFAULT_MAX_PIXELS) -> DenseData:
    """Pascal VOC 2012's segmentation split (train: train.txt, test: val.txt) from `root` in torchvision's layout, 21
    classes, held at image_size × image_size; never downloads."""
    _check_options("voc", image_size, max_image_pixels)
    base = _folder(root, "voc", VOC_LAYOUT, Path("VOCdevkit", "VOC2012"))
    listing = base / "ImageSets" / "Segmentation" / f"{VOC_LISTS[split]}.txt"
    if not listing.is_file():
        raise KdcacheError(f"voc: {listing} is missing (it lists the {split} split's IDs); expected {VOC_LAYOUT}")
    pairs = [(str(base / "JPEGImages" / f"{name}.jpg"), str(base / "SegmentationClass" / f"{name}.png"))
             for name in _listed_ids(listing)]
    return _held(split, pairs, _voc_labels(listing), image_size, max_image_pixels)


@register_dataset
def cityscapes(root: str | Path | None, split: str, *, image_size: int = DEFAULT_IMAGE_SIZE,
               max_image_pixels: int = DEFAULT_MAX_PIXELS) -> DenseData:
    """Cityscapes' finely labelled split (train: train/, test: val/) from `root` in torchvision's layout, its 19
    training classes, held at image_size × image_size; never downloads."""
    _check_options("cityscapes", image_size, max_image_pixels)
    folder = CITYSCAPES_FOLDERS[split]
    images = _folder(root, "cityscapes", CITYSCAPES_LAYOUT, Path("leftImg8bit", folder))
    labels = _folder(root, "cityscapes", CITYSCAPES_LAYOUT, Path("gtFine", folder))
    pairs = [(str(path), str(labels / path.parent.name / (path.name[:-len(CITYSCAPES_IMAGE)] + CITYSCAPES_LABELS)))
             for path in _city_images(images)]
    return _held(split, pairs, _cityscapes_labels(), image_size, max_image_pixels)


def _check_options(dataset: str, image_size: object, max_image_pixels: object) -> None:
    """One line for an image_size below 8 or a max_image_pixels below 1 (or either not an integer)."""
    for option, value, least in (("image_size", image_size, 8), ("max_image_pixels", max_image_pixels, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise KdcacheError(f"load_dataset({dataset!r}): {option} should be an integer >= {least}, found {value!r}")


def _folder(root: str | Path | None, dataset: str, layout: str, below: Path) -> Path:
    """root/below, which must be a folder; else one line describing the layout expected."""
    if root is None:
        raise missing_root(dataset, f"the folder laid out as {layout}")
    folder = Path(root).expanduser() / below
    if not folder.is_dir():
        raise KdcacheError(f"{dataset}: {folder} is not a folder; expected {layout}; pass --data-root (root= in "
                           f"load_dataset) the folder ROOT")
    return folder


def _listed_ids(listing: Path) -> list[str]:
    """The IDs a VOC list names, one a line; a name that is no plain file name (a path, a hidden name) is refused."""
    lines = read_file_bytes(str(listing)).decode("utf-8", "replace").splitlines()
    ids = [line.strip() for line in lines if line.strip()]
    if not ids:
        raise KdcacheError(f"voc: {listing} lists no IDs, so the split would be empty; expected one image ID a line "
                           f"(such as 2007_000032): restore the list")
    unsafe = [name for name in ids if name.startswith(".") or "/" in name or "\\" in name]
    if unsafe:
        raise KdcacheError(f"voc: {listing} lists {unsafe[0]!r}, which is no file name in JPEGImages/ (IDs are names "
                           f"such as 2007_000032); remove that line")
    return ids


def _city_images(folder: Path) -> list[Path]:
    """Every NAME_leftImg8bit.png in folder's city folders, sorted by city then name (hidden names skipped); any other
    file is refused, as is a split without images."""
    cities = sorted(entry for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    files = [path for city in cities for path in sorted(city.iterdir()) if not path.name.startswith(".")]
    others = [path for path in files if not path.name.endswith(CITYSCAPES_IMAGE)]
    if others:
        raise KdcacheError(f"cityscapes: {others[0]} is no NAME{CITYSCAPES_IMAGE} ({len(others)} such files in "
                           f"{folder}); expected {CITYSCAPES_LAYOUT}: move the others out")
    if not files:
        raise KdcacheError(f"cityscapes: {folder} holds no city folders of NAME{CITYSCAPES_IMAGE} images, so the split "
                           f"would be empty; expected {CITYSCAPES_LAYOUT}")
    return files


def _voc_labels(listing: Path) -> FolderLabels:
    """VOC's palette indices: 0-20 the classes, 255 borders and difficult pixels."""
    table = torch.full((256,), NOT_A_LABEL, dtype=torch.int16)
    table[:len(VOC_CLASSES)] = torch.arange(len(VOC_CLASSES), dtype=torch.int16)
    table[IGNORE_INDEX] = IGNORE_INDEX
    return FolderLabels("voc", table, VOC_CLASSES, f"palette indices 0-{len(VOC_CLASSES) - 1} (the classes) and "
                        f"{IGNORE_INDEX} (borders)", f"remove the sample's ID from {listing}", "VOC2012")


def _cityscapes_labels() -> FolderLabels:
    """Cityscapes' label ids by torchvision's table: an id with a train_id of 0-18 that class, any other id 255."""
    from torchvision.datasets import Cityscapes  # torchvision's table is the reference; a heavy import, needed here

    table = torch.full((256,), NOT_A_LABEL, dtype=torch.int16)
    table[IGNORE_INDEX] = IGNORE_INDEX  # as an 8-bit value, id -1 (licence plate) reads 255
    for entry in Cityscapes.classes:
        if entry.id >= 0:
            table[entry.id] = entry.train_id if 0 <= entry.train_id < IGNORE_INDEX else IGNORE_INDEX
    trained = sorted((entry.train_id, entry.name) for entry in Cityscapes.classes if 0 <= entry.train_id < IGNORE_INDEX)
    largest = max(entry.id for entry in Cityscapes.classes)
    return FolderLabels("cityscapes", table, tuple(name for _, name in trained),
                        f"label ids 0-{largest} (gtFine_labelIds.png, not _color.png or _instanceIds.png)",
                        "remove the sample's image and label map", "Cityscapes")


def _held(split: str, pairs: list[Pair], labels: FolderLabels, image_size: int, max_pixels: int) -> DenseData:
    """The pairs decoded, checked and resized (see the module) into one DenseData split, by a thread pool."""
    missing = [path for pair in pairs for path in pair if not os.path.isfile(path)]
    if missing:
        raise KdcacheError(f"{labels.dataset}: {len(missing)} of the {split} split's images and label maps are missing "
                           f"({names_shown(missing)}); expected each image with its label map: add the missing "
                           f"files, or for each, {labels.remove}")

    def load(pair: Pair) -> tuple[Tensor, Tensor]:
        return _load_pair(pair, labels, image_size, max_pixels)

    # torch's decoders and resize release the GIL; Executor.map cancels the files not begun once one fails
    with ThreadPoolExecutor() as pool:
        loaded = list(tqdm(pool.map(load, pairs), total=len(pairs), unit="img", desc=f"decode {labels.dataset} "
                           f"{split}", disable=None))  # disable=None: a bar on a terminal, none in logs and pipes
    images = torch.stack([image for image, _ in loaded])
    masks = torch.stack([mask for _, mask in loaded])
    return DenseData(labels.dataset, split, images, masks, labels.class_names, IMAGENET_MEAN, IMAGENET_STD)


def _load_pair(pair: Pair, labels: FolderLabels, image_size: int, max_pixels: int) -> tuple[Tensor, Tensor]:
    """An image uint8 [3, S, S] and its classes uint8 [S, S], each file checked before it is decoded."""
    from torchvision.transforms import InterpolationMode

    image_path, mask_path = pair
    image = decode_image_bytes(np.frombuffer(read_file_bytes(image_path), np.uint8).copy(), image_path, max_pixels,
                               labels.advice)
    values = _label_values(mask_path, max_pixels, labels.advice)
    if values.shape != image.shape[1:]:
        raise KdcacheError(f"{mask_path}: a label map of {values.shape[1]} x {values.shape[0]} pixels for an image of "
                           f"{image.shape[2]} x {image.shape[1]} ({image_path}); each label must lie on its pixel, so "
                           f"expected the image's size: {labels.advice}")
    classes = _classes(values, labels, mask_path)
    return (_fit(image, image_size, InterpolationMode.BILINEAR),
            _fit(classes[None], image_size, InterpolationMode.NEAREST_EXACT)[0])


def _label_values(path: str, max_pixels: int, advice: str) -> Tensor:
    """A PNG label map's 8-bit values uint8 [H, W] (a palette PNG's indices, not its colours), checked first."""
    from PIL import Image

    raw = read_file_bytes(path)
    if not raw.startswith(PNG_SIGNATURE):
        raise KdcacheError(f"{path}: not a PNG (it starts {raw[:8]!r}); a label map must be a PNG, whose values are "
                           f"exact: {advice}")
    check_file_bytes(raw, path, max_pixels, advice)
    try:
        with Image.open(io.BytesIO(raw)) as file:
            mode = file.mode
            values = np.array(file) if mode in LABEL_MAP_MODES else None
    except Exception as error:  # a damaged file fails in decoder-specific ways
        raise KdcacheError(f"{path}: not a decodable image ({decoder_error(error)}); {advice}") from None
    if values is None:
        raise KdcacheError(f"{path}: a label map of PIL mode {mode}; expected one 8-bit value per pixel (a palette "
                           f"or grey PNG, mode {' or '.join(LABEL_MAP_MODES)}) that is its class: {advice}")
    return torch.from_numpy(values)


def _classes(values: Tensor, labels: FolderLabels, path: str) -> Tensor:
    """Each pixel's class (or IGNORE_INDEX) uint8 [H, W] from its 8-bit value; a value no map of the dataset holds is
    one line naming the file and the values."""
    classes = labels.class_of_value[values.long()]
    if (classes == NOT_A_LABEL).any():
        found = torch.unique(values[classes == NOT_A_LABEL]).tolist()
        raise KdcacheError(f"{path}: label value(s) {names_shown([str(value) for value in found])}, where "
                           f"{labels.dataset}'s label maps hold {labels.expected}: {labels.advice}")
    return classes.to(torch.uint8)


def _fit(picture: Tensor, side: int, interpolation: InterpolationMode) -> Tensor:
    """uint8 [C, H, W] with its shorter side resized to `side` (torchvision.transforms' resize: float32 on every CPU,
    antialiased where bilinear), then centre-cropped to side × side."""
    from torchvision.transforms import functional as TF

    resized = TF.resize(picture, [side], interpolation=interpolation, antialias=True)
    return TF.center_crop(resized, [side, side])
