"""`--loss NAME`: a loss's defaults (configs/losses.yaml) and the weighted, named terms of one training step.

Each pure function of `kdcache.losses.functions` and `kdcache.losses.features` that a spec can name has a
terms function here, registered under the pure function's name: it returns the loss's own terms (`kd`; DKD's
`tckd` and `nckd`; SDD's `sdd`; SLD's `teacher_swap` and `student_swap`; `fitnet`, `at`, `sp`, RKD's
`rkd_distance` and `rkd_angle`; CRD's `crd`; IRG's `irg_vertex` and `irg_edge`; DeiT's `deit`; adversarial's `adv`;
CLIP's `zero_shot_kd` and `embedding_cos`)
before weighting, and `LossSpec.compute` weights them and adds cross-entropy (`ce`) and the `total`. metrics.csv has
a column per term.

A terms function reads the model outputs it needs (kdcache.models.outputs) from two dicts, the student's and
the teacher's: `regions` for the logit losses; `embedding`, `attention/<stage>`, `hint/<stage>` for the feature
and relation ones, which sum their term over every teacher output of their kind (`embedding`, `embedding#1`:
two teachers); DeiT's read the student's `distillation` head, which only the student has. `--loss a,b` is a
`LossSum`: the terms of both, cross-entropy once.
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
from kdcache.losses.adversarial import VERDICT, adversarial_loss
from kdcache.losses.dense import cwd, pixel_kd
from kdcache.losses.features import at, crd, embedding_cosine, fitnet, irg_edge, irg_vertex, rkd_angle, rkd_distance, \
    sp
from kdcache.losses.functions import (
    deit_hard_distillation,
    dkd,
    dml,
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
from kdcache.models.outputs import DISTILLATION
from kdcache.registry import Registry
from kdcache.schedules import Schedule, bind_schedule
from kdcache.tensors import head_output, negatives_output

Outputs = dict[str, Tensor]  # a model's outputs by name: regions [B, R, C], embedding [B, D], ...
TermsFunction = Callable[["LossSpec", Outputs, Outputs, Tensor, float], dict[str, Tensor]]
# the pure function a spec names -> its terms of one step, unweighted
TERMS: Registry[dict[str, Tensor]] = Registry("LossSpec(): function")
SDD_BASES = {"kd": kd, "dkd": dkd}  # the per-region losses SDD is published with
PEERS = "peers"  # the teacher-side name of deep mutual learning's peer logits [P, B, C]
PAPER_EPOCHS = 240  # the schedule the papers' epoch counts (warm-ups, SLD's switch) refer to
SCHEDULED = ("temperature", "ce_weight", "distill_weight", "alpha", "beta")  # the fields a Schedule may set
# the learned heads on the embedding a loss reads, by its function: the spec field giving their output dimension
# (None: the teacher's), whether the teacher's embedding has one too, and whether the student's has one even where
# its dimension is the teacher's (IRG's only projects where they differ)
EMBEDDING_HEADS = {"crd": ("embed_dim", True, True), "irg": (None, False, False), "clip": (None, False, True)}
EmbeddingHead = tuple[str, int | None, bool, bool]  # LossSpec.heads: (loss, dimension or None, teacher side, always)
# segmentation's: the name of a model's per-pixel logits [B, C, H, W] among its outputs (the teacher's at the
# cache's output stride), and the pure functions that read them (a segmentation student's losses, beside ce)
LOGIT_MAP = "logit_map"
DENSE_FUNCTIONS = ("pixel_kd", "cwd")


def _terms(function: str, *names: str, needs: tuple[str, ...] = (), reads: str = "regions",
           student_reads: tuple[str, ...] = ()) -> Callable[[TermsFunction], TermsFunction]:
    """Register a terms function for the pure function `function`: it returns the terms `names`, reads the
    spec fields `needs`, the teacher's outputs of kind `reads` (regions, embedding, attention, hint), and the
    student-only outputs `student_reads` (DeiT's `distillation`, which no teacher or cache has)."""
    def register(entry: TermsFunction) -> TermsFunction:
        entry.term_names, entry.needs, entry.reads, entry.student_reads = names, needs, reads, student_reads
        return TERMS.register(entry, function)
    return register


@dataclass(frozen=True)
class LossSpec:
    """A loss and its defaults: what `--loss NAME` means. Plain values, so it can be saved with a checkpoint.

    `function` names the pure function (ce, kd, dkd, sdd, sdd_lskd, sld); `base` the per-region loss of the
    SDD ones (kd or dkd); `standardize` z-scores the logits for kd, dkd and sdd (sdd_lskd always does).
    Epochs count from 1 (the first epoch is 1), as in mdistiller's trainer. The fields of SCHEDULED may hold a
    `Schedule` bound to the run's epochs (kdcache.schedules): `at(epoch)` is the spec of plain numbers for an epoch.
    """

    name: str
    function: str
    paper: str
    code: str
    ce_weight: float | Schedule
    distill_weight: float | Schedule = 0.0
    temperature: float | Schedule | None = None
    alpha: float | Schedule | None = None
    beta: float | Schedule | None = None
    warmup_epochs: float = 0.0
    standardize: bool = False
    base: str | None = None
    complementary_weight: float | None = None
    temperatures: tuple[float, ...] | None = None
    switch_epoch: float | None = None
    distance_weight: float | None = None
    angle_weight: float | None = None
    label_smoothing: float = 0.0  # of the cross-entropy term (a training recipe's option, --label-smoothing)
    detach_swapped_student: bool = False  # SLD: the official code lets gradient through the swapped student
    discriminator_lr: float | None = None  # adversarial: the discriminator's Adam learning rate
    discriminator_width: int | None = None  # adversarial: the discriminator's hidden width
    negatives: int | None = None  # CRD: K, the other samples' cached embeddings contrasted per sample
    embed_dim: int | None = None  # CRD: the dimension both projection heads map the embeddings to
    vertex_weight: float | None = None  # IRG
    edge_weight: float | None = None  # IRG
    embedding_weight: float | None = None  # CLIP: the cosine embedding term's weight (the zero-shot KD term's is 1)
    # --kd-classes: the distillation term reads these classes' logits alone, the teacher's and the student's (LwF's
    # old classes); () reads every class. The cross-entropy reads every class either way.
    kd_classes: tuple[int, ...] = ()

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
        # a schedule's values need the run's length: its text, or a Schedule not bound to one, is refused here
        unbound = [field for field in SCHEDULED if isinstance(getattr(self, field), str)
                   or getattr(getattr(self, field), "run_epochs", 0) is None]
        if unbound:
            raise KdcacheError(f"{call}: {unbound[0]} {getattr(self, unbound[0])} needs the run's epochs: give the "
                               f"text to scaled_loss(name, overrides, epochs) or DistillLoss(epochs=...), or "
                               f"parse_schedule(text).over(epochs)")
        if self.kd_classes and self.function != "kd":
            raise KdcacheError(f"--kd-classes: restricts the kd loss's logits (Learning without Forgetting's KD on "
                               f"the old classes); loss {self.name!r} ({self.function}) reads labels, regions or "
                               f"features over every class: use --loss kd, or drop --kd-classes")

    def at(self, epoch: float) -> LossSpec:
        """This loss at `epoch` (from 1): each scheduled field at its value then, the others as they are."""
        values = {field: getattr(self, field).at(epoch) for field in SCHEDULED
                  if isinstance(getattr(self, field), Schedule)}
        return dataclasses.replace(self, **values) if values else self

    def settings(self, epoch: float) -> dict[str, float]:
        """The temperature and weights the loss has at `epoch`, by field name (metrics.csv's columns)."""
        now = self.at(epoch)
        return {field: getattr(now, field) for field in SCHEDULED if getattr(now, field) is not None}

    @property
    def needs(self) -> tuple[str, ...]:
        """The teacher outputs besides region logits the loss reads (embedding, attention, hint): none for logit
        losses."""
        reads = TERMS.entry(self.function).reads
        return () if reads == "regions" else (reads,)

    @property
    def student_outputs(self) -> tuple[str, ...]:
        """The outputs only the student gives that the loss reads (DeiT's `distillation`): none for most losses."""
        return TERMS.entry(self.function).student_reads

    @property
    def heads(self) -> tuple[EmbeddingHead, ...]:
        """The learned heads on the embedding the loss reads, trained with the student: (the loss's name for
        them, their output dimension or None for the teacher's, whether the teacher's embedding has one too,
        whether the student's has one where its dimension is already the teacher's)."""
        if self.function not in EMBEDDING_HEADS:
            return ()
        field, teacher_side, always = EMBEDDING_HEADS[self.function]
        return ((self.function, getattr(self, field) if field else None, teacher_side, always),)

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

    def __call__(self, student: Tensor | Outputs, teacher: Tensor | Outputs | None, labels: Tensor,
                 epoch: float) -> Tensor:
        """The loss of one training step, to call .backward() on: `compute(...)["total"]`."""
        return self.compute(student, teacher, labels, epoch)["total"]

    def compute(self, student: Tensor | Outputs, teacher: Tensor | Outputs | None, labels: Tensor,
                epoch: float) -> dict[str, Tensor]:
        """The weighted terms of one training step: `ce`, the loss's own terms, and their `total`.

        student/teacher: region logits `[B, R, C]`, or logits `[B, C]` for the losses on the global logit
        (every loss but the SDD ones, `uses_regions`), or a dict of outputs holding them as `regions` (and, for
        the feature and relation losses, the outputs they read); labels: `[B]`, or mixed labels `[B, C]` (mixup,
        CutMix: the cross-entropy takes them whole, a loss's own terms the class of the larger weight); epoch:
        counted from 1 (pass the integer epoch to reproduce the papers' code exactly). CE is on the student's
        region 0. Non-SDD logit
        losses read region 0 only; SDD losses every region given. Each distillation term is weighted by
        distill_weight · warm-up factor. A scheduled field takes its value at `epoch` (`at`).
        """
        spec = self.at(epoch)
        terms = {"ce": spec.ce_term(student, labels)}
        if spec.function != "ce":
            terms |= spec.distillation_terms(student, teacher, labels, epoch)
        terms["total"] = sum(terms.values())
        return terms

    def ce_term(self, student: Tensor | Outputs, labels: Tensor) -> Tensor:
        """ce_weight · cross-entropy of the student's global logit (with label_smoothing)."""
        regions = self._as_regions(_outputs(student)["regions"], "student", f"LossSpec({self.name!r}).compute()")
        target = labels.float() if labels.is_floating_point() else labels.long()  # mixed labels [B, C], or [B]
        return self.ce_weight * F.cross_entropy(upcast(regions)[:, 0], target, label_smoothing=self.label_smoothing)

    def distillation_terms(self, student: Tensor | Outputs, teacher: Tensor | Outputs | None, labels: Tensor,
                           epoch: float) -> dict[str, Tensor]:
        """The loss's own terms, each weighted by distill_weight · warm-up factor."""
        call = f"LossSpec({self.name!r}).compute()"
        if teacher is None:
            raise KdcacheError(f"{call}: loss {self.name!r} needs the teacher's outputs; got None")
        student, teacher = dict(_outputs(student)), dict(_outputs(teacher))
        if not self.needs:
            student["regions"] = upcast(self._as_regions(student["regions"], "student", call))
        if not self.needs and "regions" in teacher:  # deep mutual learning without a teacher reads only its peers
            teacher["regions"] = upcast(self._as_regions(teacher["regions"], "teacher", call))
            if teacher["regions"].shape != student["regions"].shape:
                raise KdcacheError(f"{call}: teacher logits {tuple(teacher['regions'].shape)} and student logits "
                                   f"{tuple(student['regions'].shape)} differ in shape")
        if self.kd_classes:
            student["regions"], teacher["regions"] = (kept_classes(logits, self.kd_classes, call)
                                                      for logits in (student["regions"], teacher["regions"]))
        weight = self.distill_weight * self.warmup_factor(epoch)
        own = TERMS.entry(self.function)(self, student, teacher, class_labels(labels), epoch)
        return {name: weight * value for name, value in own.items()}


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
    return {"kd": kd(student["regions"][:, 0], teacher["regions"][:, 0], spec.temperature,
                     standardize=spec.standardize)}


@_terms("dkd", "tckd", "nckd", needs=("temperature", "alpha", "beta"))
def _dkd_terms(spec: LossSpec, student: Tensor, teacher: Tensor, labels: Tensor, epoch: float) -> dict[str, Tensor]:
    """DKD (or DKD+LS) on the global logit: α · TCKD and β · NCKD, each a mean over samples."""
    s, t = student["regions"][:, 0], teacher["regions"][:, 0]
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
    return {"sdd": sdd(student["regions"], teacher["regions"], labels, SDD_BASES[spec.base], spec.complementary_weight,
                       standardize=spec.standardize, **_base_args(spec))}


@_terms("sdd_lskd", "sdd", needs=("temperature", "complementary_weight"))
def _sdd_lskd_terms(spec: LossSpec, student: Tensor, teacher: Tensor, labels: Tensor,
                    epoch: float) -> dict[str, Tensor]:
    """SDD-LSKD: SDD with every region standardised."""
    return {"sdd": sdd_lskd(student["regions"], teacher["regions"], labels, SDD_BASES[spec.base],
                            spec.complementary_weight,
                            **_base_args(spec))}


@_terms("sld", "teacher_swap", "student_swap",
        needs=("temperatures", "switch_epoch"))
def _sld_terms(spec: LossSpec, student: Tensor, teacher: Tensor, labels: Tensor, epoch: float) -> dict[str, Tensor]:
    """SLD on the global logit: KD from the swapped teacher, and from the swapped student once switched on."""
    s = student["regions"][:, 0]
    swapped_student = sld_student_term(s, labels, spec.temperatures, spec.detach_swapped_student) \
        if sld_switched(epoch, spec.switch_epoch) else s.sum() * 0
    return {"teacher_swap": sld_teacher_term(s, teacher["regions"][:, 0], labels, spec.temperatures),
            "student_swap": swapped_student}


def _distillation_head(spec: LossSpec, student: Outputs) -> Tensor:
    """The student's distillation-head logits [B, C], refused in one line when the student gave none."""
    if DISTILLATION not in student:
        raise KdcacheError(f"loss {spec.name!r} trains a distillation head, and the student's outputs hold only "
                           f"{', '.join(student)}: give it {DISTILLATION!r} [B, C] beside 'regions' "
                           f"(kdcache.ModelOutputs(model, (1,), ['{DISTILLATION}']) of a timm *_distilled_* model "
                           f"gives both)")
    return student[DISTILLATION]


@_terms("deit_hard", "deit", student_reads=(DISTILLATION,))
def _deit_hard_terms(spec: LossSpec, student: Outputs, teacher: Outputs, labels: Tensor,
                     epoch: float) -> dict[str, Tensor]:
    """DeiT hard-label: the distillation head's cross-entropy on the teacher's argmax (region 0)."""
    return {"deit": deit_hard_distillation(_distillation_head(spec, student), teacher["regions"][:, 0])}


@_terms("deit_soft", "deit", needs=("temperature",), student_reads=(DISTILLATION,))
def _deit_soft_terms(spec: LossSpec, student: Outputs, teacher: Outputs, labels: Tensor,
                     epoch: float) -> dict[str, Tensor]:
    """DeiT soft: τ² KL from the teacher's softened region 0 to the distillation head's."""
    return {"deit": kd(_distillation_head(spec, student), teacher["regions"][:, 0], spec.temperature)}


def teacher_outputs(teacher: Outputs, kind: str, call: str) -> list[str]:
    """The names of the teacher's outputs of a kind (one per teacher and stage), refusing none."""
    names = [name for name in teacher if name.split("#", 1)[0].split("/", 1)[0] == kind]
    if not names:
        raise KdcacheError(f"{call}: needs the teacher's {kind} outputs, found only {', '.join(teacher)}: dump the "
                           f"teacher with `kdcache dump-teacher --outputs regions,{kind}`")
    return names


@_terms("dml", "mutual", needs=("temperature",))
def _dml_terms(spec: LossSpec, student: Tensor, teacher: Tensor, labels: Tensor, epoch: float) -> dict[str, Tensor]:
    """Deep mutual learning: KL from the mean of the peer students' softened predictions, on the global logit."""
    if PEERS not in teacher:
        raise KdcacheError(f"loss {spec.name!r} learns from peer students, and none were given: train two or more "
                           f"students together with `kdcache distill --mutual --student A --student B`")
    return {"mutual": dml(student["regions"][:, 0], teacher[PEERS], spec.temperature).mean()}


@_terms("fitnet", "fitnet", reads="hint")
def _fitnet_terms(spec: LossSpec, student: Outputs, teacher: Outputs, labels: Tensor, epoch: float) -> dict[str, Tensor]:
    """FitNet: the hint loss of each teacher's hint and the student's regressed stage, summed."""
    return {"fitnet": sum(fitnet(student[name], teacher[name]) for name in teacher_outputs(teacher, "hint", "fitnet"))}


@_terms("at", "at", reads="attention")
def _at_terms(spec: LossSpec, student: Outputs, teacher: Outputs, labels: Tensor, epoch: float) -> dict[str, Tensor]:
    """Attention transfer over every cached stage of every teacher, each paired with a student stage."""
    names = teacher_outputs(teacher, "attention", "at")
    return {"at": at([student[name] for name in names], [teacher[name] for name in names])}


@_terms("sp", "sp", reads="embedding")
def _sp_terms(spec: LossSpec, student: Outputs, teacher: Outputs, labels: Tensor, epoch: float) -> dict[str, Tensor]:
    """Similarity preservation of each teacher's embedding batch, summed."""
    return {"sp": sum(sp(student[name], teacher[name]) for name in teacher_outputs(teacher, "embedding", "sp"))}


@_terms("rkd", "rkd_distance", "rkd_angle", needs=("distance_weight", "angle_weight"), reads="embedding")
def _rkd_terms(spec: LossSpec, student: Outputs, teacher: Outputs, labels: Tensor, epoch: float) -> dict[str, Tensor]:
    """RKD's weighted distance and angle terms of each teacher's embedding, summed over teachers."""
    names = teacher_outputs(teacher, "embedding", "rkd")
    return {"rkd_distance": spec.distance_weight * sum(rkd_distance(student[n], teacher[n]) for n in names),
            "rkd_angle": spec.angle_weight * sum(rkd_angle(student[n], teacher[n]) for n in names)}


@_terms("adversarial", "adv", needs=("temperature", "discriminator_lr", "discriminator_width"))
def _adversarial_terms(spec: LossSpec, student: Outputs, teacher: Outputs, labels: Tensor,
                       epoch: float) -> dict[str, Tensor]:
    """The non-saturating generator term on the discriminator's scores of the student's predictions, which the run's
    discriminator (kdcache.stages.adversarial) adds to the student's outputs each step."""
    if VERDICT not in student:
        raise KdcacheError(f"loss {spec.name!r} reads a discriminator's scores of the student's predictions "
                           f"(outputs[{VERDICT!r}]) and none were given: `kdcache distill` trains the discriminator; "
                           f"in your own loop, call the judge of kdcache.stages.adversarial.loss_critics(loss, ...) before "
                           f"the loss")
    return {"adv": adversarial_loss(student[VERDICT])}


@_terms("crd", "crd", needs=("temperature", "negatives", "embed_dim"), reads="embedding")
def _crd_terms(spec: LossSpec, student: Outputs, teacher: Outputs, labels: Tensor, epoch: float) -> dict[str, Tensor]:
    """CRD of each teacher's embedding against K of its embeddings of other samples, both sides through the
    projection heads (`crd/embedding`, `crd/negatives/embedding`), summed over teachers."""
    total = 0
    for name in teacher_outputs(teacher, "embedding", "crd"):
        negatives = teacher.get(head_output("crd", negatives_output(name)))
        if negatives is None or head_output("crd", name) not in student:
            raise KdcacheError(f"loss {spec.name!r} contrasts each sample with the cached embeddings of other samples "
                               f"through learned projection heads, and this step's targets came without them: train "
                               f"from --cache on the default --batch-path device (not --live-teacher, not "
                               f"--batch-path dataset)")
        total = total + crd(student[head_output("crd", name)], teacher[head_output("crd", name)],
                            negatives[:, :spec.negatives], spec.temperature)
    return {"crd": total}


@_terms("irg", "irg_vertex", "irg_edge", needs=("vertex_weight", "edge_weight"), reads="embedding")
def _irg_terms(spec: LossSpec, student: Outputs, teacher: Outputs, labels: Tensor, epoch: float) -> dict[str, Tensor]:
    """IRG's weighted vertex and edge terms of each teacher's embedding, summed over teachers; the vertex term reads
    the student's embedding through its head (`irg/embedding`) where its dimension differs from the teacher's."""
    names = teacher_outputs(teacher, "embedding", "irg")
    return {"irg_vertex": spec.vertex_weight * sum(irg_vertex(student.get(head_output("irg", n), student[n]), teacher[n])
                                                   for n in names),
            "irg_edge": spec.edge_weight * sum(irg_edge(student[n], teacher[n]) for n in names)}


@_terms("pixel_kd", "pixel_kd", needs=("temperature",), reads=LOGIT_MAP)
def _pixel_kd_terms(spec: LossSpec, student: Outputs, teacher: Outputs, labels: Tensor,
                    epoch: float) -> dict[str, Tensor]:
    """Pixel-wise KD of the student's logit map against the teacher's (the student's resized to the teacher's)."""
    return {"pixel_kd": pixel_kd(student[LOGIT_MAP], teacher[LOGIT_MAP], spec.temperature)}


@_terms("cwd", "cwd", needs=("temperature",), reads=LOGIT_MAP)
def _cwd_terms(spec: LossSpec, student: Outputs, teacher: Outputs, labels: Tensor, epoch: float) -> dict[str, Tensor]:
    """Channel-wise distillation of the student's logit map against the teacher's."""
    return {"cwd": cwd(student[LOGIT_MAP], teacher[LOGIT_MAP], spec.temperature)}


@_terms("clip", "zero_shot_kd", "embedding_cos", needs=("temperature", "embedding_weight"), reads="embedding")
def _clip_terms(spec: LossSpec, student: Outputs, teacher: Outputs, labels: Tensor, epoch: float) -> dict[str, Tensor]:
    """CLIP distillation into an image-only student: KD on the teacher's zero-shot logits (its region 0), and the
    weighted cosine term of each teacher's image embedding against the student's through its head
    (`clip/embedding`), summed over teachers."""
    names = teacher_outputs(teacher, "embedding", "clip")
    return {"zero_shot_kd": kd(upcast(student["regions"][:, 0]), upcast(teacher["regions"][:, 0]),
                               spec.temperature),
            "embedding_cos": spec.embedding_weight * sum(embedding_cosine(student[head_output("clip", name)],
                                                                          teacher[name]) for name in names)}


def _outputs(value: Tensor | Outputs) -> Outputs:
    """Region logits alone as the outputs dict they stand for."""
    return value if isinstance(value, dict) else {"regions": value}


def _read_losses_yaml(losses: Registry[LossSpec]) -> None:
    """Register the `--loss` names of configs/losses.yaml, in its order, with the defaults it gives."""
    text = (importlib.resources.files("kdcache.configs") / "losses.yaml").read_text()
    for name, entry in yaml.safe_load(text).items():
        unknown = sorted(set(entry) - _overridable() - {"function"})
        if unknown:
            raise KdcacheError(f"configs/losses.yaml: entry {name!r} has unknown keys {', '.join(unknown)}; "
                               f"known: {', '.join(sorted(_overridable() | {'function'}))}")
        register_loss(LossSpec(name=name, **_tuples(entry)), losses)


# `--loss NAME` -> its LossSpec with any field overridden (`get_loss`); configs/losses.yaml's are read on first use
LOSSES: Registry[LossSpec] = Registry("get_loss()", sort=False, fill=_read_losses_yaml)


def register_loss(spec: LossSpec, losses: Registry[LossSpec] = LOSSES) -> LossSpec:
    """Register a loss under its name, its fields the defaults: `get_loss(spec.name, **overrides)` makes it."""
    losses.register(functools.partial(_with_overrides, spec), spec.name)
    return spec


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


@dataclass(frozen=True)
class LossSum:
    """`--loss a,b`: the distillation terms of every listed loss in one run, and cross-entropy once, with the
    first loss's ce_weight. Speaks LossSpec's interface (compute, term_names, needs, ...)."""

    name: str
    parts: tuple[LossSpec, ...]

    def __post_init__(self) -> None:
        names = [term for part in self.parts for term in TERMS.entry(part.function).term_names]
        repeated = sorted({term for term in names if names.count(term) > 1})
        if repeated or len(self.parts) < 2:
            raise KdcacheError(f"--loss {self.name}: a sum needs two or more losses with distinct terms; "
                               f"{', '.join(repeated) or 'one loss'} would be counted twice")
        if self.student_outputs and self.uses_regions:
            raise KdcacheError(f"--loss {self.name}: a distillation head's loss (deit-hard, deit-soft) reads the "
                               f"global logits of the class and distillation tokens, which have no region logits for "
                               f"an SDD loss beside it: sum it with losses on the global logit")

    @property
    def term_names(self) -> tuple[str, ...]:
        """ce, every part's own terms, total."""
        return ("ce", *(term for part in self.parts for term in TERMS.entry(part.function).term_names), "total")

    @property
    def needs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(kind for part in self.parts for kind in part.needs))

    @property
    def student_outputs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for part in self.parts for name in part.student_outputs))

    @property
    def heads(self) -> tuple[EmbeddingHead, ...]:
        return tuple(head for part in self.parts for head in part.heads)

    @property
    def negatives(self) -> int | None:
        """The most negatives any part contrasts (None: no part does)."""
        return max((part.negatives for part in self.parts if part.negatives), default=None)

    @property
    def uses_regions(self) -> bool:
        return any(part.uses_regions for part in self.parts)

    @property
    def standardizes(self) -> bool:
        return any(part.standardizes for part in self.parts)

    def __call__(self, student: Tensor | Outputs, teacher: Tensor | Outputs | None, labels: Tensor,
                 epoch: float) -> Tensor:
        """The loss of one training step: `compute(...)["total"]`."""
        return self.compute(student, teacher, labels, epoch)["total"]

    def settings(self, epoch: float) -> dict[str, float]:
        """The first loss's ce_weight (the one cross-entropy's), then each loss's temperature and weights at `epoch`
        as LOSS.FIELD (sdd-lskd.temperature, rkd.distill_weight)."""
        return {"ce_weight": self.parts[0].settings(epoch)["ce_weight"]} | {
            f"{part.name}.{field}": value for part in self.parts
            for field, value in part.settings(epoch).items() if field != "ce_weight"}

    def compute(self, student: Tensor | Outputs, teacher: Tensor | Outputs | None, labels: Tensor,
                epoch: float) -> dict[str, Tensor]:
        """ce once, each part's weighted terms, and their total, each part's scheduled fields at `epoch`."""
        parts = [part.at(epoch) for part in self.parts]
        terms = {"ce": parts[0].ce_term(student, labels)}
        for part in parts:
            if part.function != "ce":
                terms |= part.distillation_terms(student, teacher, labels, epoch)
        terms["total"] = sum(terms.values())
        return terms


