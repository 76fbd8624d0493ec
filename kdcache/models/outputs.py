"""A model's outputs by name: everything a student learns from, and a cache can hold, besides plain logits.

- `regions` `[B, R, C]`: the region logits of `LogitMap` (region 0 the model's own logits);
- `embedding` `[B, D]`: the pooled features the classifier sees, `forward_head(features, pre_logits=True)`;
- `attention/<stage>` `[B, H, W]`: the attention-transfer map of a stage's output (`tensors.attention_map`, p = 2);
- `hint/<stage>` `[B, C, H, W]`: a stage's output itself, FitNet's hint;
- `distillation` `[B, C]`: a student's distillation-token head (DeiT; timm's `*_distilled_*` ViTs), while `regions`
  holds its class-token head alone. Only a student has it (no cache holds it); in eval mode timm's model gives one
  prediction, the mean of its two heads, and both outputs are that mean, as `model(x)` is.

A model's stages are the modules its `feature_info` names (timm's attribute; kdcache's CIFAR models and the
torchvision families with named stages have it too), in order. A student gives the outputs of a teacher's names
through its own stages, paired from the last (the teacher's last stage with the student's last, and so on), so
different depths still pair: its attention map is resized to the teacher's by `losses.at`, and its hint passes
through a `HintRegressor` to the teacher's channels and size. The outputs of a second teacher's cache carry a
suffix, `embedding#1`, so that each teacher's term is computed and summed.

A loss may learn heads on the embedding, trained with the student as FitNet's regressors are and saved with them
(regressors.pt): CRD's linear projections of both sides to a common dimension, `crd/embedding` (the student's,
made in `forward`) and the teacher's `crd/embedding` and `crd/negatives/embedding` (made of the targets by
`project_targets`); IRG's projection of the student's embedding to the teacher's dimension, `irg/embedding`;
CLIP distillation's linear head from the student's embedding to the CLIP teacher's, `clip/embedding`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.errors import KdcacheError
from kdcache.models.logit_map import LogitMap, _channels_last, model_name, speaks_timm
from kdcache.tensors import attention_map, head_output, negatives_output

REGIONS, EMBEDDING, DISTILLATION = "regions", "embedding", "distillation"
DISTILLED_MODELS = ("a timm *_distilled_* model (timm:deit_tiny_distilled_patch16_224; any timm ViT's shape with a "
                    "distillation token: timm:deit_tiny_distilled_patch16_224,img_size=32,patch_size=8,depth=4)")
STAGE_KINDS = ("attention", "hint")
OUTPUT_FORMS = "regions, embedding, attention (every stage), attention:STAGE, hint (the middle stage), hint:STAGE"
TEACHER_HEAD = "teacher:"  # the key of a learned head on the teacher's outputs among a student's regressors


def base_name(name: str) -> str:
    """An output's name without its teacher suffix: `attention/layer1` for `attention/layer1#1`."""
    return name.split("#", 1)[0]


def output_kind(name: str) -> str:
    """regions, embedding, attention or hint."""
    return base_name(name).split("/", 1)[0]


def output_stage(name: str) -> str | None:
    """The stage an attention or hint output is made from; None for regions and embedding."""
    _, _, stage = base_name(name).partition("/")
    return stage or None


def with_teacher(name: str, teacher: int) -> str:
    """The name of teacher `teacher`'s output (0: the first teacher, whose names carry no suffix)."""
    return name if teacher == 0 else f"{name}#{teacher}"


def teacher_index(name: str) -> int:
    """Which teacher an output is of: 0 without a suffix, k for `#k`."""
    return int(name.partition("#")[2] or 0)


def feature_stages(model: nn.Module) -> list[str]:
    """The names of the modules whose outputs are the model's stages, in order (from its `feature_info`)."""
    info = getattr(model, "feature_info", None) or []
    return [entry["module"] for entry in info if isinstance(entry, dict) and entry.get("module")]


