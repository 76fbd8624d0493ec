"""How much of a teacher's distribution top-k storage loses, and how many bytes it saves (kdcache/cache/topk.py).

    python benchmarks/topk.py                          # resnet8 teacher on 100-class synthetic data + digits cache
    python benchmarks/topk.py --out /tmp/topk.md       # also write the markdown printed

For each source of real teacher region logits [N, R, C] and each k, the KL divergence KL(p_full ‖ p_rebuilt)
per (sample, region), its mean and 99th percentile, where p_full comes from the logits as a full fp16 cache
holds them and p_rebuilt from the top-k encoding of those logits with values and rest stored as fp16
(`encode_topk` → fp16 → `decode_topk`). Measured as each loss sees its teacher (temperatures from the
`--loss` registry, configs/losses.yaml):
  T=1          softmax(z): the distribution top-k storage preserves on the top-k classes and in total mass
  KD T=4       softmax(z / 4): `kd` (and the non-LS SDD/DKD losses) at their temperature
  LS T=2       softmax(standardize(z) / 2): `kd+ls` and `sdd-lskd-kd`, which z-score every region, then divide by T
  LS T=4       softmax(standardize(z) / 4): `sdd-lskd` (kdcache's default loss, DKD-based)
  LS T=4 nt    the same, over the non-target classes only (target = the sample's label, as in every region):
               the teacher distribution of DKD's NCKD term, weighted β = 8 in `sdd-lskd`
standardize() z-scores over all C classes, so the rebuilt logits' flat rest moves the mean and std and changes
the standardised top-k logits too: at LS the rebuilt distribution differs on the top-k classes as well.
Each table starts with k = 0, storing nothing (a uniform teacher): KL(p ‖ uniform), the reference a k is to beat.
For the 100-class teacher three more tables: the rest kept at T=4 instead of 1 (`encode_topk(rest_temperature=4)`);
the LS columns standardised with the full row's mean and std (two more fp16 numbers per region); and that with
the rest kept at 4·σ per row, the raw temperature at which `sdd-lskd` (LS, base T=4) sees the logits.

Sources: a resnet8 trained here for a few epochs on `synthetic` data with 100 classes (CIFAR-100's class and
region counts), its LogitMap(model, (1, 2, 4)) logits over the training images; and the quickstart digits
cache (10 classes, every view) when present (`kdcache quickstart` writes caches/quickstart-digits.zarr).
Bytes per sample, full vs. top-k (`topk_bytes`: fp16 values and rest, int16 indices), for these sources and
for the arithmetic of CIFAR-100 (21 × 100) and ImageNet (21 × 1000).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kdcache.cache import open_cache
from kdcache.cache.topk import topk_bytes
from kdcache.data import load_dataset, normalize
from kdcache.losses import get_loss, standardize
from kdcache.models import LogitMap, create_model
from kdcache.stages.topk import kl_rows, rebuild_topk
from kdcache.report import cpu_model, source_commit

ROOT = Path(__file__).resolve().parents[1]
SCALES = (1, 2, 4)
DEFAULT_KS = (1, 2, 5, 10, 20, 50)
STORAGE = torch.float16  # what a cache stores: the full logits, and the top-k values and rest
LS_EPS = 1e-7  # standardize()'s default eps


@dataclass(frozen=True)
class Metric:
    """One way a loss sees its teacher: softmax(f(z) / T) over all classes, or over the non-target ones."""

    name: str
    temperature: float
    standardize: bool
    non_target: bool = False


def loss_metrics() -> list[Metric]:
    """The columns, with the temperatures of the registered losses that see the teacher that way."""
    kd_t, ls_kd_t, lskd_t = (get_loss(name).temperature for name in ("kd", "sdd-lskd-kd", "sdd-lskd"))
    return [Metric("T=1", 1.0, False), Metric(f"KD T={kd_t:g}", kd_t, False),
            Metric(f"LS T={ls_kd_t:g}", ls_kd_t, True), Metric(f"LS T={lskd_t:g}", lskd_t, True),
            Metric(f"LS T={lskd_t:g} nt", lskd_t, True, non_target=True)]


def _seen(logits: Tensor, labels: Tensor, metric: Metric, stats_of: Tensor | None = None) -> Tensor:
    """The logits a loss turns into its teacher distribution: standardised or not, the target masked out for nt.

    With `stats_of`, standardisation uses that tensor's per-row mean and std (the full logits' μ, σ, as a cache
    could store them) instead of the row's own: `standardize` with the same formula, other statistics.
    """
    z = logits
    if metric.standardize:
        reference = logits if stats_of is None else stats_of
        mean = reference.mean(dim=-1, keepdim=True)
        std = reference.var(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny).sqrt()
        z = (logits - mean) / (std + LS_EPS) if stats_of is not None else standardize(logits)
    if metric.non_target:  # DKD's NCKD: softmax over the non-target classes; -inf carries no mass
        z = z.scatter(-1, labels.unsqueeze(-1), float("-inf"))
    return z


def measure(logits: Tensor, labels: Tensor, ks: Sequence[int], metrics: Sequence[Metric],
            rest_temperature: float | str = 1.0, stored_stats: bool = False, chunk: int = 1024) -> list[dict]:
    """One row per k (plus k = 0 and k = C): bytes per sample, times smaller, each metric's KL mean and 99th percentile.

    logits [N, R, C] (rounded to fp16, as a full cache stores them); labels [N]. KLs are per (sample, region).
    k = 0 is the reference of storing nothing (a uniform teacher; bytes 0): KL(p ‖ uniform), the most a k can lose.
    `rest_temperature` is `encode_topk`'s (1: FKD/ReLabel's rest), or "ls:T" for T · (σ + eps) per row, σ the full
    row's std: the raw temperature at which LS at base temperature T sees the logits. `stored_stats`: the LS metrics standardise the
    rebuilt logits with the full row's mean and std (two more fp16 per region, counted in the bytes).
    """
    full = logits.to(STORAGE).float()
    num_samples, num_regions, num_classes = full.shape
    region_labels = labels.long().view(-1, 1).expand(num_samples, num_regions)
    ks = [0] + sorted({k for k in ks if 0 < k < num_classes} | {num_classes})
    rows = []
    for k in ks:
        kls: dict[str, list[Tensor]] = {metric.name: [] for metric in metrics}
        for start in range(0, num_samples, chunk):  # bounded memory for large N × C
            z, y = full[start:start + chunk], region_labels[start:start + chunk]
            tau = rest_temperature
            if isinstance(tau, str):  # softmax(standardize(z) / T) = softmax((z − μ) / (T (σ + eps)))
                tau = float(tau.removeprefix("ls:")) * (z.var(dim=-1).sqrt() + LS_EPS)
            rebuilt = (torch.zeros_like(z) if k == 0
                       else rebuild_topk(z, k, storage_dtype=STORAGE, rest_temperature=tau))
            for metric in metrics:
                seen = _seen(rebuilt, y, metric, stats_of=z if stored_stats else None)
                kls[metric.name].append(kl_rows(_seen(z, y, metric), seen, metric.temperature))
        if k == 0:
            row = {"k": 0, "bytes_full": num_regions * num_classes * STORAGE.itemsize, "bytes_topk": 0,
                   "ratio": math.inf}
        else:
            size = topk_bytes(num_regions, num_classes, k)
            stored = size.topk + (num_regions * 2 * STORAGE.itemsize if stored_stats else 0)
            row = {"k": k, "bytes_full": size.full, "bytes_topk": stored, "ratio": size.full / stored}
        for name, parts in kls.items():
            values = torch.cat(parts).flatten().double().numpy()
            row[f"{name} mean"] = float(values.mean())
            row[f"{name} p99"] = float(np.percentile(values, 99))
        rows.append(row)
    return rows


def _number(value: float) -> str:
    return "0" if value == 0 else f"{value:.2e}" if abs(value) < 0.01 else f"{value:.3f}"


def kl_table(rows: list[dict], metrics: Sequence[Metric]) -> str:
    """Markdown: k, bytes per sample, times smaller, then mean / p99 of each metric's KL."""
    head = ["k", "bytes/sample", "× smaller"] + [f"{metric.name} mean / p99" for metric in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = (["0 (uniform)", "0", "—"] if row["k"] == 0
                 else [str(row["k"]), f"{row['bytes_topk']:,}", f"{row['ratio']:.2f}"])
        cells += [f"{_number(row[f'{m.name} mean'])} / {_number(row[f'{m.name} p99'])}" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bytes_table(layouts: Sequence[tuple[str, int, int]], ks: Sequence[int]) -> str:
    """Markdown: bytes per sample, full and top-k per k, with the ratio, for each (name, regions, classes)."""
    lines = ["| layout | full | " + " | ".join(f"k={k}" for k in ks) + " |", "|" + "---|" * (len(ks) + 2)]
    for name, regions, classes in layouts:
        cells = [name, f"{topk_bytes(regions, classes, classes).full:,}"]
        for k in ks:
            if k > classes:
                cells.append("—")
            else:
                size = topk_bytes(regions, classes, k)
                cells.append(f"{size.topk:,} ({size.ratio:.1f}×)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_teacher(classes: int, samples: int, test_samples: int, epochs: int, seed: int) -> tuple:
    """A resnet8 trained with cross-entropy on synthetic data; (model, train data, train acc, test acc)."""
    torch.manual_seed(seed)
    train = load_dataset("synthetic", num_classes=classes, num_samples=samples, seed=seed)
    test = load_dataset("synthetic", split="test", num_classes=classes, num_samples=test_samples, seed=seed)
    model = create_model("resnet8", num_classes=classes)
    images, labels = normalize(train.images, train.mean, train.std), train.labels
    batch = 128
    steps = epochs * math.ceil(samples / batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(samples, generator=generator)
        for start in range(0, samples, batch):
            index = order[start:start + batch]
            x = images[index]
            flip = torch.rand(len(index), generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            loss = F.cross_entropy(model(x), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()

    def accuracy(data) -> float:
        with torch.no_grad():
            logits = torch.cat([model(normalize(data.images[i:i + 512], data.mean, data.std))
                                for i in range(0, len(data.labels), 512)])
        return float((logits.argmax(-1) == data.labels).float().mean())

    return model, train, accuracy(train), accuracy(test)


def region_logits(model: torch.nn.Module, data) -> torch.Tensor:
    """LogitMap(model, (1, 2, 4)) logits [N, 21, C] over the images, float32."""
    mapper = LogitMap(model, SCALES).eval()
    with torch.no_grad():
        return torch.cat([mapper(normalize(data.images[i:i + 512], data.mean, data.std))
                          for i in range(0, len(data.labels), 512)])


def describe_source(logits: torch.Tensor, labels: torch.Tensor) -> str:
    """One line: shape, region-0 accuracy, mean top-1 probability and mean mass outside the top 5 / 10 (T = 1)."""
    p = torch.softmax(logits.float(), dim=-1)
    top = p.sort(dim=-1, descending=True).values
    acc = float((logits[:, 0].argmax(-1) == labels).float().mean())
    tails = ", ".join(f"outside top {k} {float(1 - top[..., :k].sum(-1).mean()):.3f}"
                      for k in (5, 10) if k < logits.shape[-1])
    return (f"logits {list(logits.shape)}; teacher region-0 accuracy {acc:.3f}; mean top-1 probability "
            f"{float(top[..., 0].mean()):.3f}; mean mass {tails or '—'} (over samples × regions, T = 1)")


def device_line() -> str:
    """The commit, CPU model, cores, torch threads, versions."""
    return (f"commit {source_commit()}; CPU `{cpu_model()}`, {os.cpu_count()} cores, "
            f"torch threads {torch.get_num_threads()}; python "
            f"{platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)), help="values of k (k = C is always added)")
    parser.add_argument("--classes", type=int, default=100, help="classes of the synthetic teacher")
    parser.add_argument("--samples", type=int, default=4000, help="training images of the synthetic teacher")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the synthetic teacher")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--digits-cache", default=str(ROOT / "caches" / "quickstart-digits.zarr"),
                        help="the quickstart digits cache (skipped when absent)")
    parser.add_argument("--out", help="also write the markdown printed to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    ks = [int(k) for k in args.ks.split(",")]
    metrics = loss_metrics()
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/topk.py", *(sys.argv[1:] if argv is None
                                                                                    else argv)])
    parts = [f"- command: `{command}`", f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
             f"- device: {device_line()}"]
    sections = []

    teacher_started = time.perf_counter()
    model, train, train_acc, test_acc = train_teacher(args.classes, args.samples, 1000, args.epochs, args.seed)
    logits = region_logits(model, train)
    teacher_seconds = time.perf_counter() - teacher_started
    source = (f"resnet8 teacher, synthetic {args.classes} classes, {args.samples} training images, {args.epochs} "
              f"epochs (train acc {train_acc:.3f}, test acc {test_acc:.3f}; {teacher_seconds:.0f} s); LogitMap "
              f"scales 1,2,4 over the training images")
    description = describe_source(logits, train.labels)
    sections.append((source, description, measure(logits, train.labels, ks, metrics)))
    kd_t = get_loss("kd").temperature
    sections.append((f"the same teacher, rest kept at T={kd_t:g} (`encode_topk(..., rest_temperature={kd_t:g})`)",
                     description, measure(logits, train.labels, ks, metrics, rest_temperature=kd_t)))
    sections.append((("the same teacher, rest at T=1, LS columns standardised with the full row's mean and std "
                      "(2 more fp16 per region, counted in the bytes; the other columns as in the first table)"),
                     description, measure(logits, train.labels, ks, metrics, stored_stats=True)))
    lskd_t = get_loss("sdd-lskd").temperature
    sections.append((("the same teacher, LS columns standardised with the full row's mean and std, rest kept at "
                      f"T={lskd_t:g}·σ per row (where `sdd-lskd` sees the raw logits; T=1 and KD columns then suffer)"),
                     description, measure(logits, train.labels, ks, metrics, rest_temperature=f"ls:{lskd_t:g}",
                                          stored_stats=True)))

    layouts = [("CIFAR-100 (21 × 100)", 21, 100), ("ImageNet (21 × 1000)", 21, 1000)]
    cache_path = Path(args.digits_cache)
    if cache_path.exists():
        cache = open_cache(cache_path)
        views = torch.cat([torch.from_numpy(cache.view(v).astype(np.float32)) for v in range(cache.num_views)])
        labels = torch.from_numpy(cache.labels()).repeat(cache.num_views)
        source = f"quickstart digits cache `{cache_path.name}` ({cache.num_views} views × {cache.num_samples} samples)"
        sections.append((source, describe_source(views, labels), measure(views, labels, ks, metrics)))
        layouts.insert(0, (f"digits cache (21 × {views.shape[-1]})", views.shape[1], views.shape[-1]))
    else:
        parts.append(f"- digits cache {cache_path} not found: skipped (`kdcache quickstart` writes it)")

    out = ["\n".join(parts), ""]
    for source, description, rows in sections:
        out += [f"### {source}", "", description, "", kl_table(rows, metrics), ""]
    out += ["### Bytes per sample, full vs. top-k (fp16 values and rest, int16 indices)", "",
            bytes_table(layouts, sorted(set(ks) | {100})), ""]
    out.append(f"{time.perf_counter() - started:.0f} s in all")
    text = "\n".join(out)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
