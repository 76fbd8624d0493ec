"""Loss schedules: a temperature or loss weight that changes with the epoch, e.g. `--temperature 'linear(8,2)'`.

One grammar for the flags, a --config file's values and `DistillLoss(temperature=...)`:

    NUMBER                     the same value every epoch (a constant, as before)
    linear(START,END)          START at epoch 1, END at the run's last epoch E, on a straight line between:
                               START + (END - START) * (e - 1) / (E - 1)
    cosine(START,END)          START at epoch 1, END at epoch E, along half a cosine:
                               END + (START - END) * (1 + cos(pi * (e - 1) / (E - 1))) / 2
    step(V0,V1@E1,V2@E2,...)   V0 from epoch 1, V1 from epoch E1 on, V2 from epoch E2 on (1 < E1 < E2 < ... <= E)

Epochs count from 1, as kdcache's losses count them, and E is the run's --epochs (a run of one epoch has START);
step's epochs are epochs of this run, not scaled. A value is a function of the epoch the loss is given: a kdcache
run gives it the whole epoch number, so the value changes once per epoch, never within one. The text parses once
into a `Schedule`, plain data that config.yaml and a run's record hold as its text (`str(schedule)`), which parses
back to an equal Schedule; `Schedule.over(epochs)` binds it to a run's length, where the loss is made for a run.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from kdcache.errors import KdcacheError

GRAMMAR = "a number, linear(START,END), cosine(START,END) or step(V0,V1@EPOCH,...) such as step(0.1,1@20)"
KINDS = ("linear", "cosine", "step")
_CALL = re.compile(r"\s*([a-z]+)\s*\((.*)\)\s*")


@dataclass(frozen=True)
class Schedule:
    """A value per epoch: `kind` (linear, cosine, step), its `values` (linear, cosine: start and end; step: the
    value from epoch 1, then from each of `epochs_at`), and `run_epochs`, the run's length once bound (`over`)."""

    kind: str
    values: tuple[float, ...]
    epochs_at: tuple[int, ...] = ()
    run_epochs: int | None = None

    def __str__(self) -> str:
        """The schedule's text, which `parse_schedule` reads back as an equal (unbound) Schedule."""
        later = [f"{_number(value)}@{epoch}" for value, epoch in zip(self.values[1:], self.epochs_at)]
        items = [_number(self.values[0]), *later] if self.kind == "step" else map(_number, self.values)
        return f"{self.kind}({','.join(items)})"

    def over(self, epochs: int) -> Schedule:
        """This schedule for a run of `epochs` epochs; a step after the run's last epoch is refused."""
        late = [epoch for epoch in self.epochs_at if epoch > epochs]
        if late:
            raise KdcacheError(f"{self}: the step at epoch {late[0]} comes after the run's last epoch, {epochs}; give "
                               f"step epochs from 2 to {epochs}, or more --epochs")
        return replace(self, run_epochs=epochs)

    def at(self, epoch: float) -> float:
        """The value at `epoch` (counted from 1; held to 1..E)."""
        if self.run_epochs is None:
            raise KdcacheError(f"schedule {self} is not bound to a run's length: use schedule.over(epochs), as "
                               f"kdcache distill and DistillLoss(epochs=...) do")
        if self.kind == "step":
            return self.values[sum(epoch >= start for start in self.epochs_at)]
        start, end = self.values
        progress = (min(max(epoch, 1), self.run_epochs) - 1) / max(self.run_epochs - 1, 1)  # 0 at epoch 1, 1 at E
        if self.kind == "linear":
            return start + (end - start) * progress
        return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2


def parse_schedule(text: str | float | Schedule) -> float | Schedule:
    """A number or schedule text as a float or a `Schedule` (a Schedule or a number as it is); bad text is refused
    with the grammar."""
    if isinstance(text, Schedule) or (isinstance(text, (int, float)) and not isinstance(text, bool)):
        return text if isinstance(text, Schedule) else float(text)
    if not isinstance(text, str):
        raise KdcacheError(f"expected {GRAMMAR}; got {text!r}")
    try:
        return _finite(float(text), text)
    except ValueError:
        pass
    call = _CALL.fullmatch(text)
    if call is None or call[1] not in KINDS:
        raise KdcacheError(f"expected {GRAMMAR}; got {text!r}")
    kind, items = call[1], [item.strip() for item in call[2].split(",")]
    if kind != "step":
        if len(items) != 2:
            raise KdcacheError(f"{kind}(START,END) takes two numbers, the values at the first and the last epoch; "
                               f"got {text!r}")
        return Schedule(kind, tuple(_value(item, text) for item in items))
    return _step(items, text)


def bind_schedule(value: str | float | Schedule, epochs: int, flag: str) -> float | Schedule:
    """A loss field's override for a run of `epochs` epochs: a number as it is, a schedule (or its text) bound to
    the run; a mistake is one error naming `flag`."""
    try:
        found = parse_schedule(value)
        return found.over(epochs) if isinstance(found, Schedule) else found
    except KdcacheError as error:
        raise KdcacheError(f"{flag}: {error}") from None


def _step(items: list[str], text: str) -> Schedule:
    """step(V0,V1@E1,...): the values and the epochs each later value starts at, increasing from 2."""
    later = [item.partition("@") for item in items[1:]]
    if not later or "@" in items[0] or any(not at or not epoch.strip().isdigit() for _, at, epoch in later):
        raise KdcacheError(f"step(V0,V1@EPOCH,...) takes the value from epoch 1, then VALUE@EPOCH for each change "
                           f"(whole epochs counted from 1), e.g. step(0.1,1@20); got {text!r}")
    epochs = tuple(int(epoch) for _, _, epoch in later)
    if epochs[0] < 2 or any(b <= a for a, b in zip(epochs, epochs[1:])):
        raise KdcacheError(f"step's epochs must increase from 2 on (epoch 1 has V0); got {text!r}")
    return Schedule("step", (_value(items[0], text), *(_value(value, text) for value, _, _ in later)), epochs)


def _value(item: str, text: str) -> float:
    try:
        return _finite(float(item), text)
    except ValueError:
        raise KdcacheError(f"expected numbers in {GRAMMAR}; got {item!r} in {text!r}") from None


def _finite(value: float, text: str) -> float:
    if not math.isfinite(value):
        raise KdcacheError(f"expected finite numbers; got {text!r}")
    return value


def _number(value: float) -> str:
    """A value as the shortest text that reads back to it: 8 for 8.0, 0.1."""
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
