"""timm's train.py trained from a kdcache cache: the calls examples/timm/train.patch adds to it (`--kdcache CACHE`,
`--kd-loss NAME`), so the patch stays a few lines and the logic lives and is tested here.

With `--kdcache` the train split's images are the cache's views, replayed from timm's `--data-dir`, and the targets
the teacher's logits on exactly those pixels; timm's prefetcher, AMP, EMA, schedulers, checkpoints and eval work
as they are. What would change the pixels the teacher saw (timm's augmentations, random erasing, its mixup) or
replace the cache's teacher and loss (`--kd-model-name`, `--smoothing`) is refused in one line, as are an image
size, mean, std or class count other than the cache's. The loss is `kdcache.DistillLoss(--kd-loss)`: what
`kdcache distill --loss NAME --epochs E` computes on the same batch, with E timm's `--epochs`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from kdcache.errors import KdcacheError
from kdcache.models.region_student import RegionStudent
from kdcache.stages.criterion import DistillLoss, check_student
from kdcache.stages.dataset import CacheDataset, check_loader_inputs, collate

log = logging.getLogger(__name__)

# train.py's options that would change the pixels the teacher saw, by dest; the cache's policy made the views
PIXEL_OPTIONS = ("aa", "reprob", "scale", "ratio", "hflip", "vflip", "color_jitter", "color_jitter_prob",
                 "grayscale_prob", "gaussian_blur_prob", "train_interpolation", "train_crop_mode", "no_aug",
                 "aug_repeats", "aug_splits", "train_img_sizes", "naflex_loader")
MIXING_OPTIONS = ("mixup", "cutmix", "cutmix_minmax")  # a mixup/CutMix cache mixes its own views
LOSS_OPTIONS = ("smoothing", "jsd_loss", "bce_loss")  # the loss is --kd-loss's
DATA_OPTIONS = ("dataset", "train_split", "epoch_repeats", "train_num_samples")  # the cache names its data
CHECKED_OPTIONS = PIXEL_OPTIONS + MIXING_OPTIONS + LOSS_OPTIONS + DATA_OPTIONS

Function = TypeVar("Function", bound=Callable[..., Any])


def one_line_errors(function: Function) -> Function:
    """train.py has no kdcache CLI around it: a KdcacheError is printed as kdcache's one line, exit status 2."""
    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except KdcacheError as error:
            print(f"kdcache: error: {error}", file=sys.stderr, flush=True)
            raise SystemExit(error.exit_code) from None
    return checked  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--kdcache CACHE` and `--kd-loss NAME`, after train.py's own: its defaults are kept as they are now, before a
    --config file changes them, to compare the options given with."""
    parser.kdcache_defaults = {action.dest: (action.option_strings[0], action.default)  # type: ignore[attr-defined]
                               for action in parser._actions if action.option_strings}
    parser.add_argument("--kdcache", default=None, metavar="CACHE",
                        help="train from a kdcache cache: its views of --data-dir's train split and its teacher's "
                             "logits replace timm's train transforms and loss (kdcache.timm_train)")
    parser.add_argument("--kd-loss", default="kd", metavar="NAME",
                        help="with --kdcache, the loss as `kdcache distill --loss NAME` (`kdcache losses` lists "
                             "them; default: kd)")


@one_line_errors
def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """With --kdcache, refuse in one line timm's online teacher and every option given a value other than train.py's
    default that would change the pixels the teacher saw, mix them, replace the loss or read other data."""
    if not args.kdcache:
        return
    if getattr(args, "kd_model_name", None) is not None:
        raise KdcacheError(f"--kdcache and --kd-model-name {args.kd_model_name}: --kd-model-name runs timm's own "
                           f"teacher online, --kdcache trains from the cached teacher's logits; drop one of them")
    defaults = parser.kdcache_defaults  # type: ignore[attr-defined]
    changed = [dest for dest in CHECKED_OPTIONS if dest in defaults and getattr(args, dest) != defaults[dest][1]]
    if changed:
        flag, default = defaults[changed[0]]
        others = ", ".join(defaults[dest][0] for dest in changed[1:])
        raise KdcacheError(f"{flag} {_shown(getattr(args, changed[0]))} with --kdcache {args.kdcache}: "
                           f"{_why(changed[0])}; leave {flag} at train.py's default ({_shown(default)})"
                           + (f" (also given: {others})" if others else ""))


def _why(dest: str) -> str:
    """Why an option cannot change with --kdcache."""
    if dest in MIXING_OPTIONS:
        return ("the images are the cache's views and its targets the teacher's logits on them, so timm's mixing "
                "would train on pixels the teacher never saw; a mixup/CutMix cache (dump-teacher --mix) trains with "
                "its own mixing")
    if dest in LOSS_OPTIONS:
        return "the loss is --kd-loss's (kdcache distill's, label smoothing included), not timm's"
    if dest in DATA_OPTIONS:
        return "the train split is the one the cache was made from, read from --data-dir"
    return ("the images are the cache's views, the pixels the teacher's targets were made on, and timm's train "
            "transforms are not applied to them")


def _shown(value: Any) -> str:
    """An option's value as it is written on a command line."""
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


@one_line_errors
def dataset(args: argparse.Namespace, data_config: dict[str, Any]) -> CacheDataset:
    """The train dataset: the cache's views of --data-dir's train split with the teacher's targets (uint8 for
    timm's prefetcher, normalised without it), checked against timm's image size, mean, std and classes."""
    train = CacheDataset(args.kdcache, args.data_dir, images="uint8" if args.prefetcher else "normalized",
                         item="pair")
    check_loader_inputs(train, image_size=data_config["input_size"], where="--img-size (or --input-size)")
    check_loader_inputs(train, mean=data_config["mean"], where="--mean")
    check_loader_inputs(train, std=data_config["std"], where="--std")
    check_loader_inputs(train, num_classes=args.num_classes, where="--num-classes")
    if train.data.name == "imagefolder":
        check_class_order(Path(args.data_dir) / "train", getattr(args, "class_map", ""))
    return train


def check_class_order(folder: Path, class_map: str = "") -> None:
    """The cache's labels number the class folders sorted (torchvision's ImageFolder); timm's val loader numbers
    them in natural order (class2 before class10), or as a --class-map text file lists them: refuse a difference,
    which would score every prediction against another class's label."""
    from timm.utils.misc import natural_key

    if class_map and not class_map.endswith(".txt"):
        return  # a pickled class map is not opened here: data is never code
    cached = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    if class_map:
        lines = Path(class_map).read_text(encoding="utf-8").splitlines()
        timm_order, where = [line.strip() for line in lines], f"--class-map {class_map}"
    else:
        timm_order, where = sorted(cached, key=natural_key), "timm's val loader (class folders in natural order)"
    if timm_order == cached:
        return
    first = next((i for i, (a, b) in enumerate(zip(timm_order, cached)) if a != b), min(len(timm_order), len(cached)))
    raise KdcacheError(f"{where} numbers class {first} {_nth(timm_order, first)} but the cache's labels number it "
                       f"{_nth(cached, first)} (the folders of {folder} sorted, as torchvision's ImageFolder does): "
                       f"write those names sorted, one a line, to a .txt file and pass --class-map FILE")


def _nth(names: list[str], index: int) -> str:
    """The name at index, or 'none' past the end."""
    return names[index] if index < len(names) else "none"


@one_line_errors
def create_loader(train: CacheDataset, **options: Any) -> Any:
    """timm's create_loader over the cache's views: its train transforms dropped (said once), kdcache.collate for
    the targets; options that would alter the pixels after the dataset (random erasing, a mixing collate,
    several input sizes) refused in one line."""
    from timm.data import create_loader as timm_create_loader

    if options.get("re_prob") or options.get("collate_fn") is not None or options.get("input_size_choices"):
        raise KdcacheError("create_loader over a CacheDataset: random erasing (re_prob), a mixing collate_fn and "
                           "input_size_choices would change the pixels the teacher saw; leave them unset")
    check_loader_inputs(train, image_size=options.get("input_size"), mean=options.get("mean"),
                        std=options.get("std"), where="timm's create_loader")
    with train.transforms_ignored():
        loader = timm_create_loader(train, **{**options, "collate_fn": collate})
    if _primary():
        log.info(f"kdcache: the train images are the views of the cache {train.path} (its {train.policy.name} "
                 f"policy, {train.image_size}x{train.image_size}): timm's train transforms are not applied")
    return loader


@one_line_errors
def student_and_loss(args: argparse.Namespace, model: nn.Module, train: CacheDataset
                     ) -> tuple[nn.Module, DistillLoss]:
    """The student to train (the model, or RegionStudent around it for a loss that distils regions) and the loss
    of `--kd-loss` scaled to timm's `--epochs`, both checked against the cache; the student is its model to
    checkpoints, the EMA and DDP, and gives plain logits in eval."""
    criterion = DistillLoss(args.kd_loss, epochs=args.epochs)
    read = (*criterion.loss.needs, *criterion.loss.student_outputs)
    if read:
        raise KdcacheError(f"--kd-loss {args.kd_loss} reads the student's {', '.join(read)}, "
                           f"which timm's train.py does not give its loss; use a logit loss (kd, dkd, sdd-lskd, ...) "
                           f"or `kdcache distill --loss {args.kd_loss}`")
    student = RegionStudent(model, train.scales) if criterion.loss.uses_regions else model
    check_student(criterion.loss, train, student)
    return student, criterion


def _primary() -> bool:
    """Whether this process speaks for the run: the only one, or rank 0."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
