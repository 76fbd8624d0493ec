"""Segmentation data (kdcache.data.dense): label maps follow their images through every view exactly, as
torchvision's own ops move an image and its target together; the embedded digits scenes are fixed and labelled
where the ink is."""

import pytest
import torch
from torchvision.transforms import functional as TF

from kdcache.data import load_dataset
from kdcache.data.dense import IGNORE_INDEX, DenseData, is_dense
from kdcache.errors import KdcacheError


@pytest.fixture(scope="module")
def scenes() -> DenseData:
    return load_dataset("digits-scenes", split="test")


def _torchvision_view(picture: torch.Tensor, dx: int, dy: int, flip: int, fill: int, padding: int = 4) -> torch.Tensor:
    """RandomCrop(size, padding, fill) then RandomHorizontalFlip, at the given draws, with torchvision's functions."""
    height, width = picture.shape[-2:]
    cropped = TF.crop(TF.pad(picture, [padding], fill=fill), dy, dx, height, width)
    return TF.hflip(cropped) if flip else cropped


def test_views_of_images_and_label_maps_equal_torchvision_crop_and_flip(scenes):
    policy = scenes.policy("cifar")
    params = policy.sample(torch.Generator().manual_seed(0), len(scenes))
    indices = torch.arange(12)
    views = policy.apply(scenes.images[indices], params[indices])
    maps = policy.apply_masks(scenes.masks[indices], params[indices])
    for row, index in enumerate(indices.tolist()):
        dx, dy, flip = params[index].tolist()
        assert torch.equal(views[row], _torchvision_view(scenes.images[index], dx, dy, flip, fill=0))
        assert torch.equal(maps[row], _torchvision_view(scenes.masks[index][None], dx, dy, flip, IGNORE_INDEX)[0])


def test_padding_is_ignored_and_every_other_label_moves_with_its_pixel(scenes):
    policy = scenes.policy("cifar")
    params = torch.tensor([[0, 8, 1], [8, 0, 0]])  # the most shifted corners, one flipped
    images, maps = scenes.views(policy, params, torch.arange(2), torch.device("cpu"))
    assert maps.dtype == torch.int64 and images.dtype == torch.float32
    raw = policy.apply(scenes.images[:2], params)
    outside = policy.apply(torch.full_like(scenes.images[:2], 7), params) == 0  # zero only where padded
    assert torch.equal(maps == IGNORE_INDEX, outside[:, 0]) and outside.any()
    digit = (maps > 0) & (maps != IGNORE_INDEX)
    assert (raw[:, 0][digit] > 0).all() and digit.any()  # a view's pixel labelled a digit is a digit's pixel


def test_digits_scenes_are_fixed_and_labelled_where_the_ink_is(scenes):
    again = load_dataset("digits-scenes", split="test")
    train = load_dataset("digits-scenes", split="train")
    assert again.fingerprint == scenes.fingerprint != train.fingerprint
    assert scenes.images.shape == (250, 3, 48, 48) and train.masks.shape == (1000, 48, 48)
    assert scenes.class_names[0] == "background" and scenes.num_classes == 11
    assert scenes.mean == train.mean  # normalised with the train split's statistics
    brightest = scenes.images.max(dim=1).values
    labelled = scenes.masks > 0
    assert (brightest[labelled] > 0).all() and (scenes.masks[brightest == 0] == 0).all()
    assert set(torch.unique(train.masks).tolist()) == set(range(11))
    assert is_dense(scenes) and scenes.describe()["task"] == "segmentation"


@pytest.mark.parametrize("name, mix", [("randaugment", None), ("imagenet", None), ("cifar", {"mode": "mixup"})])
def test_policies_that_cannot_move_a_label_map_are_refused(scenes, name, mix):
    with pytest.raises(KdcacheError, match="label with its pixel.*--aug cifar or --aug none"):
        scenes.policy(name, mix)


def test_a_label_map_beyond_the_classes_or_of_another_shape_is_refused():
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(KdcacheError, match="holds class 5, beyond the 3 classes"):
        DenseData("mine", "train", images, torch.full((2, 8, 8), 5, dtype=torch.uint8), ("a", "b", "c"), (0,) * 3, (1,) * 3)
    with pytest.raises(KdcacheError, match=r"label maps should be uint8 \[2, 8, 8\]"):
        DenseData("mine", "train", images, torch.zeros(2, 8, 7, dtype=torch.uint8), ("a",), (0,) * 3, (1,) * 3)
    ignored = torch.full((2, 8, 8), IGNORE_INDEX, dtype=torch.uint8)
    assert DenseData("mine", "train", images, ignored, ("a",), (0,) * 3, (1,) * 3).num_classes == 1


def test_evaluation_gives_the_split_in_order_unaugmented(scenes):
    batches = list(scenes.evaluation(torch.device("cpu"), batch_size=100))
    assert [len(images) for images, _ in batches] == [100, 100, 50]
    assert torch.equal(torch.cat([maps for _, maps in batches]), scenes.masks.long())
