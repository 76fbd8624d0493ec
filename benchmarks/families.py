"""Every family from one cache (issue 18): feature- and relation-based students, and a two-teacher ensemble, trained
from caches against cross-entropy and SDD-LSKD, on the same student, schedule and seeds.

Teacher A (fidelity.py's: resnet20 trained here, or --checkpoint) is dumped with K views as fidelity.py dumps it
(region logits only: the SDD-LSKD rows equal fidelity.py's K = 16 rows), then again on exactly those views
(`--views-from`) with every output the feature and relation losses read (embedding, every stage's attention map,
the middle stage's hint); teacher B (a second resnet20, seed 1, or --second-checkpoint) is dumped on the same
views too. Every method trains the same student for every seed. Writes families.json and a table.

Issue 19's methods (not run by default) are the same student under other recipes and views: AdamW + cosine
against the papers' SGD, SDD-LSKD from caches of mixup, CutMix and RandAugment views of teacher A (K views each,
drawn with the same seed), and SLD on one view or two views per step.

Issue 34's methods (not run by default; FIDELITY.md's section on them gives the commands it ran) set the rest of
the seeds' families beside `kd` and `sdd-lskd`:
- `crd`, `irg`: from the cached embedding (CRD's negatives: other samples' embeddings of the view held);
- `kd-temperature-schedule`: KD with T falling linearly from 8 to 2 (`--temperature 'linear(8,2)'`, the KD
  tutorial's progressive distillation);
- `kd-adversarial`: KD plus a discriminator's term (`--loss kd,adversarial`);
- `kd-qat-int8`, `sdd-lskd-qat-int8`: `--qat int8`, the row's accuracy the fake-quantised student's and `int8 last`
  the int8 model's converted from it at the last epoch (on the CPU);
- `ce-16px`, `sdd-lskd-16px`: the student at 16 px, fresh views or teacher A's 32 px cache (cross-resolution);
- `ce-vit`, `deit-hard`, `deit-soft`: their own student, VIT (a 4-block distilled ViT at 32 px, not --student),
  with AdamW, evaluated on the mean of its two heads;
- `born-again`, `born-again-ensemble`: 3 generations of KD students, each later one from a cache of its
  predecessor dumped on the same views (the ensemble form: generation 3 from generations 1 and 2), a row each.

    python benchmarks/families.py                 # digits on the CPU: both teachers trained here
    python benchmarks/families.py --methods ce,ce-adamw,sdd-lskd,sdd-lskd-adamw,sdd-lskd-mixup,sdd-lskd-cutmix,\
        sdd-lskd-randaugment,sld,sld-two-views --out runs/recipes    # issue 19's rows
    python benchmarks/families.py --methods ce,kd,sdd-lskd,crd,irg,kd-temperature-schedule,kd-adversarial,\
        kd-qat-int8,ce-16px,sdd-lskd-16px,ce-vit,deit-hard,deit-soft --out runs/families34   # issue 34's rows
    python benchmarks/families.py --seeds 1 --methods sdd-lskd,born-again,born-again-ensemble --out runs/born-again
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from fidelity import _pm, aggregate, environment, prepare_teacher  # fidelity's teacher, environment and statistics
from kdcache.config import DistillConfig, DumpConfig, TeacherConfig
from kdcache.runtime import pick_device
from kdcache.schedules import parse_schedule
from kdcache.stages import distill, train_teacher
from kdcache.stages.dump import dump_from_config
from kdcache.stages.generations import distill_generations

# the recipe options of the AdamW rows (issue 19): timm's usual AdamW with a cosine schedule, nothing tuned here
ADAMW = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "schedule": "cosine", "lr_warmup_epochs": 2}
# issue 34's student: a distilled ViT (class and distillation tokens) at digits' 32 px, 16 patches of 8 px
VIT = "timm:deit_tiny_distilled_patch16_224,img_size=32,patch_size=8,embed_dim=64,depth=4,num_heads=2"
# method -> (label, losses, caches, options): caches name CACHES; options go to the student's config, and "student"
# names a method's own student in place of --student
METHODS = {
    "ce": ("cross-entropy (fresh views)", None, (), {}),
    "sdd-lskd": ("SDD-LSKD, teacher A", "sdd-lskd", ("a",), {}),
    "fitnet": ("FitNet (hint: middle stage), teacher A", "fitnet", ("features",), {}),
    "at": ("AT (every stage), teacher A", "at", ("features",), {}),
    "sp": ("SP (embedding), teacher A", "sp", ("features",), {}),
    "rkd": ("RKD (embedding), teacher A", "rkd", ("features",), {}),
    "sdd-lskd-b": ("SDD-LSKD, teacher B", "sdd-lskd", ("b",), {}),
    "ensemble": ("SDD-LSKD, ensemble of A and B (equal weights)", "sdd-lskd", ("a", "b"), {}),
    # issue 19: recipes, and views beyond crop and flip
    "ce-adamw": ("cross-entropy (fresh views), AdamW + cosine", None, (), ADAMW),
    "sdd-lskd-adamw": ("SDD-LSKD, teacher A, AdamW + cosine", "sdd-lskd", ("a",), ADAMW),
    "sdd-lskd-mixup": ("SDD-LSKD, teacher A's mixup cache", "sdd-lskd", ("mixup",), {}),
    "sdd-lskd-cutmix": ("SDD-LSKD, teacher A's CutMix cache", "sdd-lskd", ("cutmix",), {}),
    "sdd-lskd-randaugment": ("SDD-LSKD, teacher A's RandAugment cache", "sdd-lskd", ("randaugment",), {}),
    "sld": ("SLD, teacher A, one view per step", "sld", ("a",), {}),
    "sld-two-views": ("SLD, teacher A, two views per step", "sld", ("a",), {"views_per_step": 2}),
    # issue 34: adversarial KD beside plain KD from the same cache
    "kd": ("KD, teacher A", "kd", ("a",), {}),
    "kd-adversarial": ("KD + adversarial (discriminator), teacher A", "kd,adversarial", ("a",), {}),
    # issue 34: cross-resolution, the student at 16 px from teacher A's 32 px cache, beside cross-entropy at 16 px.
    # Digits are 8x8 scans upsampled to 32, so 16 px keeps every detail the teacher saw: these rows show the path
    # and a smaller student's accuracy from the larger views, not a gain from privileged resolution
    "ce-16px": ("cross-entropy (fresh views), 16 px", None, (), {"image_size": 16}),
    "sdd-lskd-16px": ("SDD-LSKD, teacher A's 32 px views at 16 px", "sdd-lskd", ("a",), {"image_size": 16}),
    # issue 34.5: loss schedules, beside plain KD (T 4) on the same cache
    "kd-temperature-schedule": ("KD, T linear 8 to 2 (progressive), teacher A", "kd", ("a",),
                                {"temperature": parse_schedule("linear(8,2)")}),
    # issue 34: DeiT's distillation token, on its own student (VIT, not --student) trained as ViTs are, with AdamW
    "ce-vit": ("cross-entropy (fresh views), distilled ViT, AdamW", None, (), {"student": VIT, **ADAMW}),
    "deit-hard": ("DeiT hard-label, teacher A, distilled ViT, AdamW", "deit-hard", ("a",), {"student": VIT, **ADAMW}),
    "deit-soft": ("DeiT soft (τ 3), teacher A, distilled ViT, AdamW", "deit-soft", ("a",), {"student": VIT, **ADAMW}),
    # issue 34: quantisation-aware students, the fake-quantised accuracy in the row, the int8 model's beside it
    "kd-qat-int8": ("KD, teacher A, --qat int8", "kd", ("a",), {"qat": "int8"}),
    "sdd-lskd-qat-int8": ("SDD-LSKD, teacher A, --qat int8", "sdd-lskd", ("a",), {"qat": "int8"}),
    # issue 34: from the cached embedding (CRD's negatives: other samples' embeddings of the view held)
    "crd": ("CRD (embedding, negatives: the cache), teacher A", "crd", ("features",), {}),
    "irg": ("IRG (embedding: vertex and edge), teacher A", "irg", ("features",), {}),
    # issue 34: born-again networks, each generation's accuracy a row of its own; the method's is the last one's
    "born-again": ("born-again (KD), 3 generations from teacher A", "kd", ("a",), {"generations": 3}),
    "born-again-ensemble": ("born-again (KD), gen 3 from gens 1-2's ensemble", "kd", ("a",),
                            {"generations": 3, "generations_ensemble": True}),
}
# cache -> (teacher, dump options): "a" comes first, the others read its views or draw their own K views
CACHES = {
    "a": ("a", {}),
    "features": ("a", {"views_from": "a", "outputs": "embedding,attention,hint"}),
    "b": ("b", {"views_from": "a"}),
    "mixup": ("a", {"mix": "mixup", "mix_alpha": 0.8}),  # timm's mixup α
    "cutmix": ("a", {"mix": "cutmix", "mix_alpha": 1.0}),  # timm's CutMix α
    "randaugment": ("a", {"augmentation": "randaugment"}),  # torchvision's RandAugment(2, 9)
}
DEFAULT_METHODS = ("ce", "sdd-lskd", "fitnet", "at", "sp", "rkd", "sdd-lskd-b", "ensemble")  # issue 18's run
QUICK = {"teacher_epochs": 1, "epochs": 1, "seeds": 2, "views": 1, "dataset": "digits_quick"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="teacher A's weights (default: a resnet20 trained here)")
    parser.add_argument("--second-checkpoint", help="teacher B's weights (default: a resnet20 trained here, seed 1)")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--views", type=int, default=16, help="views per sample of both caches")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated, of " + ", ".join(METHODS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/families")
    parser.add_argument("--quick", action="store_true", help="a tiny run that checks the pipeline: " + str(QUICK))
    args = parser.parse_args(argv)
    args.dataset, args.data_root, args.teacher = "digits", None, None  # what fidelity.prepare_teacher reads
    if args.quick:  # digits_quick: registered by importing fidelity
        vars(args).update(QUICK)
    args.methods = args.methods.split(",")
    return args


def main() -> None:
    """Both teachers and their caches, then every method for every seed; results to --out."""
    args = parse_args()
    started, out = time.perf_counter(), Path(args.out)
    device = pick_device(args.device)
    result: dict[str, Any] = {"command": shlex.join(["python", *sys.argv]), "environment": environment(device),
                              "config": {k: v for k, v in vars(args).items() if k != "out"}}
    needed = ["a", *dict.fromkeys(name for method in args.methods for name in METHODS[method][2] if name != "a")]
    teachers = {"a": prepare_teacher(args, out)}
    if any(CACHES[name][0] == "b" for name in needed):
        teachers["b"] = second_teacher(args, out)
    result["teachers"] = teachers
    result["caches"] = caches = dump_caches(args, teachers, out, needed)
    methods = {name: {"label": METHODS[name][0], "runs": []} for name in args.methods}
    for seed in range(args.seeds):  # seeds outermost, so a busy machine slows every method alike
        for name, method in methods.items():
            run = train(args, name, seed, caches, out / "runs" / f"seed{seed}" / name)
            method["runs"].append(run)
            print(f"seed {seed} {name:<12} last {run['last']:.4f}  best {run['best']:.4f}  {run['seconds']:.0f} s",
                  flush=True)
    for method in methods.values():
        method.update(aggregate(method["runs"]))
        method["correct_last"] = [round(run["last"] * run["test_size"]) for run in method["runs"]]
        if "last_int8" in method["runs"][0]:  # a --qat method's int8 model, converted at the last epoch
            int8 = [run["last_int8"] for run in method["runs"]]
            method.update(last_int8_mean=statistics.fmean(int8),
                          last_int8_std=statistics.stdev(int8) if len(int8) > 1 else math.nan)
        if "generations" in method["runs"][0]:  # born-again: each generation over the seeds
            method["generations"] = [aggregate(list(runs)) for runs in zip(*(run["generations"]
                                                                              for run in method["runs"]))]
    result["methods"], result["seconds"] = methods, time.perf_counter() - started
    (out / "families.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def second_teacher(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Teacher B: --second-checkpoint, or fidelity's teacher recipe trained from seed 1."""
    if args.second_checkpoint:
        return prepare_teacher(argparse.Namespace(**{**vars(args), "checkpoint": args.second_checkpoint}), out)
    started = time.perf_counter()
    checkpoint = train_teacher(TeacherConfig(model="resnet20", dataset=args.dataset, epochs=args.teacher_epochs,
                                             seed=1, out=str(out / "teacher_b"), device=args.device),
                               show_progress=False).checkpoint
    teacher = prepare_teacher(argparse.Namespace(**{**vars(args), "checkpoint": str(checkpoint)}), out)
    return {**teacher, "seconds": time.perf_counter() - started}


