"""The imagefolder source preloaded (`preload=True`): torchvision's ImageFolder layout, labels and file order, decoded
and resized once. tests/test_streamed_files.py covers the default, streamed from the files."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.io import (
    ImageReadMode,
    decode_image,
    encode_jpeg,
    write_file,
    write_png,
)
from torchvision.transforms import functional as TF

from kdcache.data import imagefolder as imagefolder_module
from kdcache.data import list_datasets, load_dataset
from kdcache.errors import KdcacheError

SIZE = 24

# class -> (relative file name, height, width, channels); grey and RGBA files, a sub-folder, an upper-case
# extension, portrait and landscape shapes, and images smaller than SIZE (upsampled) and larger (downsampled)
TRAIN_FILES = {
    "dog": [("d0.jpeg", 40, 64, 3), ("d1.PNG", 30, 30, 3)],
    "bird": [("b1.png", 50, 31, 3), ("b0.jpg", 20, 36, 3)],
    "cat": [("c0.png", 48, 48, 1), ("sub/c1.png", 33, 70, 4)],
}
VAL_FILES = {"bird": [("v0.png", 26, 40, 3)], "cat": [("v1.jpg", 40, 26, 3)], "dog": [("v2.png", 25, 25, 1)]}


def _pixels(seed: int, height: int, width: int, channels: int) -> torch.Tensor:
    return torch.randint(0, 256, (channels, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _write_image(path: Path, image: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(image) == 4:  # torchvision's PNG encoder takes 1 or 3 channels
        Image.fromarray(image.permute(1, 2, 0).numpy(), "RGBA").save(path)
    elif path.suffix.lower() == ".png":
        write_png(image, str(path))
    else:
        write_file(str(path), encode_jpeg(image, quality=90))


def _write_tree(folder: Path, files: dict[str, list[tuple[str, int, int, int]]], seed: int) -> None:
    for class_name, entries in files.items():
        for index, (name, height, width, channels) in enumerate(entries):
            path = folder / class_name / name
            _write_image(path, _pixels(seed + index + 100 * len(class_name), height, width, channels))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    _write_tree(tmp_path / "train", TRAIN_FILES, seed=0)
    _write_tree(tmp_path / "val", VAL_FILES, seed=1000)
    return tmp_path


def _expected(path: str, size: int = SIZE) -> torch.Tensor:
    """torchvision's own pipeline: decode as RGB, resize the shorter side (bilinear, antialiased), center-crop."""
    image = decode_image(path, ImageReadMode.RGB)
    return TF.center_crop(TF.resize(image, [size], antialias=True), [size, size])


def _expected_by_hand(path: str, size: int = SIZE) -> torch.Tensor:
    """The same in float32 arithmetic, rounded: the pixels on every CPU, whatever its uint8 kernels."""
    image = decode_image(path, ImageReadMode.RGB).float()[None]
    height, width = image.shape[-2:]
    scale = size / min(height, width)
    new_size = [size, int(width * scale)] if height <= width else [int(height * scale), size]
    resized = F.interpolate(image, size=new_size, mode="bilinear", align_corners=False, antialias=True).round()[0]
    top, left = round((new_size[0] - size) / 2), round((new_size[1] - size) / 2)  # center_crop's rounding
    return resized[:, top : top + size, left : left + size].to(torch.uint8)


def test_imagefolder_is_registered():
    assert "imagefolder" in list_datasets()


def test_shape_labels_and_order_are_torchvision_imagefolders(root):
    data = load_dataset("imagefolder", root, "train", image_size=SIZE, preload=True)
    reference = torchvision.datasets.ImageFolder(str(root / "train"))
    assert reference.classes == ["bird", "cat", "dog"]
    assert data.images.shape == (6, 3, SIZE, SIZE) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == reference.targets == [0, 0, 1, 1, 2, 2]
    assert data.num_classes == 3 and data.name == "imagefolder" and data.split == "train"
    assert data.mean == (0.485, 0.456, 0.406) and data.std == (0.229, 0.224, 0.225)
    # every file, in ImageFolder's order, is torchvision's resize-and-crop of its decoded pixels
    for index, (path, _) in enumerate(reference.samples):
        assert torch.equal(data.images[index], _expected(path)), path
        assert torch.equal(data.images[index], _expected_by_hand(path)), path
    grey = [path for path, _ in reference.samples].index(str(root / "train" / "cat" / "c0.png"))
    assert torch.equal(data.images[grey, 0], data.images[grey, 1]) and torch.equal(data.images[grey, 0], data.images[grey, 2])


