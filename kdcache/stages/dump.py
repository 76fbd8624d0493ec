"""Stage 1: the teacher runs once over K replayable views of a dataset, and its region logits go to a cache."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdcache import distributed
from kdcache.cache import open_cache
from kdcache.cache.fit import require_same_views
from kdcache.cache.layout import PENDING, CacheSpec
from kdcache.cache.location import Location, Place, store_bytes, url_filesystem
from kdcache.cache.sizes import byte_size
from kdcache.cache.writer import CacheWriter
from kdcache.config import CONFIG_FILE, DumpConfig, config_text, loader_options
from kdcache.data import AugmentPolicy, DataSource, FileBatches, FilePolicy, ImageData, ImageFiles, Policy, \
    class_names, dataset_options, load_dataset, normalize, policy_for
from kdcache.data.files import NO_FILE, batch_on_device, check_checksums, default_workers, stream
from kdcache.data.mixing import Mixed, replay
from kdcache.data.source import policy_settings
from kdcache.data.text import TOKENIZER_FILE, is_text
from kdcache.data.dense import is_dense
from kdcache.stages.dense_dump import dump_dense_from_config
from kdcache.stages.text_dump import dump_text_from_config
from kdcache.errors import KdcacheError
from kdcache.models import describe_outputs, load_teacher
from kdcache.models.outputs import REGIONS, ModelOutputs, feature_stages, output_shapes, parse_outputs
from kdcache.runtime import autocast, pick_device, precision, prepare_model
from kdcache.stages.views import DEFAULT_VIEWS, view_params
from kdcache.stages.writing import Block, DumpResult, encoded_logits, open_writer, write_pending

DEFAULTS = DumpConfig()  # dump_teacher()'s defaults are the command's


def dump_from_config(config: DumpConfig, show_progress: bool = True) -> DumpResult:
    """`kdcache dump-teacher`: load the teacher and data a DumpConfig names, and dump."""
    if config.exhaustive and config.views is not None:
        raise KdcacheError("dump-teacher: --views and --exhaustive exclude each other (--exhaustive caches every view "
                           "of the policy)")
    device, given = pick_device(config.device), config
    if config.views_from:
        config = _with_views_of(config)
    data = load_dataset(config.dataset, config.data_root, config.split, **_text_tokenizer(config))
    if config.stride is not None and not is_dense(data):
        raise KdcacheError(f"--stride is the output stride of a dense dataset's logit maps; {config.dataset} has a "
                           f"label per {'sequence position' if is_text(data) else 'image'}: leave it out")
    # a language model's next-token distributions (a token cache), or a segmentation teacher's maps (a dense cache)
    other_kind = dump_text_from_config if is_text(data) else dump_dense_from_config if is_dense(data) else None
    if other_kind is not None:
        result = other_kind(config, data, device, show_progress)
        if distributed.world().is_main:
            save_cache_config(given)
        return result
    policy = policy_for(data, config.augmentation, config.mixing(), num_ops=config.ra_ops,
                        magnitude=config.ra_magnitude)
    teacher, info = load_teacher(config.checkpoint, config.teacher or None, data.num_classes,
                                 class_names(data, config.class_names))
    outputs = parse_outputs(config.outputs or dumped_outputs(config.losses), teacher)
    result = dump_teacher(teacher, info, data, policy, config.out, views=config.views,
                        exhaustive=config.exhaustive, scales=config.scales, batch_size=config.batch_size,
                        device=device, dtype=config.dtype, format=config.format, seed=config.seed,
                        block_size=config.block_size, overwrite=config.overwrite, topk=config.topk,
                        workers=config.workers, outputs=outputs, show_progress=show_progress)
    if config.views_from:
        with open_cache(config.views_from) as source, open_cache(config.out) as written:
            require_same_views(source, written)
    if distributed.world().is_main:
        save_cache_config(given)
    return result


def _text_tokenizer(config: DumpConfig) -> dict[str, Any]:
    """The loader options, where a text teacher's run folder gives the tokenizer it was trained with (unless
    --tokenizer or --vocab-size says otherwise)."""
    options = loader_options(config)
    if config.dataset == "text" and config.checkpoint and not {"tokenizer", "vocab_size"} & set(options):
        saved = Path(config.checkpoint) / TOKENIZER_FILE
        if saved.is_file():
            options["tokenizer"] = str(saved)
    return options


def save_cache_config(config: DumpConfig) -> str | Path:
    """The resolved config, which `kdcache dump-teacher --config` repeats, kept with the cache it wrote: config.yaml
    beside a Zarr store's zarr.json, or FILE.config.yaml beside an HDF5 file; returns where."""
    out, text = Location.of(config.out), config_text(config)
    if out.is_url:
        filesystem, path = url_filesystem(out.url)
        filesystem.pipe_file(f"{path}/{CONFIG_FILE}", text.encode())
        return f"{out}/{CONFIG_FILE}"
    path = out.path / CONFIG_FILE if out.path.is_dir() else out.path.with_name(f"{out.name}.{CONFIG_FILE}")
    path.write_text(text)
    return path


