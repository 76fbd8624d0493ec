"""Configs as plain values: frozen dataclasses filled from a YAML file, then from command-line flags.

Each field declares its option once (`option`: default, help, flag, click type); `kdcache.cli` makes every command's
flags from these fields, a YAML file's keys are the same flag names (`student: resnet8`, `batch-size` or
`batch_size`), and `save_config` writes a resolved config as such a file, so that `--config` repeats a run.
"""

from __future__ import annotations

import dataclasses
import functools
import difflib
import sys
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import click
import yaml

from kdcache.errors import KdcacheError
from kdcache.schedules import Schedule, parse_schedule

C = TypeVar("C")
CONFIG_FILE = "config.yaml"  # the resolved config, saved in every run folder and cache


def option(default: Any, help: str, flag: str | None = None, type: click.ParamType | None = None, *,
           multiple: bool = False, parse: str | None = None, rest: str | None = None) -> Any:
    """A config field that is also a command-line option: its default, help text, flag (default: --field-name), click
    type, whether it repeats (a tuple from repeated flags), `parse` (comma-separated: "scales" or "floats") and
    `rest` (a list given to it sets this field to its first item and the field `rest` to the others)."""
    metadata = {"help": help, "flag": flag, "type": type, "multiple": multiple, "parse": parse, "rest": rest}
    return dataclasses.field(default=default, metadata=metadata)


class ScheduleType(click.ParamType):
    """A loss flag's value: a number, or a schedule over the epochs (kdcache.schedules), parsed once here."""

    name = "number|schedule"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float | Schedule:
        try:
            return parse_schedule(value)
        except KdcacheError as error:
            self.fail(str(error), param, ctx)


def _loss_value(what: str) -> Any:
    return option(None, f"Override the loss's {what}: a number, or a schedule over the epochs: linear(START,END) or "
                        f"cosine(START,END) (START at epoch 1, END at the last), step(V0,V1@EPOCH,...) (V1 from "
                        f"EPOCH on); README: Loss schedules.", type=ScheduleType())


def _device() -> Any:
    return option("auto", "auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")


def _seed() -> Any:
    return option(0, "Seed of every random draw (views, batch order, initial weights).", type=click.INT)


def _dataset(default: str | None = "digits", help: str = "Dataset from `kdcache datasets`.") -> Any:
    return option(default, help)


def _data_root() -> Any:
    return option(None, "Folder holding the dataset (CIFAR, imagefolder, voc, cityscapes); for --dataset text the "
                        "corpus: pydoc (CPython's own documentation, the default), a UTF-8 file, a folder of "
                        ".txt/.md/.rst files or hf-disk:FOLDER (a Hugging Face dataset saved with save_to_disk).",
                  type=click.Path())


def _seq_len() -> Any:
    return option(None, "--dataset text: tokens per sequence (default 64; distill: the cache's).",
                  type=click.IntRange(min=2))


def _tokenizer() -> Any:
    return option(None, "--dataset text: a tokenizer.json (or a folder holding one, or GPT-2's vocab.json and "
                        "merges.txt); default: a byte-level BPE of --vocab-size trained on the corpus (dump-teacher: "
                        "the teacher's run folder's, distill: the cache's).", type=click.Path(exists=True))


def _vocab_size() -> Any:
    return option(None, "--dataset text: tokens of the BPE trained on the corpus when no --tokenizer is given "
                        "(default 4096).", type=click.IntRange(min=260))


def _image_size(more: str = "") -> Any:
    return option(None, "Side of the square views of imagefolder (default 224), of synthetic's images (default 32) "
                        "and of voc's and cityscapes' (default 64)." + more, type=click.IntRange(min=8))


def _workers() -> Any:
    return option(None, "DataLoader worker processes that read, decode and crop streamed files (default: the CPUs less "
                        "one, at most 16; 0 reads in the main process).", type=click.IntRange(min=0))


def _preload() -> Any:
    return option(False, "Decode an imagefolder split once into memory (shorter side to --image-size, centre crop) "
                         "instead of streaming its files: for small folders.")


def _max_image_pixels() -> Any:
    return option(None, "Refuse an image whose header declares more pixels than this, before decoding it (default "
                        "89478485, Pillow's limit: a small file can declare gigabytes of pixels); raise it for trusted "
                        "large images.", type=click.IntRange(min=1))


def _class_names(whose: str = "A clip: teacher's") -> Any:
    return option(None, f"{whose} class names for its prompts: a UTF-8 file of one name per line, in label order "
                        "(default: the dataset's: digits' words, CIFAR's label names, an image folder's folder "
                        "names).", type=click.Path(exists=True, dir_okay=False))


