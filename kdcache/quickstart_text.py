"""`kdcache quickstart --text`: the mission on a language model, on CPython's bundled documentation (pydoc_data), no
download: a BPE vocabulary trained on it, a GPT teacher, its token cache (top-k, quantised), and two GPT students of
one size trained from scratch, with cross-entropy alone and distilled from the cache, compared by held-out
perplexity.

Teacher and students see the same sequences (the train split, 90 % of the corpus); the held-out 10 % measures
them. README.md gives what it measured.
"""

from __future__ import annotations

import time
from pathlib import Path

from kdcache.cache import open_cache
from kdcache.cache.token_codec import DEFAULT_K, DEFAULT_WIDTH
from kdcache.config import DistillConfig, DumpConfig, TeacherConfig
from kdcache.report import distill_sweep, dump_summary
from kdcache.stages import dump_from_config, train_teacher

TEXT_TEACHER, TEXT_STUDENT = "gpt:layers=4,width=256,heads=4", "gpt:layers=2,width=128,heads=4"
TEXT_TEACHER_EPOCHS, TEXT_STUDENT_EPOCHS = 6, 8
# AdamW with a cosine schedule, the settings small GPTs train with (nanoGPT's), for teacher and students alike
TRAINING = {"optimizer": "adamw", "schedule": "cosine", "lr": 3e-3, "weight_decay": 0.1, "lr_warmup_epochs": 0.5,
            "clip_grad": 1.0, "batch_size": 32}


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

    print(f"3/3 training {TEXT_STUDENT} from scratch: cross-entropy alone, and distilled from the cache (token-kl) "
          f"({TEXT_STUDENT_EPOCHS} epochs)")
    config = DistillConfig(cache=str(cache), students=(TEXT_STUDENT,), losses=("ce", "token-kl"),
                           epochs=TEXT_STUDENT_EPOCHS, out=str(out / "students"), device=device, **TRAINING)
    runs = distill_sweep(config)  # `kdcache distill --cache`: the corpus and tokenizer checked against the cache's
    finished = time.perf_counter()

    ce = next(run for run in runs if run.loss == "ce")
    rows = [(f"teacher ({TEXT_TEACHER})", f"held-out perplexity {teacher.test_ppl:.1f}", teacher_done - started),
            (f"cache ({codec})", f"{dump.bytes_on_disk / 2**20:.1f} MB, {dump.images_per_second:.0f} "
                                             f"sequences/s, teacher next-token top-1 {100 * dump.view_accuracy[0]:.1f}%",
             dump_done - teacher_done)]
    for run in runs:
        gain = "" if run.loss == "ce" else f" ({run.test_ppl - ce.test_ppl:+.1f} vs ce)"
        rows.append((f"student, {run.loss}", f"held-out perplexity {run.test_ppl:.1f}{gain}", run.seconds))
    with open_cache(cache) as opened:
        described = opened.spec.dataset
    print(f"\nkdcache quickstart --text: pydoc_data ({described['num_samples']} train sequences of "
          f"{described['seq_len']} tokens, {described['num_tokens']} next tokens; 10 % held out), one teacher pass, "
          f"two students\n")
    print(f"{'':<42} {'result':<62} {'time':>6}")
    for name, result, seconds in rows:
        print(f"{name:<42} {result:<62} {seconds:>5.0f}s")
    print(f"\ntotal {finished - started:.0f} s. Written: teacher {teacher.folder}, cache {cache}, students "
          f"{out / 'students'}/ (summary.csv, one folder per run)")
    print(f"Next: `kdcache inspect {cache}`, `kdcache verify {cache}`, or more students from the same cache:\n"
          f"  kdcache distill --cache {cache} --student gpt:layers=2,width=192,heads=4 --loss token-kl "
          f"--optimizer adamw --lr 3e-3 --schedule cosine --epochs {TEXT_STUDENT_EPOCHS}")