def parse_outputs(text: str, model: nn.Module) -> tuple[str, ...]:
    """`--outputs` as output names, regions first (a cache always holds them): `attention` is every stage's."""
    names = [REGIONS]
    for item in (part.strip() for part in text.split(",") if part.strip()):
        kind, _, stage = item.partition(":")
        if kind in (REGIONS, EMBEDDING) and not stage:
            names.append(kind)
        elif kind in STAGE_KINDS:
            stages = _stages_or_refuse(model, item)
            if stage and stage not in stages:
                raise KdcacheError(f"--outputs {item}: {model_name(model)} has no stage {stage!r}; its stages are "
                                   f"{', '.join(stages)}")
            chosen = [stage] if stage else stages if kind == "attention" else [stages[(len(stages) - 1) // 2]]
            names += [f"{kind}/{name}" for name in chosen]
        else:
            raise KdcacheError(f"--outputs: unknown output {item!r}; expected a comma-separated list of "
                               f"{OUTPUT_FORMS}")
    return tuple(dict.fromkeys(names))


def _stages_or_refuse(model: nn.Module, asked: str) -> list[str]:
    stages = feature_stages(model)
    if not stages:
        raise KdcacheError(f"--outputs {asked}: {model_name(model)} names no stages (no feature_info); give it "
                           f"feature_info = [{{'module': NAME}}, ...] as timm's models have, or cache regions and "
                           f"embedding only")
    return stages


def paired_stage(student_stages: Sequence[str], teacher_stages: Sequence[str], teacher_stage: str,
                 student: str = "the student") -> str:
    """The student stage that learns from a teacher stage: the same position counted from the last stage."""
    from_end = len(teacher_stages) - list(teacher_stages).index(teacher_stage)
    if from_end > len(student_stages):
        raise KdcacheError(f"{student} has {len(student_stages)} stages ({', '.join(student_stages) or 'none named'}), "
                           f"too few to pair with the teacher's stage {teacher_stage!r}, number {from_end} from the "
                           f"last of {', '.join(teacher_stages)}: cache a later stage of the teacher")
    return student_stages[-from_end]


def require_distillation_token(model: nn.Module, asked_by: str) -> None:
    """Refuse, in one line, a model without a distillation token (timm's set_distilled_training) for the
    `distillation` output that `asked_by` reads."""
    if not callable(getattr(model, "set_distilled_training", None)):
        raise KdcacheError(f"{asked_by} trains a distillation token's head, and {model_name(model)} has no "
                           f"distillation token: use {DISTILLED_MODELS}")


def distilled_heads(model: nn.Module, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A distilled ViT's class-token and distillation-token logits from its final tokens, as timm's distilled
    training gives them (its own setting left as it was); in eval mode both are the heads' mean, as model(x) is."""
    previous = getattr(model, "distilled_training", False)
    model.set_distilled_training(True)
    try:
        found = model.forward_head(features)
    finally:
        model.set_distilled_training(previous)
    return found if isinstance(found, tuple) else (found, found)


class HintRegressor(nn.Module):
    """FitNet's regressor: the student's stage output, resized to the hint's size, then 1×1 conv-BN-ReLU to its
    channels (RepDistiller's ConvReg at equal sizes; at other sizes it uses strided or transposed convolutions,
    here the map is average-pooled down or bilinearly resized up first)."""

    def __init__(self, student_channels: int, hint_shape: Sequence[int]) -> None:
        super().__init__()
        channels, *self.size = hint_shape
        self.conv = nn.Conv2d(student_channels, channels, 1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The regressed feature map [B, C_hint, H_hint, W_hint]."""
        if list(features.shape[-2:]) != self.size:
            larger = features.shape[-2] >= self.size[0] and features.shape[-1] >= self.size[1]
            features = F.adaptive_avg_pool2d(features, self.size) if larger else \
                F.interpolate(features, size=self.size, mode="bilinear", align_corners=False)
        return F.relu(self.bn(self.conv(features)))


class ModelOutputs(LogitMap):
    """A model's named outputs from one forward pass: a dict of the names in `outputs` (regions always).

    sources: the module each attention or hint output is made from (default: the stage its name says, for a
    teacher); regressors: the learned heads trained with the student, by the output each gives: a hint's name, a
    HintRegressor that replaces that output (FitNet); `LOSS/NAME` (`crd/embedding`), a head that adds that output,
    made from the student's NAME; `teacher:LOSS/NAME`, one that `project_targets` applies to the teacher's NAME
    (and to its negatives).
    """

    def __init__(self, model: nn.Module, scales: Sequence[int], outputs: Sequence[str],
                 sources: dict[str, str] | None = None, regressors: dict[str, nn.Module] | None = None) -> None:
        super().__init__(model, scales)
        self.outputs = tuple(dict.fromkeys((REGIONS, *outputs)))
        if len(self.outputs) > 1 and not speaks_timm(model):
            raise KdcacheError(f"{model_name(model)} has no forward_features() and forward_head(), which "
                               f"{', '.join(self.outputs[1:])} are made from: use --outputs regions")
        if DISTILLATION in self.outputs:
            require_distillation_token(model, f"the {DISTILLATION!r} output")
            if self.scales != (1,):  # the heads read the class and distillation tokens, no cell has them
                raise KdcacheError(f"the {DISTILLATION!r} output comes with the global logit only, not region logits "
                                   f"of scales {','.join(map(str, self.scales))}: use scales (1,)")
        self.sources = {name: (sources or {}).get(name) or output_stage(name)
                        for name in self.outputs if output_stage(name)}
        modules = dict(model.named_modules())
        missing = sorted({module for module in self.sources.values() if module not in modules})
        if missing:
            raise KdcacheError(f"{model_name(model)} has no module {missing[0]!r}, whose output was asked for; its "
                               f"stages are {', '.join(feature_stages(model)) or 'not named'}")
        regressors = regressors or {}
        # the hints' regressors first, in the outputs' order (the order regressors.pt has always kept), then heads
        self.output_names = [*(name for name in self.outputs if name in regressors),
                             *(name for name in regressors if name not in self.outputs)]
        self.regressors = nn.ModuleList([regressors[name] for name in self.output_names])
        self._captured: dict[str, torch.Tensor] | None = None
        self._hooks = [modules[module].register_forward_hook(self._capture_hook(module))
                       for module in dict.fromkeys(self.sources.values())]

    def remove_hooks(self) -> None:
        """Stop capturing the stages' outputs (for a wrapper made only to look at the model once)."""
        for hook in self._hooks:
            hook.remove()

    def _capture_hook(self, module_name: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        """A forward hook that keeps the module's output while this wrapper runs the model."""
        def capture(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
            if self._captured is not None:  # only during this wrapper's own forward, not the model's alone
                self._captured[module_name] = output
        return capture

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: output} for every name of `outputs`."""
        if not speaks_timm(self.model):
            return {REGIONS: super().forward(images)}
        self._captured = {}
        try:
            features = self.model.forward_features(images)
            captured = self._captured
        finally:
            self._captured = None
        result = self._logits(features, images.shape[-2:])
        for name in self.outputs[1:]:
            if name in result:
                continue
            if output_kind(name) == EMBEDDING:
                result[name] = self.model.forward_head(features, pre_logits=True).flatten(1)
                continue
            stage = self._stage_map(captured[self.sources[name]], name)
            if output_kind(name) == "attention":
                result[name] = attention_map(stage)
            elif name in self.output_names:
                result[name] = self.regressors[self.output_names.index(name)](stage)
            else:
                result[name] = stage
        for name, head in zip(self.output_names, self.regressors):
            if name not in self.outputs and not name.startswith(TEACHER_HEAD):
                result[name] = head(result[name.split("/", 1)[1]])
        return result

    def _logits(self, features: torch.Tensor, image_size: Sequence[int]) -> dict[str, torch.Tensor]:
        """The region logits, or, with a distillation output, the class head's logits as region 0 beside it."""
        if DISTILLATION not in self.outputs:
            return {REGIONS: self.regions(features, image_size)}
        logits, distillation = distilled_heads(self.model, features)
        return {REGIONS: logits[:, None], DISTILLATION: distillation}

    def project_targets(self, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The teacher's outputs with those of the learned teacher-side heads added: `crd/embedding` made from
        `embedding` [b, D], and `crd/negatives/embedding` from `negatives/embedding` [b, K, D], where given."""
        found = dict(targets)
        for name, head in zip(self.output_names, self.regressors):
            if name.startswith(TEACHER_HEAD):
                loss, _, source = name[len(TEACHER_HEAD):].partition("/")
                for given in (source, negatives_output(source)):
                    if given in targets:
                        found[head_output(loss, given)] = head(targets[given])
        return found

    def _stage_map(self, output: torch.Tensor, name: str) -> torch.Tensor:
        """A stage's output as a map [B, C, H, W] (timm's NHWC stages permuted)."""
        if output.dim() != 4:
            raise KdcacheError(f"{model_name(self.model)}: stage {self.sources[name]!r} gives "
                               f"{list(output.shape)}, not a feature map [B, C, H, W]; attention maps and hints need "
                               f"maps: cache the embedding instead")
        return output.permute(0, 3, 1, 2) if _channels_last(self.model) else output

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, outputs={list(self.outputs)}"


def output_shapes(outputs: ModelOutputs, images: torch.Tensor) -> dict[str, list[int]]:
    """The shape of one sample of each output besides the regions, found on a few images."""
    with torch.no_grad():
        found = outputs(images)
    return {name: list(value.shape[1:]) for name, value in found.items() if name != REGIONS}


def probe_output_shapes(model: nn.Module, outputs: Sequence[str], images: torch.Tensor) -> dict[str, list[int]]:
    """The shape of one sample of each of a model's `outputs`, found on a few images in eval mode; the model is
    left as it was (its mode, and no hook)."""
    probe = ModelOutputs(model, (1,), outputs)
    was_training = model.training
    model.eval()
    try:
        return output_shapes(probe, images)
    finally:
        model.train(was_training)
        probe.remove_hooks()


def stage_channels(model: nn.Module, stages: Sequence[str], images: torch.Tensor) -> dict[str, int]:
    """How many channels each named stage's output has, found on a few images."""
    shapes = probe_output_shapes(model, [f"hint/{stage}" for stage in stages], images)
    return {stage: shapes[f"hint/{stage}"][0] for stage in stages}


@dataclass(frozen=True)
class TeacherOutputs:
    """What a student pairs with of one teacher: its further outputs' shapes, and its stages in order."""

    outputs: dict[str, list[int]]
    stages: list[str]


def student_outputs(model: nn.Module, kinds: Sequence[str], teachers: Sequence[TeacherOutputs], images: torch.Tensor,
                    student: str = "the student", heads: Sequence[tuple[str, int | None, bool, bool]] = ()
                    ) -> tuple[tuple[str, ...], dict[str, str], dict[str, nn.Module]]:
    """The outputs a student gives for losses reading `kinds` from these teachers: their names (teacher k's with
    the suffix #k), the student stage each attention or hint output is made from, and the fresh regressors (for
    ModelOutputs): a HintRegressor per hint (to the teacher's channels and size; the student's channels found on
    `images`), and the embedding heads the losses ask for (LossSpec.heads)."""
    outputs, sources = [], {}
    stages = feature_stages(model)
    for k, teacher in enumerate(teachers):
        for name in teacher.outputs:
            if output_kind(name) in kinds:
                outputs.append(with_teacher(name, k))
                if output_stage(name):
                    sources[outputs[-1]] = paired_stage(stages, teacher.stages, output_stage(name), student)
    hints = {name: teachers[teacher_index(name)].outputs[base_name(name)]
             for name in outputs if output_kind(name) == "hint"}
    channels = stage_channels(model, sorted({sources[name] for name in hints}), images) if hints else {}
    regressors = {name: HintRegressor(channels[sources[name]], shape) for name, shape in hints.items()}
    embeddings = {name: teachers[teacher_index(name)].outputs[base_name(name)][0]
                  for name in outputs if output_kind(name) == EMBEDDING}
    if heads and embeddings:
        own = probe_output_shapes(model, [EMBEDDING], images)[EMBEDDING][0]
        regressors |= embedding_heads(heads, own, embeddings)
    return tuple(outputs), sources, regressors


def embedding_heads(heads: Sequence[tuple[str, int | None, bool, bool]], student_dim: int,
                    teacher_dims: dict[str, int]) -> dict[str, nn.Module]:
    """Fresh linear heads on the embeddings, by the output each gives (ModelOutputs' regressors): for each loss's
    (name, dimension or None for the teacher's, teacher side too, always) and each teacher embedding, the student's
    head to that dimension (unless `always`, only where the student's differs from it), and the teacher's."""
    made = {}
    for loss, dim, teacher_side, always in heads:
        for name, teacher_dim in teacher_dims.items():
            if always or student_dim != (dim or teacher_dim):
                made[head_output(loss, name)] = nn.Linear(student_dim, dim or teacher_dim)
            if teacher_side:
                made[TEACHER_HEAD + head_output(loss, name)] = nn.Linear(teacher_dim, dim or teacher_dim)
    return made
