"""The policy registry's entries (`get_policy`, `list_policies`): each name once, with its form for images held in
memory and, where it has one, for files streamed from disk (`on_files`: a view drawn relative to each original
file). The source asks for the form it reads; callers name the policy only."""

from kdcache.data.augment import POLICIES, CropFlip, Identity, ResizedCropFlip
from kdcache.data.files import FileCenterCrop, FileRandAugmented, FileResizedCropFlip
from kdcache.data.randaugment import RandAugmented, RandAugmentOps
from kdcache.errors import KdcacheError

_CIFAR, _IDENTITY = CropFlip(padding=4), Identity()  # the same instance whatever the size


@POLICIES.register
def cifar(image_size: tuple[int, int] | None = None) -> CropFlip:
    """RandomCrop(padding 4) + flip, at any size."""
    return _CIFAR


@POLICIES.register
def none(image_size: tuple[int, int] | None = None, on_files: bool = False) -> Identity | FileCenterCrop:
    """No augmentation (on files: the evaluation crop, shorter side resized, centre crop)."""
    return FileCenterCrop(_side(image_size)) if on_files else _IDENTITY


@POLICIES.register
def imagenet(image_size: tuple[int, int] | None = None, on_files: bool = False
             ) -> ResizedCropFlip | FileResizedCropFlip:
    """ResizedCropFlip at the stored images' size, which its boxes and output are measured in (on files: the box
    drawn in fractions of each original file, the view made at image_size)."""
    if image_size is None:
        raise KdcacheError("get_policy('imagenet'): needs image_size=(H, W), the stored images' height and width "
                           "(its crop boxes are drawn in pixels of that image and resampled back to its size)")
    if on_files:
        return FileResizedCropFlip(_side(image_size))
    return ResizedCropFlip(size=(int(image_size[0]), int(image_size[1])))


@POLICIES.register
def randaugment(image_size: tuple[int, int] | None = None, num_ops: int = 2, magnitude: int = 9,
                on_files: bool = False) -> RandAugmented | FileRandAugmented:
    """RandomCrop(padding 4) + flip + RandAugment(num_ops, magnitude), torchvision's ops, at any size (on files:
    imagenet's crop of the original file, then the ops)."""
    if on_files:
        return FileRandAugmented(_side(image_size), num_ops, magnitude)
    return RandAugmented(CropFlip(padding=4), RandAugmentOps(int(num_ops), int(magnitude)))


def _side(image_size: tuple[int, int] | None) -> int:
    """The side of a file source's square views."""
    if image_size is None or image_size[0] != image_size[1]:
        raise KdcacheError(f"get_policy(on_files=True): needs the square view size (S, S) of the files' views, "
                           f"got {image_size}")
    return int(image_size[0])