def dump_caches(args: argparse.Namespace, teachers: dict[str, Any], out: Path,
                names: list[str]) -> dict[str, dict[str, Any]]:
    """The caches of CACHES that the methods read, "a" (teacher A's logits of K views) first."""
    caches = {}
    for name in names:
        teacher, options = CACHES[name]
        path = out / "caches" / f"{name}.zarr"
        options = {**options, "views_from": caches["a"]["path"]} if "views_from" in options else \
            {**options, "views": args.views}
        dumped = dump_from_config(DumpConfig(checkpoint=teachers[teacher]["checkpoint"], dataset=args.dataset,
                                             out=str(path), overwrite=True, device=args.device, **options),
                                  show_progress=False)
        caches[name] = {"path": str(path), "seconds": dumped.seconds, "bytes": dumped.bytes_on_disk,
                        "teacher_view_acc": statistics.fmean(dumped.view_accuracy)}
        print(f"cache {name}: {dumped.bytes_on_disk / 2**20:.1f} MB in {dumped.seconds:.1f} s", flush=True)
    return caches


def train(args: argparse.Namespace, method: str, seed: int, caches: dict[str, Any], folder: Path) -> dict[str, Any]:
    """One student of one method and seed: its last and best test accuracy and wall time."""
    _, loss, sources, options = METHODS[method]
    student, options = options.get("student", args.student), {k: v for k, v in options.items() if k != "student"}
    schedule = {"epochs": args.epochs, "seed": seed, "device": args.device, **options}
    started = time.perf_counter()
    if loss is None:  # teacher training is exactly plain cross-entropy on fresh views
        run_folder = train_teacher(TeacherConfig(model=student, dataset=args.dataset, out=str(folder),
                                                 **schedule), show_progress=False).checkpoint.parent
    else:
        paths = [caches[source]["path"] for source in sources]
        config = DistillConfig(students=(student,), losses=(loss,), cache=paths[0], extra_caches=tuple(paths[1:]),
                               out=str(folder), **schedule)
        if config.generations > 1:  # born-again: a rerun replaces this method's generations (they refuse a used --out)
            shutil.rmtree(folder, ignore_errors=True)
            runs = [generation.run for generation in distill_generations(config, show_progress=False)]
        else:
            runs = distill(config, show_progress=False)
        run_folder = runs[-1].folder
    seconds = time.perf_counter() - started
    from kdcache.data import load_dataset

    found = {"seed": seed, "student": student, **curve(run_folder), "seconds": seconds,
             "test_size": len(load_dataset(args.dataset, None, "test").labels)}
    if loss is not None and len(runs) > 1:  # every generation's own, for its row
        found["generations"] = [{**curve(run.folder), "seconds": run.seconds} for run in runs]
    return found