def _classes() -> Any:
    return option(None, "Only the samples of these classes, e.g. 0-4 or 0,2,5 (of data held in memory): labels and "
                        "the head's class count stay the dataset's; both splits, and a cache records them (distill "
                        "and eval then read the same classes unless given).")


def _scales(default: tuple[int, ...] | None, help: str) -> Any:
    return option(default, help, parse="scales")


def _overwrite(help: str) -> Any:
    return option(False, help)


AUG_DEFAULT = "Default: cifar for data held in memory, imagenet for an image folder streamed from its files."


@dataclass(frozen=True)
class TrainConfig:
    """The SGD recipe of the CIFAR KD literature, shared by teachers and students; optimizer, schedule, warm-up,
    label smoothing, weight EMA, precision and clipping give the recipes of timm and FKD (stages/recipe_options)."""

    COMMAND: ClassVar[str] = ""
    NOT_OPTIONS: ClassVar[tuple[str, ...]] = ()  # fields of a base class that are no option of this command

    epochs: int = option(240, "Epochs; the lr decays ×0.1 at 62.5/75/87.5 % of them (and loss warm-ups scale with "
                              "epochs/240).", type=click.IntRange(min=1))
    batch_size: int = option(64, "Images per SGD step.", type=click.IntRange(min=2))
    lr: float = option(0.05, "Initial SGD learning rate.", type=click.FloatRange(min=0, min_open=True))
    momentum: float = option(0.9, "SGD momentum (the papers'); adamw ignores it.", type=click.FloatRange(0, 1))
    weight_decay: float = option(5e-4, "Weight decay (decoupled for adamw).", type=click.FloatRange(min=0))
    # fractions of the run: epochs 150, 180, 210 of 240
    lr_decay_at: tuple[float, ...] = option((0.625, 0.75, 0.875), "--schedule step: the fractions of the epochs at "
                                            "which the lr is multiplied by --lr-decay-rate, comma-separated.",
                                            parse="floats")
    lr_decay_rate: float = option(0.1, "--schedule step: the lr's factor at each --lr-decay-at.",
                                  type=click.FloatRange(min=0, min_open=True))
    seed: int = _seed()
    device: str = _device()
    augmentation: str | None = option(None, "Augmentation policy (cifar: pad 4, crop, flip; imagenet: "
                                            f"RandomResizedCrop, flip; none). {AUG_DEFAULT}", flag="--aug")
    optimizer: str = option("sgd", "sgd (momentum 0.9, the papers') or adamw (timm's and FKD's; give it "
                                   "--weight-decay 0.05).", type=click.Choice(["sgd", "adamw"]))
    schedule: str = option("step", "step: lr x0.1 at 62.5/75/87.5 % of the epochs (the papers'); cosine: to 0 at the "
                                   "last step. The lr is set per step.", type=click.Choice(["step", "cosine"]))
    lr_warmup_epochs: float = option(0.0, "Linear warm-up of the learning rate over these epochs (per step); not the "
                                          "loss warm-up of --warmup-epochs.", type=click.FloatRange(min=0))
    label_smoothing: float = option(0.0, "Label smoothing of the cross-entropy term.",
                                    type=click.FloatRange(0, 1, max_open=True))
    ema_decay: float | None = option(None, "Keep a weight EMA of the model (e.g. 0.9998), evaluated each epoch "
                                           "(test_acc_ema) and saved as model_ema.pt.",
                                     type=click.FloatRange(0, 1, min_open=True, max_open=True))
    precision: str = option("auto", "Training precision: auto is bf16 autocast on CUDA and fp32 on the CPU; fp16 "
                                    "(CUDA) trains with a gradient scaler, for GPUs without bf16 (V100, 2080 Ti).",
                            type=click.Choice(["auto", "bf16", "fp16", "fp32"]))
    clip_grad: float | None = option(None, "Clip the gradients' global norm to this.",
                                     type=click.FloatRange(min=0, min_open=True))
    views_per_step: int = option(1, "Train each step on this many views of the same samples (epoch e: views e*S to "
                                    "e*S+S-1 of the order), their losses summed, as SLD's official code trains on two "
                                    "views per step (--loss sld --views-per-step 2).", type=click.IntRange(min=1))

    def lr_milestones(self) -> list[int]:
        """Epochs at which the learning rate is multiplied by lr_decay_rate."""
        return sorted({max(1, round(f * self.epochs)) for f in self.lr_decay_at})


