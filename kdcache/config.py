"""Configs as plain values: frozen dataclasses filled from a YAML recipe, then from command-line flags."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kdcache.errors import KdcacheError

C = TypeVar("C")


@dataclass(frozen=True)
class TrainConfig:
    """The SGD recipe of the CIFAR KD literature, shared by teachers and students; optimizer, schedule, warm-up,
    label smoothing, weight EMA, precision and clipping give the recipes of timm and FKD (stages/recipe_options)."""

    epochs: int = 240
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay_at: tuple[float, ...] = (0.625, 0.75, 0.875)  # fractions of the run: epochs 150, 180, 210 of 240
    lr_decay_rate: float = 0.1
    seed: int = 0
    device: str = "auto"
    augmentation: str | None = None  # None: the source's own (data.files.DEFAULT_POLICIES)
    optimizer: str = "sgd"  # sgd | adamw
    schedule: str = "step"  # step (decay at lr_decay_at) | cosine (to 0 at the last step)
    lr_warmup_epochs: float = 0.0  # linear warm-up of the learning rate, per step
    label_smoothing: float = 0.0  # of the cross-entropy term
    ema_decay: float | None = None  # a weight EMA of the model, evaluated and saved beside it
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | bf16 | fp16 | fp32
    clip_grad: float | None = None  # the gradients' global norm is clipped to this
    views_per_step: int = 1  # each step trains on this many views of the same samples, their losses summed

    def lr_milestones(self) -> list[int]:
        """Epochs at which the learning rate is multiplied by lr_decay_rate."""
        return sorted({max(1, round(f * self.epochs)) for f in self.lr_decay_at})


@dataclass(frozen=True)
class TeacherConfig(TrainConfig):
    """`kdcache train-teacher`."""

    model: str = "resnet20"
    dataset: str = "digits"
    data_root: str | None = None
    image_size: int | None = None
    workers: int | None = None  # None: data.files.default_workers()
    preload: bool = False
    max_image_pixels: int | None = None  # None: the loader's (Pillow's limit)
    out: str = "runs/teacher"


@dataclass(frozen=True)
class DumpConfig:
    """`kdcache dump-teacher`."""

    teacher: str = ""
    checkpoint: str = ""
    dataset: str = "digits"
    data_root: str | None = None
    image_size: int | None = None
    workers: int | None = None
    preload: bool = False
    max_image_pixels: int | None = None
    split: str = "train"
    views: int | None = None
    exhaustive: bool = False
    scales: tuple[int, ...] = (1, 2, 4)
    augmentation: str | None = None  # None: the source's own (data.files.DEFAULT_POLICIES)
    ra_ops: int | None = None  # --aug randaugment: ops per view (default 2) and their magnitude bin (default 9)
    ra_magnitude: int | None = None
    mix: str | None = None  # mixup | cutmix: each view mixed with a partner sample's
    mix_alpha: float = 1.0  # λ ~ Beta(alpha, alpha)
    mix_prob: float = 1.0  # the share of views mixed
    batch_size: int = 256
    device: str = "auto"
    dtype: str = "float16"
    format: str | None = None
    out: str = "caches/teacher.zarr"
    seed: int = 0
    block_size: int = 0
    topk: int = 0
    outputs: str = ""  # models.outputs names, comma-separated; "": what `losses` need, else regions
    losses: tuple[str, ...] = ()
    views_from: str | None = None  # a cache whose views (dataset, policy, parameters) this dump replays
    overwrite: bool = False

    def mixing(self) -> dict | None:
        """--mix and its options as the policy takes them, or None without mixing."""
        return {"mode": self.mix, "alpha": self.mix_alpha, "prob": self.mix_prob} if self.mix else None


@dataclass(frozen=True)
class SynthesizeConfig:
    """`kdcache synthesize`: DeepInversion's paper parameters for CIFAR-10 (NVlabs/DeepInversion cifar10/README.md:
    batches of 256, 2000 iterations, Adam lr 0.05, BatchNorm weight 10; the script's total variation 2.5e-5, ℓ2 0,
    jitter 2)."""

    teacher: str = ""
    checkpoint: str = ""
    dataset: str = "digits"  # the teacher's: image shape, classes, normalisation, and the real test split
    data_root: str | None = None
    image_size: int | None = None
    num: int = 1024
    out: str = "synthesized"
    batch_size: int = 256
    iterations: int = 2000
    lr: float = 0.05  # Adam's, on the inputs
    bn_weight: float = 10.0  # the BatchNorm-statistics term
    tv_weight: float = 2.5e-5  # total variation
    l2_weight: float = 0.0
    jitter: int = 2  # pixels of random roll per iteration
    labels: str = "target"  # each image's label: the class it was synthesised for, or the one the teacher names
    augmentation: str = "cifar"  # the policy of the cache's views
    views: int = 4
    scales: tuple[int, ...] = (1, 2, 4)
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    """`kdcache distill`."""

    cache: str | None = None
    extra_caches: tuple[str, ...] = ()  # further teachers' caches over the same views: an ensemble
    teacher_weights: tuple[float, ...] = ()  # one per cache; default equal
    live_teacher: str | None = None
    teacher: str | None = None
    students: tuple[str, ...] = ("resnet8x4",)
    student_checkpoint: str | None = None  # the student's initial weights (a file or run folder); None: fresh ones
    losses: tuple[str, ...] = ("sdd-lskd",)
    pairs: tuple[str, ...] = ()  # "student:loss"; when given, these runs instead of students x losses
    scales: tuple[int, ...] | None = None
    dataset: str | None = None  # default: the cache's
    data_root: str | None = None
    image_size: int | None = None  # default: the cache's, for datasets stored at a chosen size
    workers: int | None = None
    preload: bool = False
    max_image_pixels: int | None = None
    view_order: str = "cycle"
    batch_path: str = "device"
    out: str = "runs/distill"
    name: str | None = None  # the run's folder under out, exactly; default STUDENT-LOSS, or -2, -3, ... once taken
    resume: bool = False
    # loss overrides; None keeps the loss's published default (configs/losses.yaml)
    temperature: float | None = None
    ce_weight: float | None = None
    distill_weight: float | None = None
    alpha: float | None = None
    beta: float | None = None
    warmup_epochs: float | None = None
    mutual: bool = False  # deep mutual learning: the students train together, each also learning from the others
    ema_teacher: float | None = None  # the teacher is the EMA of the student's weights, with this decay

    @property
    def has_teacher(self) -> bool:
        """Whether a cache or a live teacher gives targets (not only peers or the student's own EMA)."""
        return bool(self.cache or self.live_teacher)

    def runs(self) -> list[tuple[str, str]]:
        """The (student, loss) pairs to train: the explicit pairs, else every student with every loss; under
        --mutual each loss plus `dml` (alone without a teacher: cross-entropy and the peers)."""
        if self.mutual:
            loss = "dml" if not self.has_teacher or self.losses[0] == "ce" else f"{self.losses[0]},dml"
            return [(student, loss) for student in self.students]
        if not self.pairs:
            return [(student, loss) for student in self.students for loss in self.losses]
        # the loss follows the last colon: a student spec may hold colons of its own (timm:resnet18:kd)
        pairs = [tuple(pair.rsplit(":", 1)) for pair in self.pairs]
        malformed = [text for text, pair in zip(self.pairs, pairs) if len(pair) != 2 or not all(pair)]
        if malformed:
            raise KdcacheError(f"--pair: expected STUDENT:LOSS such as resnet8x4:sdd-lskd or timm:resnet18:kd, got "
                               f"{malformed[0]!r}")
        return pairs

    def loss_overrides(self) -> dict[str, float]:
        """The loss hyper-parameters given explicitly."""
        names = ("temperature", "ce_weight", "distill_weight", "alpha", "beta", "warmup_epochs")
        smoothing = {"label_smoothing": self.label_smoothing} if self.label_smoothing else {}
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None} | smoothing