def curve(run_folder: Path) -> dict[str, float]:
    """A run's last and best test accuracy and the best one's epoch, from its metrics.csv; a --qat run's int8
    model's accuracy (converted at the last epoch) too."""
    with open(run_folder / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    accuracy = [float(row["test_acc"]) for row in rows]
    int8 = {"last_int8": float(rows[-1]["test_acc_int8"])} if rows[-1].get("test_acc_int8") else {}
    return {"last": accuracy[-1], "best": max(accuracy), "best_epoch": accuracy.index(max(accuracy)) + 1, **int8}


def table(result: dict[str, Any], title: str = "families") -> str:
    """The printed results: teachers, caches, then one row per method."""
    config = result["config"]
    lines = [f"{title}: {config['dataset']}, student {config['student']}, {config['epochs']} epochs, seeds "
             f"0..{config['seeds'] - 1}, {config['views']} cached views, device {result['environment']['device']}"]
    for name, teacher in result["teachers"].items():
        lines.append(f"teacher {name.upper()} {teacher['arch']}: test {100 * teacher['test_acc']:.2f}%")
    for name, cache in result["caches"].items():
        lines.append(f"cache {name}: {cache['bytes'] / 2**20:.1f} MB, dumped in {cache['seconds']:.1f} s, teacher "
                     f"{100 * cache['teacher_view_acc']:.2f}% on its views")
    lines += ["", f"{'method':<48} {'last (%)':>15} {'best (%)':>15}  correct (last)  {'wall s/run':>10}"]
    for method in result["methods"].values():
        lines.append(f"{method['label']:<48} {_pm(method, 'last', 100, 2):>15} {_pm(method, 'best', 100, 2):>15}  "
                     f"{', '.join(map(str, method['correct_last'])):>14}  {method['seconds_mean']:>10.1f}"
                     + (f"  int8 last {_pm(method, 'last_int8', 100, 2)}" if "last_int8_mean" in method else ""))
        for number, generation in enumerate(method.get("generations", []), start=1):
            lines.append(f"{f'  generation {number}':<48} {_pm(generation, 'last', 100, 2):>15} "
                         f"{_pm(generation, 'best', 100, 2):>15}  {'':>14}  {generation['seconds_mean']:>10.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
