"""kdcache's speed, as ratios measured side by side in one run: student step, epoch, dump and store.

    python benchmarks/run.py --device cpu --quick     # every section, small sizes: 80 s on 2 cores
    python benchmarks/run.py --device cuda            # N = 50,000; bf16 + channels_last and fp32 rows
    python benchmarks/run.py --device cpu --epoch-samples 2048 --dump-samples 2048 --json results.json

Synthetic data of CIFAR-100's shapes (N uint8 images 3x32x32, 100 classes), teacher resnet32x4 (random
weights: speed does not depend on them), student resnet8x4, scales 1,2,4 (21 regions). Everything runs
through kdcache's own code: `Run.train_epoch` over `device_batches` or `loader_batches`, `CachedTargets`,
`LiveTeacher`, `CacheDataset`, `dump_teacher`, `CacheWriter`, `TeacherCache.view`. The cache the
students read is written by `CacheWriter` with random logits, so that N = 50,000 needs no teacher pass.

Within a section every variant runs once per repeat, the order rotating from repeat to repeat; warm-up
repeats are dropped; a figure is the median of the repeats, a ratio the median of the per-repeat ratios
of variants that ran next to each other. Targets are reported, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any
from unittest import mock

import h5py
import numpy as np
import torch
import zarr

from kdcache.cache import CacheSpec, CacheWriter, TeacherCache, open_cache
from kdcache.cache.location import remove_store
from kdcache.config import TrainConfig
from kdcache.data import ImageData, get_policy, load_dataset, normalize
from kdcache.losses import get_loss
from kdcache.models import LogitMap, create_model
from kdcache.runtime import (
    autocast,
    epoch_generator,
    pick_device,
    precision,
    prepare_model,
)
from kdcache.stages import loop
from kdcache.stages import targets as target_providers
from kdcache.stages.dataset import CacheDataset
from kdcache.stages.dump import dump_teacher, view_params
from kdcache.stages.loop import Run, loader_batches
from kdcache.stages.splits import device_batches
from kdcache.stages.targets import CachedTargets, LiveTeacher
from kdcache.stages.views import CachedViews
from kdcache.report import cpu_model, source_commit

TEACHER, STUDENT, SCALES, CLASSES = "resnet32x4", "resnet8x4", (1, 2, 4), 100
CIFAR100_SAMPLES = 50_000
CACHED_LOSSES = ("kd", "dkd", "sdd-lskd")
LIVE_LOSS = "sdd-lskd"  # the loss of the live-teacher baseline and of the epoch section
EPOCH_BATCH = 64  # the recipes' batch size
DUMP_BATCH = 256  # `kdcache dump-teacher`'s default
SEED = 0
# floors of the ratios (reported, not asserted)
CACHE_VS_CE_CPU, CACHE_VS_CE_CUDA, CACHE_VS_LIVE_CPU, DUMP_VS_INFERENCE, VIEW_READ_VS_RAW = 0.9, 0.95, 2.3, 0.85, 0.5
CUDA_TARGET_BATCH = 512


@dataclass
class Row:
    """One line of the table: a measurement (value, unit) or a ratio with its target."""

    what: str
    value: float | None = None
    unit: str = ""
    ratio: float | None = None
    target: float | None = None  # the ratio's floor, when there is one

    @property
    def met(self) -> bool | None:
        """Whether the ratio reaches its target (None without a target)."""
        return None if self.target is None or self.ratio is None else self.ratio >= self.target


@dataclass
class Section:
    """The rows of one section and a line saying what they measured."""

    name: str
    note: str
    rows: list[Row]
    seconds: float = 0.0  # how long the section ran, warm-ups included


@dataclass
class Plan:
    """Sizes and repeat counts of one run (defaults depend on --quick and the device)."""

    samples: int
    batch_sizes: tuple[int, ...]
    step_images: int
    warmup: int
    repeats: int
    epoch_samples: int
    epoch_repeats: int
    dump_samples: int
    dump_repeats: int
    store_samples: int
    store_repeats: int
    precisions: tuple[str, ...]  # "fp32"; on CUDA also "bf16+cl", kdcache's own precision there

    def steps(self, batch: int) -> int:
        """Optimizer steps per repeat of one student-step variant."""
        return max(1, self.step_images // batch)


@dataclass
class Bench:
    """What every section shares: device, data, the student caches and a scratch folder."""

    device: torch.device
    plan: Plan
    data: ImageData
    policy: Any
    teacher: torch.nn.Module
    caches: dict[str, TeacherCache]  # format -> the cache the students read (one view of N samples)
    folder: Path


def median_ratio(top: list[float], bottom: list[float]) -> float:
    """Median over repeats of top[r] / bottom[r]: each ratio pairs variants measured side by side."""
    return statistics.median(a / b for a, b in zip(top, bottom))


def interleave(variants: dict[str, Callable[[int], float]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Run each variant once per repeat, the order rotating; keep what the repeats after the warm-up measured."""
    names = list(variants)
    results: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(warmup + repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            value = variants[name](repeat)
            if repeat >= warmup:
                results[name].append(value)
    return results


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def compute_precision(name: str, device: torch.device) -> Iterator[None]:
    """`bf16+cl`: kdcache as it is (bf16 autocast and channels_last on CUDA). `fp32` on CUDA: the loop's and the
    live teacher's autocast switched off; memory format and cuDNN's TF32 default stay as kdcache leaves them."""
    if name == "fp32" and device.type == "cuda":
        def off(device: torch.device) -> contextlib.AbstractContextManager:
            return contextlib.nullcontext()

        with mock.patch.object(loop, "autocast", off), mock.patch.object(target_providers, "autocast", off):
            yield
    else:
        yield


# -- setup ---------------------------------------------------------------------------------------

def write_student_cache(path: Path, data: ImageData, policy: Any, device: torch.device, fmt: str) -> TeacherCache:
    """A complete one-view cache of data written by CacheWriter with random fp16 logits; opened for reading."""
    params = view_params(policy, len(data.labels), 1, False, SEED)
    spec = CacheSpec(teacher={"arch": TEACHER, "num_classes": CLASSES, "checkpoint": "random weights",
                              "checkpoint_sha256": "0" * 64, "precision": precision(device), "feature_map": [8, 8]},
                     dataset=data.describe(), augmentation=policy.describe(), num_views=1, exhaustive=False,
                     seed=SEED, scales=SCALES)
    generator = np.random.default_rng(SEED)
    with CacheWriter.open(path, spec, data.labels.numpy(), params.numpy(), format=fmt) as writer:
        for block in range(spec.num_blocks):
            rows = spec.block_range(block)
            logits = generator.standard_normal((len(rows), spec.num_regions, CLASSES), np.float32) * 3
            writer.write_block(0, block, {"logits": logits.astype(np.float16)}, 0)
        writer.finish()
    return open_cache(path)


def make_run(name: str, loss: str, batch: int, bench: Bench) -> Run:
    """A fresh resnet8x4 student with the loss's regions, as `kdcache distill` builds it."""
    spec = get_loss(loss)
    torch.manual_seed(SEED)
    model = create_model(STUDENT, num_classes=CLASSES)
    return Run(name, model, spec, SCALES if spec.uses_regions else (1,), TrainConfig(batch_size=batch),
               bench.folder / name, bench.device, record={})


# -- sections ------------------------------------------------------------------------------------

def bench_student_step(bench: Bench) -> Section:
    """Every batch size and precision of the plan."""
    plan = bench.plan
    rows = [row for batch in plan.batch_sizes for name in plan.precisions for row in student_step(bench, batch, name)]
    steps = ", ".join(f"{plan.steps(batch)} at b{batch}" for batch in plan.batch_sizes)
    note = (f"{STUDENT} student, {TEACHER} teacher, scales {','.join(map(str, SCALES))}, N = {len(bench.data.labels)}; "
            f"Run.train_epoch over device_batches (batch, targets, loss, backward, SGD step); steps per repeat: "
            f"{steps}; median of {plan.repeats} repeats after {plan.warmup} warm-up")
    return Section("student step", note, rows)


def student_step(bench: Bench, batch: int, precision_name: str) -> list[Row]:
    """img/s of training steps (batch, targets, loss, backward, SGD step): CE, each cached loss, the live teacher."""
    device, plan, data = bench.device, bench.plan, bench.data
    cache = bench.caches["zarr"]
    steps = plan.steps(batch)
    images, labels = data.images.to(device), data.labels.to(device)
    params = CachedViews(cache, bench.policy).params(0).to(device)
    cached = CachedTargets(cache, SCALES, device)
    cached.begin_epoch(0)
    live = LiveTeacher(bench.teacher, SCALES, device)
    providers: dict[str, tuple[str, Any]] = {"ce": ("ce", None)}
    providers |= {f"{loss} (cache)": (loss, cached) for loss in CACHED_LOSSES}
    providers[f"{LIVE_LOSS} (live teacher)"] = (LIVE_LOSS, live)
    runs = {name: make_run(f"step-{batch}-{name.split()[0]}", loss, batch, bench)
            for name, (loss, _) in providers.items()}

    def variant(name: str) -> Callable[[int], float]:
        run, provider = runs[name], providers[name][1]

        def measure(repeat: int) -> float:
            batches = device_batches(images, labels, params, bench.policy, data.mean, data.std, provider, batch,
                                     epoch_generator(SEED, repeat))
            with compute_precision(precision_name, device):
                return run.train_epoch(0, islice(batches, steps), steps, show_progress=False)["img_per_s"]
        return measure

    results = interleave({name: variant(name) for name in providers}, plan.warmup, plan.repeats)
    label = f"b{batch} {precision_name}"
    rows = [Row(f"{label} {name}", statistics.median(values), "img/s") for name, values in results.items()]
    ce, live_values = results["ce"], results[f"{LIVE_LOSS} (live teacher)"]
    floor = CACHE_VS_CE_CPU if device.type == "cpu" else (
        CACHE_VS_CE_CUDA if batch == CUDA_TARGET_BATCH and precision_name == "bf16+cl" else None)
    rows += [Row(f"{label} cache/CE {loss}", ratio=median_ratio(results[f"{loss} (cache)"], ce),
                 target=floor) for loss in CACHED_LOSSES]
    rows.append(Row(f"{label} cache/live {LIVE_LOSS}",
                    ratio=median_ratio(results[f"{LIVE_LOSS} (cache)"], live_values),
                    target=CACHE_VS_LIVE_CPU if device.type == "cpu" and batch == 64 else None))
    rows.append(Row(f"{label} CE/live (ceiling of cache/live)", ratio=median_ratio(ce, live_values)))
    return rows


def bench_epoch(bench: Bench) -> Section:
    """Seconds of one epoch (sdd-lskd, batch 64) on the device path and on the Dataset + DataLoader path, each
    with its data loading: the view read from the store, its parameters, every batch."""
    device, plan, data, cache = bench.device, bench.plan, bench.data, bench.caches["zarr"]
    steps = plan.epoch_samples // EPOCH_BATCH
    images, labels = data.images.to(device), data.labels.to(device)
    views = CachedViews(cache, bench.policy)
    dataset = CacheDataset(cache, data=data, scales=SCALES)
    runs = {path: make_run(f"epoch-{path}", LIVE_LOSS, EPOCH_BATCH, bench) for path in ("device", "dataset")}

    def device_epoch(repeat: int, steps: int = steps) -> float:
        started = time.perf_counter()
        targets = CachedTargets(cache, SCALES, device)  # a fresh provider reads the view again
        targets.begin_epoch(views.view_of(0))
        params = views.params(0).to(device)
        batches = device_batches(images, labels, params, bench.policy, data.mean, data.std, targets, EPOCH_BATCH,
                                 epoch_generator(SEED, repeat))
        runs["device"].train_epoch(0, islice(batches, steps), steps, show_progress=False)
        return time.perf_counter() - started

    def dataset_epoch(repeat: int, steps: int = steps) -> float:
        started = time.perf_counter()
        dataset.set_epoch(0)
        batches = loader_batches(dataset, EPOCH_BATCH, epoch_generator(SEED, repeat), device)
        runs["dataset"].train_epoch(0, islice(batches, steps), steps, show_progress=False)
        return time.perf_counter() - started

    device_epoch(0, 1), dataset_epoch(0, 1)  # warm-up: one step each
    results = interleave({"device": device_epoch, "dataset": dataset_epoch}, 0, plan.epoch_repeats)
    samples = steps * EPOCH_BATCH
    fast, slow = statistics.median(results["device"]), statistics.median(results["dataset"])
    note = (f"{STUDENT} {LIVE_LOSS}, batch {EPOCH_BATCH}, {samples} samples of N = {len(data.labels)}; timed with "
            f"the whole view read from the zarr store and the view's parameters; median of {plan.epoch_repeats} "
            f"epochs per path after a one-step warm-up")
    return Section("epoch", note, [
        Row("device path (device_batches)", fast, "s"),
        Row("  the same in img/s", samples / fast, "img/s"),
        Row("Dataset + DataLoader path (CacheDataset)", slow, "s"),
        Row("  the same in img/s", samples / slow, "img/s"),
        Row("Dataset time / device time", ratio=median_ratio(results["dataset"], results["device"])),
    ])


def bench_dump(bench: Bench) -> Section:
    """img/s of dump_teacher (zarr, hdf5) against the teacher's pure inference over the same batches."""
    device, plan, data, policy = bench.device, bench.plan, bench.data, bench.policy
    count = plan.dump_samples
    subset = ImageData(data.name, data.split, data.images[:count].clone(), data.labels[:count].clone(),
                       data.num_classes, data.mean, data.std)
    info = {"arch": TEACHER, "num_classes": CLASSES, "checkpoint": "random weights", "checkpoint_sha256": "0" * 64}
    logit_map = prepare_model(LogitMap(bench.teacher, SCALES), device).eval()
    images = subset.images.to(device)
    params = view_params(policy, count, 1, False, SEED)[0].to(device)

    def inference(repeat: int, limit: int = count) -> float:
        synchronize(device)
        started = time.perf_counter()
        with torch.no_grad(), autocast(device):
            for start in range(0, limit, DUMP_BATCH):
                batch = slice(start, min(start + DUMP_BATCH, limit))
                x = normalize(policy.apply(images[batch], params[batch]), subset.mean, subset.std)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                logit_map(x).float().to(torch.float16)
        synchronize(device)
        return limit / (time.perf_counter() - started)

    def dump(fmt: str) -> Callable[[int], float]:
        def measure(repeat: int) -> float:
            out = bench.folder / f"dump-{repeat}.{'zarr' if fmt == 'zarr' else 'h5'}"
            started = time.perf_counter()
            dump_teacher(bench.teacher, info, subset, policy, out, views=1, scales=SCALES, batch_size=DUMP_BATCH,
                         device=device, format=fmt, seed=SEED, show_progress=False)
            seconds = time.perf_counter() - started
            remove_store(out)  # each dump starts from nothing
            return count / seconds
        return measure

    inference(0, min(count, DUMP_BATCH))  # warm-up: one batch
    results = interleave({"zarr": dump("zarr"), "hdf5": dump("hdf5"), "inference": inference}, 0, plan.dump_repeats)
    note = (f"{TEACHER} over {count} samples x 1 view, batch {DUMP_BATCH}, {precision(device)}; a dump is timed "
            f"whole (store created, written, finished), inference is augmentation + LogitMap forward; median of "
            f"{plan.dump_repeats} after a one-batch warm-up")
    return Section("dump", note, [
        Row("dump_teacher zarr", statistics.median(results["zarr"]), "img/s"),
        Row("dump_teacher hdf5", statistics.median(results["hdf5"]), "img/s"),
        Row("teacher inference (LogitMap)", statistics.median(results["inference"]), "img/s"),
        Row("dump/inference zarr", ratio=median_ratio(results["zarr"], results["inference"]), target=DUMP_VS_INFERENCE),
        Row("dump/inference hdf5", ratio=median_ratio(results["hdf5"], results["inference"]), target=DUMP_VS_INFERENCE),
    ])


def bench_store(bench: Bench) -> Section:
    """MB/s reading and writing one whole view: kdcache's stores (checksums and checks included) against a raw .npy."""
    plan, caches = bench.plan, _store_caches(bench)
    try:
        view = caches["zarr"].view(0)
        reads, writes = _time_reads(bench, caches, view), _time_writes(bench, caches, view)
    finally:
        if caches is not bench.caches:
            for cache in caches.values():
                cache.close()
    note = (f"one whole view [{', '.join(map(str, view.shape))}] {view.dtype} = {view.nbytes / 1e6:.0f} MB (MB = 1e6 "
            f"bytes), warm page cache, checksums verified; median of {plan.store_repeats} after one warm-up")
    return Section("store", note, _store_rows(reads, writes))


def _store_caches(bench: Bench) -> dict[str, TeacherCache]:
    """The caches whose view is timed: the student caches, or caches of --store-samples blank images."""
    if bench.plan.store_samples == len(bench.data.labels):
        return bench.caches
    count = bench.plan.store_samples  # a view of its own size: only its logits are read
    blank = ImageData(bench.data.name, bench.data.split, torch.zeros((count, 3, 32, 32), dtype=torch.uint8),
                      torch.zeros(count, dtype=torch.int64), CLASSES, bench.data.mean, bench.data.std)
    return {fmt: write_student_cache(bench.folder / f"store.{suffix}", blank, bench.policy, bench.device, fmt)
            for fmt, suffix in (("zarr", "zarr"), ("hdf5", "h5"))}


def _rate(megabytes: float, action: Callable[[], Any]) -> Callable[[int], float]:
    """A measurement of MB/s of one call of action."""
    def measure(repeat: int) -> float:
        started = time.perf_counter()
        action()
        return megabytes / (time.perf_counter() - started)
    return measure


def _time_reads(bench: Bench, caches: dict[str, TeacherCache], view: np.ndarray) -> dict[str, list[float]]:
    """MB/s of reading the view every way, interleaved: through the caches, their stores, h5py and numpy."""
    raw, raw_bytes = bench.folder / "view.npy", bench.folder / "view.bin"  # .bin: no header, for readinto
    np.save(raw, view)
    view.tofile(raw_bytes)
    # what CachedTargets reads into: buffers reused from epoch to epoch, whose pages are already mapped
    buffers = {fmt: cache.view_buffers() for fmt, cache in caches.items()}
    raw_buffer = np.empty_like(view)
    # the same chunks without HDF5's fletcher32 filter: how much of HDF5's time its checksum takes
    unchecked = h5py.File(bench.folder / "unchecked.h5", "w", libver="latest")
    unchecked.create_dataset("logits", data=view[None], chunks=caches["hdf5"].store.array_info("logits").chunks)

    def read_raw_into_buffer() -> None:
        with open(raw_bytes, "rb", buffering=0) as file:
            file.readinto(raw_buffer)

    rate = functools.partial(_rate, view.nbytes / 1e6)
    try:
        return interleave({"zarr": rate(lambda: caches["zarr"].view(0)),
                           "hdf5": rate(lambda: caches["hdf5"].view(0)),
                           "zarr buffer": rate(lambda: caches["zarr"].view_arrays(0, out=buffers["zarr"])),
                           "hdf5 buffer": rate(lambda: caches["hdf5"].view_arrays(0, out=buffers["hdf5"])),
                           "raw buffer": rate(read_raw_into_buffer),
                           "zarr store": rate(lambda: caches["zarr"].store.read("logits", (0,))),
                           "hdf5 store": rate(lambda: caches["hdf5"].store.read("logits", (0,))),
                           "hdf5 unchecked": rate(lambda: unchecked["logits"][0]),
                           "raw": rate(lambda: np.load(raw))}, 1, bench.plan.store_repeats)
    finally:
        unchecked.close()


def _time_writes(bench: Bench, caches: dict[str, TeacherCache], view: np.ndarray) -> dict[str, list[float]]:
    """MB/s of writing the view block by block as the dump does, against np.save, interleaved."""
    spec = caches["zarr"].spec
    writers = {fmt: CacheWriter.open(bench.folder / f"write.{suffix}", spec, caches["zarr"].labels(),
                                     caches["zarr"].aug_params(0)[None], format=fmt)
               for fmt, suffix in (("zarr", "zarr"), ("hdf5", "h5"))}

    def write_view(writer: CacheWriter) -> None:
        for block in range(spec.num_blocks):  # as the dump writes: block by block, each marked done
            rows = spec.block_range(block)
            writer.write_block(0, block, {"logits": view[rows.start:rows.stop]}, 0)

    rate = functools.partial(_rate, view.nbytes / 1e6)
    try:
        return interleave({"zarr": rate(lambda: write_view(writers["zarr"])),
                           "hdf5": rate(lambda: write_view(writers["hdf5"])),
                           "raw": rate(lambda: np.save(bench.folder / "view.npy", view))}, 1, bench.plan.store_repeats)
    finally:
        for writer in writers.values():
            writer.close()


def _store_rows(reads: dict[str, list[float]], writes: dict[str, list[float]]) -> list[Row]:
    """The store section's table: rates, then ratios against the raw read or write."""
    def median(name: str, key: str, results: dict[str, list[float]] = reads) -> Row:
        return Row(name, statistics.median(results[key]), "MB/s")

    def ratio(name: str, key: str, over: str = "raw", target: float | None = None,
              results: dict[str, list[float]] = reads) -> Row:
        return Row(name, ratio=median_ratio(results[key], results[over]), target=target)

    return [
        median("read view zarr (TeacherCache.view)", "zarr"), median("read view hdf5 (TeacherCache.view)", "hdf5"),
        median("read view zarr (ZarrStore.read alone)", "zarr store"),
        median("read view hdf5 (HDF5Store.read alone)", "hdf5 store"),
        median("read view hdf5 without fletcher32 (h5py, reference)", "hdf5 unchecked"),
        median("read view raw numpy (np.load of a .npy)", "raw"),
        ratio("read zarr/raw", "zarr", target=VIEW_READ_VS_RAW), ratio("read hdf5/raw", "hdf5", target=VIEW_READ_VS_RAW),
        median("read view zarr into reused buffers (CachedTargets)", "zarr buffer"),
        median("read view hdf5 into reused buffers (CachedTargets)", "hdf5 buffer"),
        median("read view raw into a reused array (readinto)", "raw buffer"),
        ratio("read zarr buffered/raw", "zarr buffer", target=VIEW_READ_VS_RAW),
        ratio("read hdf5 buffered/raw", "hdf5 buffer", target=VIEW_READ_VS_RAW),
        ratio("read zarr buffered/raw buffered", "zarr buffer", "raw buffer"),
        ratio("read zarr store alone/raw", "zarr store"), ratio("read hdf5 store alone/raw", "hdf5 store"),
        ratio("read hdf5 without fletcher32/raw", "hdf5 unchecked"),
        median("write view zarr (CacheWriter.write_block per block)", "zarr", writes),
        median("write view hdf5 (CacheWriter.write_block per block)", "hdf5", writes),
        median("write view raw numpy (np.save)", "raw", writes),
        ratio("write zarr/raw", "zarr", results=writes), ratio("write hdf5/raw", "hdf5", results=writes),
    ]


# -- report --------------------------------------------------------------------------------------

def environment(device: torch.device) -> dict[str, Any]:
    """Where the figures come from: machine, threads, load and versions."""
    return {
        "commit": source_commit(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "zarr": zarr.__version__,
                     "h5py": h5py.__version__, "numpy": np.__version__},
    }


def format_table(sections: list[Section], header: dict[str, Any]) -> str:
    """The printed report: one block per section; each row what, value, ratio, target, met?"""
    lines = [f"kdcache benchmarks  {header['command']}",
             f"{header['date']}  commit {header['commit']}  device {header['device']}  "
             f"cpu {header['cpu']} x{header['cores']}  "
             f"torch threads {header['torch_threads']}  load {header['load_average']}",
             "  ".join(f"{k} {v}" for k, v in header["versions"].items())]
    width = max(len(row.what) for section in sections for row in section.rows) + 2
    for section in sections:
        lines += ["", f"== {section.name} ==  ({section.seconds:.0f} s)", f"   {section.note}",
                  f"{'what':<{width}}{'value':>16}{'ratio':>9}{'target':>10}  met?"]
        for row in section.rows:
            value = f"{row.value:,.1f} {row.unit}" if row.value is not None else ""
            ratio = f"{row.ratio:.3f}" if row.ratio is not None else ""
            target = f">= {row.target:g}" if row.target is not None else ""
            met = {None: "", True: "yes", False: "NO"}[row.met]
            lines.append(f"{row.what:<{width}}{value:>16}{ratio:>9}{target:>10}  {met}")
    return "\n".join(lines)


def make_plan(args: argparse.Namespace, device: torch.device) -> Plan:
    """The run's sizes: the flags, else the defaults of --quick or the full run on this device."""
    cuda, quick = device.type == "cuda", args.quick
    samples = args.samples or (2048 if quick else CIFAR100_SAMPLES)
    defaults = dict(step_images=(2048 if cuda else 64) if quick else (16384 if cuda else 256), warmup=1,
                    repeats=1 if quick else 7, epoch_samples=min(samples, 256) if quick else samples,
                    epoch_repeats=1 if quick else 3, dump_samples=min(samples, 256) if quick else samples,
                    dump_repeats=1 if quick else 3, store_samples=CIFAR100_SAMPLES, store_repeats=3 if quick else 15)
    chosen = {key: getattr(args, key) if getattr(args, key) is not None else value for key, value in defaults.items()}
    plan = Plan(samples=samples, batch_sizes=args.batch_sizes, precisions=("fp32", "bf16+cl") if cuda else ("fp32",),
                **chosen)
    plan.epoch_samples, plan.dump_samples = min(plan.epoch_samples, samples), min(plan.dump_samples, samples)
    if max(plan.batch_sizes) > samples or plan.epoch_samples < EPOCH_BATCH:
        raise SystemExit(f"--samples {samples} (and --epoch-samples {plan.epoch_samples}) must hold one batch of "
                         f"every --batch-sizes {plan.batch_sizes} (and of {EPOCH_BATCH})")
    return plan


SECTIONS: dict[str, Callable[[Bench], Section]] = {"student": bench_student_step, "epoch": bench_epoch,
                                                  "dump": bench_dump, "store": bench_store}


def section_names(text: str) -> list[str]:
    """--sections: names among SECTIONS, comma-separated."""
    names = text.split(",")
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section {unknown[0]!r}; known: {', '.join(SECTIONS)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), help="where to run (default: cuda if present)")
    parser.add_argument("--quick", action="store_true", help="small sizes and one repeat: a CPU run of about 80 s")
    parser.add_argument("--samples", type=int, help="N, the dataset and cache size (default 50000; --quick 2048)")
    parser.add_argument("--batch-sizes", type=lambda text: tuple(int(b) for b in text.split(",")), default=(64, 512),
                        help="student-step batch sizes (default 64,512)")
    parser.add_argument("--step-images", type=int, help="images per repeat of a student-step variant (steps = this "
                        "// batch, at least 1; default 256 on CPU, 16384 on CUDA; --quick 64 / 2048)")
    parser.add_argument("--warmup", type=int, help="student-step repeats run first and not counted (default 1)")
    parser.add_argument("--repeats", type=int, help="counted student-step repeats (default 7; --quick 1)")
    parser.add_argument("--epoch-samples", type=int, help="samples of the timed epoch (default N; --quick 256)")
    parser.add_argument("--epoch-repeats", type=int, help="epochs timed per path (default 3; --quick 1)")
    parser.add_argument("--dump-samples", type=int, help="samples the dump covers (default N; --quick 256)")
    parser.add_argument("--dump-repeats", type=int, help="dumps timed per variant (default 3; --quick 1)")
    parser.add_argument("--store-samples", type=int, help="samples of the view the store section reads and writes "
                        "(default 50000, also with --quick: it costs seconds, and the targets are set at this size)")
    parser.add_argument("--store-repeats", type=int, help="reads and writes timed per variant after one warm-up "
                        "(default 15; --quick 3)")
    parser.add_argument("--sections", type=section_names, default=list(SECTIONS),
                        help=f"which sections to run, in order: {','.join(SECTIONS)}")
    parser.add_argument("--json", type=Path, help="also write the figures and settings to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run every section and print the table (and write --json)."""
    args = parse_args(argv)
    device = pick_device(args.device)
    plan = make_plan(args, device)
    header = {"command": " ".join(["python", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]),
              **environment(device), "plan": asdict(plan)}
    started = time.perf_counter()
    policy = get_policy("cifar")
    data = load_dataset("synthetic", split="train", num_samples=plan.samples, num_classes=CLASSES, image_size=32,
                        seed=SEED)
    torch.manual_seed(SEED)
    teacher = create_model(TEACHER, num_classes=CLASSES).eval()
    sections: list[Section] = []
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as folder:
        caches = {fmt: write_student_cache(Path(folder) / f"student.{suffix}", data, policy, device, fmt)
                  for fmt, suffix in (("zarr", "zarr"), ("hdf5", "h5"))}
        bench = Bench(device, plan, data, policy, teacher, caches, Path(folder))
        try:
            for name in args.sections:
                section_started = time.perf_counter()
                sections.append(SECTIONS[name](bench))
                sections[-1].seconds = round(time.perf_counter() - section_started, 1)
        finally:
            for cache in caches.values():
                cache.close()
    header["seconds"] = round(time.perf_counter() - started, 1)
    print(format_table(sections, header))
    print(f"\n{header['seconds']:.0f} s in all")
    if args.json is not None:
        document = {**header, "sections": [{"name": section.name, "note": section.note, "seconds": section.seconds,
                                            "rows": [{**asdict(row), "met": row.met} for row in section.rows]}
                                           for section in sections]}
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
