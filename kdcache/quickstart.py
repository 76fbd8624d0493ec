"""`kdcache quickstart`: the whole mission on the embedded digits, no download, a few minutes on a laptop CPU."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

from kdcache.config import DistillConfig, DumpConfig, QuickstartConfig, TeacherConfig, save_config
from kdcache.report import distill_sweep, dump_summary
from kdcache.stages import dump_from_config, train_teacher
from kdcache.quickstart_text import text_quickstart
from kdcache.stages.folders import hold_free_folder

TEACHER, STUDENT = "resnet20", "resnet8"
TEACHER_EPOCHS, STUDENT_EPOCHS, VIEWS = 8, 12, 4


def run_quickstart(out: Path | None = None, cache: Path | None = None, device: str = QuickstartConfig.device,
                   text: bool = False) -> None:
    """Train a teacher on digits, dump its cache once, distil two students from it, print what each stage gave;
    in a place of its own (an earlier quickstart is kept). text: the language-model quickstart (quickstart_text)."""
    out = out or Path("runs/quickstart-text" if text else "runs/quickstart")
    cache = cache or Path("caches/quickstart-text.zarr" if text else "caches/quickstart-digits.zarr")
    with ExitStack() as held:
        place, place_cache = fresh_place(out, cache, held)
        # repeated, it takes a fresh place again
        save_config(QuickstartConfig(out=str(out), cache=str(cache), text=text, device=device), place)
        (text_quickstart if text else _quickstart)(place, place_cache, device)


def fresh_place(out: Path, cache: Path, held: ExitStack) -> tuple[Path, Path]:
    """Where this quickstart writes, held until `held` closes: out and cache, else out-2 and cache-2, ... the first
    pair where no earlier quickstart wrote (each is kept as it is, and it is said where this one goes)."""
    def numbered(number: int) -> Path:
        return cache if number == 1 else cache.with_name(f"{cache.stem}-{number}{cache.suffix}")

    def in_use(folder: Path, number: int) -> bool:
        return folder.exists() or numbered(number).exists()

    place, number = hold_free_folder(out.parent, out.name, held, in_use)
    if number > 1:
        print(f"earlier quickstarts are kept as they are ({out}, {cache}, ...): this one writes {place} and "
              f"{numbered(number)}")
    return place, numbered(number)


def _quickstart(out: Path, cache: Path, device: str) -> None:
    """The quickstart's three stages into out and cache, and its table."""
    started = time.perf_counter()
    print(f"1/3 training teacher {TEACHER} on digits ({TEACHER_EPOCHS} epochs)")
    teacher = train_teacher(TeacherConfig(model=TEACHER, dataset="digits", epochs=TEACHER_EPOCHS,
                                          out=str(out / "teacher"), device=device))
    teacher_done = time.perf_counter()

    print(f"2/3 dumping the teacher's region logits over {VIEWS} views per image to {cache}")
    dump = dump_from_config(DumpConfig(checkpoint=str(teacher.checkpoint), dataset="digits", views=VIEWS,
                                       out=str(cache), device=device))
    print(dump_summary(dump))
    dump_done = time.perf_counter()

    print(f"3/3 distilling {STUDENT} from the cache: plain cross-entropy and SDD-LSKD ({STUDENT_EPOCHS} epochs)")
    runs = distill_sweep(DistillConfig(cache=str(cache), students=(STUDENT,), losses=("ce", "sdd-lskd"),
                                       epochs=STUDENT_EPOCHS, out=str(out / "students"), device=device))
    finished = time.perf_counter()

    ce = next(r.test_acc for r in runs if r.loss == "ce")
    rows = [("teacher " + TEACHER, f"test accuracy {100 * teacher.test_acc:.2f}%", teacher_done - started),
            (f"cache ({VIEWS} views)", f"{dump.bytes_on_disk / 2**20:.1f} MB, {dump.images_per_second:.0f} img/s, "
                                      f"teacher {100 * sum(dump.view_accuracy) / len(dump.view_accuracy):.2f}% on views",
             dump_done - teacher_done)]
    for run in runs:
        gain = "" if run.loss == "ce" else f" ({100 * (run.test_acc - ce):+.2f} vs ce)"
        rows.append((f"student {run.student}, {run.loss}", f"test accuracy {100 * run.test_acc:.2f}%{gain}",
                     run.seconds))
    print("\nkdcache quickstart: digits (1438 train / 359 test images), one teacher pass, two students\n")
    print(f"{'':<28} {'result':<52} {'time':>6}")
    for name, result, seconds in rows:
        print(f"{name:<28} {result:<52} {seconds:>5.0f}s")
    print(f"\ntotal {finished - started:.0f} s. Written: teacher {teacher.checkpoint} (+ {teacher.sidecar.name}), "
          f"cache {cache}, students {out / 'students'}/ (summary.csv, summary.png, one folder per run)")
    print(f"Next: `kdcache inspect {cache}`, `kdcache verify {cache}`, or more students from the same cache:\n"
          f"  kdcache distill --cache {cache} --student resnet20 --loss kd --loss sdd-lskd --epochs {STUDENT_EPOCHS}")