def _with_views_of(config: DumpConfig) -> DumpConfig:
    """The config with the dataset, split (its classes), policy, views and seed of the --views-from cache."""
    if config.views is not None or config.exhaustive:
        raise KdcacheError("dump-teacher: --views-from takes the views (their number, policy and seed) from its "
                           "cache; drop --views and --exhaustive")
    with open_cache(config.views_from) as source:
        spec = source.spec
    options = dataset_options(spec.dataset["name"])  # the split as the cache read it: its size, streamed or not
    sized = {"image_size": spec.dataset["image_shape"][-1]} if "image_size" in options else {}
    loaded = {"preload": not spec.streamed} if "preload" in options else {}
    name, mix, options = policy_settings(spec.augmentation)
    policy = {"augmentation": name, "ra_ops": options["num_ops"], "ra_magnitude": options["magnitude"],
              "mix": mix["mode"] if mix else None,
              **({"mix_alpha": mix["alpha"], "mix_prob": mix["prob"]} if mix else {})}
    classes = spec.dataset.get("classes")  # a cache of some classes' samples: the same samples
    return dataclasses.replace(config, dataset=spec.dataset["name"], split=spec.dataset["split"], **policy,
                               classes=None if classes is None else ",".join(map(str, classes)),
                               views=None if spec.exhaustive else spec.num_views, exhaustive=spec.exhaustive,
                               seed=spec.seed, **sized, **loaded)


def dumped_outputs(losses: tuple[str, ...]) -> str:
    """The --outputs that the losses of `--loss` need (regions alone without any)."""
    from kdcache.losses import get_loss, loss_parts  # the loss registry reads its YAML only when asked

    needed = [kind for name in losses for part, _ in loss_parts(name) for kind in get_loss(part).needs]
    return ",".join(dict.fromkeys([REGIONS, *needed]))


def dump_teacher(teacher: nn.Module, teacher_info: dict[str, Any], data: DataSource,
                 policy: Policy, out: Place, *, views: int | None = DEFAULTS.views,
                 exhaustive: bool = DEFAULTS.exhaustive, scales: tuple[int, ...] = DEFAULTS.scales,
                 batch_size: int = DEFAULTS.batch_size, device: torch.device | str = DEFAULTS.device,
                 dtype: str = DEFAULTS.dtype, format: str | None = DEFAULTS.format, seed: int = DEFAULTS.seed,
                 block_size: int = DEFAULTS.block_size, overwrite: bool = DEFAULTS.overwrite, topk: int = DEFAULTS.topk,
                 workers: int | None = DEFAULTS.workers, outputs: str | tuple[str, ...] = DEFAULTS.outputs,
                 show_progress: bool = True) -> DumpResult:
    """Write the teacher's region logits for every (view, sample) to a cache; resumes an interrupted dump.

    teacher_info names the teacher in the metadata: arch (its spec), checkpoint, checkpoint_sha256; the feature
    grid, head kind and class count are found by running it.
    topk > 0 stores per region only the k largest logits, their classes and one logit for the rest.
    outputs: what to cache (models.outputs names, regions always): embedding, attention/<stage>, hint/<stage>.
    Under torchrun each rank computes and writes a contiguous, chunk-aligned range of blocks; rank 0
    creates the cache and records the per-view accuracy once every rank is done.
    A streamed split (ImageFiles) is read by `workers` DataLoader processes, each view drawn for each file's own
    size; a rank reads only the files of its blocks.
    The defaults are `kdcache dump-teacher`'s (DumpConfig's): views None is its 4, device "auto" CUDA when present,
    outputs "" the region logits only.
    """
    out = Location.of(out)
    views = DEFAULT_VIEWS if views is None and not exhaustive else views
    device = pick_device(device) if isinstance(device, str) else device
    outputs = parse_outputs(outputs or REGIONS, teacher) if isinstance(outputs, str) else outputs
    here = distributed.init(device)
    streamed = data.streamed  # views drawn per file by workers, or ahead for the whole split held in memory
    params = None if streamed else view_params(policy, len(data.labels), views, exhaustive, seed)
    num_views = _streamed_views(policy, views, exhaustive) if streamed else len(params)
    logit_map = prepare_model(ModelOutputs(teacher, scales, outputs), device).eval()
    spec = _cache_spec(logit_map, teacher_info, data, policy, num_views, exhaustive, seed, scales, dtype, block_size,
                       topk, device)
    if show_progress and here.is_main:
        print(_view_size(spec), flush=True)
    writer = open_writer(out, spec, data.labels.numpy(), None if streamed else params.numpy(), format, overwrite,
                         here, data.listing(), _constant_arrays(teacher, spec))
    try:
        blocks, shard = distributed.shard(spec.num_blocks, spec.block_size, spec.num_samples, here)
        pending = writer.pending(blocks)
        if streamed:
            batches = _StreamedTeacherBatches(logit_map, data, policy, spec, batch_size, device, writer,
                                              default_workers(workers))
            pending = sorted({*pending, *batches.unvouched(writer.progress(), blocks)})
        else:
            held = slice(shard.samples.start, shard.samples.stop)  # a rank moves only its own samples to its device
            batches = _TeacherBatches(logit_map, data, policy, spec, batch_size, device, held,
                                      torch.from_numpy(writer.aug_params()).to(device))  # a resumed run replays these
        resumed = len(pending) < spec.num_views * len(blocks)
        started = time.perf_counter()
        total = write_pending(writer, batches.blocks(pending), pending, f"dump {out.name}", here,
                               show_progress)
        seconds = time.perf_counter() - started
        distributed.barrier()  # every rank's blocks are written before rank 0 reads the progress
        if streamed:
            batches.require_recorded_as_first_read(blocks)
        accuracy = writer.finish() if here.is_main else writer.view_accuracy()
        images = int(distributed.all_sum(torch.tensor(total)))
    finally:
        writer.close()
    return DumpResult(out.target, images, seconds, store_bytes(out), accuracy, resumed)


