"""Segmentation folders in torchvision's VOC and Cityscapes layouts (kdcache.data.dense_folders): each label lands on
its pixel at the held size, label ids become the classes torchvision's tables say, and every bad file or layout is
one line naming it."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from console import run_cli
from kdcache.data import load_dataset
from kdcache.data.dense import IGNORE_INDEX
from kdcache.data.dense_folders import VOC_CLASSES
from kdcache.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from kdcache.errors import KdcacheError

HEIGHT, WIDTH, SIDE = 20, 30, 10  # files of 20 x 30 held at 10 x 10: shorter side halved, then 15 -> 10 centred
# the source pixel each held pixel (r, c) takes (NEAREST_EXACT: the one under the output pixel's centre): row 2r + 1,
# column 2(c + 2) + 1, the centre crop starting at column 2 of the 15 wide resize (round(2.5), as torchvision rounds)
HELD_ROWS, HELD_COLUMNS = slice(1, HEIGHT, 2), slice(5, 25, 2)
VOC_IDS = {"train": ["2007_000001", "2007_000002", "2007_000003"], "test": ["2008_000001", "2008_000002"]}
CITYSCAPES_FILES = {"train": [("aachen", "aachen_000000_000019"), ("aachen", "aachen_000001_000019"),
                              ("bochum", "bochum_000000_000313")], "test": [("lindau", "lindau_000000_000019")]}
# the label ids the fake maps hold and their train ids in torchvision's Cityscapes.classes
CITYSCAPES_TRAIN_IDS = {0: IGNORE_INDEX, 4: IGNORE_INDEX, 7: 0, 8: 1, 26: 13, 33: 18}


def colour(value: int) -> tuple[int, int, int]:
    """The distinct flat colour a test image paints where its label map holds `value`."""
    return (value * 37) % 256, (value * 91 + 60) % 256, (value * 53 + 120) % 256


def label_map(seed: int, values: list[int]) -> np.ndarray:
    """HEIGHT x WIDTH of values[0], with two rectangles of the next values and a 1-pixel border of the last around
    the first rectangle (VOC's 255 edges)."""
    generator = np.random.default_rng(seed)
    labels = np.full((HEIGHT, WIDTH), values[0], np.uint8)
    top, left = generator.integers(1, 6), generator.integers(1, 10)
    labels[top - 1:top + 9, left - 1:left + 11] = values[-1]
    labels[top:top + 8, left:left + 10] = values[1]
    labels[12:, 20:] = values[2]
    return labels


def write_pair(image_path: Path, mask_path: Path, labels: np.ndarray, palette: bool = True) -> None:
    """The image (flat colours by label, JPEG or PNG by suffix) and its label map, a palette or grey PNG."""
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    painted = np.array([colour(value) for value in range(256)], np.uint8)[labels]
    Image.fromarray(painted).save(image_path, quality=95, subsampling=0)
    mask = Image.fromarray(labels, mode="L")
    if palette:
        mask = mask.convert("P")
        mask.putpalette([channel for value in range(256) for channel in colour(value)])
    mask.save(mask_path)


def voc_tree(root: Path) -> dict[str, np.ndarray]:
    """A VOC2012 tree of 3 train and 2 val IDs; the label map of each ID."""
    base = root / "VOCdevkit" / "VOC2012"
    lists = base / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    written = {}
    for split, names in VOC_IDS.items():
        (lists / f"{'train' if split == 'train' else 'val'}.txt").write_text("\n".join(names) + "\n")
        for seed, name in enumerate(names):
            written[name] = label_map(seed, [0, 1 + seed, 15 + seed, IGNORE_INDEX])
            write_pair(base / "JPEGImages" / f"{name}.jpg", base / "SegmentationClass" / f"{name}.png", written[name])
    return written


def cityscapes_tree(root: Path) -> dict[str, np.ndarray]:
    """A Cityscapes tree (fine labels) of 3 train images in 2 cities and 1 val image; the label ids of each."""
    written = {}
    for split, files in CITYSCAPES_FILES.items():
        folder = "train" if split == "train" else "val"
        for seed, (city, name) in enumerate(files):
            written[name] = label_map(seed, [7, 26, 33, 0] if seed % 2 else [8, 7, 26, 4])
            write_pair(root / "leftImg8bit" / folder / city / f"{name}_leftImg8bit.png",
                       root / "gtFine" / folder / city / f"{name}_gtFine_labelIds.png", written[name], palette=False)
    return written


@pytest.fixture
def voc_root(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    return tmp_path, voc_tree(tmp_path)


@pytest.fixture
def cityscapes_root(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    return tmp_path, cityscapes_tree(tmp_path)


def assert_aligned(images: torch.Tensor, masks: torch.Tensor, originals: list[np.ndarray], classes, tolerance: int):
    """Each held label is the written label of the source pixel under it (mapped to its class); and the image's
    pixel there has that label's colour wherever the source's 5 x 5 around it (the bilinear filter's reach, 2 source
    pixels a side at half the size) is one label."""
    for image, mask, original in zip(images, masks, originals):
        held = original[HELD_ROWS, HELD_COLUMNS]
        assert torch.equal(mask, torch.from_numpy(np.vectorize(classes.get)(held).astype(np.uint8)))
        for row, column in zip(*np.nonzero(held >= 0)):
            source_row, source_column = 2 * row + 1, 2 * column + 5
            around = original[max(source_row - 2, 0):source_row + 3, source_column - 2:source_column + 3]
            if (around == around[0, 0]).all():
                found = image[:, row, column].int()
                assert (found - torch.tensor(colour(int(around[0, 0])))).abs().max() <= tolerance


def test_voc_images_and_label_maps_load_aligned_with_vocs_classes(voc_root):
    root, written = voc_root
    train = load_dataset("voc", root, "train", image_size=SIDE)
    assert (train.name, train.split, tuple(train.images.shape), tuple(train.masks.shape)) == \
        ("voc", "train", (3, 3, SIDE, SIDE), (3, SIDE, SIDE))
    assert train.class_names == VOC_CLASSES and train.num_classes == 21
    assert train.class_names[:2] == ("background", "aeroplane") and train.class_names[-1] == "tvmonitor"
    assert (train.mean, train.std) == (IMAGENET_MEAN, IMAGENET_STD)
    identity = {value: value for value in range(256)}
    assert_aligned(train.images, train.masks, [written[name] for name in VOC_IDS["train"]], identity, tolerance=12)
    assert set(train.masks.unique().tolist()) == {0, 1, 2, 3, 15, 16, 17, IGNORE_INDEX}  # nearest invents no label

    test = load_dataset("voc", root, "test", image_size=SIDE)  # val.txt
    assert len(test) == 2 and test.split == "test"
    assert_aligned(test.images, test.masks, [written[name] for name in VOC_IDS["test"]], identity, tolerance=12)


def test_cityscapes_label_ids_become_torchvisions_train_ids(cityscapes_root):
    root, written = cityscapes_root
    train = load_dataset("cityscapes", root, "train", image_size=SIDE)
    assert len(train) == 3 and train.num_classes == 19
    assert train.class_names[:3] == ("road", "sidewalk", "building") and train.class_names[-1] == "bicycle"
    originals = [written[name] for _, name in CITYSCAPES_FILES["train"]]  # sorted by city, then name
    assert_aligned(train.images, train.masks, originals, CITYSCAPES_TRAIN_IDS, tolerance=0)  # PNG: exact colours
    test = load_dataset("cityscapes", root, "test", image_size=SIDE)  # val/
    assert len(test) == 1
    assert_aligned(test.images, test.masks, [written["lindau_000000_000019"]], CITYSCAPES_TRAIN_IDS, tolerance=0)


def test_the_default_size_and_a_tall_image_are_centre_cropped(cityscapes_root):
    root, _ = cityscapes_root
    tall = label_map(0, [7, 8, 26, 0]).T.copy()  # 30 x 20: shorter side 20 -> 64, then 96 -> 64 centred
    write_pair(root / "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png",
               root / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png", tall, palette=False)
    test = load_dataset("cityscapes", root, "test")
    assert tuple(test.images.shape) == (1, 3, 64, 64)
    expected = np.vectorize(CITYSCAPES_TRAIN_IDS.get)(tall).astype(np.uint8)
    rows = ((np.arange(64) + 16 + 0.5) * 20 / 64).astype(int)  # the 96 rows' centre 64, each from the row under it
    columns = ((np.arange(64) + 0.5) * 20 / 64).astype(int)
    assert torch.equal(test.masks[0], torch.from_numpy(expected[rows][:, columns]))


def test_the_fingerprint_is_stable_and_follows_the_labels(voc_root):
    root, written = voc_root
    first = load_dataset("voc", root, "test", image_size=SIDE).fingerprint
    assert load_dataset("voc", root, "test", image_size=SIDE).fingerprint == first
    name = VOC_IDS["test"][0]
    changed = written[name].copy()
    changed[HELD_ROWS, HELD_COLUMNS][0, 0] = 20  # a label a held pixel takes
    base = root / "VOCdevkit/VOC2012"
    write_pair(base / f"JPEGImages/{name}.jpg", base / f"SegmentationClass/{name}.png", changed)
    assert load_dataset("voc", root, "test", image_size=SIDE).fingerprint != first


def test_kdcache_datasets_lists_both(capsys):
    code, out, _ = run_cli(["datasets"], capsys)
    assert code == 0 and "voc" in out and "cityscapes" in out


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-30])


def relabel(path: Path, values: np.ndarray) -> None:
    Image.fromarray(values, mode="L").save(path)


VOC_FILE = "VOCdevkit/VOC2012/{}/2007_000002.{}"
VOC_TRAIN_LIST = "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt"
VOC_ADVICE = r"replace it with the file as VOC2012 ships it, or remove the sample's ID from .*train.txt"
VOC_FAULTS = {
    "truncated label map": (lambda root: truncate(root / VOC_FILE.format("SegmentationClass", "png")),
                            r"2007_000002.png: not a decodable image \(its IDAT chunk declares .*\(truncated\)\); "
                            + VOC_ADVICE),
    "no image": (lambda root: (root / VOC_FILE.format("JPEGImages", "jpg")).write_bytes(b"<html>not found</html>"),
                 r"2007_000002.jpg: not a decodable image \(no image format recognises its header\); " + VOC_ADVICE),
    "label map not a png": (lambda root: (root / VOC_FILE.format("SegmentationClass", "png")).write_bytes(b"GIF89a"),
                            r"2007_000002.png: not a PNG \(it starts b'GIF89a'\); a label map must be a PNG"),
    "colour label map": (lambda root: Image.new("RGB", (WIDTH, HEIGHT)).save(root / VOC_FILE.format(
        "SegmentationClass", "png")), r"2007_000002.png: a label map of PIL mode RGB; expected one 8-bit value per "
                                      r"pixel \(a palette or grey PNG, mode P or L\)"),
    "label map of another size": (lambda root: relabel(root / VOC_FILE.format("SegmentationClass", "png"),
                                                       np.zeros((HEIGHT, WIDTH + 2), np.uint8)),
                                  r"2007_000002.png: a label map of 32 x 20 pixels for an image of 30 x 20 \(.*"
                                  r"2007_000002.jpg\); .* expected the image's size: " + VOC_ADVICE),
    "label beyond the classes": (lambda root: relabel(root / VOC_FILE.format("SegmentationClass", "png"),
                                                      np.array([[21, 0, 200] * 10] * HEIGHT, np.uint8)),
                                 r"2007_000002.png: label value\(s\) 21, 200, where voc's label maps hold palette "
                                 r"indices 0-20 \(the classes\) and 255 \(borders\): " + VOC_ADVICE),
    "missing label map": (lambda root: (root / VOC_FILE.format("SegmentationClass", "png")).unlink(),
                          r"voc: 1 of the train split's images and label maps are missing \(.*2007_000002.png\); "
                          r"expected each image with its label map: add the missing files, or for each, remove the "
                          r"sample's ID from .*train.txt"),
    "empty list": (lambda root: (root / VOC_TRAIN_LIST).write_text("\n  \n"),
                   r"train.txt lists no IDs, so the split would be empty; expected one image ID a line"),
    "path in the list": (lambda root: (root / VOC_TRAIN_LIST).write_text("2007_000001\n../../secret\n"),
                         r"train.txt lists '../../secret', which is no file name in JPEGImages/"),
    "no list": (lambda root: (root / VOC_TRAIN_LIST).unlink(),
                r"voc: .*train.txt is missing \(it lists the train split's IDs\); expected ROOT/VOCdevkit/VOC2012/"),
}


@pytest.mark.parametrize("fault", VOC_FAULTS)
def test_a_bad_voc_file_is_one_line_naming_it(voc_root, fault):
    root, _ = voc_root
    damage, message = VOC_FAULTS[fault]
    damage(root)
    with pytest.raises(KdcacheError, match=message) as raised:
        load_dataset("voc", root, "train", image_size=SIDE)
    assert "\n" not in str(raised.value)


def test_an_image_above_the_pixel_limit_is_refused_before_it_is_decoded(voc_root):
    root, _ = voc_root
    with pytest.raises(KdcacheError, match=r"2007_000001.jpg: 30 x 20 pixels \(600\), above the limit of 599; .*"
                                           r"--max-image-pixels N"):
        load_dataset("voc", root, "train", image_size=SIDE, max_image_pixels=599)


CITY = "gtFine/train/aachen/aachen_000001_000019_gtFine_labelIds.png"
CITYSCAPES_ADVICE = "replace it with the file as Cityscapes ships it, or remove the sample's image and label map"
CITYSCAPES_FAULTS = {
    "truncated image": (lambda root: truncate(root / "leftImg8bit/train/bochum/bochum_000000_000313_leftImg8bit.png"),
                        r"bochum_000000_000313_leftImg8bit.png: not a decodable image \(.*\(truncated\)\); "
                        + CITYSCAPES_ADVICE),
    "colour map for label ids": (lambda root: relabel(root / CITY, np.full((HEIGHT, WIDTH), 128, np.uint8)),
                                 r"aachen_000001_000019_gtFine_labelIds.png: label value\(s\) 128, where cityscapes's "
                                 r"label maps hold label ids 0-33 \(gtFine_labelIds.png"),
    "missing label map": (lambda root: (root / CITY).unlink(),
                          r"cityscapes: 1 of the train split's images and label maps are missing"),
    "a stray file": (lambda root: (root / "leftImg8bit/train/aachen/notes.txt").write_text("x"),
                     r"cityscapes: .*notes.txt is no NAME_leftImg8bit.png \(1 such files"),
    "no labels folder": (lambda root: (root / "gtFine").rename(root / "gtCoarse"),
                         r"cityscapes: .*gtFine/train is not a folder; expected ROOT/leftImg8bit/\{train,val\}/CITY/"),
}


@pytest.mark.parametrize("fault", CITYSCAPES_FAULTS)
def test_a_bad_cityscapes_file_is_one_line_naming_it(cityscapes_root, fault):
    root, _ = cityscapes_root
    damage, message = CITYSCAPES_FAULTS[fault]
    damage(root)
    with pytest.raises(KdcacheError, match=message) as raised:
        load_dataset("cityscapes", root, "train", image_size=SIDE)
    assert "\n" not in str(raised.value)


def test_an_empty_cityscapes_split_says_so(tmp_path):
    for folder in ("leftImg8bit/val/lindau", "gtFine/val/lindau"):
        (tmp_path / folder).mkdir(parents=True)
    with pytest.raises(KdcacheError, match=r"val holds no city folders of NAME_leftImg8bit.png images, so the split "
                                           r"would be empty"):
        load_dataset("cityscapes", tmp_path, "test")


@pytest.mark.parametrize("dataset, layout", [("voc", "ROOT/VOCdevkit/VOC2012/"), ("cityscapes", "ROOT/leftImg8bit/")])
def test_a_missing_root_or_layout_describes_the_layout(tmp_path, dataset, layout):
    with pytest.raises(KdcacheError, match=rf"dataset '{dataset}' needs its folder: --data-root DIR .*{layout}"):
        load_dataset(dataset, None, "train")
    with pytest.raises(KdcacheError, match=rf"{dataset}: .* is not a folder; expected {layout}"):
        load_dataset(dataset, tmp_path, "train")
    with pytest.raises(KdcacheError, match=rf"load_dataset\('{dataset}'\): image_size should be an integer >= 8"):
        load_dataset(dataset, tmp_path, "train", image_size=4)
