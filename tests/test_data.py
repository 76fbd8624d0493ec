"""Data sources: CIFAR from a local root (restricted unpickling), digits, synthetic, fingerprints, normalize."""

import json
import os
import pickle
from unittest import mock

import numpy as np
import pytest
import torch
import torchvision
from fake_cifar import write_fake_cifar, write_python2_pickle
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcache.data import (
    ImageData,
    data_fingerprint,
    list_datasets,
    load_dataset,
    normalize,
)
from kdcache.errors import KdcacheError


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
@pytest.mark.parametrize("through_inner_folder", [False, True])
def test_fake_cifar_reads_back_as_written(tmp_path, kind, through_inner_folder):
    fake = write_fake_cifar(tmp_path, kind, n_train=23, n_test=7, seed=1)
    root = str(fake.folder) if through_inner_folder else tmp_path
    for split, images, labels in (("train", fake.train_images, fake.train_labels), ("test", fake.test_images, fake.test_labels)):
        data = load_dataset(kind, root, split)
        assert data.images.shape == (len(labels), 3, 32, 32) and data.images.dtype == torch.uint8
        assert torch.equal(data.images, images) and torch.equal(data.labels, labels)
        assert data.num_classes == fake.num_classes and data.split == split and data.name == kind
    assert load_dataset(kind, root).mean == ((0.4914, 0.4822, 0.4465) if kind == "cifar10" else (0.5071, 0.4865, 0.4409))


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_torchvision_reads_the_fake_root_identically(tmp_path, kind):
    # the fake's md5 sums cannot match the real files; everything else goes through torchvision's own reader
    fake = write_fake_cifar(tmp_path, kind, n_train=12, n_test=5)
    dataset_class = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
    with mock.patch.object(dataset_class, "_check_integrity", return_value=True), mock.patch(
        "torchvision.datasets.cifar.check_integrity", return_value=True
    ):
        reference = dataset_class(str(tmp_path), train=True, download=False)
    assert torch.equal(torch.from_numpy(reference.data).permute(0, 3, 1, 2), fake.train_images)
    assert reference.targets == fake.train_labels.tolist()
    assert torch.equal(load_dataset(kind, tmp_path).images, fake.train_images)


