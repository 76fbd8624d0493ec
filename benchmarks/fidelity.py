"""Does caching cost accuracy? Students distilled from caches of K views against the online teacher (issue 10).

One teacher and one cache per K for the whole run; for every seed, the same student and schedule trained with plain
cross-entropy, with online SDD-LSKD (live teacher, fresh views every epoch) and with SDD-LSKD from each cache.
Writes fidelity.json (every run and the aggregates), fidelity.png (accuracy against K, online as a band) and a table.

    python benchmarks/fidelity.py                      # digits on the CPU: teacher trained here
    python benchmarks/fidelity.py --dataset cifar100 --data-root DATA --checkpoint T.pt --teacher resnet32x4 \\
        --student resnet8x4 --epochs 240 --device cuda
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import zarr

import kdcache
from kdcache.config import DistillConfig, DumpConfig, TeacherConfig
from kdcache.data import ImageData, load_dataset, normalize, register_dataset
from kdcache.models import load_teacher
from kdcache.runtime import pick_device
from kdcache.stages import distill, train_teacher
from kdcache.stages.dump import dump_from_config
from kdcache.report import cpu_model, source_commit

QUICK_TRAIN_SAMPLES = 64
QUICK = {"teacher": "resnet8", "teacher_epochs": 1, "epochs": 2, "seeds": 2, "views": (1, 2)}


@register_dataset
def digits_quick(root: str | Path | None, split: str) -> ImageData:
    """digits with only its first 64 training images: --quick's data, on which an exhaustive dump takes seconds."""
    data = load_dataset("digits", root, split)
    keep = QUICK_TRAIN_SAMPLES if split == "train" else len(data.labels)
    return ImageData("digits_quick", split, data.images[:keep].contiguous(), data.labels[:keep], data.num_classes,
                     data.mean, data.std)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; --quick replaces the schedule with a tiny one for the test."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits", help="a kdcache dataset (digits needs nothing; cifar100 needs "
                                                            "--data-root)")
    parser.add_argument("--data-root", help="folder holding the dataset in torchvision's on-disk format")
    parser.add_argument("--checkpoint", help="the teacher's weights; without it a --teacher is trained here first")
    parser.add_argument("--teacher", default=None, help="the teacher's architecture (default: the checkpoint's "
                                                         "sidecar, or resnet20 when training one)")
    parser.add_argument("--teacher-epochs", type=int, default=30, help="epochs of the teacher trained without "
                                                                       "--checkpoint")
    parser.add_argument("--student", default="resnet8", help="the student architecture of every run")
    parser.add_argument("--loss", default="sdd-lskd", help="the distillation loss of the online and cached runs")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of every student")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, default=3, help="students per method, seeds 0..N-1 (at least 3)")
    parser.add_argument("--views", default="1,4,16", help="the K of the sampled caches, comma-separated")
    parser.add_argument("--exhaustive", action=argparse.BooleanOptionalAction, default=True,
                        help="also cache every view of the policy (162 per sample for cifar crop+flip)")
    parser.add_argument("--view-order", default="cycle", choices=("cycle", "shuffle"),
                        help="which cached view each epoch replays: cycle (e mod K) or a seeded shuffle per round")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/fidelity", help="folder for the teacher, caches, runs and results")
    parser.add_argument("--quick", action="store_true", help="a tiny run that checks the pipeline (the test's): "
                                                             f"{QUICK_TRAIN_SAMPLES} training digits, {QUICK}")
    args = parser.parse_args(argv)
    args.views = tuple(int(k) for k in args.views.split(","))
    if args.quick:
        if args.dataset != "digits":
            parser.error("--quick runs on digits only")
        args.dataset = "digits_quick"
        vars(args).update(QUICK)
    elif args.seeds < 3:
        parser.error(f"--seeds {args.seeds}: a spread needs at least 3 seeds (2 only with --quick)")
    return args


