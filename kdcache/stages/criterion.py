"""The distillation loss of `kdcache distill` as one module for any training loop: `criterion(output, target)`.

`DistillLoss` computes what a distill run's step computes on the same batch (tests/test_user_loop_api.py checks
it equal): the loss of `--loss NAME` with its epoch-based defaults (warm-up, SLD's switch) scaled to `epochs`,
the labels of a mixed cache's views mixed (`soft_labels`), the teacher's regions cut to the student's. It
counts epochs as samplers do, from 0 (`set_epoch`); kdcache's losses count from 1, and it passes epoch + 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from kdcache.data.mixing import soft_labels
from kdcache.errors import KdcacheError
from kdcache.losses import LossSpec, LossSum, scaled_loss
from kdcache.models.logit_map import LogitMap
from kdcache.models.outputs import REGIONS, output_kind
from kdcache.models.region_student import RegionStudent
from kdcache.schedules import Schedule
from kdcache.stages.dataset import LABEL, CacheDataset, check_loader_inputs

REGION_ADVICE = "wrap the student in kdcache.RegionStudent(model, scales), which gives region logits while it trains"


class DistillLoss(nn.Module):
    """`loss` (a `kdcache losses` name, `a,b=W` sums several) with `overrides` (temperature, ce_weight,
    distill_weight, alpha, beta, warmup_epochs, label_smoothing) for a run of `epochs` epochs. temperature and the
    weights also take a schedule, as distill's flags do: its text (`temperature="linear(8,2)"`) or a
    `kdcache.schedules.Schedule`, valued at the epoch `set_epoch` names (README: Loss schedules).

    `forward(output, target)`: output, the student's logits [B, C] or region logits [B, R, C] (or a dict of
    outputs holding them as "regions", for the feature losses); target, the batch's `TeacherTargets` (label
    included) or the triple form's `(labels, targets)`. Given `dataset` (a CacheDataset), the cache is checked
    against the loss and `model` here, at construction: class count, the regions and outputs the loss reads.
    """

    def __init__(self, loss: str = "kd", *, epochs: int, dataset: CacheDataset | None = None,
                 model: nn.Module | None = None, **overrides: float | str | Schedule) -> None:
        super().__init__()
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise KdcacheError(f"DistillLoss({loss!r}): epochs must be the run's number of epochs, a positive "
                               f"integer (the warm-up is scaled to it as `kdcache distill --epochs` scales it); "
                               f"got {epochs!r}")
        self.name, self.epochs, self.epoch = loss, epochs, 0
        self.loss: LossSpec | LossSum = scaled_loss(loss, dict(overrides), epochs)
        if dataset is not None:
            check_student(self.loss, dataset, model)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next steps belong to, counted from 0 as samplers and `CacheDataset.set_epoch` count."""
        self.epoch = int(epoch)

    def forward(self, output: Tensor | Mapping[str, Tensor], target: Mapping[str, Tensor] | tuple) -> Tensor:
        """The step's loss to call .backward() on."""
        return self.terms(output, target)["total"]

    def terms(self, output: Tensor | Mapping[str, Tensor], target: Mapping[str, Tensor] | tuple
              ) -> dict[str, Tensor]:
        """The step's weighted terms by name (ce, the loss's own, total), as a distill run's metrics.csv has them."""
        labels, teacher = _labels_and_targets(target, self.name)
        student = dict(output) if isinstance(output, Mapping) else {REGIONS: output}
        logits = student[REGIONS]
        labels, teacher = soft_labels(labels, teacher, logits.shape[-1])  # a mixed view's two labels and λ
        teacher = dict(teacher or {})
        if REGIONS in teacher:
            teacher[REGIONS] = self._teacher_regions(logits, teacher[REGIONS])
        return self.loss.compute(student, teacher, labels, self.epoch + 1)  # kdcache's losses count from 1

    def _teacher_regions(self, student: Tensor, teacher: Tensor) -> Tensor:
        """The teacher's regions for the student's logits: region 0 for [B, C], the student's R for [B, R, C]
        (as a distill run cuts the cache's regions to its scales)."""
        if student.dim() == 2 and self.loss.uses_regions:
            raise KdcacheError(f"DistillLoss({self.name!r}): the loss distils every region, so it needs the "
                               f"student's region logits [B, R, C], got logits {tuple(student.shape)}: "
                               f"{REGION_ADVICE}")
        if student.dim() == 2:
            return teacher[:, 0]
        if student.dim() == 3 and student.shape[1] > teacher.shape[1]:
            raise KdcacheError(f"DistillLoss({self.name!r}): the student gives {student.shape[1]} regions but the "
                               f"targets hold {teacher.shape[1]}: give RegionStudent the dataset's scales")
        return teacher[:, :student.shape[1]] if student.dim() == 3 else teacher

    def extra_repr(self) -> str:
        return f"loss={self.name!r}, epochs={self.epochs}, epoch={self.epoch}"