@pytest.mark.parametrize("kind, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_missing_cifar_names_where_it_looked_and_how_to_get_it(tmp_path, kind, folder):
    with pytest.raises(KdcacheError) as caught:
        load_dataset(kind, tmp_path / "nowhere", "test")
    message = str(caught.value)
    assert str(tmp_path / "nowhere" / folder) in message and "never downloads" in message and "download=True" in message
    assert "\n" not in message
    with pytest.raises(KdcacheError, match="needs its folder: --data-root DIR on the command line, root=DIR in load_dataset"):
        load_dataset(kind)


def test_missing_one_cifar10_batch_names_the_file(tmp_path):
    fake = write_fake_cifar(tmp_path, "cifar10", n_train=10, n_test=2)
    (fake.folder / "data_batch_3").unlink()
    with pytest.raises(KdcacheError, match="missing data_batch_3"):
        load_dataset("cifar10", tmp_path)
    assert len(load_dataset("cifar10", tmp_path, "test").labels) == 2  # the test split is intact


class _Payload:
    """Unpickling this runs os.mkdir(marker): what a malicious batch file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("nested", [False, True])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, nested):
    fake = write_fake_cifar(tmp_path, "cifar100", n_train=4, n_test=2)
    marker = tmp_path / "payload_ran"
    payload = _Payload(marker)
    planted = {b"data": fake.train_images.numpy().reshape(4, -1), b"fine_labels": [0] * 4, b"x": payload} if nested else payload
    write_python2_pickle(fake.folder / "train", planted)
    pickle.loads(pickle.dumps(_Payload(tmp_path / "control"), protocol=2))  # the payload does run when unrestricted
    assert (tmp_path / "control").exists()
    with pytest.raises(KdcacheError, match=r"refused to unpickle (posix|nt)\.mkdir") as caught:
        load_dataset("cifar100", tmp_path)
    assert str(fake.folder / "train") in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, complaint",
    [
        (None, "not a readable CIFAR batch file"),  # truncated
        ([1, 2, 3], "holds a dict"),
        ({b"data": np.zeros((2, 3072), np.float32), b"fine_labels": [0, 1]}, "'data' should be a uint8 array"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0]}, "should be 2 integer labels"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]}, r"labels should lie in \[0, 100\)"),
    ],
)
def test_damaged_cifar_file_is_one_line_error(tmp_path, content, complaint):
    fake = write_fake_cifar(tmp_path, "cifar100", n_train=2, n_test=2)
    if content is None:
        (fake.folder / "test").write_bytes((fake.folder / "test").read_bytes()[:100])
    else:
        write_python2_pickle(fake.folder / "test", content)
    with pytest.raises(KdcacheError, match=complaint):
        load_dataset("cifar100", tmp_path, "test")


def test_digits_shapes_split_and_determinism():
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    for data in (train, test):
        assert data.images.dtype == torch.uint8 and data.images.shape[1:] == (3, 32, 32)
        assert data.labels.dtype == torch.int64 and data.num_classes == 10
        assert torch.equal(data.images[:, 0], data.images[:, 1]) and torch.equal(data.images[:, 0], data.images[:, 2])
        assert data.mean == train.mean and data.std == train.std
    assert len(train.labels) + len(test.labels) == 1797
    assert load_dataset("digits").fingerprint == train.fingerprint
    # the raw 8×8 digits are all distinct, so disjoint image sets mean disjoint samples
    train_rows = {row.numpy().tobytes() for row in train.images}
    test_rows = {row.numpy().tobytes() for row in test.images}
    assert len(train_rows) == len(train.labels) and len(test_rows) == len(test.labels) and not train_rows & test_rows
    # stratified: every class sends about 20% of its samples to test
    test_share = torch.bincount(test.labels, minlength=10) / (torch.bincount(train.labels, minlength=10) + torch.bincount(test.labels, minlength=10))
    assert torch.all((test_share - 0.2).abs() < 0.01)
    # mean/std are those of the train split
    pixels = train.images[:, 0].double() / 255
    assert abs(train.mean[0] - pixels.mean().item()) < 1e-4 and abs(train.std[0] - pixels.std(unbiased=False).item()) < 1e-4


def _bilinear_x4_in_64ths(grid: torch.Tensor) -> torch.Tensor:
    """Integer bilinear ×4 upsampling (align_corners=False) of int64 [..., 8, 8], in 64ths of the input unit."""

    def along_last_axis(x):
        before = torch.cat([x[..., :1], x[..., :-1]], -1)  # edges clamp, as F.interpolate does
        after = torch.cat([x[..., 1:], x[..., -1:]], -1)
        # output pixels 4i..4i+3 sit at i - 3/8, i - 1/8, i + 1/8, i + 3/8: weights in eighths
        return torch.stack([5 * x + 3 * before, 7 * x + before, 7 * x + after, 5 * x + 3 * after], -1).flatten(-2)

    return along_last_axis(along_last_axis(grid).transpose(-1, -2)).transpose(-1, -2)


def test_digits_are_the_exact_bilinear_upsampling_of_all_1797_partitioned():
    from sklearn.datasets import load_digits

    raw = load_digits()
    in_64ths = _bilinear_x4_in_64ths(torch.from_numpy(raw.images).to(torch.int64))
    expected = torch.round(in_64ths.double() * 255 / (16 * 64)).to(torch.uint8)
    expected_samples = sorted((image.numpy().tobytes(), int(label)) for image, label in zip(expected, raw.target))
    found = [load_dataset("digits", split=split) for split in ("train", "test")]
    found_samples = sorted((image[0].numpy().tobytes(), int(label)) for data in found for image, label in zip(data.images, data.labels))
    assert found_samples == expected_samples  # train and test partition the whole set, pixel for pixel


def test_synthetic_is_seeded_and_learnable():
    train = load_dataset("synthetic", num_samples=400, seed=3)
    assert train.fingerprint == load_dataset("synthetic", num_samples=400, seed=3).fingerprint
    assert train.fingerprint != load_dataset("synthetic", num_samples=400, seed=4).fingerprint
    test = load_dataset("synthetic", split="test", num_samples=200, seed=3)
    assert test.mean == train.mean and test.std == train.std and test.fingerprint != train.fingerprint
    assert torch.bincount(train.labels).tolist() == [40] * 10
    # nearest class mean, fitted on train, scored on test
    features = {split: normalize(data.images, data.mean, data.std).flatten(1) for split, data in (("train", train), ("test", test))}
    class_means = torch.stack([features["train"][train.labels == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(features["test"], class_means).argmin(1) == test.labels).float().mean().item()
    assert accuracy > 0.5  # chance is 0.1


def test_synthetic_options():
    data = load_dataset("synthetic", num_samples=30, num_classes=3, image_size=16)
    assert data.images.shape == (30, 3, 16, 16) and data.num_classes == 3
    with pytest.raises(KdcacheError, match="unknown option.*colour.*known: num_samples, num_classes, image_size, seed"):
        load_dataset("synthetic", colour=1)
    with pytest.raises(KdcacheError, match="image_size should be an integer >= 8"):
        load_dataset("synthetic", image_size=4)
    with pytest.raises(KdcacheError, match="unknown option.*known: none"):
        load_dataset("digits", seed=1)


def test_unknown_name_and_split():
    assert {"cifar10", "cifar100", "digits", "synthetic"} <= set(list_datasets())
    with pytest.raises(KdcacheError, match="load_dataset\\(\\): unknown name 'imagenet'; known: cifar10, cifar100, cityscapes, digits"):
        load_dataset("imagenet")
    with pytest.raises(KdcacheError, match="unknown split 'val'; known: train, test"):
        load_dataset("digits", split="val")


def test_describe_is_json_metadata():
    data = load_dataset("synthetic", num_samples=20)
    described = json.loads(json.dumps(data.describe()))
    assert described == {
        "name": "synthetic",
        "split": "train",
        "num_samples": 20,
        "image_shape": [3, 32, 32],
        "num_classes": 10,
        "mean": list(data.mean),
        "std": list(data.std),
        "fingerprint": data.fingerprint,
    }


def _tiny_data(images, labels):
    return ImageData("t", "train", images, labels, 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    position=st.tuples(st.integers(0, 5), st.integers(0, 2), st.integers(0, 6), st.integers(0, 6)),
    delta=st.integers(1, 255),
)
def test_fingerprint_sees_one_pixel_one_label_and_the_order(seed, position, delta):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (6, 3, 7, 7), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (6,), generator=generator)
    original = _tiny_data(images, labels).fingerprint
    assert original == data_fingerprint(images.clone(), labels.clone())
    changed_pixel = images.clone()
    changed_pixel[position] += delta  # wraps modulo 256, never back to itself
    assert _tiny_data(changed_pixel, labels).fingerprint != original
    changed_label = labels.clone()
    changed_label[position[0]] = (labels[position[0]] + 1 + delta % 9) % 10  # moves by 1..9 classes
    assert _tiny_data(images, changed_label).fingerprint != original
    swapped = torch.tensor([1, 0, 2, 3, 4, 5])
    if not torch.equal(images[0], images[1]):
        assert _tiny_data(images[swapped], labels[swapped]).fingerprint != original


def test_fingerprint_sees_the_shape():
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    labels = torch.zeros(4, dtype=torch.int64)
    assert data_fingerprint(images, labels) != data_fingerprint(images.view(4, 3, 4, 16), labels)
    assert data_fingerprint(images, labels) != data_fingerprint(images.view(2, 3, 16, 8), labels[:2])


def test_empty_data_has_a_fingerprint():
    empty = _tiny_data(torch.zeros(0, 3, 4, 4, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    assert len(empty.fingerprint) == 64 and empty.describe()["num_samples"] == 0


def test_image_data_checks_its_tensors():
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(KdcacheError, match="contiguous CPU uint8"):
        _tiny_data(images.float(), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(KdcacheError, match="labels should be int64 \\[2\\]"):
        _tiny_data(images, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(KdcacheError, match="labels should lie in"):
        _tiny_data(images, torch.tensor([0, 10]))
    with pytest.raises(KdcacheError, match="one value per channel"):
        ImageData("t", "train", images, torch.zeros(2, dtype=torch.int64), 10, (0.5,), (0.5,))


def test_normalize_matches_manual_computation():
    images = torch.randint(0, 256, (4, 3, 5, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    result = normalize(images, mean, std)
    assert result.dtype == torch.float32 and result.shape == images.shape
    for channel in range(3):
        expected = (images[:, channel].double() / 255 - mean[channel]) / std[channel]
        torch.testing.assert_close(result[:, channel].double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(normalize(images[0], mean, std), result[0])  # a single [C, H, W] image too
    with pytest.raises(KdcacheError, match="needs uint8 images"):
        normalize(images.float(), mean, std)