def kept_classes(logits: Tensor, classes: tuple[int, ...], call: str) -> Tensor:
    """The logits of `classes` alone (the last dimension), refusing a class the logits do not have."""
    if max(classes) >= logits.shape[-1]:
        raise KdcacheError(f"{call}: --kd-classes names class {max(classes)} but the logits have "
                           f"{logits.shape[-1]} classes (0 to {logits.shape[-1] - 1})")
    return logits[..., list(classes)]


def class_labels(labels: Tensor) -> Tensor:
    """One class per sample: the labels [B] themselves, or the class of the larger weight of mixed labels [B, C]."""
    return labels.argmax(dim=-1) if labels.is_floating_point() else labels.long()


def loss_parts(name: str) -> list[tuple[str, float | None]]:
    """`sdd-lskd,rkd=2` as [(sdd-lskd, None), (rkd, 2.0)]: each loss and the distill_weight given to it."""
    parts = []
    for item in name.split(","):
        loss, _, weight = item.strip().partition("=")
        try:
            parts.append((loss, float(weight) if weight else None))
        except ValueError:
            raise KdcacheError(f"--loss {name}: expected LOSS[=WEIGHT],LOSS[=WEIGHT] such as sdd-lskd,rkd=2; "
                               f"{item!r} has no number after '='") from None
    for loss, _ in parts:
        get_loss(loss)  # an unknown name lists the known ones
    return parts


