"""What the CLI commands do beyond one library call: wiring a dump from its config, reports and tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from kdcache.cache import Problem, open_cache
from kdcache.cache.dump import DumpResult, dump_teacher
from kdcache.cache.store import location_name, store_bytes
from kdcache.config import DumpConfig, loader_options
from kdcache.data import get_policy, list_datasets, list_policies, load_dataset
from kdcache.distributed import world
from kdcache.errors import KdcacheError
from kdcache.runtime import pick_device

DEFAULT_VIEWS = 4


def dump_teacher_from_config(config: DumpConfig, show_progress: bool = True) -> DumpResult:
    """Load the teacher and data a DumpConfig names, dump, and print the closing summary."""
    from kdcache.train.teacher import load_teacher

    if not config.checkpoint:
        raise KdcacheError("dump-teacher: --checkpoint is required (a teacher from `kdcache train-teacher` or an "
                           "mdistiller CIFAR-100 teacher)")
    if config.exhaustive and config.views is not None:
        raise KdcacheError("dump-teacher: --views and --exhaustive exclude each other (--exhaustive caches every view "
                           "of the policy)")
    device = pick_device(config.device)
    data = load_dataset(config.dataset, config.data_root, config.split, **loader_options(config))
    policy = get_policy(config.augmentation, image_size=tuple(data.images.shape[-2:]))
    teacher, info = load_teacher(config.checkpoint, config.teacher or None, data)
    result = dump_teacher(teacher, info, data, policy, config.out, views=config.views or DEFAULT_VIEWS,
                          exhaustive=config.exhaustive, scales=config.scales, batch_size=config.batch_size,
                          device=device, dtype=config.dtype, format=config.format, seed=config.seed,
                          block_size=config.block_size, overwrite=config.overwrite, topk=config.topk,
                          show_progress=show_progress)
    if show_progress and world().is_main:
        print(dump_summary(result))
    return result


def dump_summary(result: DumpResult) -> str:
    """The closing lines of a dump: what, how big, how fast, how good the teacher is per view."""
    accuracy = " ".join(f"{a:.4f}" for a in result.view_accuracy[:16])
    more = f" ... ({len(result.view_accuracy)} views)" if len(result.view_accuracy) > 16 else ""
    how = "resumed and finished" if result.resumed else "wrote"
    return (f"{how} {result.path}: {_megabytes(result.bytes_on_disk)} on disk; {result.images} teacher images in "
            f"{result.seconds:.1f} s ({result.images_per_second:.0f} img/s)\nteacher accuracy per view: {accuracy}{more}")


def describe_cache(path: str | Path) -> dict[str, Any]:
    """`kdcache inspect`: metadata, shapes, size on disk, completeness and teacher accuracy per view."""
    with open_cache(path) as cache:
        spec, progress = cache.spec, cache.progress()
        written = int((progress >= 0).sum())
        accuracy = cache.view_accuracy()
        size = store_bytes(path)
        report = {"path": str(path), "format": cache.store.format_name, "metadata": cache.metadata,
                  "shape": {"logits": list(spec.logits_shape), "aug": [spec.num_views, spec.num_samples, spec.num_params]},
                  "bytes_on_disk": size, "blocks_written": written, "blocks_total": progress.size,
                  "complete": written == progress.size, "view_accuracy": accuracy}
    shown = [("-" if a is None else f"{a:.4f}") for a in accuracy[:16]]
    report["text"] = "\n".join([
        f"{path} ({report['format']}, format version {spec.format_version})",
        f"teacher   {spec.teacher['arch']} ({spec.num_classes} classes, sha256 {spec.teacher.get('checkpoint_sha256', '?')[:12]}, "
        f"{spec.teacher.get('precision')})",
        f"dataset   {spec.dataset['name']} {spec.dataset['split']}, {spec.num_samples} samples, fingerprint "
        f"{spec.dataset['fingerprint'][:12]}, mean {spec.dataset['mean']} std {spec.dataset['std']}",
        f"views     {spec.num_views}{' (exhaustive)' if spec.exhaustive else ''} of policy "
        f"{spec.augmentation['name']} {spec.augmentation.get('param_names')}, seed {spec.seed}",
        f"logits    {list(spec.logits_shape)} {spec.dtype} (views, samples, regions, classes); scales "
        f"{list(spec.scales)}; {spec.block_size} samples per chunk"
        + (f"; top {spec.topk} per region stored, the rest rebuilt" if spec.topk else ""),
        f"size      {_megabytes(size)} on disk",
        f"complete  {'yes' if report['complete'] else 'no'}: {written} of {progress.size} (view, block) units written",
        f"accuracy  teacher top-1 per view: {' '.join(shown)}{' ...' if len(accuracy) > 16 else ''}",
    ])
    return report


def verify_cache(path: str | Path, show_progress: bool = True) -> list[Problem]:
    """`kdcache verify`: read every chunk; the problems found, located by array, view and block."""
    with open_cache(path) as cache:
        total = cache.num_views * cache.spec.num_blocks
        with tqdm(total=total, unit="block", desc=f"verify {location_name(path)}", disable=not show_progress) as bar:
            problems = cache.verify(on_block=lambda: bar.update(1))
    if show_progress and not problems:
        print(f"{path}: ok, {total} blocks of logits and every other chunk read and checked")
    return problems


def model_table(pattern: str = "*") -> str:
    """Registered architectures with their parameter counts at 100 classes."""
    from kdcache.models import create_model, list_models

    names = list_models(pattern)
    if not names:
        raise KdcacheError(f"models: nothing matches {pattern!r}; known: {', '.join(list_models())}")
    width = max(len(name) for name in names)
    rows = [f"{'model':<{width}} {'params (100 classes)':>22}"]
    for name in names:
        count = sum(p.numel() for p in create_model(name, num_classes=100).parameters())
        rows.append(f"{name:<{width}} {count / 1e6:>20.2f} M")
    return "\n".join(rows)


def dataset_table() -> str:
    """Data sources and augmentation policies."""
    return "\n".join([
        "datasets:  " + ", ".join(list_datasets()),
        "           digits needs nothing (scikit-learn's bundled digits); cifar10/cifar100 read --data-root in "
        "torchvision's on-disk format and never download; synthetic is generated",
        "           imagefolder reads --data-root/train and val/ (or test/) in torchvision's ImageFolder layout, at 64×64",
        "policies:  " + ", ".join(list_policies()) + " (imagenet: RandomResizedCrop + flip, sampled views only)",
    ])


def loss_table() -> str:
    """Losses with their default weights and papers."""
    from kdcache.losses import get_loss, list_losses

    rows = []
    for name in list_losses():
        spec = get_loss(name)
        rows.append(f"{name:<12} {spec.paper}")
    return "\n".join(rows)


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB" if size < 2**30 else f"{size / 2**30:.2f} GB"
