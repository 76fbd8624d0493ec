"""`--loss NAME`: a loss's defaults (configs/losses.yaml) and the weighted, named terms of one training step.

Each pure function of `kdcache.losses.functions` that a spec can name has a terms function here,
registered under the pure function's name: it returns the loss's own terms (`kd`; DKD's `tckd` and
`nckd`; SDD's `sdd`; SLD's `teacher_swap` and `student_swap`) before weighting, and `LossSpec.compute`
weights them and adds cross-entropy (`ce`) and the `total`. metrics.csv has a column per term.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
import yaml
from torch import Tensor

from kdcache.errors import KdcacheError
from kdcache.losses.functions import (
    dkd,
    kd,
    nckd,
    sdd,
    sdd_lskd,
    sld_student_term,
    sld_switched,
    sld_teacher_term,
    standardize,
    tckd,
    upcast,
)
from kdcache.registry import Registry

TermsFunction = Callable[["LossSpec", Tensor, Tensor, Tensor, float], dict[str, Tensor]]
# the pure function a spec names -> its terms of one step, unweighted
TERMS: Registry[dict[str, Tensor]] = Registry("LossSpec(): function")
SDD_BASES = {"kd": kd, "dkd": dkd}  # the per-region losses SDD is published with
PAPER_EPOCHS = 240  # the schedule the papers' epoch counts (warm-ups, SLD's switch) refer to


def _terms(function: str, *names: str, needs: tuple[str, ...] = ()) -> Callable[[TermsFunction], TermsFunction]:
    """Register a terms function for the pure function `function`: it returns the terms `names` and reads the
    spec fields `needs`."""
    def register(entry: TermsFunction) -> TermsFunction:
        entry.term_names, entry.needs = names, needs
        return TERMS.register(entry, function)
    return register


@dataclass(frozen=True)
class LossSpec:
    """A loss and its defaults: what `--loss NAME` means. Plain values, so it can be saved with a checkpoint.

    `function` names the pure function (ce, kd, dkd, sdd, sdd_lskd, sld); `base` the per-region loss of the
    SDD ones (kd or dkd); `standardize` z-scores the logits for kd, dkd and sdd (sdd_lskd always does).
    Epochs count from 1 (the first epoch is 1), as in mdistiller's trainer.
    """

    name: str
    function: str
    paper: str
    code: str
    ce_weight: float
    distill_weight: float = 0.0
    temperature: float | None = None
    alpha: float | None = None
    beta: float | None = None
    warmup_epochs: float = 0.0
    standardize: bool = False
    base: str | None = None
    complementary_weight: float | None = None
    temperatures: tuple[float, ...] | None = None
    switch_epoch: float | None = None

    def __post_init__(self) -> None:
        call = f"LossSpec({self.name!r})"
        needed = list(TERMS.entry(self.function).needs)  # an unknown function lists the known ones
        if self.function in ("sdd", "sdd_lskd") and self.base not in SDD_BASES:
            raise KdcacheError(f"{call}: an SDD loss needs base 'kd' or 'dkd'; got {self.base!r}")
        if self.base == "dkd":
            needed += ["alpha", "beta"]
        missing = [field for field in needed if getattr(self, field) is None]
        if missing:
            raise KdcacheError(f"{call}: loss {self.function!r} needs {', '.join(missing)}")

    @property
    def uses_regions(self) -> bool:
        """Whether the loss reads every region (SDD) or only region 0, the global logit."""
        return self.function in ("sdd", "sdd_lskd")

    @property
    def standardizes(self) -> bool:
        """Whether the loss z-scores the logits (LS) before comparing them."""
        return self.standardize or self.function == "sdd_lskd"

    @property
    def term_names(self) -> tuple[str, ...]:
        """The names of the terms `compute` returns, `total` last."""
        return ("ce", *TERMS.entry(self.function).term_names, "total")

    def warmup_factor(self, epoch: float) -> float:
        """min(epoch / warm-up epochs, 1), the DKD/SDD-DKD ramp of the distillation term; 1 without warm-up."""
        return min(epoch / self.warmup_epochs, 1.0) if self.warmup_epochs > 0 else 1.0

    def __call__(self, student: Tensor, teacher: Tensor | None, labels: Tensor, epoch: float) -> Tensor:
        """The loss of one training step, to call .backward() on: `compute(...)["total"]`."""
        return self.compute(student, teacher, labels, epoch)["total"]

    def compute(self, student_regions: Tensor, teacher_regions: Tensor | None, labels: Tensor,
                epoch: float) -> dict[str, Tensor]:
        """The weighted terms of one training step: `ce`, the loss's own terms, and their `total`.

        student_regions/teacher_regions: region logits `[B, R, C]`, or logits `[B, C]` for the losses on the
        global logit (every loss but the SDD ones, `uses_regions`); labels: `[B]`; epoch: counted from 1 (pass
        the integer epoch to reproduce the papers' code exactly). CE is on the student's region 0. Non-SDD
        losses read region 0 only; SDD losses every region given. Each distillation term is weighted by
        distill_weight · warm-up factor.
        """
        call = f"LossSpec({self.name!r}).compute()"
        student_regions = self._as_regions(student_regions, "student", call)
        if teacher_regions is not None:
            teacher_regions = self._as_regions(teacher_regions, "teacher", call)
        student = upcast(student_regions)
        labels = labels.long()
        terms = {"ce": self.ce_weight * F.cross_entropy(student[:, 0], labels)}
        if self.function != "ce":
            if teacher_regions is None:
                raise KdcacheError(f"{call}: loss {self.name!r} needs teacher logits; got None")
            if teacher_regions.shape != student_regions.shape:
                raise KdcacheError(f"{call}: teacher logits {tuple(teacher_regions.shape)} and student logits "
                                   f"{tuple(student_regions.shape)} differ in shape")
            teacher = upcast(teacher_regions)
            weight = self.distill_weight * self.warmup_factor(epoch)
            own = TERMS.entry(self.function)(self, student, teacher, labels, epoch)
            terms |= {name: weight * value for name, value in own.items()}
        terms["total"] = sum(terms.values())
        return terms


    def _as_regions(self, logits: Tensor, whose: str, call: str) -> Tensor:
        """[B, R, C] region logits as they are; [B, C] logits as one region, for a loss on the global logit."""
        if logits.dim() == 2 and not self.uses_regions:
            return logits[:, None]
        if logits.dim() == 2:
            raise KdcacheError(f"{call}: loss {self.name!r} distils every region, so it needs region logits "
                               f"[B, R, C], got {whose} logits {tuple(logits.shape)}: wrap the student in "
                               f"kdcache.LogitMap(model, scales) and take the teacher's from the cache "
                               f"(CacheDataset's targets['regions'])")
        if logits.dim() != 3:
            raise KdcacheError(f"{call}: {whose} logits must be [B, C] or region logits [B, R, C]; got "
                               f"{tuple(logits.shape)}")
        return logits


@_terms("ce")
def _ce_terms(spec: LossSpec, student: Tensor, teacher: Tensor, labels: Tensor, epoch: float) -> dict[str, Tensor]:
    """Plain cross-entropy has no distillation term."""
    return {}


@_terms("kd", "kd", needs=("temperature",))
def _kd_terms(spec: LossSpec, student: Tensor, teacher: Tensor, labels: Tensor, epoch: float) -> dict[str, Tensor]:
    """KD (or KD+LS) on the global logit."""
    return {"kd": kd(student[:, 0], teacher[:, 0], spec.temperature, standardize=spec.standardize)}


@_terms("dkd", "tckd", "nckd", needs=("temperature", "alpha", "beta"))
def _dkd_terms(spec: LossSpec, student: Tensor, teacher: Tensor, labels: Tensor, epoch: float) -> dict[str, Tensor]:
    """DKD (or DKD+LS) on the global logit: α · TCKD and β · NCKD, each a mean over samples."""
    s, t = student[:, 0], teacher[:, 0]
    if spec.standardize:
        s, t = standardize(s), standardize(t)
    return {"tckd": spec.alpha * tckd(s, t, labels, spec.temperature).mean(),
            "nckd": spec.beta * nckd(s, t, labels, spec.temperature).mean()}


def _base_args(spec: LossSpec) -> dict[str, float]:
    """The arguments of an SDD loss's base (kd or dkd)."""
    return {"temperature": spec.temperature} | ({"alpha": spec.alpha, "beta": spec.beta} if spec.base == "dkd" else {})


@_terms("sdd", "sdd", needs=("temperature", "complementary_weight"))
def _sdd_terms(spec: LossSpec, student: Tensor, teacher: Tensor, labels: Tensor, epoch: float) -> dict[str, Tensor]:
    """SDD: the base loss on every region, SDD-weighted."""
    return {"sdd": sdd(student, teacher, labels, SDD_BASES[spec.base], spec.complementary_weight,
                       standardize=spec.standardize, **_base_args(spec))}


@_terms("sdd_lskd", "sdd", needs=("temperature", "complementary_weight"))
def _sdd_lskd_terms(spec: LossSpec, student: Tensor, teacher: Tensor, labels: Tensor,
                    epoch: float) -> dict[str, Tensor]:
    """SDD-LSKD: SDD with every region standardised."""
    return {"sdd": sdd_lskd(student, teacher, labels, SDD_BASES[spec.base], spec.complementary_weight,
                            **_base_args(spec))}


@_terms("sld", "teacher_swap", "student_swap",
        needs=("temperatures", "switch_epoch"))
def _sld_terms(spec: LossSpec, student: Tensor, teacher: Tensor, labels: Tensor, epoch: float) -> dict[str, Tensor]:
    """SLD on the global logit: KD from the swapped teacher, and from the swapped student once switched on."""
    s = student[:, 0]
    swapped_student = sld_student_term(s, labels, spec.temperatures) if sld_switched(epoch, spec.switch_epoch) \
        else s.sum() * 0
    return {"teacher_swap": sld_teacher_term(s, teacher[:, 0], labels, spec.temperatures),
            "student_swap": swapped_student}


@functools.cache
def _losses() -> Registry[LossSpec]:
    """The `--loss` names of configs/losses.yaml, each making its spec with any field overridden."""
    text = (importlib.resources.files("kdcache.configs") / "losses.yaml").read_text()
    losses: Registry[LossSpec] = Registry("get_loss()", sort=False)
    for name, entry in yaml.safe_load(text).items():
        unknown = sorted(set(entry) - _overridable() - {"function"})
        if unknown:
            raise KdcacheError(f"configs/losses.yaml: entry {name!r} has unknown keys {', '.join(unknown)}; "
                               f"known: {', '.join(sorted(_overridable() | {'function'}))}")
        losses.register(functools.partial(_with_overrides, LossSpec(name=name, **_tuples(entry))), name)
    return losses


def _overridable() -> set[str]:
    return {field.name for field in dataclasses.fields(LossSpec)} - {"name", "function"}


def _tuples(values: dict[str, object]) -> dict[str, object]:
    """YAML lists as the tuples the frozen spec holds."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}


def _with_overrides(spec: LossSpec, **overrides: object) -> LossSpec:
    unknown = sorted(set(overrides) - _overridable())
    if unknown:
        raise KdcacheError(f"get_loss({spec.name!r}): unknown field {', '.join(unknown)}; known: "
                           f"{', '.join(sorted(_overridable()))}")
    return dataclasses.replace(spec, **_tuples(overrides))


def scaled_loss(name: str, overrides: dict[str, float], epochs: int) -> LossSpec:
    """A loss with the flags' overrides; epoch-based defaults (warm-up, SLD's switch) scaled from 240 epochs to `epochs`."""
    default = get_loss(name)
    unused = [key for key in overrides if getattr(default, key, None) is None]
    if unused:
        raise KdcacheError(f"--{unused[0].replace('_', '-')} does not apply to loss {name!r} (it has no "
                           f"{unused[0]}); see `kdcache losses`")
    scaled = {key: getattr(default, key) * epochs / PAPER_EPOCHS for key in ("warmup_epochs", "switch_epoch")
              if key not in overrides and getattr(default, key)}
    return get_loss(name, **scaled, **overrides)


def list_losses() -> list[str]:
    """The `--loss` names, in the order of configs/losses.yaml."""
    return _losses().names()


def get_loss(name: str, **overrides: object) -> LossSpec:
    """The `LossSpec` registered as `name`, with any field replaced by `overrides` (e.g. temperature=3.0)."""
    return _losses().get(name, **overrides)
