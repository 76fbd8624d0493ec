"""Dense caches on digits-scenes: bytes per image and the stored map's error at each output stride and storage, and
the dense dump against the teacher's pure forward on the same views (issue 35).

    python benchmarks/dense_cache.py [--train-epochs 3] [--samples 250] [--dump-samples 1000] [--repeats 5]
                                     [--threads 1] [--json FILE]
    python benchmarks/dense_cache.py --quick     # a few scenes, random weights, one repeat: the script's own test

Teacher: fcn_resnet20, trained here for --train-epochs epochs on digits-scenes' train split (Adam, lr 2e-3, batch
64, cross-entropy over the labelled pixels, views of the `cifar` policy, seed 0; 0 keeps its seeded random weights),
or the weights of --checkpoint. Views: one view (`cifar`, seed 0) of each of the first --samples scenes of the test
split, the same for every row.

For each output stride s in {1, 2, 4, 8} and storage (every logit in fp16; the top k per position, k in {1, 2, 4},
the rest as one logit: kdcache.stages.topk), a one-view cache is written by `dump_dense`, read back through
`open_dense_targets`, and its maps m [C, H/s, W/s] compared with the teacher's float32 logits z [C, H, W] at full
size on the same views (every pixel, padding included), up(m) being m upsampled bilinearly (align_corners=False):
  raw B/img     bytes of one view of one image in the data arrays, uncompressed (DenseCacheSpec.bytes_per_sample)
  disk B/img    the store's bytes on disk over the images: Zarr as kdcache writes it (uncompressed chunks with
                crc32c, the last block's chunk written whole), labels, aug and metadata included
  MAE           mean over pixels and classes of |z - up(m)|
  KL            mean over pixels of KL(softmax(z) ‖ softmax(up(m))) at T = 1, in nats
  agree         the share of pixels where argmax up(m) = argmax z
Throughput: `dump_dense` over one view of the first --dump-samples scenes of the train split, timed whole (store
created, every block written, finished; stride 4, fp16, full and top-2), against the teacher's pure forward on the
same views (DenseData.views, then the teacher under the dump's autocast, nothing kept), the same batches; the order
alternates, a first round is a warm-up and is dropped; medians of img/s, and the median of the per-repeat ratios
dump / forward.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from kdcache.cache.location import remove_store, store_bytes
from kdcache.data import load_dataset
from kdcache.data.dense import IGNORE_INDEX, DenseData
from kdcache.models import create_model, load_checkpoint
from kdcache.report import cpu_model, source_commit
from kdcache.runtime import autocast
from kdcache.stages.dense_dump import dump_dense
from kdcache.stages.dense_targets import open_dense_targets

TEACHER, CLASSES, SEED, CPU = "fcn_resnet20", 11, 0, torch.device("cpu")
STRIDES, TOP_KS = (1, 2, 4, 8), (0, 1, 2, 4)  # k 0: every logit
TIMED = ((4, 0), (4, 2))  # (stride, k) of the dumps timed against the pure forward
INFO = {"arch": TEACHER, "num_classes": CLASSES, "checkpoint": "benchmark", "checkpoint_sha256": "0" * 64}


def teacher(epochs: int, checkpoint: str | None) -> torch.nn.Module:
    """fcn_resnet20 with --checkpoint's weights, or seeded random ones trained for `epochs` on the train split."""
    torch.manual_seed(SEED)
    model = create_model(TEACHER, num_classes=CLASSES)
    if checkpoint:
        load_checkpoint(checkpoint, model)
        return model.eval()
    train = load_dataset("digits-scenes", split="train") if epochs else None
    optimizer, generator = torch.optim.Adam(model.parameters(), lr=2e-3), torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        policy = train.policy("cifar")
        params = policy.sample(generator, len(train))
        for batch in torch.randperm(len(train), generator=generator).split(64):
            images, masks = train.views(policy, params, batch, CPU)
            loss = F.cross_entropy(model.train()(images), masks, ignore_index=IGNORE_INDEX)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def first_scenes(count: int, split: str) -> DenseData:
    """The first `count` scenes of a split of digits-scenes, normalised as the split is."""
    whole = load_dataset("digits-scenes", split=split)
    return DenseData(whole.name, whole.split, whole.images[:count].clone(), whole.masks[:count].clone(),
                     whole.class_names, whole.mean, whole.std)


