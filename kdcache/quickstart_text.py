"""`kdcache quickstart --text`: the mission on a language model, on CPython's bundled documentation (pydoc_data), no
download: a BPE vocabulary trained on it, a GPT teacher, its token cache (top-k, quantised), and two GPT students of
one size trained from scratch, with cross-entropy alone and distilled from the cache, compared by held-out
perplexity.

The teacher learns from the whole corpus and the students from its first quarter, the setting where distillation
is known to pay (the teacher's distributions carry what the students' share of the text does not); on the whole
corpus the cross-entropy student catches up with the distilled one at this size (README.md gives both).
"""

from __future__ import annotations

import time
from pathlib import Path

from kdcache.cache import open_cache
from kdcache.cache.token_codec import DEFAULT_K, DEFAULT_WIDTH
from kdcache.config import DistillConfig, DumpConfig, TeacherConfig
from kdcache.report import dump_summary
from kdcache.runtime import pick_device
from kdcache.stages import dump_from_config, train_teacher
from kdcache.stages.text_train import cache_text, distill_text, write_language_summary

TEXT_TEACHER, TEXT_STUDENT = "gpt:layers=4,width=256,heads=4", "gpt:layers=2,width=128,heads=4"
TEXT_TEACHER_EPOCHS, TEXT_STUDENT_EPOCHS = 6, 8
STUDENT_SHARE = 4  # the students train on the first 1/STUDENT_SHARE of the sequences the teacher saw
# AdamW with a cosine schedule, the settings small GPTs train with (nanoGPT's), for teacher and students alike
TRAINING = {"optimizer": "adamw", "schedule": "cosine", "lr": 3e-3, "weight_decay": 0.1, "lr_warmup_epochs": 0.5,
            "clip_grad": 1.0, "batch_size": 32}
DISTILL_WEIGHTS = {"ce_weight": 0.1, "distill_weight": 0.9, "temperature": 1.0}


def text_quickstart(out: Path, cache: Path, device: str) -> None:
    """The text quickstart's three stages into out and cache, and its table of held-out perplexity."""
    started = time.perf_counter()
    print(f"1/3 training teacher {TEXT_TEACHER} on pydoc_data with a BPE of 4096 tokens ({TEXT_TEACHER_EPOCHS} "
          f"epochs)")
    teacher = train_teacher(TeacherConfig(model=TEXT_TEACHER, dataset="text", epochs=TEXT_TEACHER_EPOCHS,
                                          out=str(out / "teacher"), device=device, **TRAINING))
    teacher_done = time.perf_counter()

    codec = f"top-{DEFAULT_K}, {DEFAULT_WIDTH}"
    print(f"2/3 dumping the teacher's next-token distributions ({codec}) to {cache}")
    dump = dump_from_config(DumpConfig(checkpoint=str(teacher.folder), dataset="text", out=str(cache), device=device))
    print(dump_summary(dump))
    dump_done = time.perf_counter()

    print(f"3/3 training {TEXT_STUDENT} on the first 1/{STUDENT_SHARE} of the sequences: cross-entropy alone, and "
          f"distilled from the cache (token-kl) ({TEXT_STUDENT_EPOCHS} epochs)")
    config = DistillConfig(cache=str(cache), students=(TEXT_STUDENT,), losses=("ce", "token-kl"),
                           epochs=TEXT_STUDENT_EPOCHS, out=str(out / "students"), device=device, **TRAINING,
                           **DISTILL_WEIGHTS)
    with open_cache(cache) as opened:
        data, test = cache_text(opened.spec, None, None)
        runs = distill_text(config, opened, data, test, pick_device(device),
                            samples=data.num_samples // STUDENT_SHARE)
    write_language_summary(runs, Path(config.out))
    finished = time.perf_counter()

    ce = next(run for run in runs if run.loss == "ce")
    rows = [(f"teacher ({TEXT_TEACHER})", f"held-out perplexity {teacher.test_ppl:.1f}", teacher_done - started),
            (f"cache ({codec})", f"{dump.bytes_on_disk / 2**20:.1f} MB, {dump.images_per_second:.0f} "
                                             f"sequences/s, teacher next-token top-1 {100 * dump.view_accuracy[0]:.1f}%",
             dump_done - teacher_done)]
    for run in runs:
        gain = "" if run.loss == "ce" else f" ({run.test_ppl - ce.test_ppl:+.1f} vs ce)"
        rows.append((f"student, {run.loss}", f"held-out perplexity {run.test_ppl:.1f}{gain}", run.seconds))
    print(f"\nkdcache quickstart --text: pydoc_data ({data.num_samples} train / {test.num_samples} held-out sequences "
          f"of {data.seq_len} tokens), one teacher pass, two students on a quarter of it\n")
    print(f"{'':<36} {'result':<60} {'time':>6}")
    for name, result, seconds in rows:
        print(f"{name:<36} {result:<60} {seconds:>5.0f}s")
    print(f"\ntotal {finished - started:.0f} s. Written: teacher {teacher.folder}, cache {cache}, students "
          f"{out / 'students'}/ (summary.csv, one folder per run)")
    print(f"Next: `kdcache inspect {cache}`, `kdcache verify {cache}`, or more students from the same cache:\n"
          f"  kdcache distill --cache {cache} --student gpt:layers=2,width=192,heads=4 --loss token-kl "
          f"--optimizer adamw --lr 3e-3 --schedule cosine --epochs {TEXT_STUDENT_EPOCHS}")