def _labels_and_targets(target: Mapping[str, Tensor] | tuple, name: str) -> tuple[Tensor, dict[str, Tensor]]:
    """(labels [B], the teacher's targets by name) of a TeacherTargets batch or of (labels, targets)."""
    if isinstance(target, Mapping) and LABEL in target:
        return target[LABEL], {key: value for key, value in target.items() if key != LABEL}
    if isinstance(target, (tuple, list)) and len(target) == 2 and isinstance(target[1], Mapping):
        return target[0], dict(target[1])
    raise KdcacheError(f"DistillLoss({name!r})(output, target): target must be the batch's TeacherTargets "
                       f"(CacheDataset(item='pair'), label included) or (labels, targets) of the triple form; got "
                       f"{type(target).__name__}")


def check_student(loss: LossSpec | LossSum, dataset: CacheDataset, model: nn.Module | None = None) -> None:
    """Refuse, in one line naming both, a cache or student that does not fit the loss: the student's class count
    against the cache's, region logits for a loss that distils regions, the regions and outputs it reads."""
    model = model.module if isinstance(model, DistributedDataParallel) else model
    if model is not None:
        check_loader_inputs(dataset, num_classes=_head_classes(model, dataset), where="the student's head")
    missing = [kind for kind in loss.needs if not any(output_kind(name) == kind for name in dataset.outputs)]
    if missing:
        raise KdcacheError(f"loss {loss.name!r} reads the teacher's {', '.join(missing)} but the cache "
                           f"{dataset.path} holds {', '.join((REGIONS, *dataset.outputs))}: dump a cache with --outputs "
                           f"{','.join(missing)}")
    if not loss.uses_regions:
        return
    if len(dataset.scales) < 2:
        raise KdcacheError(f"loss {loss.name!r} distils the regions of scales 2 and up but the cache {dataset.path} "
                           f"holds scales {_scales(dataset.scales)}: dump a cache with --scales 1,2,4")
    scales = getattr(model, "scales", None) if isinstance(model, (RegionStudent, LogitMap)) else None
    if model is not None and scales is None:
        raise KdcacheError(f"loss {loss.name!r} distils every region but the student gives logits [B, C]: "
                           f"{REGION_ADVICE} (scales={dataset.scales}, the cache's)")
    if scales is not None and tuple(dataset.scales[:len(scales)]) != tuple(scales):
        raise KdcacheError(f"the student's scales are {_scales(scales)} but the dataset's are "
                           f"{_scales(dataset.scales)}: give RegionStudent scales={tuple(dataset.scales)}, or "
                           f"CacheDataset scales={tuple(scales)}")


def _head_classes(model: nn.Module, dataset: CacheDataset) -> int:
    """How many classes the model's head gives: timm's num_classes, else the logits of one blank image."""
    declared = getattr(model, "num_classes", None)
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared
    parameter = next(model.parameters(), None)
    blank = torch.zeros(1, *dataset.input_size, device=None if parameter is None else parameter.device)
    was_training = model.training
    try:
        with torch.no_grad():
            return int(model.eval()(blank).shape[-1])
    finally:
        model.train(was_training)


def _scales(scales: Any) -> str:
    """Scales as the command line writes them: 1,2,4."""
    return ",".join(map(str, scales))