@dataclass(frozen=True)
class TeacherConfig(TrainConfig):
    """`kdcache train-teacher`."""

    COMMAND: ClassVar[str] = "train-teacher"
    NOT_OPTIONS: ClassVar[tuple[str, ...]] = ("views_per_step",)  # a teacher trains on one view per step

    model: str = option("resnet20", "Model spec: a kdcache name, timm:NAME, torchvision:NAME or python:module:callable "
                                    "(`kdcache models`).")
    dataset: str = _dataset()
    data_root: str | None = _data_root()
    image_size: int | None = _image_size(" Other datasets (digits, CIFAR) make their views at their own size and "
                                         "resize them to it.")
    workers: int | None = _workers()  # None: data.files.default_workers()
    preload: bool = _preload()
    max_image_pixels: int | None = _max_image_pixels()  # None: the loader's (Pillow's limit)
    classes: str | None = _classes()
    seq_len: int | None = _seq_len()
    tokenizer: str | None = _tokenizer()
    vocab_size: int | None = _vocab_size()
    out: str = option("runs/teacher", "Folder for model.pt (weights only), model.json, metrics.csv, config.yaml.")


@dataclass(frozen=True)
class DumpConfig:
    """`kdcache dump-teacher`."""

    COMMAND: ClassVar[str] = "dump-teacher"

    checkpoint: str = option("", "Teacher weights: a .pt/.pth (mdistiller's, torchvision's, kdcache's model.pt), a "
                                 ".safetensors (timm's, Hugging Face's), or a kdcache run folder. Never downloaded. "
                                 "An hf:PATH teacher needs none (its folder's weights; given, it is loaded over them).")
    teacher: str = option("", "Teacher model spec: a kdcache name, timm:NAME, torchvision:NAME, gpt:..., hf:PATH, "
                              "clip:NAME (open_clip's CLIP: its zero-shot logits against the data's class names, "
                              "'a photo of a {name}.') or python:module:callable; read from the checkpoint's kdcache "
                              "sidecar when omitted.")
    class_names: str | None = _class_names()
    dataset: str = _dataset()
    data_root: str | None = _data_root()
    image_size: int | None = _image_size()
    workers: int | None = _workers()
    preload: bool = _preload()
    max_image_pixels: int | None = _max_image_pixels()
    classes: str | None = _classes()
    seq_len: int | None = _seq_len()
    tokenizer: str | None = _tokenizer()
    vocab_size: int | None = _vocab_size()
    token_width: str = option("q6", "--dataset text: how each position's top-k log-probabilities are stored: q6, q8 or "
                                    "q4 (6, 8 or 4-bit codes of a step per position), q8f (8-bit codes of 1/16 nat) or "
                                    "fp16; --topk is the ids per position (default 36). benchmarks/TOKENS.md measures "
                                    "each.", type=click.Choice(["q6", "q8", "q4", "q8f", "fp16"]))
    split: str = option("train", "Which split's images (or sequences) to cache.", type=click.Choice(["train", "test"]))
    views: int | None = option(None, "Views per sample to cache (default 4).", type=click.IntRange(min=1))
    exhaustive: bool = option(False, "Cache every view of a finite policy (cifar: 162) per sample, in a seeded random "
                                     "order.")
    scales: tuple[int, ...] = _scales((1, 2, 4), "Region scales; region count is the sum of their squares.")
    augmentation: str | None = option(None, "Augmentation policy replayed for each view (cifar, imagenet, none; "
                                            "randaugment: the default's crop and flip, then torchvision's "
                                            f"RandAugment). {AUG_DEFAULT}", flag="--aug")
    ra_ops: int | None = option(None, "--aug randaugment: ops per view (default 2).", type=click.IntRange(min=1))
    ra_magnitude: int | None = option(None, "--aug randaugment: magnitude bin of every op, 0-30 (default 9).",
                                      type=click.IntRange(0, 30))
    mix: str | None = option(None, "Mix each view with a partner sample's view of the same cached view (partner, "
                                   "lambda and box stored with the view; the teacher sees the mixed image, the "
                                   "student's cross-entropy uses both labels; streamed folders read the partner's "
                                   "file).", type=click.Choice(["mixup", "cutmix"]))
    mix_alpha: float = option(1.0, "--mix: lambda ~ Beta(alpha, alpha).", type=click.FloatRange(min=0, min_open=True))
    mix_prob: float = option(1.0, "--mix: the share of views mixed.", type=click.FloatRange(0, 1))
    batch_size: int = option(256, "Images per teacher forward pass.", type=click.IntRange(min=1))
    device: str = _device()
    dtype: str = option("float16", "Stored logit precision.", type=click.Choice(["float16", "float32"]))
    format: str | None = option(None, "Store format (default: from --out's suffix, else zarr).",
                                type=click.Choice(["zarr", "hdf5"]))
    out: str = option("caches/teacher.zarr", "Cache path (.zarr directory or .h5 file), or a Zarr URL (s3://, gs://, "
                                             "file://); its resolved config goes to config.yaml beside its zarr.json "
                                             "(a .h5 file: to FILE.config.yaml).")
    seed: int = _seed()
    block_size: int = option(0, "Samples per chunk (0: about 2 MB per chunk).", type=click.IntRange(min=0))
    topk: int = option(0, "Store per region only the k largest logits, their classes and one logit for the rest "
                          "(format 2; e.g. 20 for 1000 classes, see benchmarks/TOPK.md); 0 stores every logit. "
                          "--dataset text: the token ids kept per position (0: 36, benchmarks/TOKENS.md). A dense "
                          "dataset (digits-scenes): the classes kept per map position (0: all).",
                       type=click.IntRange(min=0))
    stride: int | None = option(None, "A dense dataset (digits-scenes: a label per pixel): the output stride of the "
                                      "cached logit maps, each position the mean of a stride x stride block of the "
                                      "teacher's per-pixel logits (default 4; 1 keeps every pixel; it must divide the "
                                      "image's height and width). benchmarks/RESULTS.md measures bytes and error per "
                                      "stride.", type=click.IntRange(min=1))
    outputs: str = option("", "What to cache besides the region logits, comma-separated: embedding (the pooled "
                              "features), attention (every stage's attention map) or attention:STAGE, hint (the "
                              "middle stage's feature map, FitNet's) or hint:STAGE. Default: what --loss needs, else "
                              "regions only. --dataset text: hidden (the teacher's final hidden state at every "
                              "position, for --loss distilbert).")
    losses: tuple[str, ...] = option((), "Cache what these losses read (fitnet: a hint; at: attention maps; sp, rkd, "
                                         "crd, irg, clip: the embedding); repeatable.", flag="--loss", multiple=True)
    views_from: str | None = option(None, "Run this teacher on exactly the views of another cache (its dataset, "
                                          "split, policy, views and seed), for several teachers: distill --cache A "
                                          "--cache B.", type=click.Path(exists=True))
    overwrite: bool = _overwrite("Delete an existing cache at --out and start over.")

    def mixing(self) -> dict | None:
        """--mix and its options as the policy takes them, or None without mixing."""
        return {"mode": self.mix, "alpha": self.mix_alpha, "prob": self.mix_prob} if self.mix else None