def test_default_size_is_224(root):
    assert load_dataset("imagefolder", root, "test", preload=True).images.shape == (3, 3, 224, 224)


def test_test_split_reads_val_or_else_test(root):
    data = load_dataset("imagefolder", root, "test", image_size=SIZE, preload=True)
    assert data.split == "test" and data.labels.tolist() == [0, 1, 2]
    assert torch.equal(data.images[0], _expected(str(root / "val" / "bird" / "v0.png")))
    (root / "val").rename(root / "test")
    assert load_dataset("imagefolder", root, "test", image_size=SIZE, preload=True).fingerprint == data.fingerprint


def test_fingerprint_is_deterministic_and_sees_one_pixel(root, monkeypatch):
    first = load_dataset("imagefolder", root, image_size=SIZE, preload=True)
    monkeypatch.setattr(imagefolder_module, "_FILES_PER_TASK", 1)  # one file per thread task: another schedule
    assert load_dataset("imagefolder", root, image_size=SIZE, preload=True).fingerprint == first.fingerprint
    path = root / "train" / "dog" / "d1.PNG"  # 30×30, upsampled: every source pixel reaches the crop
    pixels = decode_image(str(path))
    pixels[:, 15, 15] += 128
    write_png(pixels, str(path))
    assert load_dataset("imagefolder", root, image_size=SIZE, preload=True).fingerprint != first.fingerprint


def test_other_formats_become_three_channel_uint8(tmp_path):
    folder = tmp_path / "train" / "only"
    folder.mkdir(parents=True)
    Image.new("CMYK", (30, 20), (10, 20, 30, 40)).save(folder / "cmyk.jpg")
    Image.new("RGB", (20, 30), (200, 100, 50)).save(folder / "plain.bmp")  # torchvision.io cannot decode BMP: PIL does
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(folder / "deep.png")  # a 16-bit PNG
    data = load_dataset("imagefolder", tmp_path, image_size=8, preload=True)
    assert data.images.shape == (3, 3, 8, 8)
    cmyk, deep, bmp = data.images  # sorted file names
    assert cmyk[:, 0, 0].tolist() == list(Image.open(folder / "cmyk.jpg").convert("RGB").getpixel((0, 0)))
    assert deep.unique().tolist() == [40000 >> 8]  # scaled to 8 bits
    assert bmp[:, 0, 0].tolist() == [200, 100, 50]


def _error(root, split="train", **options) -> str:
    with pytest.raises(KdcacheError) as caught:
        load_dataset("imagefolder", root, split, **options)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_root_and_missing_split_folders(root, tmp_path):
    assert "needs its folder: --data-root DIR on the command line, root=DIR in load_dataset()" in _error(None)
    assert "is not a folder" in _error(tmp_path / "nowhere")
    (root / "val").rename(root / "validation")
    message = _error(root, "test")
    assert "no val/ or test/ folder" in message and "its folders: train/, validation/" in message
    (root / "train").rename(root / "training")
    message = _error(root)
    assert "no train/ folder" in message and "root/train/<class>/<images>" in message


def test_a_class_tree_without_split_folders_is_refused(root):
    message = _error(root / "train")
    assert "no train/ folder" in message and "its folders: bird/, cat/, dog/" in message


def test_test_split_needs_train_for_its_class_numbering(root):
    (root / "train").rename(root / "elsewhere")
    assert "labels are numbered" in _error(root, "test")


def test_no_class_folders_and_empty_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "loose.png").write_bytes(b"")
    assert "has no class folders" in _error(tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "texts").mkdir()
    message = _error(tmp_path)
    assert "2 of 2 class folders hold no image files (empty, texts)" in message and ".png" in message


def test_a_file_that_is_no_image_by_its_extension_is_named_not_skipped(root):
    notes = root / "train" / "dog" / "notes.txt"
    notes.write_text("not an image: torchvision's ImageFolder skips it silently")
    message = _error(root)
    assert f"1 files in its class folders are not images by their extension ({notes})" in message
    assert "move the others out" in message


def test_undecodable_file_is_named(root):
    bad = root / "train" / "cat" / "c2.png"
    bad.write_bytes(b"not a png")
    message = _error(root, image_size=SIZE, preload=True)
    assert str(bad) in message and "put a readable image under the same name" in message and ".cpp" not in message


def test_test_classes_must_be_trains(root):
    (root / "val" / "dog").rename(root / "val" / "wolf")
    message = _error(root, "test")
    assert "differ from train's (1 missing: dog; 1 extra: wolf)" in message


def test_image_size_option_is_checked(root):
    assert "image_size should be an integer >= 8" in _error(root, image_size=4)