def main() -> None:
    """Teacher, caches, then every method for every seed; results to --out."""
    args = parse_args()
    started = time.perf_counter()
    out = Path(args.out)
    device = pick_device(args.device)
    result: dict[str, Any] = {"command": shlex.join(["python", *sys.argv]), "environment": environment(device),
                              "config": {k: v for k, v in vars(args).items() if k not in ("out",)}}

    teacher = prepare_teacher(args, out)
    result["teacher"] = teacher
    caches = dump_caches(args, teacher, out)
    result["caches"] = caches

    methods: dict[str, dict[str, Any]] = {
        "ce": {"label": "cross-entropy (fresh views)", "views": None, "runs": []},
        "online": {"label": f"online {args.loss} (live teacher, fresh views)", "views": None, "runs": []},
        **{name: {"label": f"{args.loss} from cache", "views": cache["views"], "runs": []}
           for name, cache in caches.items()},
    }
    total, done = args.seeds * len(methods), 0
    for seed in range(args.seeds):  # seeds outermost, so a busy machine slows every method alike
        for name, method in methods.items():
            run = train_student(args, name, seed, teacher, caches, out / "runs" / f"seed{seed}" / name)
            method["runs"].append(run)
            done += 1
            print(f"[{done}/{total}] seed {seed} {name:<16} last {run['last']:.4f}  best {run['best']:.4f} "
                  f"(epoch {run['best_epoch']})  {run['seconds']:.0f} s", flush=True)
    for name, method in methods.items():
        method.update(aggregate(method["runs"]))
        if name != "online":
            method["vs_online"] = paired_difference(method["runs"], methods["online"]["runs"])
    result["methods"] = methods
    result["seconds"] = time.perf_counter() - started

    (out / "fidelity.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "fidelity.png")
    print(table(result))
    print(f"\n{result['seconds']:.0f} s in all; written {out / 'fidelity.json'} and {out / 'fidelity.png'}")


def environment(device: torch.device) -> dict[str, Any]:
    """Where the numbers come from: date, device, CPU, threads, versions."""
    return {"commit": source_commit(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "zarr": zarr.__version__,
            "kdcache": kdcache.__version__, "platform": platform.platform()}


def prepare_teacher(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The run's one teacher: --checkpoint as given, or one trained here; with its test accuracy."""
    started = time.perf_counter()
    if args.checkpoint:
        checkpoint, trained_seconds = Path(args.checkpoint), None
    else:
        arch = args.teacher or "resnet20"
        print(f"training teacher {arch} on {args.dataset} for {args.teacher_epochs} epochs", flush=True)
        checkpoint = train_teacher(TeacherConfig(model=arch, dataset=args.dataset, data_root=args.data_root,
                                                 epochs=args.teacher_epochs, out=str(out / "teacher"),
                                                 device=args.device), show_progress=False).checkpoint
        trained_seconds = time.perf_counter() - started
    test = load_dataset(args.dataset, args.data_root, "test")
    model, info = load_teacher(checkpoint, args.teacher, test.num_classes)
    accuracy = test_accuracy(model, test, pick_device(args.device))
    print(f"teacher {info['arch']}: test accuracy {accuracy:.4f}", flush=True)
    return {"arch": info["arch"], "checkpoint": str(checkpoint), "test_acc": accuracy, "seconds": trained_seconds}


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, test: ImageData, device: torch.device, batch_size: int = 500) -> float:
    """Top-1 accuracy of a model on the un-augmented test split."""
    model = model.to(device).eval()
    correct = 0
    for start in range(0, len(test.labels), batch_size):
        x = normalize(test.images[start:start + batch_size].to(device), test.mean, test.std)
        correct += int((model(x).argmax(-1).cpu() == test.labels[start:start + batch_size]).sum())
    return correct / len(test.labels)


def dump_caches(args: argparse.Namespace, teacher: dict[str, Any], out: Path) -> dict[str, dict[str, Any]]:
    """One cache per K (all from dump seed 0, so the smaller caches' views are the first views of the larger) and
    the exhaustive one; their size, dump time and the teacher's accuracy on the cached views."""
    caches = {}
    wanted = [(f"cache_k{k}", {"views": k}) for k in args.views]
    if args.exhaustive:
        wanted.append(("cache_exhaustive", {"exhaustive": True}))
    for name, views in wanted:
        path = out / "caches" / f"{name.removeprefix('cache_')}.zarr"
        print(f"dumping {name} to {path}", flush=True)
        dumped = dump_from_config(DumpConfig(checkpoint=teacher["checkpoint"], teacher=args.teacher or "",
                                                     dataset=args.dataset, data_root=args.data_root, out=str(path),
                                                     overwrite=True, device=args.device, **views),
                                          show_progress=False)
        caches[name] = {"path": str(path), "views": len(dumped.view_accuracy), "exhaustive": "exhaustive" in views,
                        "seconds": dumped.seconds, "bytes": dumped.bytes_on_disk, "images": dumped.images,
                        "teacher_view_acc": statistics.fmean(dumped.view_accuracy)}
    return caches


def train_student(args: argparse.Namespace, method: str, seed: int, teacher: dict[str, Any],
                  caches: dict[str, dict[str, Any]], folder: Path) -> dict[str, Any]:
    """One student of one method and seed; its last and best test accuracy, best epoch, and wall time."""
    schedule = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": seed,
                "device": args.device}
    started = time.perf_counter()
    if method == "ce":  # teacher training is exactly plain CE on fresh views; here it trains the student
        run_folder = train_teacher(TeacherConfig(model=args.student, dataset=args.dataset, data_root=args.data_root,
                                                 out=str(folder), **schedule), show_progress=False).checkpoint.parent
    else:
        source = ({"live_teacher": teacher["checkpoint"]} if method == "online" else
                  {"cache": caches[method]["path"], "view_order": args.view_order})
        [summary] = distill(DistillConfig(students=(args.student,), losses=(args.loss,), teacher=args.teacher,
                                          dataset=args.dataset, data_root=args.data_root, out=str(folder),
                                          **source, **schedule), show_progress=False)
        run_folder = summary.folder
    seconds = time.perf_counter() - started
    with open(run_folder / "metrics.csv") as file:
        history = list(csv.DictReader(file))
    curve = [float(row["test_acc"]) for row in history]
    best = max(range(len(curve)), key=curve.__getitem__)  # the first best epoch, as the library reports it
    return {"seed": seed, "last": curve[-1], "best": curve[best], "best_epoch": best + 1, "seconds": seconds,
            "train_seconds": sum(float(row["seconds"]) for row in history), "curve": curve}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and sample standard deviation (n - 1) over seeds of last/best accuracy, best epoch and wall time; the
    deviation of one seed is NaN (none was measured), which the tables print as no spread."""
    stats = {}
    for key in ("last", "best", "best_epoch", "seconds"):
        values = [run[key] for run in runs]
        stats[f"{key}_mean"] = statistics.fmean(values)
        stats[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
    return stats


def paired_difference(runs: list[dict[str, Any]], online: list[dict[str, Any]]) -> dict[str, float]:
    """Accuracy minus the online run of the same seed (same init and batch order), mean and sample std over seeds:
    the seed's own luck cancels, which the two methods' separate spreads cannot show."""
    stats = {}
    for key in ("last", "best"):
        differences = [run[key] - base[key] for run, base in zip(runs, online, strict=True)]
        stats[f"{key}_mean"] = statistics.fmean(differences)
        stats[f"{key}_std"] = statistics.stdev(differences)
    return stats


def table(result: dict[str, Any]) -> str:
    """The printed results: teacher, caches, then one row per method."""
    config, teacher = result["config"], result["teacher"]
    lines = [(f"fidelity: {config['dataset']}, teacher {teacher['arch']} (test {100 * teacher['test_acc']:.2f}%), "
              f"student {config['student']}, {config['epochs']} epochs, seeds 0..{config['seeds'] - 1}, "
              f"device {result['environment']['device']}"), ""]
    for name, cache in result["caches"].items():
        lines.append(f"{name:<18} {cache['views']:>4} views  {cache['bytes'] / 2**20:8.1f} MB  dumped in "
                     f"{cache['seconds']:6.1f} s  teacher {100 * cache['teacher_view_acc']:.2f}% on the views")
    lines += ["", (f"{'method':<46} {'K':>4}  {'last epoch (%)':>15}  {'best epoch (%)':>15}  {'best at':>11}  "
                   f"{'last - online, paired':>21}  {'wall s/run':>10}")]
    for method in result["methods"].values():
        views = "" if method["views"] is None else str(method["views"])
        paired = _pm(method["vs_online"], "last", 100, 2, signed=True) if "vs_online" in method else ""
        lines.append(f"{method['label']:<46} {views:>4}  {_pm(method, 'last', 100, 2):>15}  "
                     f"{_pm(method, 'best', 100, 2):>15}  {_pm(method, 'best_epoch', 1, 1):>11}  "
                     f"{paired:>21}  {method['seconds_mean']:>10.1f}")
    return "\n".join(lines)


def _pm(stats: dict[str, Any], key: str, scale: float, digits: int, signed: bool = False) -> str:
    sign = "+" if signed else ""
    spread = stats[key + "_std"]
    mean = f"{scale * stats[key + '_mean']:{sign}.{digits}f}"
    return mean if math.isnan(spread) else f"{mean} ± {scale * spread:.{digits}f}"


def plot(result: dict[str, Any], path: Path) -> None:
    """Test accuracy against K (log axis): cached runs as error bars, online as a band, cross-entropy dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, config = result["methods"], result["config"]
    named = {name: m for name, m in methods.items() if name.startswith("cache_")}
    cached, ks = list(named.values()), [m["views"] for m in named.values()]
    labels = [f"{m['views']}\n(all)" if name == "cache_exhaustive" else str(m["views"]) for name, m in named.items()]
    figure, axes = plt.subplots(figsize=(7.5, 5.6))
    online, ce = methods["online"], methods["ce"]
    axes.axhspan(online["last_mean"] - online["last_std"], online["last_mean"] + online["last_std"], color="C0",
                 alpha=0.15, label="online, last epoch (mean ± std)")
    axes.axhline(online["last_mean"], color="C0", lw=1)
    axes.axhline(online["best_mean"], color="C1", lw=1, ls=":", label="online, best epoch (mean)")
    axes.axhline(ce["last_mean"], color="grey", ls="--", label="cross-entropy, last epoch (mean)")
    axes.errorbar(ks, [m["last_mean"] for m in cached], yerr=[m["last_std"] for m in cached], fmt="o-", color="C0",
                  capsize=4, label="from cache, last epoch (mean ± std)")
    # nudged right so the two series' error bars do not hide each other
    axes.errorbar([k * 1.08 for k in ks], [m["best_mean"] for m in cached], yerr=[m["best_std"] for m in cached],
                  fmt="s--", color="C1", capsize=4, label="from cache, best epoch (mean ± std)")
    axes.set_xscale("log")
    axes.set_xticks(ks, labels)
    axes.minorticks_off()
    axes.set(xlabel="cached views per sample K (log scale)", ylabel="test accuracy",
             title=f"{config['dataset']}: {config['student']} from {result['teacher']['arch']} ({config['loss']}), "
                   f"{config['epochs']} epochs, {config['seeds']} seeds")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)  # below: the data fills the axes
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
