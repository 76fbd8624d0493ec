"""Augmentation policies: replay equals torchvision's transforms, the view grid, sampling, CPU = CUDA."""

import json
from unittest import mock

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcache.data import CropFlip, get_policy, list_policies
from kdcache.errors import KdcacheError

CIFAR = get_policy("cifar")


def _random_images(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@st.composite
def batches(draw, height=st.integers(1, 40), width=st.integers(1, 40)):
    """Random uint8 images [B, C, H, W] of any size and one (dx, dy, flip) row per image."""
    batch, channels = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    images = _random_images(draw(st.integers(0, 2**31)), (batch, channels, draw(height), draw(width)))
    rows = draw(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8), st.integers(0, 1)), min_size=batch, max_size=batch))
    return images, torch.tensor(rows, dtype=draw(st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8])))


@settings(max_examples=150, deadline=None)
@given(batches())
def test_cifar_apply_equals_torchvision_functional(batch):
    images, params = batch
    height, width = images.shape[-2:]
    views = CIFAR.apply(images, params)
    assert views.dtype == torch.uint8 and views.shape == images.shape
    for image, view, (dx, dy, flip) in zip(images, views, params.tolist()):
        expected = TF.crop(TF.pad(image, [4]), top=dy, left=dx, height=height, width=width)
        assert torch.equal(view, TF.hflip(expected) if flip else expected)


@settings(max_examples=60, deadline=None)
@given(batches(height=st.just(32), width=st.just(32)))
def test_cifar_apply_equals_torchvision_random_transforms_with_forced_draws(batch):
    images, params = batch
    views = CIFAR.apply(images, params)
    for image, view, (dx, dy, flip) in zip(images, views, params.tolist()):
        # RandomCrop draws its corner in get_params (top=i, left=j); RandomHorizontalFlip flips when rand < p
        pipeline = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(p=float(flip))])
        with mock.patch.object(T.RandomCrop, "get_params", return_value=(dy, dx, 32, 32)):
            assert torch.equal(view, pipeline(image))


def test_cifar_enumerate_is_the_whole_grid_in_lexicographic_order():
    views = CIFAR.enumerate()
    assert views.dtype == torch.int64 and views.shape == (162, 3) and CIFAR.num_views == 162
    assert len({tuple(row) for row in views.tolist()}) == 162
    assert views.tolist() == [[dx, dy, flip] for dx in range(9) for dy in range(9) for flip in range(2)]


def test_cifar_162_views_of_a_generic_image_are_distinct():
    image = _random_images(0, (1, 3, 32, 32))
    views = CIFAR.apply(image.expand(162, -1, -1, -1), CIFAR.enumerate())
    assert len({view.numpy().tobytes() for view in views}) == 162


def test_cifar_sample_is_seeded_and_in_range():
    first = CIFAR.sample(torch.Generator().manual_seed(7), 5000)
    assert torch.equal(first, CIFAR.sample(torch.Generator().manual_seed(7), 5000))
    assert not torch.equal(first, CIFAR.sample(torch.Generator().manual_seed(8), 5000))
    assert first.dtype == torch.int64 and first.shape == (5000, 3) and first.device.type == "cpu"
    assert set(first[:, 0].tolist()) == set(range(9)) and set(first[:, 1].tolist()) == set(range(9))
    assert set(first[:, 2].tolist()) == {0, 1}


def test_padding_is_a_parameter_of_the_policy():
    policy = CropFlip(padding=2)
    assert policy.num_views == 50 and policy.describe()["padding"] == 2
    image = _random_images(1, (1, 3, 9, 11))
    view = policy.apply(image, torch.tensor([[4, 0, 0]]))
    assert torch.equal(view[0], TF.crop(TF.pad(image[0], [2]), top=0, left=4, height=9, width=11))


def test_none_is_identity():
    policy = get_policy("none")
    images = _random_images(2, (3, 3, 8, 8))
    assert policy.num_views == 1 and policy.param_names == ()
    assert policy.sample(torch.Generator().manual_seed(0), 3).shape == (3, 0)
    assert policy.enumerate().shape == (1, 0)
    assert torch.equal(policy.apply(images, policy.sample(torch.Generator(), 3)), images)


def test_registry_and_description():
    assert list_policies() == ["cifar", "imagenet", "none", "randaugment"]
    with pytest.raises(KdcacheError, match="get_policy\\(\\): unknown name 'autoaugment'; known: cifar, imagenet, none"):
        get_policy("autoaugment")
    for name in list_policies():
        policy = get_policy(name, image_size=(32, 32))  # imagenet needs the image size; the others ignore it
        described = json.loads(json.dumps(policy.describe()))
        assert described["name"] == name and described["param_names"] == list(policy.param_names)
    assert CIFAR.describe() == {"name": "cifar", "param_names": ["dx", "dy", "flip"], "num_views": 162, "padding": 4, "fill": 0}


def test_apply_refuses_wrong_params():
    images = _random_images(3, (2, 3, 8, 8))
    with pytest.raises(KdcacheError, match="needs integer params \\[2, 3\\] \\(dx, dy, flip\\)"):
        CIFAR.apply(images, torch.zeros(2, 3))
    with pytest.raises(KdcacheError, match="needs integer params"):
        CIFAR.apply(images, torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(KdcacheError, match="needs uint8 images"):
        CIFAR.apply(images.float(), torch.zeros(2, 3, dtype=torch.int64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cifar_apply_is_bit_identical_on_cpu_and_cuda():
    images = _random_images(4, (2048, 3, 32, 32))
    params = CIFAR.sample(torch.Generator().manual_seed(4), 2048)
    on_cuda = CIFAR.apply(images.cuda(), params)  # params follow the images to the GPU
    assert on_cuda.device.type == "cuda" and on_cuda.dtype == torch.uint8
    assert torch.equal(on_cuda.cpu(), CIFAR.apply(images, params))
    views = CIFAR.enumerate()
    assert torch.equal(CIFAR.apply(images[:162].cuda(), views.cuda()).cpu(), CIFAR.apply(images[:162], views))
