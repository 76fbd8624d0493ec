"""Tiny CIFAR-10/100 roots in torchvision's on-disk format, for tests that must not download.

The files are written as the real ones were, by Python 2's cPickle (protocol 2) from numpy 1.x:
every string is a Python 2 byte string (BINSTRING opcodes: bytes under `encoding="bytes"`, str
under torchvision's `encoding="latin1"`) and arrays name `numpy.core.multiarray._reconstruct`.
So readers are tested against the opcodes they meet in the wild. Only the md5 sums differ from
the real files, which torchvision's `download=False` path checks.
"""

import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


@dataclass(frozen=True, eq=False)
class FakeCifar:
    """What `write_fake_cifar` wrote: the root, the inner folder and each split's images and labels."""

    root: Path
    folder: Path
    num_classes: int
    train_images: Tensor  # uint8 [n_train, 3, 32, 32]
    train_labels: Tensor  # int64 [n_train]
    test_images: Tensor
    test_labels: Tensor


class _Python2Pickler(pickle._Pickler):
    """The pure-Python pickler, writing strings and global names as Python 2 and numpy 1.x did."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_string(self, text: str | bytes) -> None:
        """Write text as a Python 2 `str`: SHORT_BINSTRING or BINSTRING."""
        data = text.encode("latin-1") if isinstance(text, str) else text
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(text)

    dispatch[str] = save_python2_string
    dispatch[bytes] = save_python2_string

    def save_global(self, obj, name=None) -> None:
        """numpy 2 names `_reconstruct` under `numpy._core`; the real files name it as numpy 1.x did."""
        if obj is _reconstruct:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def write_python2_pickle(path: Path, value) -> None:
    """Write value to path as Python 2's cPickle.dump(value, f, protocol=2) would have."""
    with open(path, "wb") as file:
        _Python2Pickler(file, protocol=2).dump(value)


def write_fake_cifar(
    root: str | Path, kind: str = "cifar100", n_train: int = 20, n_test: int = 10, seed: int = 0
) -> FakeCifar:
    """Write random images and labels as `root/cifar-10-batches-py/` or `root/cifar-100-python/`."""
    num_classes = _NUM_CLASSES[kind]
    folder = Path(root) / _FOLDERS[kind]
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(seed)
    splits = {}
    for split, count in (("train", n_train), ("test", n_test)):
        images = generator.integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8)
        labels = generator.integers(0, num_classes, size=count).tolist()
        splits[split] = (images, labels)
    if kind == "cifar10":
        _write_cifar10(folder, splits)
    else:
        _write_cifar100(folder, splits)
    (train_images, train_labels), (test_images, test_labels) = (
        (torch.from_numpy(images.copy()), torch.tensor(labels, dtype=torch.int64)) for images, labels in splits.values()
    )
    return FakeCifar(Path(root), folder, num_classes, train_images, train_labels, test_images, test_labels)


def _batch(images: np.ndarray, labels: list[int], label_key: bytes, batch_label: bytes, extra: dict) -> dict:
    """One batch dict with the keys and types of the real files."""
    return {
        b"batch_label": batch_label,
        label_key: labels,
        b"data": images.reshape(len(images), -1),
        b"filenames": [f"fake_{i:05d}.png".encode() for i in range(len(images))],
        **extra,
    }


def _write_cifar10(folder: Path, splits: dict) -> None:
    """data_batch_1..5 (the train split in five near-equal parts), test_batch, batches.meta."""
    train_images, train_labels = splits["train"]
    for number, indices in enumerate(np.array_split(np.arange(len(train_labels)), 5), start=1):
        batch = _batch(
            train_images[indices], [train_labels[i] for i in indices], b"labels", f"training batch {number} of 5".encode(), {}
        )
        write_python2_pickle(folder / f"data_batch_{number}", batch)
    test_images, test_labels = splits["test"]
    write_python2_pickle(folder / "test_batch", _batch(test_images, test_labels, b"labels", b"testing batch 1 of 1", {}))
    meta = {b"num_cases_per_batch": 10000, b"label_names": [f"class_{i}".encode() for i in range(10)], b"num_vis": 3072}
    write_python2_pickle(folder / "batches.meta", meta)


def _write_cifar100(folder: Path, splits: dict) -> None:
    """train, test (fine and coarse labels), meta."""
    batch_labels = {"train": b"training batch 1 of 1", "test": b"testing batch 1 of 1"}
    for split, (images, labels) in splits.items():
        coarse = {b"coarse_labels": [label // 5 for label in labels]}
        batch = _batch(images, labels, b"fine_labels", batch_labels[split], coarse)
        write_python2_pickle(folder / split, batch)
    meta = {
        b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)],
    }
    write_python2_pickle(folder / "meta", meta)