@dataclass(frozen=True)
class SynthesizeConfig:
    """`kdcache synthesize`: DeepInversion's paper parameters for CIFAR-10 (NVlabs/DeepInversion cifar10/README.md:
    batches of 256, 2000 iterations, Adam lr 0.05, BatchNorm weight 10; the script's total variation 2.5e-5, ℓ2 0,
    jitter 2)."""

    COMMAND: ClassVar[str] = "synthesize"

    checkpoint: str = option("", "Teacher weights (.pt, .safetensors, or a kdcache run folder).",
                             type=click.Path(exists=True))
    teacher: str = option("", "Teacher model spec (as dump-teacher's); read from the checkpoint's sidecar when "
                              "omitted. It needs BatchNorm layers.")
    dataset: str = _dataset(help="The teacher's dataset: image shape, classes and normalisation of the synthesised "
                                 "images, and the real test split students are evaluated on.")
    data_root: str | None = option(None, "Folder holding that dataset (CIFAR).", type=click.Path(file_okay=False))
    image_size: int | None = _image_size()
    num: int = option(1024, "Images to synthesise (balanced over the classes).", type=click.IntRange(min=1))
    out: str = option("synthesized", "Folder to write: the images as a dataset (--dataset synthesized --data-root "
                                     "OUT), the teacher's cache over them, OUT/teacher.zarr, and config.yaml. A rerun "
                                     "resumes it.")
    batch_size: int = option(256, "Images optimised together.", type=click.IntRange(min=1))
    iterations: int = option(2000, "Adam steps per batch.", type=click.IntRange(min=0))
    lr: float = option(0.05, "Adam's learning rate on the inputs.", type=click.FloatRange(min=0, min_open=True))
    bn_weight: float = option(10.0, "Weight of matching the BatchNorm statistics.", type=click.FloatRange(min=0))
    tv_weight: float = option(2.5e-5, "Weight of the total-variation prior.", type=click.FloatRange(min=0))
    l2_weight: float = option(0.0, "Weight of the inputs' l2 norm.", type=click.FloatRange(min=0))
    jitter: int = option(2, "Random roll of the inputs per step, in pixels.", type=click.IntRange(min=0))
    labels: str = option("target", "Each image's label: the class it was synthesised for, or the class the teacher "
                                   "names (with --iterations 0: noise the teacher labels, the floor a synthesis "
                                   "should beat).", type=click.Choice(["target", "teacher"]))
    augmentation: str = option("cifar", "Policy of the cached views.", flag="--aug")
    views: int = option(4, "Views per image in the cache.", type=click.IntRange(min=1))
    scales: tuple[int, ...] = _scales((1, 2, 4), "Region scales of the cache.")
    seed: int = _seed()
    device: str = _device()
    overwrite: bool = _overwrite("Start over in a folder that holds another synthesis.")


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    """`kdcache distill`."""

    COMMAND: ClassVar[str] = "distill"

    cache: str | None = option(None, "Teacher cache written by dump-teacher (a path, or a Zarr URL such as s3://...); "
                                     "repeat for several teachers on the same views (dump-teacher --views-from): their "
                                     "ensemble teaches.", multiple=True, rest="extra_caches")
    extra_caches: tuple[str, ...] = ()  # further teachers' caches over the same views (--cache A --cache B)
    teacher_weights: tuple[float, ...] = option((), "With several --cache, each teacher's weight in the ensemble, "
                                                    "comma-separated (default equal).", parse="floats")
    live_teacher: str | None = option(None, "Teacher weights (a file or a kdcache run folder) run on every batch "
                                            "instead: the online baseline (fresh views each epoch, or the cache's "
                                            "views when --cache is given too).")
    teacher: str | None = option(None, "Model spec of --live-teacher (read from its sidecar when omitted); with "
                                       "--cache, the cache must come from this spec.")
    class_names: str | None = _class_names("A clip: --live-teacher's")
    students: tuple[str, ...] = option(("resnet8x4",), "Student model spec: a kdcache name, timm:NAME, "
                                                       "torchvision:NAME or python:module:callable; repeat for several "
                                                       "students.", flag="--student", multiple=True)
    student_checkpoint: str | None = option(None, "Start the student from these weights (.pt, .pth, .safetensors, or "
                                                  "a kdcache run folder) instead of fresh ones; shape-checked, and a "
                                                  "head for another class count (ImageNet's 1000) is replaced by a "
                                                  "fresh one, said in a line. One --student.",
                                            type=click.Path(exists=True))
    losses: tuple[str, ...] = option(("sdd-lskd",), "Loss from `kdcache losses`; repeat for several. Every student is "
                                                    "trained with every loss. LOSS,LOSS[=WEIGHT] sums losses in one "
                                                    "run (e.g. sdd-lskd,rkd; cross-entropy once, WEIGHT the distill "
                                                    "weight of that loss).", flag="--loss", multiple=True)
    pairs: tuple[str, ...] = option((), "STUDENT:LOSS to train, repeatable; replaces the --student x --loss grid (e.g. "
                                        "--pair resnet8x4:sdd-lskd --pair timm:resnet18:dkd).", flag="--pair",
                                    multiple=True)
    scales: tuple[int, ...] | None = _scales(None, "Region scales (default: the cache's; a subset such as 1,2 of a "
                                                   "1,2,4 cache is taken from the stored regions).")
    dataset: str | None = _dataset(None, "Dataset (default: the cache's).")
    data_root: str | None = _data_root()
    image_size: int | None = option(None, "Side of the student's views. With --cache: the cache's (default) or smaller, "
                                          "the teacher's views at a lower resolution (cross-resolution distillation: "
                                          "each file's crop box resized to this side, a view held in memory resized); "
                                          "the test split at this side too. Without: imagefolder's and synthetic's "
                                          "side (default 224, 32), other datasets' views resized to it.",
                                    type=click.IntRange(min=8))
    workers: int | None = _workers()
    preload: bool = _preload()
    max_image_pixels: int | None = _max_image_pixels()
    classes: str | None = _classes()
    tokenizer: str | None = _tokenizer()
    token_tail: str = option("bucket", "A token cache's losses: bucket compares the teacher's k ids and the rest of the "
                                       "vocabulary as one more outcome; renormalize, the k ids alone (the teacher "
                                       "renormalised over them).", type=click.Choice(["bucket", "renormalize"]))
    augmentation: str | None = option(None, "Policy of the fresh views of a run without --cache (cifar, imagenet, "
                                            "none, randaugment); a cache's runs replay its views. " + AUG_DEFAULT,
                                      flag="--aug")
    view_order: str = option("cycle", "Epoch e uses view e mod K (cycle) or a seeded permutation of the views per "
                                      "round (shuffle).", type=click.Choice(["cycle", "shuffle"]))
    batch_path: str = option("device", "device: whole view on the device, batches as tensor ops (fast); dataset: "
                                       "CacheDataset + DataLoader (general).", type=click.Choice(["device", "dataset"]))
    out: str = option("runs/distill", "Folder for one sub-folder per run (with its config.yaml), summary.csv (a row "
                                      "added per finished run) and summary.png. A run's folder is STUDENT-LOSS, or "
                                      "STUDENT-LOSS-2, -3, ... when that holds another run: no run is replaced.")
    name: str | None = option(None, "The run's folder under --out, exactly (one run only); refused when it holds a "
                                    "run, unless --resume.")
    resume: bool = option(False, "Continue the run --name names, else each run's latest unfinished folder (a finished "
                                 "one is kept as it is; with none, a new run starts).")
    # loss overrides; None keeps the loss's published default (configs/losses.yaml)
    # a loss schedule (linear(8,2)) is parsed once, by the flag's type or a config file's value, into a Schedule
    temperature: float | Schedule | None = _loss_value("temperature")
    ce_weight: float | Schedule | None = _loss_value("cross-entropy weight")
    distill_weight: float | Schedule | None = _loss_value("distillation weight")
    alpha: float | Schedule | None = _loss_value("alpha (DKD's)")
    beta: float | Schedule | None = _loss_value("beta (DKD's)")
    warmup_epochs: float | None = option(None, "Override the loss warm-up (in epochs of this run).", type=click.FLOAT)
    negatives: int | None = option(None, "Override CRD's negatives per sample, K: other samples' cached embeddings "
                                         "(at most N - 1 are drawn).", type=click.INT)
    kd_classes: str | None = option(None, "The distillation term reads only these classes' logits, e.g. 0-4, the "
                                          "teacher's and the student's alike (its softmax over them); cross-entropy "
                                          "reads every class. Learning without Forgetting's KD on the old classes "
                                          "(README: Born-again generations and continual learning). Loss kd.")
    mutual: bool = option(False, "Deep mutual learning: train the --student models together, step by step on the same "
                                 "batches, each also learning from the others' predictions (loss dml; with --cache, "
                                 "plus the one --loss). Two or more students.")
    ema_teacher: float | None = option(None, "The teacher is the exponential moving average of the student's own "
                                             "weights with this decay, e.g. 0.999 (mean teacher); no --cache.",
                                       type=click.FLOAT)
    qat: str | None = option(None, "Quantisation-aware training: int8 trains the student with fake quantisation "
                                   "(torch's FX graph mode, from the first step, in float32) so the loss reads the "
                                   "quantised outputs, then converts it to int8 on the CPU: model_int8.pt (its "
                                   "weights, which eval rebuilds it from) and model_int8.torchscript.pt (a program "
                                   "for your deployment, never loaded by kdcache) beside model.pt (the float "
                                   "weights), test_acc_int8 beside test_acc (fake-quantised). Logit losses only "
                                   "(regions included); known: int8.")
    generations: int = option(1, "Born-again networks: train this many generations of the one --student and --loss, "
                                 "generation G+1 from generation G's student dumped on the first --cache's views "
                                 "(OUT/genG/ holds generation G's run and its student's cache student.zarr; "
                                 "OUT/summary.csv every generation's accuracy).", type=click.IntRange(min=1))
    generations_ensemble: bool = option(False, "With --generations N: the last generation learns from the ensemble "
                                               "(equal weights) of every earlier generation's student (BAN's BANE).")

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

    def one_run(self, student: str, loss: str) -> DistillConfig:
        """The config that repeats one run of this sweep (saved in its folder): its student and loss (under --mutual,
        every student), in a folder of its own (no --name, no --resume)."""
        if self.mutual:
            return dataclasses.replace(self, name=None, resume=False)
        return dataclasses.replace(self, students=(student,), losses=(loss,), pairs=(), name=None, resume=False)

    def loss_overrides(self) -> dict[str, float | int | Schedule]:
        """The loss hyper-parameters given explicitly."""
        names = ("temperature", "ce_weight", "distill_weight", "alpha", "beta", "warmup_epochs", "negatives")
        smoothing = {"label_smoothing": self.label_smoothing} if self.label_smoothing else {}
        restricted = {"kd_classes": parse_kd_classes(self.kd_classes)} if self.kd_classes else {}
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None} | smoothing | restricted




