"""Run folders: every run writes its own folder, held (the cache's kernel lock, `<folder>.lock`) for the run's life.

A new run never takes a folder holding another run, finished (model.pt) or unfinished (last.pt), nor one another
process holds: the first run of a name keeps it (resnet8-kd, where scripts and --resume find it), later ones take
the next free suffix (resnet8-kd-2, resnet8-kd-3, ...). --resume continues the latest unfinished run of a name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from kdcache.cache.lock import WriterLock
from kdcache.errors import KdcacheError

NEW, UNFINISHED, FINISHED = "new", "unfinished", "finished"


@dataclass(frozen=True)
class RunFolder:
    """A run's folder and what it held when taken: nothing (NEW), a run to resume (UNFINISHED) or a FINISHED one
    that --resume keeps as it is."""

    path: Path
    state: str
    note: str = ""  # what --resume chose, said to the user


def run_state(folder: Path) -> str:
    """What a run folder holds: a finished run (model.pt), an unfinished one (last.pt), or none (NEW)."""
    if (folder / "model.pt").exists():
        return FINISHED
    return UNFINISHED if (folder / "last.pt").exists() else NEW


def hold(folder: Path, stack: ExitStack) -> None:
    """Take the folder's lock until `stack` closes; refuse in one line naming the process that holds it."""
    stack.callback(WriterLock(folder).acquire().release)


def hold_free_folder(parent: Path, base: str, stack: ExitStack,
                     in_use: Callable[[Path, int], bool]) -> tuple[Path, int]:
    """The first of parent/base, parent/base-2, ... that no process holds and `in_use(folder, number)` does not
    claim, held until `stack` closes, and its number (1: base itself)."""
    number = 1
    while True:
        folder = parent / (base if number == 1 else f"{base}-{number}")
        with ExitStack() as attempt:
            try:
                hold(folder, attempt)
            except KdcacheError:  # another process holds it: never shared
                number += 1
                continue
            if not in_use(folder, number):
                stack.push(attempt.pop_all())
                return folder, number
        number += 1


def hold_run_folder(out: Path, base: str, name: str | None, resume: bool, stack: ExitStack) -> RunFolder:
    """The folder of the run `base` (STUDENT-LOSS) under `out`, held until `stack` closes: --name's exactly, else
    with --resume the latest unfinished run of base (or, all of them finished, the latest, kept), else a new one."""
    if name is not None:
        return _named(out / name, resume, stack, "; or give another --name")
    if resume:
        found = _latest_to_resume(out, base)
        if found is not None:
            folder = _named(found, resume, stack)
            what = "finished already: kept as it is" if folder.state == FINISHED else "continuing it"
            return RunFolder(folder.path, folder.state, f"--resume: {base}: the latest run is {found}; {what}")
    path, _ = hold_free_folder(out, base, stack, lambda folder, _: run_state(folder) != NEW)
    return RunFolder(path, NEW, f"--resume: {base}: no run to continue in {out}; starting {path}" if resume else "")


def _named(folder: Path, resume: bool, stack: ExitStack, advice: str = "") -> RunFolder:
    """A folder named exactly, held: refused (with `advice` when another process holds it) when it holds a run and
    this is no --resume of it."""
    try:
        hold(folder, stack)
    except KdcacheError as held:
        raise KdcacheError(f"{held}{advice}") from None
    state = run_state(folder)
    if state != NEW and not resume:
        raise KdcacheError(f"--name {folder.name}: {folder} holds a {state} run, which is never replaced; give "
                           f"another --name, or add --resume to continue it")
    if resume and state == FINISHED and not (folder / "last.pt").exists():
        raise KdcacheError(f"--resume: {folder} holds a finished run without its last.pt, so there is nothing to "
                           f"continue; it is kept: give another --name for a new run")
    return RunFolder(folder, state)


def _latest_to_resume(out: Path, base: str) -> Path | None:
    """The latest (highest suffix) folder of base with an unfinished run, else the latest with a finished run that
    can be reported from its last.pt; None when there is neither."""
    pattern = re.compile(re.escape(base) + r"(?:-([2-9]|[1-9]\d+))?")  # the numbers hold_free_folder gives
    found = []
    for folder in out.iterdir() if out.is_dir() else ():
        matched = pattern.fullmatch(folder.name)
        if matched and (folder / "last.pt").exists():
            found.append((run_state(folder) == UNFINISHED, int(matched.group(1) or 1), folder))
    return max(found)[2] if found else None


def run_name(student: str, loss: str) -> str:
    """A run's name and its first folder's (later runs of it take resnet8-kd-2, ...): STUDENT-LOSS, a spec's colons and slashes made underscores (timm_resnet18-kd), a
    sum's commas '+' (resnet8x4-sdd-lskd+rkd)."""
    return re.sub(r"[^\w.+=-]", "_", f"{student}-{loss.replace(',', '+')}")
