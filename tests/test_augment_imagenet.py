"""The imagenet policy: replay equals torchvision's resized_crop + flip pixel for pixel, get_params' draws, CPU = CUDA."""

import collections
import json
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF2
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2.functional import _geometry

from kdcache.data import get_policy
from kdcache.data.augment import ResizedCropFlip
from kdcache.errors import KdcacheError
from kdcache.stages.dump import view_params

SIZES = [(1, 1), (1, 9), (9, 1), (2, 3), (5, 7), (13, 29), (32, 32), (64, 17), (40, 64), (64, 64)]

# torchvision resizes uint8 natively (torch's integer kernel) only on AVX2/AVX512/arm CPUs; elsewhere it
# resizes in float32 and rounds, which may differ by a grey level, so equality is only asserted natively
native_uint8 = pytest.mark.skipif(
    not getattr(_geometry, "_do_native_uint8_resize_on_cpu", lambda mode: True)(InterpolationMode.BILINEAR),
    reason="torchvision resizes uint8 through float32 on this CPU",
)


def _random_images(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _torchvision_view(image: torch.Tensor, i: int, j: int, h: int, w: int, flip: int) -> torch.Tensor:
    """RandomResizedCrop's pixels for box (i, j, h, w) at the image's own size, then the flip."""
    height, width = image.shape[-2:]
    view = TF2.resized_crop(image, i, j, h, w, size=[height, width], interpolation=InterpolationMode.BILINEAR,
                            antialias=True)
    return TF2.horizontal_flip(view) if flip else view


def _assert_equals_torchvision(images: torch.Tensor, params: torch.Tensor) -> None:
    height, width = images.shape[-2:]
    views = ResizedCropFlip(size=(height, width)).apply(images, params)
    assert views.dtype == torch.uint8 and views.shape == images.shape
    for image, view, box in zip(images, views, params.tolist()):
        assert torch.equal(view, _torchvision_view(image, *box)), f"box {box} of a {height}x{width} image"


@st.composite
def boxes(draw, height: int, width: int) -> list[int]:
    """Any box (i, j, h, w, flip) that lies inside a height x width image."""
    h, w = draw(st.integers(1, height)), draw(st.integers(1, width))
    return [draw(st.integers(0, height - h)), draw(st.integers(0, width - w)), h, w, draw(st.integers(0, 1))]


@st.composite
def batches(draw) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images [B, C, H, W] up to 64 px a side and a box per image, drawn freely or by sample()."""
    height, width = draw(st.sampled_from(SIZES) | st.tuples(st.integers(1, 64), st.integers(1, 64)))
    batch, channels = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    images = _random_images(draw(st.integers(0, 2**31)), (batch, channels, height, width))
    if draw(st.booleans()):
        params = ResizedCropFlip(size=(height, width)).sample(torch.Generator().manual_seed(draw(st.integers(0, 2**31))), batch)
    else:
        params = torch.tensor(draw(st.lists(boxes(height, width), min_size=batch, max_size=batch)))
    return images, params


@native_uint8
@settings(max_examples=200, deadline=None)
@given(batches())
def test_apply_equals_torchvision_resized_crop_and_flip(batch):
    _assert_equals_torchvision(*batch)


@native_uint8
@pytest.mark.parametrize("size", SIZES)
def test_apply_equals_torchvision_on_edge_boxes(size):
    height, width = size
    edges = [
        (0, 0, height, width),  # the whole image: no resampling at all
        (0, 0, 1, 1), (height - 1, width - 1, 1, 1),  # one pixel blown up to the whole image
        (0, width - 1, height, 1), (height - 1, 0, 1, width),  # one column or row: one axis only
        (height // 2, 0, height - height // 2, width),  # a horizontal band: vertical pass only
        (0, width // 3, height, width - width // 3),  # a vertical band: horizontal pass only
        (max(height - 2, 0), max(width - 3, 0), min(height, 2), min(width, 3)),  # a small box at the far corner
        (height // 4, width // 4, max(height // 2, 1), max(width // 2, 1)),  # the central quarter: 2x upscaling
        (0, 0, max(height - 1, 1), max(width - 1, 1)),  # one pixel short of the image: slight upscaling
    ]
    params = torch.tensor([[*box, flip] for box in edges for flip in (0, 1)])
    # uniform grey levels, extremes and a checkerboard stress the rounding and the [0, 255] clamp
    images = _random_images(height * 100 + width, (len(params), 3, height, width))
    images[0::4] = 255
    images[1::4] = (torch.arange(height)[:, None] + torch.arange(width)).remainder(2).to(torch.uint8) * 255
    _assert_equals_torchvision(images, params)


@native_uint8
def test_apply_equals_torchvision_at_imagenet_size():
    images = _random_images(5, (12, 3, 224, 224))
    params = ResizedCropFlip(size=(224, 224)).sample(torch.Generator().manual_seed(5), 12)
    _assert_equals_torchvision(images, params)


@settings(max_examples=100, deadline=None)
@given(batches())
def test_apply_equals_torch_uint8_interpolate(batch):
    """Whatever path torchvision takes, the views are torch's own integer antialiased bilinear kernel."""
    images, params = batch
    views = ResizedCropFlip(size=tuple(images.shape[-2:])).apply(images, params)
    for image, view, (i, j, h, w, flip) in zip(images, views, params.tolist()):
        expected = F.interpolate(image[None, :, i:i + h, j:j + w], size=list(image.shape[-2:]), mode="bilinear",
                                 align_corners=False, antialias=True)[0]
        assert torch.equal(view, expected.flip(-1) if flip else expected)


def test_batch_and_params_dtype_do_not_change_the_views():
    policy = ResizedCropFlip(size=(24, 30))
    images = _random_images(6, (16, 3, 24, 30))
    params = policy.sample(torch.Generator().manual_seed(6), 16)
    views = policy.apply(images, params)
    assert torch.equal(views, policy.apply(images, params.to(torch.int32)))
    assert torch.equal(views[5:6], policy.apply(images[5:6], params[5:6]))


def _central_box(size: tuple[int, int], ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """get_params' fallback box (i, j, h, w), written out from torchvision's code."""
    height, width = size
    if width / height < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif width / height > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("size", SIZES + [(3, 64), (64, 3), (224, 224)])
def test_sampled_boxes_fit_the_image_and_the_ranges(size):
    height, width = size
    params = ResizedCropFlip(size=size).sample(torch.Generator().manual_seed(height * 1000 + width), 5000)
    assert params.dtype == torch.int64 and params.shape == (5000, 5) and params.device.type == "cpu"
    i, j, h, w, flip = params.T
    assert (h >= 1).all() and (w >= 1).all() and (i >= 0).all() and (j >= 0).all()
    assert (i + h <= height).all() and (j + w <= width).all()
    assert set(flip.tolist()) <= {0, 1}
    # w, h are sqrt(area·ratio), sqrt(area/ratio) rounded, so area and ratio are known to within the rounding
    hf, wf = h.double(), w.double()
    in_range = (((wf - 0.5) * (hf - 0.5) <= 1.0 * height * width) & ((wf + 0.5) * (hf + 0.5) >= 0.08 * height * width)
                & ((wf - 0.5) / (hf + 0.5) <= 4 / 3) & ((wf + 0.5) / (hf - 0.5) >= 3 / 4))
    central = (params[:, :4] == torch.tensor(_central_box(size))).all(dim=1)
    assert (in_range | central).all()


def test_sample_is_seeded():
    policy = ResizedCropFlip(size=(32, 32))
    first = policy.sample(torch.Generator().manual_seed(7), 1000)
    assert torch.equal(first, policy.sample(torch.Generator().manual_seed(7), 1000))
    assert not torch.equal(first, policy.sample(torch.Generator().manual_seed(8), 1000))
    assert set(first[:, 4].tolist()) == {0, 1}


def _torchvision_boxes(size: tuple[int, int], n: int) -> torch.Tensor:
    torch.manual_seed(0)
    image = torch.zeros(1, *size)
    return torch.tensor([T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])


def _total_variation(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Half the L1 distance between the empirical distributions of two sets of rows."""
    a, b = collections.Counter(map(tuple, ours.tolist())), collections.Counter(map(tuple, theirs.tolist()))
    return sum(abs(a[key] / len(ours) - b[key] / len(theirs)) for key in a.keys() | b.keys()) / 2


@pytest.mark.parametrize("size", [(32, 32), (5, 7), (3, 3), (64, 20)])
def test_sample_draws_like_torchvision_get_params(size):
    n = 20000
    ours = ResizedCropFlip(size=size).sample(torch.Generator().manual_seed(0), n)[:, :4]
    theirs = _torchvision_boxes(size, n)
    area = size[0] * size[1]

    def statistics(boxes: torch.Tensor) -> dict[str, float]:
        i, j, h, w = boxes.double().T
        return {"area": (h * w / area).mean().item(), "log_aspect": (w / h).log().mean().item(),
                "central": (boxes == torch.tensor(_central_box(size))).all(dim=1).double().mean().item(),
                "top": i.mean().item(), "left": j.mean().item()}

    ours_stats, theirs_stats = statistics(ours), statistics(theirs)
    # tolerances are about 5 standard errors of the difference of two 20000-draw means
    tolerances = {"area": 0.015, "log_aspect": 0.01, "central": 0.02, "top": 0.05 * size[0], "left": 0.05 * size[1]}
    for key, tolerance in tolerances.items():
        assert abs(ours_stats[key] - theirs_stats[key]) < tolerance, (key, ours_stats, theirs_stats)
    # the whole (h, w) distribution, not only its moments: two samples of one distribution differ by about
    # Σ sqrt(p / (π·n)) in total variation (measured: 0.94-1.07 times that); a biased draw would add to it
    counts = collections.Counter(map(tuple, theirs[:, 2:].tolist())).values()
    noise = sum(math.sqrt(count / n / (math.pi * n)) for count in counts)
    assert _total_variation(ours[:, 2:], theirs[:, 2:]) < 1.4 * noise


def test_get_policy_needs_the_image_size():
    with pytest.raises(KdcacheError, match=r"get_policy\('imagenet'\): needs image_size=\(H, W\)"):
        get_policy("imagenet")
    policy = get_policy("imagenet", image_size=(48, 40))
    assert policy == ResizedCropFlip(size=(48, 40)) and policy.num_views is None
    assert get_policy("cifar", image_size=(48, 40)) is get_policy("cifar")  # the others ignore the size


def test_enumerate_and_exhaustive_are_refused():
    policy = ResizedCropFlip(size=(32, 32))
    with pytest.raises(KdcacheError, match=r"imagenet.enumerate\(\): the policy has no finite list of views"):
        policy.enumerate()
    with pytest.raises(KdcacheError, match="instead of --exhaustive"):
        view_params(policy, num_samples=10, num_views=None, exhaustive=True, seed=0)
    assert view_params(policy, num_samples=10, num_views=3, exhaustive=False, seed=0).shape == (3, 10, 5)


def test_describe_is_json():
    described = ResizedCropFlip(size=(64, 48)).describe()
    assert json.loads(json.dumps(described)) == described == {
        "name": "imagenet", "param_names": ["i", "j", "h", "w", "flip"], "num_views": None, "size": [64, 48],
        "scale": [0.08, 1.0], "ratio": [3 / 4, 4 / 3], "interpolation": "bilinear", "antialias": True,
    }


def test_apply_refuses_other_images_and_params():
    policy = ResizedCropFlip(size=(8, 8))
    with pytest.raises(KdcacheError, match=r"made for images of size \[8, 8\], found \[8, 9\]"):
        policy.apply(_random_images(0, (2, 3, 8, 9)), torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(KdcacheError, match=r"needs integer params \[2, 5\] \(i, j, h, w, flip\)"):
        policy.apply(_random_images(0, (2, 3, 8, 8)), torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(KdcacheError, match="image size"):
        ResizedCropFlip(size=(0, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("size", [(32, 32), (64, 17), (3, 5), (224, 224)])
def test_apply_is_bit_identical_on_cpu_and_cuda(size):
    count = 64 if size == (224, 224) else 2048
    policy = ResizedCropFlip(size=size)
    images = _random_images(4, (count, 3, *size))
    params = policy.sample(torch.Generator().manual_seed(4), count)
    edges = torch.tensor([[0, 0, *size, 0], [0, 0, 1, 1, 1], [0, 0, size[0], 1, 0], [size[0] - 1, 0, 1, size[1], 1]])
    params[:len(edges)] = edges
    on_cuda = policy.apply(images.cuda(), params)  # params follow the images to the GPU
    assert on_cuda.device.type == "cuda" and on_cuda.dtype == torch.uint8
    assert torch.equal(on_cuda.cpu(), policy.apply(images, params))
    assert torch.equal(policy.apply(images.cuda(), params.cuda()).cpu(), on_cuda.cpu())