def loader_options(config: Any) -> dict[str, Any]:
    """The loader options a config sets (image_size, max_image_pixels, preload), for load_dataset."""
    options = {name: getattr(config, name) for name in ("image_size", "max_image_pixels")
               if getattr(config, name, None) is not None}
    return {**options, "preload": True} if getattr(config, "preload", False) else options


def field_default(cls: type, name: str) -> Any:
    """A config field's default value (for --help)."""
    return next(f.default for f in fields(cls) if f.name == name)


def load_config(cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                section: str | None = None) -> C:
    """A config from a YAML recipe (its `section` mapping when it has one) with flags on top; unknown keys are an error."""
    values: dict[str, Any] = {}
    if path is not None:
        values = _read_yaml(Path(path), section)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise KdcacheError(f"{path or 'config'}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _coerce(name, value, hints[name], path) for name, value in values.items()})


def config_dict(config: Any) -> dict[str, Any]:
    """A config as JSON-able plain values (saved in checkpoints and metadata)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def _read_yaml(path: Path, section: str | None) -> dict[str, Any]:
    if not path.is_file():
        raise KdcacheError(f"--config: no recipe file at {path}")
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise KdcacheError(f"--config {path}: not valid YAML ({error})".replace("\n", " ")) from error
    if not isinstance(document, dict):
        raise KdcacheError(f"--config {path}: expected a mapping of option names to values")
    if section is not None and isinstance(document.get(section), dict):
        document = document[section]
    return {str(k).replace("-", "_"): v for k, v in document.items()}


def _coerce(name: str, value: Any, hint: Any, where: Any) -> Any:
    """Check a value against a field's type, turning lists into tuples and ints into floats where asked."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        origin = typing.get_origin(option)
        if origin is tuple and isinstance(value, (list, tuple)):
            item = typing.get_args(option)[0]
            return tuple(_coerce(name, v, item, where) for v in value)
        if origin is tuple and isinstance(value, (str, int)) and not isinstance(value, bool):
            return _coerce(name, [value], option, where)
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option in (int, str, bool) and type(value) is option:
            return value
    raise KdcacheError(f"{where or 'config'}: {name} should be {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def recorded_config(config: Any) -> dict[str, Any]:
    """The config as saved with a run, less what does not change what this run computes: the device, resuming,
    its folder's --name, and which other students and losses share the sweep (so a run resumes when the sweep
    around it changes)."""
    return {k: v for k, v in config_dict(config).items()
            if k not in ("device", "resume", "name", "students", "losses", "pairs")}
