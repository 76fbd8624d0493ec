"""Continual learning on digits (issue 34): Learning without Forgetting against plain fine-tuning, class-incremental.

The old model (resnet8) is trained on classes 0-4 alone and dumped over the images of classes 5-9 (the README's
recipe, "Born-again generations and continual learning"). Two successors start from its weights and train on 5-9
alone: `fine-tune` by cross-entropy on the new labels, `lwf` adding KD at T = 2 from the old model's softmax over
classes 0-4 (`--kd-classes 0-4`, LwF's weight 1). Each is evaluated on the test images of the old classes
(forgetting), of the new ones, and of all, among all 10 logits (class-incremental) and, for one task's images, among
that task's own logits (task-aware, as LwF's head per task answers); the old model is the reference. Writes
continual.json and a table.

    python benchmarks/continual.py               # digits on the CPU
    python benchmarks/continual.py --quick       # a tiny run that checks the pipeline
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from kdcache.config import DistillConfig, DumpConfig, TeacherConfig
from kdcache.report import source_commit
from kdcache.stages import distill, train_teacher
from kdcache.stages.dump import dump_from_config
from kdcache.stages.evaluate import evaluate_model

OLD, NEW, ALL = "0-4", "5-9", "0-9"
# method -> its distill options beyond the shared ones: LwF is CE + 1 · T-softened cross-entropy on the old classes
# (kd's term is T²·KL: weight 1/T² = 0.25 at T = 2)
METHODS = {
    "fine-tune": {"losses": ("ce",)},
    "lwf": {"losses": ("kd",), "kd_classes": OLD, "temperature": 2.0, "ce_weight": 1.0, "distill_weight": 0.25},
}
QUICK = {"teacher_epochs": 1, "epochs": 1, "seeds": 1, "views": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet8", help="the old model and both successors")
    parser.add_argument("--teacher-epochs", type=int, default=30, help="epochs of the old model on classes 0-4")
    parser.add_argument("--epochs", type=int, default=15, help="epochs of each successor on classes 5-9")
    parser.add_argument("--lr", type=float, default=0.01, help="the successors' learning rate")
    parser.add_argument("--views", type=int, default=4, help="views of the old model's cache over classes 5-9")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/continual")
    parser.add_argument("--quick", action="store_true", help="a tiny run that checks the pipeline: " + str(QUICK))
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    return args


ANSWERS = {"old": (OLD, False), "old, its head": (OLD, True), "new": (NEW, False), "new, its head": (NEW, True),
           "all": (ALL, False)}  # column -> (the test images' classes, answered among their logits alone)


def accuracies(run_folder: Path, device: str) -> dict[str, float]:
    """A model's top-1 on the test images of the old classes, the new ones and all, among all 10 logits (class-
    incremental) and, for a task, among its own classes' logits (task-aware: LwF's head per task)."""
    return {name: evaluate_model(str(run_folder), classes=classes, within_classes=within, device=device).top1
            for name, (classes, within) in ANSWERS.items()}


def run_seed(args: argparse.Namespace, seed: int, out: Path) -> dict[str, dict[str, float]]:
    """The old model of one seed, its cache over the new classes, and both successors: every one's accuracies."""
    old = train_teacher(TeacherConfig(model=args.model, classes=OLD, epochs=args.teacher_epochs, seed=seed,
                                      out=str(out / "old"), device=args.device), show_progress=False).checkpoint.parent
    cache = out / "old-on-new.zarr"
    dump_from_config(DumpConfig(checkpoint=str(old), classes=NEW, views=args.views, seed=seed, out=str(cache),
                                overwrite=True, device=args.device), show_progress=False)
    found = {"old model": accuracies(old, args.device)}
    for name, options in METHODS.items():
        [run] = distill(DistillConfig(cache=str(cache), students=(args.model,), student_checkpoint=str(old),
                                      epochs=args.epochs, lr=args.lr, seed=seed, out=str(out / name),
                                      device=args.device, **options), show_progress=False)
        found[name] = accuracies(run.folder, args.device)
    return found


def table(result: dict[str, Any]) -> str:
    """Per model the mean (and spread) over seeds of its top-1 on the old, new and all classes' test images."""
    config = result["config"]
    lines = [f"continual learning on digits: old task 0-4, new task 5-9; {config['model']}, old model "
             f"{config['teacher_epochs']} epochs, successors {config['epochs']} epochs at lr {config['lr']}, "
             f"{config['seeds']} seed(s); top-1 (%) among all 10 logits, or among the task's own (its head)",
             f"{'model':<12} " + " ".join(f"{name:>15}" for name in ANSWERS)]
    for model in result["seeds"][0]:
        cells = []
        for split in ANSWERS:
            values = [100 * seed[model][split] for seed in result["seeds"]]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.2f} ± {spread:.2f}")
        lines.append(f"{model:<12} " + " ".join(f"{cell:>15}" for cell in cells))
    return "\n".join(lines)


def main() -> None:
    """Every seed's old model and successors; results to --out/continual.json and the table."""
    args = parse_args()
    started, out = time.perf_counter(), Path(args.out)
    seeds = [run_seed(args, seed, out / f"seed{seed}") for seed in range(args.seeds)]
    result = {"command": shlex.join(["python", *sys.argv]), "commit": source_commit(),
              "config": {k: v for k, v in vars(args).items() if k != "out"}, "seeds": seeds,
              "seconds": time.perf_counter() - started}
    out.mkdir(parents=True, exist_ok=True)
    (out / "continual.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