def _constant_arrays(teacher: nn.Module, spec: CacheSpec) -> dict[str, np.ndarray]:
    """The values of the cache's arrays of the teacher rather than the samples (a zero-shot teacher's text
    embedding): the teacher's tensor of each array's name."""
    return {name: getattr(teacher, name).detach().float().cpu().numpy() for name in spec.constant_arrays}


def _view_size(spec: CacheSpec) -> str:
    """What one view takes on disk before compression, and of it each output's share."""
    shares = [f"region logits {byte_size(spec.view_bytes(spec.logit_arrays))}"] + [
        f"{name} {byte_size(spec.view_bytes((array,)))}" for name, array in spec.output_arrays.items()]
    return (f"each view holds {byte_size(spec.view_bytes())} before compression "
            f"({spec.num_samples} samples: {', '.join(shares)}); {spec.num_views} views")


def _cache_spec(logit_map: ModelOutputs, teacher_info: dict[str, Any], data: DataSource, policy: Policy,
                num_views: int, exhaustive: bool, seed: int, scales: tuple[int, ...], dtype: str, block_size: int,
                topk: int, device: torch.device) -> CacheSpec:
    """What the cache will hold, after checking that the teacher fits the data and --topk fits its classes."""
    # the teacher is on the device already, inside its LogitMap: its feature grid, head kind and class count
    images = normalize(data.first_images(), data.mean, data.std).to(device)
    spec = CacheSpec(
        teacher={**teacher_info, "precision": precision(device), **describe_outputs(logit_map, images),
                 "stages": feature_stages(logit_map.model)},
        dataset=data.describe(), augmentation=policy.describe(), num_views=num_views, exhaustive=exhaustive,
        seed=seed, scales=tuple(scales), dtype=dtype, block_size=block_size, topk=topk,
        outputs=output_shapes(logit_map, images) if len(logit_map.outputs) > 1 else {})
    if spec.num_classes != data.num_classes:
        raise KdcacheError(f"the teacher {teacher_info['arch']} predicts {spec.num_classes} classes but dataset "
                           f"{data.name} has {data.num_classes}; pass a teacher made for this dataset's classes")
    if not 0 <= topk < spec.num_classes:
        raise KdcacheError(f"--topk: expected a number of logits per region below the {spec.num_classes} classes "
                           f"(0 or no --topk stores them all), got {topk}")
    return spec