@dataclass(frozen=True)
class QuickstartConfig:
    """`kdcache quickstart`."""

    COMMAND: ClassVar[str] = "quickstart"

    out: str | None = option(None, "Folder for the teacher and students (and config.yaml); default runs/quickstart, "
                                   "with --text runs/quickstart-text.")
    cache: str | None = option(None, "Where the teacher cache goes (default caches/quickstart-digits.zarr, with --text "
                                     "caches/quickstart-text.zarr).")
    text: bool = option(False, "The language-model quickstart instead: a BPE vocabulary, a GPT teacher and two GPT "
                               "students on CPython's bundled documentation, compared by held-out perplexity.")
    device: str = _device()


@dataclass(frozen=True)
class RecipeConfig:
    """`kdcache recipe`."""

    COMMAND: ClassVar[str] = "recipe"

    recipe: str | None = option(None, "A recipe YAML file or the name of a packaged one (`kdcache recipe --list`).")
    checkpoint: str | None = option(None, "Teacher weights (an mdistiller .pth, kdcache's model.pt or run folder, a "
                                          ".safetensors) of the recipe's teacher.", type=click.Path())
    data_root: str | None = option(None, "Folder holding the dataset in torchvision's on-disk format (CIFAR-100: "
                                         "DATA/cifar-100-python/).", type=click.Path(file_okay=False))
    out: str | None = option(None, "Folder for one sub-folder per run, summary.csv, table.md, table.csv and "
                                   "config.yaml (default runs/RECIPE).")
    cache: str | None = option(None, "Teacher cache: reused when complete, resumed when partial, dumped when missing "
                                     "(default caches/DATASET-TEACHER-VIEWS.zarr, shared by recipes with the same "
                                     "teacher).")
    epochs: int | None = option(None, "Epochs per run instead of the recipe's 240 (lr decay and warm-ups scale with "
                                      "them); the table says how many were run.", type=click.IntRange(min=1))
    losses: tuple[str, ...] = option((), "Run only this loss (repeatable); default: every loss the recipe lists.",
                                     flag="--loss", multiple=True)
    views: int | None = option(None, "Cache K sampled views per image instead of the recipe's exhaustive 162 (16 "
                                     "views of CIFAR-100: 3.4 GB instead of 34 GB).", type=click.IntRange(min=1))
    device: str = _device()
    resume: bool = option(False, "Continue each run from its last checkpoint (a finished run is kept).")


