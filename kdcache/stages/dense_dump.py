"""Stage 1 on segmentation: a segmentation teacher runs once over K replayable views of a dense split (images with a
label per pixel), and its per-pixel logits at an output stride go to a dense cache (format 7,
kdcache.cache.dense_layout: every logit in float16, or the top k per position), which resumes, shards under torchrun
and verifies as image caches do.

A view's map is `at_stride(teacher(view), stride)`: the teacher's logits at the view's full size, averaged over each
stride × stride block, so the replayed view's pixel block (y, x) maps to position (y // s, x // s) of its map exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from kdcache import distributed
from kdcache.cache.dense_layout import DenseCacheSpec, dense_cache_spec
from kdcache.cache.location import Location, Place
from kdcache.config import DumpConfig, options_given
from kdcache.data.dense import IGNORE_INDEX, DenseData, LabelledPolicy
from kdcache.errors import KdcacheError
from kdcache.models import load_teacher
from kdcache.runtime import autocast, pick_device, precision, prepare_model
from kdcache.stages.dense_targets import at_stride
from kdcache.stages.views import DEFAULT_VIEWS, view_params
from kdcache.stages.writing import Block, DumpResult, dump_pending, encoded_logits, open_writer

DEFAULT_STRIDE = 4  # DumpConfig.stride None: the FCN teachers' own output stride (they upsample a map at 1/4)
# dump-teacher's options for image classifiers' caches: a dense cache takes none of them
CLASSIFIER_DUMP_OPTIONS = ("mix", "outputs", "losses", "views_from", "scales")


def dump_dense(teacher: nn.Module, teacher_info: dict[str, Any], data: DenseData, policy: LabelledPolicy, out: Place,
               *, views: int | None = None, exhaustive: bool = False, stride: int = DEFAULT_STRIDE, topk: int = 0,
               batch_size: int = 256, device: torch.device | str = "auto", dtype: str = "float16",
               format: str | None = None, seed: int = 0, block_size: int = 0, overwrite: bool = False,
               show_progress: bool = True) -> DumpResult:
    """Write a segmentation teacher's logit maps at `stride` for every (view, sample) of `data` to a dense cache
    (topk > 0: per position the k largest logits, their classes and one logit for the rest); resumes an interrupted
    dump, and under torchrun each rank writes its own blocks. views None: 4, unless `exhaustive` (every view of the
    policy per sample)."""
    out = Location.of(out)
    device = pick_device(device) if isinstance(device, str) else device
    require_dense_teacher(teacher, teacher_info, data, stride, topk)
    here = distributed.init(device)
    params = view_params(policy, len(data), DEFAULT_VIEWS if views is None and not exhaustive else views, exhaustive,
                         seed)
    labelled = labelled_pixels(data, policy, params)
    spec = dense_cache_spec({**teacher_info, "precision": precision(device)}, data.describe(), policy.describe(),
                            len(params), exhaustive, seed, stride, labelled.sum(1).tolist(), dtype, block_size, topk)
    model = prepare_model(teacher, device).eval()
    writer = open_writer(out, spec, labelled.numpy(), params.numpy(), format, overwrite, here)
    stored = torch.from_numpy(writer.aug_params()).long()  # a resumed run replays exactly these
    return dump_pending(writer, out, lambda pending: dense_blocks(model, data, policy, spec, stored, batch_size,
                                                                  device, pending), here, show_progress)


def require_dense_teacher(teacher: nn.Module, teacher_info: dict[str, Any], data: DenseData, stride: int,
                          topk: int) -> None:
    """Refuse a teacher that gives no per-pixel logits of the data's classes, a stride whose blocks do not tile the
    images, or a top-k of all classes."""
    arch, (height, width) = teacher_info["arch"], data.images.shape[-2:]
    if not getattr(teacher, "segmentation", False):
        raise KdcacheError(f"--teacher {arch}: a dense dataset ({data.name}) caches per-pixel logits, which only a "
                           f"segmentation model gives; {arch} is not one (it has no `segmentation = True`): pass one "
                           f"such as fcn_resnet20")
    if getattr(teacher, "num_classes", data.num_classes) != data.num_classes:
        raise KdcacheError(f"the teacher {arch} predicts {teacher.num_classes} classes but dataset {data.name} has "
                           f"{data.num_classes}; pass a teacher made for this dataset's classes")
    if stride < 1 or height % stride or width % stride:
        divisors = [s for s in range(1, min(height, width) + 1) if height % s == 0 and width % s == 0]
        raise KdcacheError(f"--stride {stride}: the map's blocks must tile {data.name}'s {height}×{width} images; "
                           f"choose one of {', '.join(map(str, divisors))}")
    if not 0 <= topk < data.num_classes:
        raise KdcacheError(f"--topk: expected a number of logits per position below the {data.num_classes} classes "
                           f"(0 or no --topk stores them all), got {topk}")


def labelled_pixels(data: DenseData, policy: LabelledPolicy, params: Tensor) -> Tensor:
    """[K, N] int64: the pixels of each sample's view that carry a label (padding and ignored pixels do not)."""
    return torch.stack([(policy.apply_masks(data.masks, view) != IGNORE_INDEX).sum((1, 2)) for view in params])


