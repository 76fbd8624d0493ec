"""CIFAR-10/100 read from a local root in torchvision's on-disk format, through a restricted unpickler.

The batch files are Python 2 pickles of a dict holding a uint8 array `data` [N, 3072] (red plane,
green plane, blue plane, each 32×32 row-major) and a list of int labels. Unpickling runs code
named by the file, so the unpickler admits only the three numpy callables those arrays need.
kdcache never downloads.
"""

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdcache.errors import KdcacheError, missing_root

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

IMAGE_SHAPE = (3, 32, 32)
# the class names in label order, as the batches.meta and meta files of the archives list them (label_names,
# fine_label_names), for a zero-shot teacher's prompts
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest",
    "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard",
    "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum",
    "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper",
    "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf",
    "woman", "worm")

# Every global a CIFAR batch file names. The files were written by numpy 1.x, whose arrays
# pickle as `numpy.core.multiarray._reconstruct`; numpy 2 writes `numpy._core`. Both names map
# to the object directly, so nothing is imported on the file's say-so.
_ADMITTED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


@dataclass(frozen=True)
class CifarLayout:
    """Where torchvision keeps one CIFAR variant and which key holds its labels."""

    title: str
    folder: str
    files: dict[str, tuple[str, ...]]
    label_key: str
    num_classes: int
    torchvision_class: str


LAYOUTS = {
    "cifar10": CifarLayout(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        label_key="labels",
        num_classes=10,
        torchvision_class="CIFAR10",
    ),
    "cifar100": CifarLayout(
        title="CIFAR-100",
        folder="cifar-100-python",
        files={"train": ("train",), "test": ("test",)},
        label_key="fine_labels",
        num_classes=100,
        torchvision_class="CIFAR100",
    ),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch file, refusing every global that is not one of its numpy callables."""

    def __init__(self, file, path: Path):
        # encoding="bytes" keeps the Python 2 strings (keys, array buffers) as bytes, as the CIFAR page says
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        """The admitted object for (module, name), or a KdcacheError naming the file."""
        admitted = _ADMITTED_GLOBALS.get((module, name))
        if admitted is None:
            raise KdcacheError(
                f"{self.path}: refused to unpickle {module}.{name}: a CIFAR batch file holds only numpy arrays, "
                "lists and strings, so this file is damaged or was tampered with; replace it with the original"
            )
        return admitted


def read_cifar(kind: str, root: str | Path | None, split: str) -> tuple[Tensor, Tensor]:
    """uint8 images [N, 3, 32, 32] and int64 labels [N] of one split, in the files' order."""
    layout = LAYOUTS[kind]
    folder = _find_folder(kind, layout, root, split)
    images, labels = [], []
    for file_name in layout.files[split]:
        file_images, file_labels = _read_batch(folder / file_name, layout)
        images.append(file_images)
        labels.append(file_labels)
    # np.concatenate copies, so the tensors own writable memory rather than the unpickled buffers
    image_array = np.concatenate(images).reshape(-1, *IMAGE_SHAPE)
    return torch.from_numpy(image_array), torch.from_numpy(np.concatenate(labels))


def _find_folder(kind: str, layout: CifarLayout, root: str | Path | None, split: str) -> Path:
    """The folder holding the split's files: `root/<torchvision folder>`, or `root` itself."""
    expected = f"root/{layout.folder}/{{{', '.join(layout.files['train'] + layout.files['test'])}}}"
    hint = (
        f"expected torchvision's layout {expected}; kdcache never downloads: get it with "
        f"torchvision.datasets.{layout.torchvision_class}(root, download=True) on a machine with internet"
    )
    if root is None:
        raise missing_root(kind, f"the folder that holds {layout.folder}; {hint}")
    root = Path(root).expanduser()
    wanted = layout.files[split]
    looked = []
    for folder in (root / layout.folder, root):
        missing = [name for name in wanted if not (folder / name).is_file()]
        if not missing:
            return folder
        looked.append(f"{folder} ({'none there' if len(missing) == len(wanted) else 'missing ' + ', '.join(missing)})")
    raise KdcacheError(
        f"load_dataset({kind!r}): no {layout.title} {split} files ({', '.join(wanted)}): looked in {' and '.join(looked)}; {hint}"
    )


def _read_batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """The data array [n, 3072] and labels [n] of one batch file, checked."""
    with open(path, "rb") as file:
        try:
            entry = _RestrictedUnpickler(file, path).load()
        except KdcacheError:
            raise
        except Exception as error:  # a damaged pickle can fail in many ways; the user needs one line
            raise KdcacheError(f"{path}: not a readable CIFAR batch file ({type(error).__name__}: {error})") from error
    if not isinstance(entry, dict):
        raise KdcacheError(f"{path}: a CIFAR batch file holds a dict, this one holds {type(entry).__name__}")
    # Python 2 wrote the keys as byte strings; a file re-saved by Python 3 may have str keys
    entry = {key.decode("latin-1") if isinstance(key, bytes) else key: value for key, value in entry.items()}
    data = entry.get("data")
    pixels_per_image = int(np.prod(IMAGE_SHAPE))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == pixels_per_image):
        found = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise KdcacheError(f"{path}: 'data' should be a uint8 array [N, {pixels_per_image}], found {found}")
    raw_labels = entry.get(layout.label_key)
    labels = np.asarray(raw_labels if raw_labels is not None else [])
    if labels.ndim != 1 or len(labels) != len(data) or (len(labels) and labels.dtype.kind not in "iu"):
        raise KdcacheError(f"{path}: {layout.label_key!r} should be {len(data)} integer labels, one per image")
    if len(labels) and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise KdcacheError(
            f"{path}: labels should lie in [0, {layout.num_classes}), found {labels.min()}..{labels.max()}"
        )
    return data, labels.astype(np.int64)