def parse_kd_classes(text: str, num_classes: int | None = None) -> tuple[int, ...]:
    """--kd-classes as the classes it names (each below num_classes where given)."""
    from kdcache.data import parse_classes  # the data layer parses every class list; config stays light

    return parse_classes(text, num_classes, "--kd-classes")


def loader_options(config: Any) -> dict[str, Any]:
    """The loader options a config sets (image_size, max_image_pixels, preload, classes; a text source's seq_len,
    tokenizer, vocab_size), for load_dataset."""
    options = {name: getattr(config, name) for name in ("image_size", "max_image_pixels", "seq_len", "tokenizer",
                                                        "vocab_size", "classes")
               if getattr(config, name, None) is not None}
    return {**options, "preload": True} if getattr(config, "preload", False) else options


def option_fields(cls: Any) -> list[dataclasses.Field]:
    """A config class's (or config's) fields that are options of its command (declared with `option`)."""
    return [f for f in fields(cls) if "help" in f.metadata and f.name not in getattr(cls, "NOT_OPTIONS", ())]


def option_key(field: dataclasses.Field) -> str:
    """The key of a field in a config file: its flag's name, `-` as `_` (`--student` -> student)."""
    return (field.metadata.get("flag") or field.name).lstrip("-").replace("-", "_")


