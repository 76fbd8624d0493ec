"""Teachers that are no cache (issue 20), on digits: deep mutual learning, the student's own EMA as teacher, and a
student distilled only from images DeepInversion synthesised from the teacher, each against its reference.

References, the same student, schedule and seeds: cross-entropy alone (fresh views); for the data-free student, a
student distilled from as many noise images labelled by the teacher (the floor) and one distilled from the real
training images (the ceiling, fidelity.py's K = 16 cache). The synthesis uses fewer steps than the paper's 2000
(CPU time) and a BatchNorm weight fitted to digits; both are options. Writes online.json and a table.

    python benchmarks/online.py --checkpoint runs/fidelity/teacher/model.pt --methods ce,dml,ema-teacher
    python benchmarks/online.py --checkpoint runs/fidelity/teacher/model.pt --methods synthesized,noise,real
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from families import dump_caches, table  # fidelity's teacher cache "a", and the table of method rows
from fidelity import aggregate, environment, prepare_teacher
from kdcache.config import DistillConfig, SynthesizeConfig, TeacherConfig
from kdcache.data import load_dataset
from kdcache.runtime import pick_device
from kdcache.stages import distill, train_teacher
from kdcache.stages.synthesize import synthesize

# method -> its label; dml gives two rows, one per student of the pair
METHODS = {"ce": "cross-entropy alone (fresh views)",
           "dml": "deep mutual learning, pair of {student}",
           "ema-teacher": "KD from the student's own EMA (decay 0.99)",
           "ema-teacher-ce": "KD from the student's own EMA (decay 0.99), cross-entropy weight 1",
           "synthesized": "SDD-LSKD from {num} DeepInversion images",
           "noise": "SDD-LSKD from {num} noise images, teacher's labels (floor)",
           "real": "SDD-LSKD from the real training images (ceiling)"}
SETS = {"synthesized": {}, "noise": {"iterations": 0, "labels": "teacher"}}  # --methods that read a synthesised set
CACHE_OF = {"real": "a", "synthesized": "synthesized", "noise": "noise"}  # the cache each distilled method reads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="the teacher's weights (fidelity.py's resnet20)")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--views", type=int, default=16, help="views per image of every cache")
    parser.add_argument("--num", type=int, default=512, help="images to synthesise")
    parser.add_argument("--iterations", type=int, default=200, help="DeepInversion steps per batch")
    parser.add_argument("--bn-weight", type=float, default=1.0)
    parser.add_argument("--synthesis-lr", type=float, default=0.1)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/online")
    args = parser.parse_args(argv)
    args.dataset, args.data_root, args.teacher, args.methods = "digits", None, None, args.methods.split(",")
    return args


def main() -> None:
    """The teacher, the sets and caches the methods read, then every method for every seed; results to --out."""
    args = parse_args()
    started, out = time.perf_counter(), Path(args.out)
    result: dict[str, Any] = {"command": shlex.join(["python", *sys.argv]),
                              "environment": environment(pick_device(args.device)),
                              "config": {k: v for k, v in vars(args).items() if k != "out"}}
    teachers = {"a": prepare_teacher(args, out)}
    result["teachers"] = teachers
    caches = dump_caches(args, teachers, out, ["a"]) if "real" in args.methods else {}
    result["syntheses"] = {}
    for name in (method for method in args.methods if method in SETS):
        caches[name], result["syntheses"][name] = synthesised_set(args, teachers["a"], name, out)
    result["caches"] = caches
    rows: dict[str, dict[str, Any]] = {}
    for seed in range(args.seeds):  # seeds outermost, so a busy machine slows every method alike
        for method in args.methods:
            for name, run in train(args, method, seed, caches, out / "runs" / f"seed{seed}" / method).items():
                rows.setdefault(name, {"label": name, "runs": []})["runs"].append(run)
                print(f"seed {seed} {name:<40} last {run['last']:.4f}  best {run['best']:.4f}  "
                      f"{run['seconds']:.0f} s", flush=True)
    for row in rows.values():
        row.update(aggregate(row["runs"]))
        row["correct_last"] = [round(run["last"] * run["test_size"]) for run in row["runs"]]
    result["methods"], result["seconds"] = rows, time.perf_counter() - started
    (out / "online.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result, "online"))


def synthesised_set(args: argparse.Namespace, teacher: dict[str, Any], name: str,
                    out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A DeepInversion set (or noise, labelled by the teacher) of --num images, and the teacher's cache over it."""
    settings = {"checkpoint": teacher["checkpoint"], "num": args.num, "iterations": args.iterations,
                "bn_weight": args.bn_weight, "lr": args.synthesis_lr, "views": args.views, "out": str(out / name),
                "device": args.device}
    made = synthesize(SynthesizeConfig(**{**settings, **SETS[name]}), show_progress=False)
    print(f"{name}: {made.images} images in {made.seconds:.0f} s, statistics loss {made.statistics_loss_start:.2f} -> "
          f"{made.statistics_loss_end:.2f}, teacher names the intended class of {100 * made.intended_accuracy:.1f}%",
          flush=True)
    cache = {"path": str(made.cache.path), "seconds": made.cache.seconds, "bytes": made.cache.bytes_on_disk,
             "teacher_view_acc": sum(made.cache.view_accuracy) / len(made.cache.view_accuracy)}
    return cache, {"seconds": made.seconds, "statistics_loss": [made.statistics_loss_start, made.statistics_loss_end],
                   "intended_accuracy": made.intended_accuracy}


def train(args: argparse.Namespace, method: str, seed: int, caches: dict[str, Any],
          folder: Path) -> dict[str, dict[str, Any]]:
    """The students of one method and seed, by row label: last and best test accuracy and wall time."""
    schedule = {"epochs": args.epochs, "seed": seed, "device": args.device, "out": str(folder)}
    label = METHODS[method].format(student=args.student, num=args.num)
    started = time.perf_counter()
    if method == "ce":  # teacher training is exactly plain cross-entropy on fresh views
        folders = {label: train_teacher(TeacherConfig(model=args.student, dataset="digits", **schedule),
                                        show_progress=False).checkpoint.parent}
    else:
        options = {"dml": {"mutual": True, "students": (args.student, args.student)},
                   "ema-teacher": {"ema_teacher": 0.99, "losses": ("kd",)},
                   # KD's own cross-entropy weight, 0.1, leaves a self-teacher's student a tenth of the label signal
                   "ema-teacher-ce": {"ema_teacher": 0.99, "losses": ("kd",), "ce_weight": 1.0}}.get(method) or {
            "cache": caches[CACHE_OF[method]]["path"], "losses": ("sdd-lskd",)}
        summaries = distill(DistillConfig(**{"students": (args.student,), **options, **schedule}), show_progress=False)
        folders = {f"{label}, student {k + 1}" if len(summaries) > 1 else label: summary.folder
                   for k, summary in enumerate(summaries)}
    seconds = (time.perf_counter() - started) / len(folders)
    test_size = len(load_dataset("digits", None, "test").labels)
    return {name: _curve(run_folder, seed, seconds, test_size) for name, run_folder in folders.items()}


def _curve(folder: Path, seed: int, seconds: float, test_size: int) -> dict[str, Any]:
    """A run's last and best test accuracy from its metrics.csv."""
    with open(folder / "metrics.csv") as file:
        curve = [float(row["test_acc"]) for row in csv.DictReader(file)]
    return {"seed": seed, "last": curve[-1], "best": max(curve), "best_epoch": curve.index(max(curve)) + 1,
            "seconds": seconds, "test_size": test_size}


if __name__ == "__main__":
    main()