def scaled_loss(name: str, overrides: dict[str, float], epochs: int) -> LossSpec | LossSum:
    """A loss (`a,b=W` sums several) with the flags' overrides; epoch-based defaults (warm-up, SLD's switch)
    scaled from 240 epochs to `epochs`. In a sum, each flag applies to the losses that have its field."""
    parts = loss_parts(name)
    if len(parts) == 1 and parts[0][1] is None:
        return _scaled(parts[0][0], overrides, epochs)
    unused = [key for key in overrides if all(getattr(get_loss(loss), key, None) is None for loss, _ in parts)]
    if unused:
        raise KdcacheError(f"--{unused[0].replace('_', '-')} applies to none of the losses of {name!r} (they have "
                           f"no {unused[0]}); see `kdcache losses`")
    return LossSum(name, tuple(
        _scaled(loss, {key: value for key, value in overrides.items() if getattr(get_loss(loss), key, None) is not None}
                | ({} if weight is None else {"distill_weight": weight}), epochs) for loss, weight in parts))


def _scaled(name: str, overrides: dict[str, float], epochs: int) -> LossSpec:
    """One loss with overrides, its epoch-based defaults scaled to `epochs`."""
    default = get_loss(name)
    unused = [key for key in overrides if getattr(default, key, None) is None]
    if unused:
        raise KdcacheError(f"--{unused[0].replace('_', '-')} does not apply to loss {name!r} (it has no "
                           f"{unused[0]}); see `kdcache losses`")
    scaled = {key: getattr(default, key) * epochs / PAPER_EPOCHS for key in ("warmup_epochs", "switch_epoch")
              if key not in overrides and getattr(default, key)}
    # a schedule (or its text, from the Python API) is bound to this run's epochs
    bound = {key: bind_schedule(value, epochs, "--" + key.replace("_", "-")) if key in SCHEDULED else value
             for key, value in overrides.items()}
    return get_loss(name, **scaled, **bound)


def list_losses() -> list[str]:
    """The `--loss` names, in the order of configs/losses.yaml (then any registered since)."""
    return LOSSES.names()


def get_loss(name: str, **overrides: object) -> LossSpec:
    """The `LossSpec` registered as `name`, with any field replaced by `overrides` (e.g. temperature=3.0)."""
    return LOSSES.get(name, **overrides)
