"""Born-again networks (Furlanello et al., ICML 2018): `kdcache distill --generations N`.

Generation 1 learns from the given --cache (the original teacher). Its student is then dumped as a teacher on
exactly that cache's views (`dump-teacher --views-from`), and generation 2 learns from that dump, and so on: the
generations differ only by their teacher. With `--generations-ensemble` the last generation learns from the ensemble
of every earlier generation's student (BAN's BANE), through the ensemble of several caches that `distill --cache A
--cache B` trains from (the weighted mean of their probabilities, equal weights).

Folders under --out: genG/ holds generation G's run (genG/STUDENT-LOSS, genG/summary.csv) and, but for the last
generation, its student's cache genG/student.zarr; summary.csv lists every generation's accuracy. --resume
continues: a finished generation is kept, not retrained, and a finished dump reused (a partial one resumed).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from kdcache.cache import open_cache
from kdcache.config import DistillConfig, DumpConfig
from kdcache.errors import KdcacheError
from kdcache.stages.distill import RunSummary, distill
from kdcache.stages.dump import dump_from_config

STUDENT_CACHE = "student.zarr"  # in each generation's folder: its student's logits on the first cache's views


@dataclass(frozen=True)
class Generation:
    """One generation: its number (from 1), the caches it learned from, and how its student did."""

    number: int
    teachers: tuple[str, ...]
    run: RunSummary


def generation_folder(out: str | Path, number: int) -> Path:
    """Where generation `number` (from 1) keeps its run and its student's cache."""
    return Path(out) / f"gen{number}"


def distill_generations(config: DistillConfig, show_progress: bool = True) -> list[Generation]:
    """Train config.generations generations of the one student and loss, each from its predecessor's dumped cache
    (the last from the ensemble of all earlier ones with generations_ensemble); the generations, in order."""
    check_generations(config)
    first = tuple(path for path in (config.cache, *config.extra_caches) if path)
    done: list[Generation] = []
    for number in range(1, config.generations + 1):
        teachers = first if number == 1 else _teachers(config, number)
        folder = generation_folder(config.out, number)
        weights = config.teacher_weights if number == 1 else ()  # the earlier generations weigh alike
        one = replace(config, out=str(folder), cache=teachers[0], extra_caches=teachers[1:], teacher_weights=weights,
                      generations=1, generations_ensemble=False)
        [run] = distill(one, show_progress)
        if number < config.generations:
            _dump_student(config, run, folder / STUDENT_CACHE, show_progress)
        done.append(Generation(number, teachers, run))
    return done


def _teachers(config: DistillConfig, number: int) -> tuple[str, ...]:
    """The caches generation `number` (2 and up) learns from: its predecessor's student, or for the last under
    generations_ensemble every earlier generation's student."""
    earlier = range(1, number) if config.generations_ensemble and number == config.generations else [number - 1]
    return tuple(str(generation_folder(config.out, g) / STUDENT_CACHE) for g in earlier)


def _dump_student(config: DistillConfig, run: RunSummary, out: Path, show_progress: bool) -> None:
    """Dump a generation's student as the next one's teacher, on exactly the first cache's views, at its scales,
    precision and top-k, with what the loss reads; a finished dump is reused and a partial one resumed."""
    with open_cache(config.cache) as first:
        spec = first.spec
    dump = DumpConfig(checkpoint=str(run.folder), teacher=run.student, views_from=config.cache, out=str(out),
                      data_root=config.data_root, workers=config.workers, scales=tuple(spec.scales), dtype=spec.dtype,
                      topk=spec.topk, block_size=spec.block_size, losses=(run.loss,), device=config.device,
                      max_image_pixels=config.max_image_pixels)
    dump_from_config(dump, show_progress)


def check_generations(config: DistillConfig) -> None:
    """Refuse, in one line, what a generations run cannot do: several runs, no cache to start from or a token cache,
    a --name, or an earlier generations run in --out without --resume."""
    runs = config.runs()
    if len(runs) != 1 or config.mutual:
        raise KdcacheError(f"--generations: trains one student with one loss, generation after generation; got "
                           f"{len(runs)} runs ({', '.join(f'{student}:{loss}' for student, loss in runs)}): give one "
                           f"--student and one --loss")
    if not config.cache or config.live_teacher or config.ema_teacher is not None:
        raise KdcacheError("--generations: generation 1 learns from --cache CACHE (the original teacher's), and each "
                           "later one from a cache of its predecessor; give --cache, without --live-teacher and "
                           "--ema-teacher")
    with open_cache(config.cache) as first:
        tokens = first.spec.kind == "tokens"
    if tokens:
        raise KdcacheError(f"--generations: {config.cache} is a token cache, and born-again generations are dumped as "
                           f"image caches; train a language model's generations one `distill` and one `dump-teacher "
                           f"--dataset text --checkpoint RUN` at a time")
    if config.name is not None:
        raise KdcacheError(f"--name {config.name}: a generations run names its folders OUT/gen1, OUT/gen2, ...; "
                           f"drop --name")
    earlier = generation_folder(config.out, 1)
    if earlier.exists() and not config.resume:
        raise KdcacheError(f"--generations: {config.out} holds an earlier generations run ({earlier}); continue it "
                           f"with --resume (finished generations are kept), or give another --out")

