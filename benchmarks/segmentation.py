"""Segmentation end to end (issue 35): a teacher, its dense cache, and students trained from it with cross-entropy
alone, pixel-wise KD and channel-wise distillation, on the embedded digits-scenes, every step a `kdcache` command.

    kdcache train-teacher --dataset digits-scenes --model fcn_resnet20 --epochs E --out OUT/teacher
    kdcache dump-teacher --dataset digits-scenes --checkpoint OUT/teacher --views K --stride S --out OUT/cache.zarr
    kdcache distill --cache OUT/cache.zarr --student fcn_resnet8 --loss ce --loss pixel-kd --loss cwd --epochs E \
        --seed SEED --out OUT/students/seedSEED                                     (for each seed)

Every student of a seed starts from the same weights and replays the same cached views (epoch e: view e mod K);
the table gives each method's last-epoch test mIoU and pixel accuracy (mean ± sample std over the seeds, then each
seed's), beside the teacher's. Writes OUT/segmentation.json (the commands, the machine, the commit, every run).

    python benchmarks/segmentation.py                  # 30 teacher epochs, 8 views, 30 student epochs, 3 seeds
    python benchmarks/segmentation.py --quick          # 1 epoch each, 1 view, 1 seed: checks the chain
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kdcache.report import cpu_model, source_commit

LOSSES = ("ce", "pixel-kd", "cwd")
LABELS = {"ce": "cross-entropy (cached views)", "pixel-kd": "pixel-wise KD", "cwd": "channel-wise distillation"}
QUICK = {"teacher_epochs": 1, "epochs": 1, "views": 1, "seeds": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="fcn_resnet20")
    parser.add_argument("--student", default="fcn_resnet8")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=30, help="each student's")
    parser.add_argument("--views", type=int, default=8, help="views per scene in the cache")
    parser.add_argument("--stride", type=int, default=4, help="the cached maps' output stride")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/segmentation")
    parser.add_argument("--quick", action="store_true", help="a tiny run that checks the chain: " + str(QUICK))
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    return args


def kdcache(*argv: object) -> tuple[str, float]:
    """Run `python -m kdcache ARGV` (this interpreter, this environment); its command line and seconds. A failed
    command stops the benchmark with its own message."""
    command = [sys.executable, "-m", "kdcache", *map(str, argv)]
    started = time.perf_counter()
    print("$", shlex.join(["kdcache", *map(str, argv)]), flush=True)
    done = subprocess.run(command, env=os.environ.copy())
    if done.returncode:
        sys.exit(f"benchmarks/segmentation.py: `{shlex.join(command)}` exited {done.returncode}")
    return shlex.join(["kdcache", *map(str, argv)]), time.perf_counter() - started


def main() -> None:
    """The teacher, its cache, then every seed's students; OUT/segmentation.json and the table."""
    args = parse_args()
    out, steps, started = Path(args.out), [], time.perf_counter()
    if (out / "students").exists():  # its summary.csv files would hold an earlier call's rows too
        sys.exit(f"benchmarks/segmentation.py: {out} holds an earlier run's students; give a new --out")
    common = ("--dataset", "digits-scenes", "--device", args.device)
    steps.append(kdcache("train-teacher", *common, "--model", args.teacher, "--epochs", args.teacher_epochs,
                         "--out", out / "teacher"))
    steps.append(kdcache("dump-teacher", *common, "--checkpoint", out / "teacher", "--views", args.views,
                         "--stride", args.stride, "--out", out / "cache.zarr", "--overwrite"))
    runs: dict[str, list[dict[str, Any]]] = {loss: [] for loss in LOSSES}
    for seed in range(args.seeds):
        folder = out / "students" / f"seed{seed}"
        steps.append(kdcache("distill", "--cache", out / "cache.zarr", "--device", args.device, "--student",
                             args.student, *(part for loss in LOSSES for part in ("--loss", loss)), "--epochs",
                             args.epochs, "--seed", seed, "--out", folder))
        with open(folder / "summary.csv", newline="") as file:
            for row in csv.DictReader(file):
                runs[row["loss"]].append({"seed": seed, "miou": float(row["test_miou"]),
                                          "pixel_acc": float(row["test_pixel_acc"]), "folder": row["folder"]})
    teacher = json.loads((out / "teacher" / "model.json").read_text())
    result = {"command": shlex.join(["python", *sys.argv]), "commit": source_commit(), "cpu": cpu_model(),
              "python": platform.python_version(), "config": {k: v for k, v in vars(args).items() if k != "out"},
              "steps": [{"command": command, "seconds": seconds} for command, seconds in steps],
              "teacher": {"miou": teacher["test_miou"], "pixel_acc": teacher["test_pixel_acc"]},
              "methods": {loss: {"label": LABELS[loss], "runs": found, **summary(found)} for loss, found in runs.items()},
              "seconds": time.perf_counter() - started}
    (out / "segmentation.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and sample std (0 for one seed) of the runs' last-epoch mIoU and pixel accuracy."""
    found = {}
    for key in ("miou", "pixel_acc"):
        values = [run[key] for run in runs]
        found |= {f"{key}_mean": statistics.fmean(values),
                  f"{key}_std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return found


def table(result: dict[str, Any]) -> str:
    """The printed table: the teacher, then each method's mIoU and pixel accuracy (mean ± std, each seed's)."""
    config, teacher = result["config"], result["teacher"]
    lines = [f"digits-scenes test split; teacher {config['teacher']} ({config['teacher_epochs']} epochs), students "
             f"{config['student']} ({config['epochs']} epochs) from its cache of {config['views']} views at stride "
             f"{config['stride']}; {config['seeds']} seed(s); commit {result['commit']}, {result['cpu']}",
             f"{'method':<30} {'mIoU':>16} {'pixel acc':>16}  per seed (mIoU)",
             f"{'teacher':<30} {100 * teacher['miou']:>15.2f}% {100 * teacher['pixel_acc']:>15.2f}%"]
    for method in result["methods"].values():
        seeds = " ".join(f"{100 * run['miou']:.2f}" for run in method["runs"])
        lines.append(f"{method['label']:<30} {100 * method['miou_mean']:>8.2f} ± {100 * method['miou_std']:>4.2f} "
                     f"{100 * method['pixel_acc_mean']:>8.2f} ± {100 * method['pixel_acc_std']:>4.2f}  {seeds}")
    lines.append(f"total {result['seconds']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