def _streamed_views(policy: FilePolicy, views: int | None, exhaustive: bool) -> int:
    """How many views of each file to cache: --views, or every view of a finite policy."""
    if exhaustive and policy.num_views is None:
        raise KdcacheError(f"--exhaustive: the {policy.name} policy has no finite list of views (RandomResizedCrop "
                           "draws boxes from a continuous range); sample views with --views instead")
    if exhaustive:
        return policy.num_views
    if views is None or views < 1:
        raise KdcacheError(f"--views: expected a positive number of views per sample, got {views}")
    return views


def _teacher_outputs(outputs: nn.Module, x: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """The teacher's outputs (models.outputs) of normalised images, in the stored dtype."""
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(x.device):
        return {name: value.float().to(getattr(torch, dtype)) for name, value in outputs(x).items()}


def _stored_arrays(outputs: dict[str, torch.Tensor], spec: CacheSpec) -> dict[str, np.ndarray]:
    """A block's outputs as the cache stores them: the region logits whole or as their top-k encoding, and
    each further output in its array."""
    further = {array: outputs[name].cpu().numpy() for name, array in spec.output_arrays.items()}
    return {**encoded_logits(outputs[REGIONS], spec), **further}


def _concatenated(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Batches' outputs joined into the block's."""
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


class _TeacherBatches:
    """The teacher over one block of samples under one view: region logits (or their top-k encoding), on the device.

    Holds the samples of `held` (a rank's share of a sharded dump, or all) and every view's parameters.
    """

    def __init__(self, logit_map: nn.Module, data: ImageData, policy: AugmentPolicy, spec: CacheSpec,
                 batch_size: int, device: torch.device, held: slice, params: torch.Tensor) -> None:
        self.logit_map, self.data, self.policy, self.spec = logit_map, data, policy, spec
        if isinstance(policy, Mixed):  # a mixed view reads its partner's image, which may lie outside `held`
            held = slice(0, len(data.labels))
        self.batch_size, self.device, self.first = batch_size, device, held.start
        self.images, self.labels = data.images[held].to(device), data.labels[held].to(device)
        self.params = params[:, held]

    def blocks(self, pending: list[tuple[int, int]]) -> Iterator[Block]:
        """Each pending (view, block) computed in turn."""
        for view, block in pending:
            yield view, block, *self.block(view, block)

    def block(self, view: int, block: int) -> tuple[dict[str, np.ndarray], int]:
        """The data arrays of one (view, block) and how many of its region-0 predictions are right."""
        rows = self.spec.block_range(block)
        parts, correct = [], torch.zeros((), dtype=torch.long, device=self.device)
        # batches always start at the block's start, so a resumed block computes exactly what it would have
        for start in range(rows.start, rows.stop, self.batch_size):
            batch = slice(start - self.first, min(start + self.batch_size, rows.stop) - self.first)
            x = normalize(replay(self.policy, self.images, self.params[view], batch), self.data.mean, self.data.std)
            outputs = _teacher_outputs(self.logit_map, x, self.spec.dtype)
            # of what is stored: verify recounts it
            correct += (outputs[REGIONS][:, 0].argmax(-1) == self.labels[batch]).sum()
            parts.append(outputs)
        return _stored_arrays(_concatenated(parts), self.spec), int(correct)


class _StreamedTeacherBatches:
    """The teacher over blocks of a streamed split: files read, decoded and cropped by DataLoader workers, each
    view drawn from (seed, view, sample) for the file's own size; the block's boxes and the files' crc32c go to
    the cache with its logits.

    Every read of a file (its own sample's, in each view, and as a mixed view's partner) is held to the crc32c of
    its first read in this dump, or to the one recorded by an earlier run's finished block: a changed file stops
    the dump, naming it, before a block that read it is written.
    """

    def __init__(self, logit_map: nn.Module, files: ImageFiles, policy: FilePolicy, spec: CacheSpec,
                 batch_size: int, device: torch.device, writer: CacheWriter, workers: int) -> None:
        self.logit_map, self.files, self.policy, self.spec, self.writer = logit_map, files, policy, spec, writer
        self.batch_size, self.device, self.workers = batch_size, device, workers
        self.dataset = FileBatches(files, policy, spec.seed, "views", normalized=device.type == "cpu")
        self.first_reads = np.full(spec.num_samples, NO_FILE, np.int64)  # crc32c per file; NO_FILE: not read yet
        recorded = writer.progress()[0] != PENDING  # view 0 of these blocks recorded their files' crc32c
        if recorded.any():
            stored = writer.store.read("file_crc32c").astype(np.int64)
            for block in np.flatnonzero(recorded):
                rows = spec.block_range(int(block))
                self.first_reads[rows.start:rows.stop] = stored[rows.start:rows.stop]

    def blocks(self, pending: list[tuple[int, int]]) -> Iterator[Block]:
        """Each pending (view, block) computed in turn, its files read ahead by the workers."""
        # batches always start at the block's start, so a resumed block computes exactly what it would have
        keys = [(view, range(start, min(start + self.batch_size, rows.stop)))
                for view, rows in ((view, self.spec.block_range(block)) for view, block in pending)
                for start in range(rows.start, rows.stop, self.batch_size)]
        batches = stream(self.dataset, keys, self.workers, self.device)
        for view, block in pending:
            rows = self.spec.block_range(block)
            parts, boxes = [], []
            correct = torch.zeros((), dtype=torch.long, device=self.device)
            for _ in range(rows.start, rows.stop, self.batch_size):
                images, labels, params, sums, indices = next(batches)
                self._hold_to_first_reads(indices, params, sums)
                x = batch_on_device(images, self.files, self.device)
                outputs = _teacher_outputs(self.logit_map, x, self.spec.dtype)
                correct += (outputs[REGIONS][:, 0].argmax(-1) == labels.to(self.device)).sum()
                parts.append(outputs)
                boxes.append(params)
            recorded = {"file_crc32c": self.first_reads[rows.start:rows.stop]} if view == 0 else {}
            yield view, block, {**_stored_arrays(_concatenated(parts), self.spec), "aug": torch.cat(boxes).numpy(),
                                **recorded}, int(correct)

    def _hold_to_first_reads(self, indices: torch.Tensor, params: torch.Tensor, sums: torch.Tensor) -> None:
        """Record the crc32c of files read for the first time; refuse one whose bytes differ from its first read."""
        read = sums[:, 1] != NO_FILE  # the partners whose files were read
        partners = params[read, self.policy.partner_column].long() if read.any() else indices[:0]
        files, found = torch.cat([indices, partners]), torch.cat([sums[:, 0], sums[read, 1]])
        unseen = self.first_reads[files.numpy()] == NO_FILE
        self.first_reads[files.numpy()[unseen]] = found.numpy()[unseen]
        check_checksums(self.files, files, found, self.first_reads[files.numpy()], "this dump first",
                        "restore the file and rerun the same command, or rerun it with --overwrite to dump the "
                        "folder as it is now")

    def unvouched(self, progress: np.ndarray, blocks: range) -> list[tuple[int, int]]:
        """The finished (view, block) pairs of `blocks` that mixed in a partner whose file's crc32c is not
        recorded (an earlier run read it before its own block was written, and stopped): written again."""
        return self._mixing_in(progress, blocks, self.first_reads == NO_FILE)

    def require_recorded_as_first_read(self, blocks: range) -> None:
        """After every rank's blocks are written: refuse the dump (on every rank alike) if a file this rank read as
        a partner was recorded by its own block's rank with other bytes (it changed between the two ranks' reads),
        after returning this rank's blocks that mixed it in to pending, so the same command writes them again."""
        recorded = self.writer.store.read("file_crc32c").astype(np.int64)
        changed = (self.first_reads != NO_FILE) & (self.first_reads != recorded)
        self.writer.redo(self._mixing_in(self.writer.progress(), blocks, changed))
        if int(distributed.all_sum(torch.tensor(int(changed.any())))):
            first = int(np.flatnonzero(changed)[0]) if changed.any() else None
            named = self.files.path(first) if first is not None else "a file another process read"
            raise KdcacheError(f"{named} changed while the dump read it (one process read it as a mixed view's "
                               f"partner, another recorded other bytes): the blocks that mixed it in are marked "
                               f"unfinished; keep the folder as it is now and rerun the same command to write them "
                               f"again")

    def _mixing_in(self, progress: np.ndarray, blocks: range, files: np.ndarray) -> list[tuple[int, int]]:
        """The finished (view, block) pairs of `blocks` whose mixed views take a partner among `files` (a bool
        mask over the split)."""
        if not isinstance(self.policy, Mixed) or not files.any():
            return []
        pairs = []
        for view, block in np.argwhere(progress != PENDING):
            rows = self.spec.block_range(int(block))
            if int(block) in blocks:
                params = torch.from_numpy(self.writer.store.read("aug", (int(view), slice(rows.start, rows.stop))))
                mixed = self.policy.label_weight(params) < 1
                if files[params[mixed, self.policy.partner_column].long().numpy()].any():
                    pairs.append((int(view), int(block)))
        return pairs