def full_logits(model: torch.nn.Module, data: DenseData, params: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The teacher's float32 logits [N, C, H, W] at full size on view `params` [N, P] of every sample."""
    parts = []
    with torch.no_grad():
        for batch in torch.arange(len(data)).split(batch_size):
            parts.append(model(data.views(data.policy("cifar"), params, batch, CPU)[0]).float())
    return torch.cat(parts)


def map_error(full: torch.Tensor, stored: torch.Tensor) -> dict[str, float]:
    """MAE of the logits, mean per-pixel KL at T = 1 and argmax agreement of `stored` [N, C, h, w] upsampled
    bilinearly to `full` [N, C, H, W] (see the module)."""
    rebuilt = F.interpolate(stored, size=full.shape[-2:], mode="bilinear", align_corners=False)
    log_p, log_q = full.log_softmax(1), rebuilt.log_softmax(1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1)
    return {"mae": float((full - rebuilt).abs().mean()), "kl": float(kl.mean()),
            "agree": float((full.argmax(1) == rebuilt.argmax(1)).float().mean())}


def storage_rows(model: torch.nn.Module, data: DenseData, folder: Path, batch_size: int) -> list[dict]:
    """One row per (stride, k): bytes per image and the stored map's error against the full float32 logits."""
    rows, full = [], None
    for stride in STRIDES:
        for k in TOP_KS:
            out = folder / f"s{stride}-k{k}.zarr"
            result = dump_dense(model, INFO, data, data.policy("cifar"), out, views=1, stride=stride, topk=k,
                                batch_size=batch_size, device=CPU, seed=SEED, show_progress=False)
            with open_dense_targets(out, data, CPU) as targets:
                if full is None:
                    full = full_logits(model, data, targets.params(0), batch_size)
                stored = targets.maps(0, torch.arange(len(data)), None)
                raw = targets.cache.spec.bytes_per_sample
            rows.append({"stride": stride, "storage": f"top-{k} fp16" if k else "full fp16", "raw_bytes": raw,
                         "disk_bytes": store_bytes(out) / len(data), "pixel_accuracy": result.view_accuracy[0],
                         **map_error(full, stored)})
            remove_store(out)
    return rows


def throughput_rows(model: torch.nn.Module, data: DenseData, folder: Path, batch_size: int,
                    repeats: int) -> list[dict]:
    """img/s of the timed dumps and of the pure forward on the same views; each dump's median ratio to it."""
    policy = data.policy("cifar")
    params = policy.sample(torch.Generator().manual_seed(SEED), len(data))

    def forward(_: int) -> float:
        started = time.perf_counter()
        with torch.no_grad(), autocast(CPU):
            for batch in torch.arange(len(data)).split(batch_size):
                model(data.views(policy, params, batch, CPU)[0])
        return time.perf_counter() - started

    def dump(stride: int, k: int):
        def timed(repeat: int) -> float:
            out = folder / f"timed-{repeat}.zarr"
            started = time.perf_counter()
            dump_dense(model, INFO, data, policy, out, views=1, stride=stride, topk=k, batch_size=batch_size,
                       device=CPU, seed=SEED, show_progress=False)
            seconds = time.perf_counter() - started
            remove_store(out)
            return seconds
        return timed

    runs = {"forward": forward, **{f"dump stride {s} {f'top-{k}' if k else 'full'}": dump(s, k) for s, k in TIMED}}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(repeats + 1):  # round 0 is a warm-up, dropped
        order = list(runs) if repeat % 2 else list(runs)[::-1]
        for name in order:
            took = runs[name](repeat)
            if repeat:
                seconds[name].append(took)
    return [{"what": name, "img_per_s": len(data) / statistics.median(times),
             "ratio": statistics.median(f / d for f, d in zip(seconds["forward"], times))}
            for name, times in seconds.items()]


def tables(storage: list[dict], throughput: list[dict]) -> str:
    """Both tables as markdown."""
    lines = ["| stride | storage | raw B/img | disk B/img | MAE | KL (nats) | agree |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {row['stride']} | {row['storage']} | {row['raw_bytes']} | {row['disk_bytes']:.0f} | {row['mae']:.4f} "
              f"| {row['kl']:.5f} | {row['agree']:.4f} |" for row in storage]
    lines += ["", "| what | img/s | vs the pure forward |", "|---|---|---|"]
    lines += [f"| {row['what']} | {row['img_per_s']:.1f} | {row['ratio']:.3f}x |" for row in throughput]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-epochs", type=int, default=3, help="epochs of training of the teacher (0: random)")
    parser.add_argument("--checkpoint", help="the teacher's weights instead (an fcn_resnet20 of 11 classes)")
    parser.add_argument("--samples", type=int, default=250, help="scenes of the test split measured")
    parser.add_argument("--dump-samples", type=int, default=1000, help="scenes of the train split the dumps time")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of the dumps and the forward")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="8 scenes, random weights, 1 repeat")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_epochs, args.samples, args.dump_samples, args.repeats = 0, 8, 8, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, data = teacher(args.train_epochs, args.checkpoint), first_scenes(args.samples, "test")
    with tempfile.TemporaryDirectory() as folder:
        storage = storage_rows(model, data, Path(folder), args.batch_size)
        throughput = throughput_rows(model, first_scenes(args.dump_samples, "train"), Path(folder), args.batch_size,
                                     args.repeats)
    weights = args.checkpoint or (f"trained {args.train_epochs} epochs here" if args.train_epochs else "random")
    command = "python " + " ".join(map(shlex.quote, ["benchmarks/dense_cache.py", *(argv or sys.argv[1:])]))
    print("\n".join([
        f"- command: `{command}`", f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- device: commit {source_commit()}; CPU `{cpu_model()}`, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}; python {platform.python_version()}, torch {torch.__version__}",
        f"- teacher: {TEACHER} ({weights}), pixel accuracy {storage[0]['pixel_accuracy']:.4f} on the view; "
        f"maps of {len(data)} test scenes; dumps of {args.dump_samples} train scenes, batch {args.batch_size}, "
        f"{args.repeats} timed repeats",
        "", tables(storage, throughput), "", f"{time.perf_counter() - started:.0f} s"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"storage": storage, "throughput": throughput}, indent=2))


if __name__ == "__main__":
    main()