def dense_blocks(model: nn.Module, data: DenseData, policy: LabelledPolicy, spec: DenseCacheSpec, params: Tensor,
                 batch_size: int, device: torch.device, pending: list[tuple[int, int]]) -> Iterator[Block]:
    """Each pending (view, block): its maps as the cache stores them, and how many labelled pixels the teacher's
    per-pixel argmax at full size gets right."""
    dtype = getattr(torch, spec.dtype)
    for view, block in pending:
        rows = spec.block_range(block)
        parts, correct = [], torch.zeros((), dtype=torch.long, device=device)
        # batches start at the block's start: a resumed block computes exactly what it would have
        for start in range(rows.start, rows.stop, batch_size):
            images, masks = data.views(policy, params[view], torch.arange(start, min(start + batch_size, rows.stop)),
                                       device)
            maps, right = teacher_maps(model, images, masks, spec.stride)
            correct += right
            parts.append(maps.to(dtype))
        yield view, block, encoded_logits(map_positions(torch.cat(parts)), spec), int(correct)


@torch.no_grad()
def teacher_maps(model: nn.Module, images: Tensor, masks: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    """The teacher's logits float32 [B, C, H/s, W/s] at the stride on normalised views, and the count of labelled
    pixels of `masks` [B, H, W] its argmax at full size gets right."""
    with autocast(images.device):
        logits = model(images)
    if logits.shape[-2:] != images.shape[-2:] or logits.ndim != 4:
        raise KdcacheError(f"the teacher gave {list(logits.shape)} for images {list(images.shape)}; a segmentation "
                           f"model gives logits [B, C, H, W] at the input's size")
    logits = logits.float()
    # max's indices are argmax's (the first largest), found six times faster over the channels of an NCHW map
    right = ((logits.max(1).indices == masks) & (masks != IGNORE_INDEX)).sum()
    return at_stride(logits, stride), right


def map_positions(maps: Tensor) -> Tensor:
    """Maps [B, C, h, w] as the cache stores them: [B, h·w, C], positions row-major (where regions stand)."""
    return maps.flatten(2).transpose(1, 2).contiguous()


def dump_dense_from_config(config: DumpConfig, data: DenseData, device: torch.device,
                           show_progress: bool = True) -> DumpResult:
    """`kdcache dump-teacher` on a dense dataset: the teacher's logit maps at --stride (default DEFAULT_STRIDE)."""
    given = options_given(config, CLASSIFIER_DUMP_OPTIONS)
    if given:
        raise KdcacheError(f"dump-teacher --dataset {config.dataset}: a dense cache stores a segmentation teacher's "
                           f"per-pixel logits at --stride; {', '.join(given)} are for image classifiers' caches: "
                           f"leave them out")
    policy = data.policy(config.augmentation or data.default_policy)
    teacher, info = load_teacher(config.checkpoint, config.teacher or None, data.num_classes)
    return dump_dense(teacher, info, data, policy, config.out, views=config.views, exhaustive=config.exhaustive,
                      stride=config.stride or DEFAULT_STRIDE, topk=config.topk, batch_size=config.batch_size,
                      device=device, dtype=config.dtype, format=config.format, seed=config.seed,
                      block_size=config.block_size, overwrite=config.overwrite, show_progress=show_progress)