def options_given(config: Any, names: tuple[str, ...], allowed: tuple[Any, ...] = ()) -> list[str]:
    """The flags (`--aug`) of those fields among `names` that `config` sets to other than their defaults (or an
    `allowed` value): what a command that takes none of them must refuse rather than ignore."""
    declared = {field.name: field for field in fields(config)}
    return ["--" + option_key(declared[name]).replace("_", "-") for name in names
            if getattr(config, name) != declared[name].default and getattr(config, name) not in allowed]


def config_keys(cls: type) -> dict[str, str]:
    """A config class's keys (its flags' names) -> the field each sets."""
    return {option_key(f): f.name for f in option_fields(cls)}


def old_keys(cls: type) -> dict[str, str]:
    """The field names that are no key of their own (`students`, `augmentation`) -> the key to use instead; they still
    set their field, for a release."""
    keys = config_keys(cls)
    instead = {f.metadata["rest"]: option_key(f) for f in fields(cls) if f.metadata.get("rest")}
    return {f.name: instead.get(f.name) or option_key(f) for f in fields(cls)
            if f.name not in keys and f.name not in getattr(cls, "NOT_OPTIONS", ())}


def fields_from_keys(cls: type, document: dict[str, Any], where: Any) -> dict[str, Any]:
    """A config file's mapping (keys: the flag names, `-` or `_`) as field values; an unknown key is refused, naming
    the nearest known one, and an old field name works with a deprecation line."""
    keys, old = config_keys(cls), old_keys(cls)
    fields_by_name, hints = {f.name: f for f in fields(cls)}, typing.get_type_hints(cls)
    values = {}
    for key, value in document.items():
        name = str(key).replace("-", "_")
        if name in old:
            _say_deprecated(str(where), str(key), old[name])
        elif name not in keys:
            near = difflib.get_close_matches(name, list(keys), n=1)
            advice = f"did you mean {near[0]}?" if near else f"known: {', '.join(sorted(keys))}"
            raise KdcacheError(f"{where}: unknown key {key!r}; {advice} (the keys are the flag names of `kdcache "
                               f"{cls.COMMAND} --help`)")
        values[keys.get(name, name)] = value
        _check(fields_by_name[keys.get(name, name)], hints[keys.get(name, name)], key, value, where)
    return values


def _check(field: dataclasses.Field, hint: Any, key: str, value: Any, where: Any) -> None:
    """Hold a value from a file to its field's type, then to its flag's click type (a range, a choice, an existing
    path), as the flag is; the field's default (such as "" for no --checkpoint) stands for the flag not given."""
    kind = field.metadata.get("type")
    if kind is None or value is None or isinstance(value, (list, tuple)):  # typed item by item in load_config
        return
    value = _coerce(key, value, hint, where)
    if value == field.default:
        return
    try:
        kind.convert(value, None, None)
    except click.BadParameter as error:
        raise KdcacheError(f"{where}: {key}: {error.message}") from None


@functools.lru_cache(maxsize=None)
def _say_deprecated(where: str, key: str, new_key: str) -> None:
    """One line per file and key, however often the file is read."""
    print(f"kdcache: {key} (in {where}) is deprecated and goes in the next release; use {new_key}", file=sys.stderr)


def load_config(cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                section: str | None = None) -> C:
    """A config from a YAML file (its `section` mapping when it has one) whose keys are the flag names, with
    `overrides` (field names; None: unset) on top; unknown keys are an error."""
    values: dict[str, Any] = {}
    if path is not None:
        values = fields_from_keys(cls, _read_yaml(Path(path), section), path)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise KdcacheError(f"{cls.__name__} has no field {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    for field in fields(cls):  # a list given to --cache: the first cache, then the others
        rest = field.metadata.get("rest")
        if rest and isinstance(values.get(field.name), (list, tuple)):
            values[field.name], *values[rest] = values[field.name] or [None]
    key = {name: key for key, name in config_keys(cls).items()}  # what a message calls a field
    return cls(**{name: _coerce(key.get(name, name), value, hints[name], path) for name, value in values.items()})


def config_document(config: Any) -> dict[str, Any]:
    """A config as a config file holds it, keyed by flag names: what `load_config` reads back as an equal config."""
    document = {}
    for field in option_fields(config):
        value, rest = getattr(config, field.name), field.metadata.get("rest")
        if rest and getattr(config, rest):
            value = [value, *getattr(config, rest)]
        document[option_key(field)] = _plain(value)
    return document


def config_text(config: Any) -> str:
    """The resolved config as a YAML file that repeats the run: `kdcache COMMAND --config FILE`."""
    return (f"# the resolved config (defaults, then the --config file, then the flags) of a kdcache {config.COMMAND} "
            f"run;\n# `kdcache {config.COMMAND} --config THIS_FILE` repeats it\n"
            + yaml.safe_dump(config_document(config), sort_keys=False, allow_unicode=True, default_flow_style=None))


def save_config(config: Any, folder: str | Path) -> Path:
    """Write the resolved config to FOLDER/config.yaml (the folder made if need be); returns its path."""
    path = Path(folder) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_text(config))
    return path


def config_dict(config: Any) -> dict[str, Any]:
    """A config as JSON-able plain values (saved in checkpoints and metadata)."""
    return {field.name: _plain(getattr(config, field.name)) for field in fields(config)}


def _plain(value: Any) -> Any:
    """A config value as YAML and JSON hold it: a tuple as a list, a schedule as its text."""
    if isinstance(value, Schedule):
        return str(value)
    return list(value) if isinstance(value, tuple) else value

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
        if option is Schedule:  # the text (or a mapping, a list: refused with the grammar)
            try:
                return parse_schedule(value)
            except KdcacheError as error:
                raise KdcacheError(f"{where or 'config'}: {name}: {error}") from None
    raise KdcacheError(f"{where or 'config'}: {name} should be {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def recorded_config(config: Any) -> dict[str, Any]:
    """The config as saved with a run, less what does not change what this run computes: the device, resuming,
    its folder's --name, and which other students and losses share the sweep (so a run resumes when the sweep
    around it changes)."""
    return {k: v for k, v in config_dict(config).items()
            if k not in ("device", "resume", "name", "students", "losses", "pairs")}
