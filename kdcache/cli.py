"""The `kdcache` command: thin, every command one call into the library."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from kdcache.config import (
    DistillConfig,
    DumpConfig,
    SynthesizeConfig,
    TeacherConfig,
    TrainConfig,
    field_default,
    load_config,
)
from kdcache.errors import KdcacheError

# a flag renamed so that one idea has one name in every command: old parameter -> the config field it sets
RENAMED = {"augmentation_old_name": "augmentation"}


def _overrides(ctx: click.Context) -> dict[str, Any]:
    """The flags given on the command line (they win over the recipe, which wins over the defaults)."""
    given = {name: value for name, value in ctx.params.items()
             if name != "config" and ctx.get_parameter_source(name) is not ParameterSource.DEFAULT}
    for old, new in RENAMED.items():
        if old in given:
            given[new] = given.pop(old)
    return given


def _deprecated(new_flag: str) -> Any:
    """A callback for a flag kept for a release under its old name: it works, and says what to use instead."""
    def warn(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            click.echo(f"kdcache: {param.opts[0]} is deprecated and goes in the next release; use {new_flag}", err=True)
        return value
    return warn


def _scales(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    from kdcache.models import parse_scales

    return None if value is None else parse_scales(value)


def _floats(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(item) for item in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers such as 0.5,0.5, got {value!r}") from None


def _default(cls: type, name: str) -> dict[str, Any]:
    value = field_default(cls, name)
    if isinstance(value, tuple):
        value = ",".join(map(str, value))
    return {"default": value, "show_default": True}


AUG_DEFAULT = "Default: cifar for data held in memory, imagenet for an image folder streamed from its files."
config_option = click.option("--config", type=click.Path(dir_okay=False), default=None,
                             help="YAML recipe; its keys are these options' names, and flags given here override it.")
device_option = click.option("--device", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")
seed_option = click.option("--seed", type=int, help="Seed of every random draw (views, batch order, initial weights).")
image_size_option = click.option("--image-size", type=click.IntRange(min=8), help="Side of the square views of "
                                 "imagefolder (default 224; distill: the cache's) and of synthetic's images "
                                 "(default 32).")


def file_options(command: Callable) -> Callable:
    """--workers, --preload and --max-image-pixels: how an image folder is read."""
    workers = click.option("--workers", type=click.IntRange(min=0), help="DataLoader worker processes that read, "
                           "decode and crop streamed files (default: the CPUs less one, at most 16; 0 reads in the "
                           "main process).")
    preload = click.option("--preload", is_flag=True, default=None, help="Decode an imagefolder split once into "
                           "memory (shorter side to --image-size, centre crop) instead of streaming its files: for "
                           "small folders.")
    max_pixels = click.option("--max-image-pixels", type=click.IntRange(min=1), help="Refuse an image whose header "
                              "declares more pixels than this, before decoding it (default 89478485, Pillow's limit: "
                              "a small file can declare gigabytes of pixels); raise it for trusted large images.")
    return workers(preload(max_pixels(command)))


def recipe_options(command: Callable) -> Callable:
    """The training recipe: optimiser, schedule, warm-up, label smoothing, weight EMA, precision, clipping."""
    options = [
        click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), help="sgd (momentum 0.9, the papers') or "
                     "adamw (timm's and FKD's; give it --weight-decay 0.05).", **_default(TrainConfig, "optimizer")),
        click.option("--weight-decay", type=click.FloatRange(min=0), help="Weight decay (decoupled for adamw).",
                     **_default(TrainConfig, "weight_decay")),
        click.option("--schedule", type=click.Choice(["step", "cosine"]), help="step: lr x0.1 at 62.5/75/87.5 % "
                     "of the epochs (the papers'); cosine: to 0 at the last step. The lr is set per step.",
                     **_default(TrainConfig, "schedule")),
        click.option("--lr-warmup-epochs", type=click.FloatRange(min=0), help="Linear warm-up of the learning "
                     "rate over these epochs (per step); not the loss warm-up of --warmup-epochs.",
                     **_default(TrainConfig, "lr_warmup_epochs")),
        click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), help="Label smoothing of "
                     "the cross-entropy term.", **_default(TrainConfig, "label_smoothing")),
        click.option("--ema-decay", type=click.FloatRange(0, 1, min_open=True, max_open=True), help="Keep a "
                     "weight EMA of the model (e.g. 0.9998), evaluated each epoch (test_acc_ema) and saved as "
                     "model_ema.pt."),
        click.option("--precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), help="Training "
                     "precision: auto is bf16 autocast on CUDA and fp32 on the CPU; fp16 (CUDA) trains with a "
                     "gradient scaler, for GPUs without bf16 (V100, 2080 Ti).", **_default(TrainConfig, "precision")),
        click.option("--clip-grad", type=click.FloatRange(min=0, min_open=True), help="Clip the gradients' "
                     "global norm to this."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kdcache", prog_name="kdcache")
def cli() -> None:
    """Offline knowledge distillation: run the teacher once, cache its multi-scale logits, train many students.

    \b
    Start here:   kdcache quickstart
    Stage 1:      kdcache dump-teacher --checkpoint T.pt --teacher resnet32x4 --dataset cifar100 --data-root DATA
    Stage 2:      kdcache distill --cache caches/teacher.zarr --student resnet8x4
    Evaluate:     kdcache eval runs/distill/resnet8x4-sdd-lskd (top-1, top-5, loss), kdcache eval --cache CACHE
    Many GPUs:    torchrun --nproc-per-node 8 -m kdcache dump-teacher ... (or distill ...): see the README
    """


@cli.command()
@click.option("--out", default="runs/quickstart", show_default=True, help="Folder for the teacher and students.")
@click.option("--cache", "cache_path", default="caches/quickstart-digits.zarr", show_default=True,
              help="Where the teacher cache goes.")
@device_option
def quickstart(out: str, cache_path: str, device: str | None) -> None:
    """The whole mission on scikit-learn's bundled digits: train a teacher, dump its cache, distil two students.

    Needs no download and no flags; about 80 s on two idle CPU cores (77-79 s measured on a 2-core Xeon, 100 s on
    a 2-core EPYC: README.md).
    """
    from kdcache.quickstart import run_quickstart

    run_quickstart(Path(out), Path(cache_path), device or "auto")


@cli.command("train-teacher")
@config_option
@click.option("--model", help="Model spec: a kdcache name, timm:NAME, torchvision:NAME or python:module:callable "
              "(`kdcache models`).", **_default(TeacherConfig, "model"))
@click.option("--dataset", help="Dataset from `kdcache datasets`.", **_default(TeacherConfig, "dataset"))
@click.option("--data-root", type=click.Path(file_okay=False), help="Folder holding the dataset (CIFAR, imagefolder).")
@image_size_option
@file_options
@recipe_options
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs; the lr decays ×0.1 at 62.5/75/87.5 % of them.",
              **_default(TeacherConfig, "epochs"))
@click.option("--batch-size", type=click.IntRange(min=2), help="Images per SGD step.",
              **_default(TeacherConfig, "batch_size"))
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Initial SGD learning rate.",
              **_default(TeacherConfig, "lr"))
@click.option("--aug", "augmentation", help="Augmentation policy (cifar: pad 4, crop, flip; imagenet: "
              f"RandomResizedCrop, flip; none). {AUG_DEFAULT}")
@click.option("--augmentation", "augmentation_old_name", hidden=True, callback=_deprecated("--aug"),
              help="The old name of --aug, kept for one release.")
@click.option("--out", help="Folder for model.pt (weights only), model.json, metrics.csv.",
              **_default(TeacherConfig, "out"))
@device_option
@seed_option
@click.pass_context
def train_teacher_command(ctx: click.Context, config: str | None, **_: Any) -> None:
    """Train a teacher (cross-entropy, the SGD recipe of the KD literature) and write a weights-only checkpoint."""
    from kdcache.distributed import world
    from kdcache.stages import train_teacher

    result = train_teacher(load_config(TeacherConfig, config, _overrides(ctx), section="teacher"))
    if world().is_main:
        click.echo(f"teacher test accuracy {result.test_acc:.4f} (best {result.best_test_acc:.4f}); "
                   f"checkpoint {result.checkpoint}, sidecar {result.sidecar}")


@cli.command("dump-teacher")
@config_option
@click.option("--checkpoint", help="Teacher weights: a .pt/.pth (mdistiller's, torchvision's, kdcache's model.pt), "
              "a .safetensors (timm's, Hugging Face's), or a kdcache run folder. Never downloaded.")
@click.option("--teacher", help="Teacher model spec: a kdcache name, timm:NAME, torchvision:NAME or "
              "python:module:callable; read from the checkpoint's kdcache sidecar when omitted.")
@click.option("--dataset", help="Dataset from `kdcache datasets`.", **_default(DumpConfig, "dataset"))
@click.option("--data-root", type=click.Path(file_okay=False), help="Folder holding the dataset (CIFAR, imagefolder).")
@image_size_option
@file_options
@click.option("--split", type=click.Choice(["train", "test"]), help="Which split's images to cache.",
              **_default(DumpConfig, "split"))
@click.option("--views", type=click.IntRange(min=1), help="Views per sample to cache (default 4).")
@click.option("--exhaustive", is_flag=True, help="Cache every view of a finite policy (cifar: 162) per sample, "
              "in a seeded random order.")
@click.option("--scales", callback=_scales, help="Region scales; region count is the sum of their squares.",
              **_default(DumpConfig, "scales"))
@click.option("--aug", "augmentation", help="Augmentation policy replayed for each view (cifar, imagenet, none; "
              "randaugment: the default's crop and flip, then torchvision's RandAugment). " + AUG_DEFAULT)
@click.option("--ra-ops", type=click.IntRange(min=1), help="--aug randaugment: ops per view (default 2).")
@click.option("--ra-magnitude", type=click.IntRange(0, 30), help="--aug randaugment: magnitude bin of every op, 0-30 "
              "(default 9).")
@click.option("--mix", type=click.Choice(["mixup", "cutmix"]), help="Mix each view with a partner sample's view of "
              "the same cached view (partner, lambda and box stored with the view; the teacher sees the mixed image, "
              "the student's cross-entropy uses both labels; streamed folders read the partner's file).")
@click.option("--mix-alpha", type=click.FloatRange(min=0, min_open=True), help="--mix: lambda ~ Beta(alpha, alpha).",
              **_default(DumpConfig, "mix_alpha"))
@click.option("--mix-prob", type=click.FloatRange(0, 1), help="--mix: the share of views mixed.",
              **_default(DumpConfig, "mix_prob"))
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per teacher forward pass.",
              **_default(DumpConfig, "batch_size"))
@click.option("--dtype", type=click.Choice(["float16", "float32"]), help="Stored logit precision.",
              **_default(DumpConfig, "dtype"))
@click.option("--format", type=click.Choice(["zarr", "hdf5"]), help="Store format (default: from --out's suffix, "
              "else zarr).")
@click.option("--out", help="Cache path (.zarr directory or .h5 file), or a Zarr URL (s3://, gs://, file://).",
              **_default(DumpConfig, "out"))
@click.option("--block-size", type=click.IntRange(min=0), help="Samples per chunk (0: about 2 MB per chunk).",
              **_default(DumpConfig, "block_size"))
@click.option("--topk", type=click.IntRange(min=0), help="Store per region only the k largest logits, their classes "
              "and one logit for the rest (format 2; e.g. 20 for 1000 classes, see benchmarks/TOPK.md); 0 stores "
              "every logit.", **_default(DumpConfig, "topk"))
@click.option("--outputs", help="What to cache besides the region logits, comma-separated: embedding (the pooled "
              "features), attention (every stage's attention map) or attention:STAGE, hint (the middle stage's "
              "feature map, FitNet's) or hint:STAGE. Default: what --loss needs, else regions only.")
@click.option("--loss", "losses", multiple=True, help="Cache what these losses read (fitnet: a hint; at: attention "
              "maps; sp, rkd: the embedding); repeatable.")
@click.option("--views-from", type=click.Path(exists=True), help="Run this teacher on exactly the views of another "
              "cache (its dataset, split, policy, views and seed), for several teachers: distill --cache A --cache B.")
@click.option("--overwrite", is_flag=True, help="Delete an existing cache at --out and start over.")
@device_option
@seed_option
@click.pass_context
def dump_teacher_command(ctx: click.Context, config: str | None, **_: Any) -> None:
    """Stage 1: run the teacher once over K replayable views and cache its region logits (resumes when rerun)."""
    from kdcache.distributed import world
    from kdcache.report import dump_summary
    from kdcache.stages import dump_from_config

    result = dump_from_config(load_config(DumpConfig, config, _overrides(ctx), section="dump"))
    if world().is_main:
        click.echo(dump_summary(result))


@cli.command("distill")
@config_option
@click.option("--cache", "caches", multiple=True, help="Teacher cache written by dump-teacher (a path, or a Zarr URL "
              "such as s3://...); repeat for several teachers on the same views (dump-teacher --views-from): their "
              "ensemble teaches.")
@click.option("--teacher-weights", callback=_floats, help="With several --cache, each teacher's weight in the "
              "ensemble, comma-separated (default equal).")
@click.option("--live-teacher", help="Teacher weights (a file or a kdcache run folder) run on every batch instead: the "
              "online baseline (fresh views each epoch, or the cache's views when --cache is given too).")
@click.option("--teacher", help="Model spec of --live-teacher (read from its sidecar when omitted); with --cache, "
              "the cache must come from this spec.")
@click.option("--student", "students", multiple=True, help="Student model spec: a kdcache name, timm:NAME, "
              "torchvision:NAME or python:module:callable; repeat for several students.")
@click.option("--student-checkpoint", type=click.Path(exists=True), help="Start the student from these weights "
              "(.pt, .pth, .safetensors, or a kdcache run folder) instead of fresh ones; shape-checked, and a head for "
              "another class count (ImageNet's 1000) is replaced by a fresh one, said in a line. One --student.")
@click.option("--loss", "losses", multiple=True, help="Loss from `kdcache losses` (default sdd-lskd); repeat for "
              "several. Every student is trained with every loss. LOSS,LOSS[=WEIGHT] sums losses in one run "
              "(e.g. sdd-lskd,rkd; cross-entropy once, WEIGHT the distill weight of that loss).")
@click.option("--pair", "pairs", multiple=True, help="STUDENT:LOSS to train, repeatable; replaces the --student x "
              "--loss grid (e.g. --pair resnet8x4:sdd-lskd --pair timm:resnet18:dkd).")
@click.option("--scales", callback=_scales, help="Region scales (default: the cache's; a subset such as 1,2 of a "
              "1,2,4 cache is taken from the stored regions).")
@click.option("--dataset", help="Dataset (default: the cache's).")
@click.option("--data-root", type=click.Path(file_okay=False), help="Folder holding the dataset (CIFAR, imagefolder).")
@image_size_option
@file_options
@recipe_options
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs; lr ×0.1 at 62.5/75/87.5 %, loss warm-ups scale "
              "with epochs/240.", **_default(DistillConfig, "epochs"))
@click.option("--batch-size", type=click.IntRange(min=2), help="Images per SGD step.",
              **_default(DistillConfig, "batch_size"))
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Initial SGD learning rate.",
              **_default(DistillConfig, "lr"))
@click.option("--aug", "augmentation", help="Policy of the fresh views of a run without --cache (cifar, imagenet, "
              "none, randaugment); a cache's runs replay its views. " + AUG_DEFAULT)
@click.option("--view-order", type=click.Choice(["cycle", "shuffle"]), help="Epoch e uses view e mod K (cycle) or "
              "a seeded permutation of the views per round (shuffle).", **_default(DistillConfig, "view_order"))
@click.option("--mutual", is_flag=True, help="Deep mutual learning: train the --student models together, step by "
              "step on the same batches, each also learning from the others' predictions (loss dml; with --cache, "
              "plus the one --loss). Two or more students.")
@click.option("--ema-teacher", type=float, help="The teacher is the exponential moving average of the student's own "
              "weights with this decay, e.g. 0.999 (mean teacher); no --cache.")
@click.option("--views-per-step", type=click.IntRange(min=1), help="Train each step on this many views of the same "
              "samples (epoch e: views e*S to e*S+S-1 of the order), their losses summed, as SLD's official code "
              "trains on two views per step (--loss sld --views-per-step 2).",
              **_default(DistillConfig, "views_per_step"))
@click.option("--batch-path", type=click.Choice(["device", "dataset"]), help="device: whole view on the device, "
              "batches as tensor ops (fast); dataset: CacheDataset + DataLoader (general).",
              **_default(DistillConfig, "batch_path"))
@click.option("--temperature", type=float, help="Override the loss's temperature.")
@click.option("--ce-weight", type=float, help="Override the cross-entropy weight.")
@click.option("--distill-weight", type=float, help="Override the distillation weight.")
@click.option("--alpha", type=float, help="Override DKD's alpha.")
@click.option("--beta", type=float, help="Override DKD's beta.")
@click.option("--warmup-epochs", type=float, help="Override the loss warm-up (in epochs of this run).")
@click.option("--out", help="Folder for one sub-folder per run, summary.csv (a row added per finished run) and "
              "summary.png. A run's folder is STUDENT-LOSS, or STUDENT-LOSS-2, -3, ... when that holds another run: "
              "no run is replaced.", **_default(DistillConfig, "out"))
@click.option("--name", help="The run's folder under --out, exactly (one run only); refused when it holds a run, "
              "unless --resume.")
@click.option("--resume", is_flag=True, help="Continue the run --name names, else each run's latest unfinished "
              "folder (a finished one is kept as it is; with none, a new run starts).")
@device_option
@seed_option
@click.pass_context
def distill_command(ctx: click.Context, config: str | None, **_: Any) -> None:
    """Stage 2: train students from a teacher cache (SDD-LSKD by default) and compare them."""
    from kdcache.report import distill_sweep

    overrides = _overrides(ctx)
    if "caches" in overrides:  # the first teacher's cache, then the others'
        overrides["cache"], *extra = overrides.pop("caches")
        overrides["extra_caches"] = tuple(extra)
    distill_sweep(load_config(DistillConfig, config, overrides, section="distill"))


@cli.command("synthesize")
@config_option
@click.option("--checkpoint", type=click.Path(exists=True), help="Teacher weights (.pt, .safetensors, or a kdcache "
              "run folder).")
@click.option("--teacher", help="Teacher model spec (as dump-teacher's); read from the checkpoint's sidecar when "
              "omitted. It needs BatchNorm layers.")
@click.option("--dataset", help="The teacher's dataset: image shape, classes and normalisation of the synthesised "
              "images, and the real test split students are evaluated on.", **_default(SynthesizeConfig, "dataset"))
@click.option("--data-root", type=click.Path(file_okay=False), help="Folder holding that dataset (CIFAR).")
@image_size_option
@click.option("--num", type=click.IntRange(min=1), help="Images to synthesise (balanced over the classes).",
              **_default(SynthesizeConfig, "num"))
@click.option("--out", help="Folder to write: the images as a dataset (--dataset synthesized --data-root OUT) and "
              "the teacher's cache over them, OUT/teacher.zarr. A rerun resumes it.",
              **_default(SynthesizeConfig, "out"))
@click.option("--batch-size", type=click.IntRange(min=1), help="Images optimised together.",
              **_default(SynthesizeConfig, "batch_size"))
@click.option("--iterations", type=click.IntRange(min=0), help="Adam steps per batch.",
              **_default(SynthesizeConfig, "iterations"))
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Adam's learning rate on the inputs.",
              **_default(SynthesizeConfig, "lr"))
@click.option("--bn-weight", type=click.FloatRange(min=0), help="Weight of matching the BatchNorm statistics.",
              **_default(SynthesizeConfig, "bn_weight"))
@click.option("--tv-weight", type=click.FloatRange(min=0), help="Weight of the total-variation prior.",
              **_default(SynthesizeConfig, "tv_weight"))
@click.option("--l2-weight", type=click.FloatRange(min=0), help="Weight of the inputs' l2 norm.",
              **_default(SynthesizeConfig, "l2_weight"))
@click.option("--jitter", type=click.IntRange(min=0), help="Random roll of the inputs per step, in pixels.",
              **_default(SynthesizeConfig, "jitter"))
@click.option("--labels", type=click.Choice(["target", "teacher"]), help="Each image's label: the class it was "
              "synthesised for, or the class the teacher names (with --iterations 0: noise the teacher labels, the "
              "floor a synthesis should beat).", **_default(SynthesizeConfig, "labels"))
@click.option("--aug", "augmentation", help="Policy of the cached views.", **_default(SynthesizeConfig, "augmentation"))
@click.option("--views", type=click.IntRange(min=1), help="Views per image in the cache.",
              **_default(SynthesizeConfig, "views"))
@click.option("--scales", callback=_scales, help="Region scales of the cache.", **_default(SynthesizeConfig, "scales"))
@click.option("--overwrite", is_flag=True, help="Start over in a folder that holds another synthesis.")
@device_option
@seed_option
@click.pass_context
def synthesize_command(ctx: click.Context, config: str | None, **_: Any) -> None:
    """Data-free distillation: synthesise a transfer set from the teacher alone (DeepInversion) and cache the
    teacher on it; train students with `kdcache distill --cache OUT/teacher.zarr`."""
    from kdcache.stages.synthesize import synthesize

    result = synthesize(load_config(SynthesizeConfig, config, _overrides(ctx), section="synthesize"))
    click.echo(f"synthesised {result.images} images in {result.seconds:.0f} s to {result.folder}: BatchNorm-statistics "
               f"loss {result.statistics_loss_start:.3f} (noise) -> {result.statistics_loss_end:.3f}; the teacher "
               f"names the intended class of {100 * result.intended_accuracy:.1f}% of them\n"
               f"cache {result.cache.path}: teacher accuracy per view (against the intended class) "
               + " ".join(f"{a:.4f}" for a in result.cache.view_accuracy)
               + f"\nnext: kdcache distill --cache {result.cache.path} --student resnet8")


@cli.command("inspect")
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print the metadata and status as JSON.")
def inspect_command(cache: str, as_json: bool) -> None:
    """What a cache holds: metadata, shape, size, completeness, teacher accuracy per view."""
    from kdcache.report import describe_cache

    report = describe_cache(cache)
    click.echo(json.dumps(report, indent=2) if as_json else report["text"])


@cli.command("eval")
@click.argument("checkpoint", metavar="[MODEL_OR_RUN_FOLDER]", required=False)
@click.option("--model", "--teacher", "model", help="Model spec of the weights (a kdcache name, timm:NAME, "
              "torchvision:NAME or python:module:callable); read from a run folder's model.json when omitted, "
              "where a python: spec is never taken: type it here.")
@click.option("--cache", help="Instead of a model: a teacher cache; report the teacher's top-1 and top-5 over each "
              "of its views, from the stored logits, beside the top-1 the dump recorded.")
@click.option("--recorded", is_flag=True, help="With --cache: only the recorded top-1 per view (reads no logits).")
@click.option("--dataset", help="Dataset from `kdcache datasets` (default: the run's, from model.json).")
@click.option("--data-root", type=click.Path(file_okay=False), help="Folder holding the dataset (default: the run's).")
@image_size_option
@file_options
@click.option("--split", type=click.Choice(["train", "test"]), help="Which split to evaluate on, un-augmented "
              "(default test).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per forward pass (default 250, as the "
              "training loop evaluates).")
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_command(checkpoint: str | None, model: str | None, cache: str | None, recorded: bool, as_json: bool,
                 **options: Any) -> None:
    """A model's top-1, top-5 and mean cross-entropy on a test split, or a teacher's accuracy over a cache's views.

    \b
    kdcache eval runs/distill/resnet8x4-sdd-lskd    (a run folder: model.json names model, data)
    kdcache eval model.pt --model resnet8 --dataset digits --json
    kdcache eval --cache caches/teacher.zarr
    """
    from dataclasses import asdict

    from kdcache.report import cache_evaluation_text, model_evaluation_text
    from kdcache.stages.evaluate import evaluate_cache, evaluate_model

    if (checkpoint is None) == (cache is None):
        raise KdcacheError("eval: give MODEL_OR_RUN_FOLDER (weights, or a run folder of train-teacher or distill) or "
                           "--cache CACHE, one of the two")
    if recorded and cache is None:
        raise KdcacheError("eval: --recorded reports a cache's recorded accuracy; give --cache CACHE, or drop it")
    given = {name: value for name, value in options.items() if value is not None}  # the rest: the run's or defaults
    if cache is not None and (given or model):
        flags = ", ".join("--" + name.replace("_", "-") for name in (["model"] if model else []) + list(given))
        raise KdcacheError(f"eval --cache: {flags} set how a model is evaluated; a cache's views hold its own "
                           f"teacher's logits on its own data: drop them")
    if cache is not None:
        found = evaluate_cache(cache, recompute=not recorded)
        text = cache_evaluation_text(found)
    else:
        found = evaluate_model(checkpoint, model, **given)
        text = model_evaluation_text(found)
    click.echo(json.dumps(asdict(found), indent=2) if as_json else text)


@cli.command("verify")
@click.argument("cache")
def verify_command(cache: str) -> None:
    """Read every chunk of a cache and check it: checksums, missing chunks, NaN/Inf, region self-check."""
    from kdcache.report import verify_cache

    problems = verify_cache(cache)
    if problems:
        for problem in problems:
            click.echo(f"{cache}: {problem}", err=True)
        sys.exit(1)


@cli.command("models")
@click.argument("pattern", default="*")
@click.option("--source", type=click.Choice(["kdcache", "timm", "torchvision"]), default="kdcache", show_default=True,
              help="Whose models: kdcache's registry (with parameter counts), timm's or torchvision's.")
@click.option("--pretrained", is_flag=True, help="With --source timm: list timm's pretrained tags (such as "
              "timm:resnet50.a1_in1k), whose weights you fetch yourself and pass with --checkpoint.")
def models_command(pattern: str, source: str, pretrained: bool) -> None:
    """List the models a source offers, optionally matching a pattern such as 'convnext*'.

    \b
    Wherever a model is named (--teacher, --student, --model, recipes, the Python API):
      NAME                          kdcache's registry (this list)
      timm:NAME                     any timm model (pip install "kdcache[timm]"), e.g. timm:convnext_atto
      torchvision:NAME              torchvision.models.get_model(NAME), e.g. torchvision:resnet50
      python:module.path:callable   your own factory returning an nn.Module (num_classes= passed if accepted)
    Weights always come from a local file (--checkpoint): kdcache never downloads any.
    """
    from kdcache.report import model_table

    click.echo(model_table(pattern, source, pretrained))


@cli.command("datasets")
def datasets_command() -> None:
    """List data sources and augmentation policies."""
    from kdcache.report import dataset_table

    click.echo(dataset_table())


@cli.command("losses")
def losses_command() -> None:
    """List losses with their papers' default weights."""
    from kdcache.report import loss_table

    click.echo(loss_table())


@cli.command("recipe")
@click.argument("recipe", required=False)
@click.option("--checkpoint", type=click.Path(), help="Teacher weights (an mdistiller .pth, kdcache's model.pt or "
              "run folder, a .safetensors) of the recipe's teacher.")
@click.option("--data-root", type=click.Path(file_okay=False), help="Folder holding the dataset in torchvision's "
              "on-disk format (CIFAR-100: DATA/cifar-100-python/).")
@click.option("--out", help="Folder for one sub-folder per run, summary.csv, table.md and table.csv "
              "(default runs/RECIPE).")
@click.option("--cache", help="Teacher cache: reused when complete, resumed when partial, dumped when missing "
              "(default caches/DATASET-TEACHER-VIEWS.zarr, shared by recipes with the same teacher).")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs per run instead of the recipe's 240 (lr decay "
              "and warm-ups scale with them); the table says how many were run.")
@click.option("--loss", "losses", multiple=True, help="Run only this loss (repeatable); default: every loss the "
              "recipe lists.")
@click.option("--views", type=click.IntRange(min=1), help="Cache K sampled views per image instead of the recipe's "
              "exhaustive 162 (16 views of CIFAR-100: 3.4 GB instead of 34 GB).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present, else CPU), cpu, cuda "
              "or cuda:N.")
@click.option("--resume", is_flag=True, help="Continue each run from its last checkpoint (a finished run is kept).")
@click.option("--list", "list_only", is_flag=True, help="List the packaged recipes and exit.")
def recipe_command(recipe: str | None, checkpoint: str | None, data_root: str | None, out: str | None,
                   cache: str | None, epochs: int | None, losses: tuple[str, ...], views: int | None, device: str,
                   resume: bool, list_only: bool) -> None:
    """Reproduce a row of the published CIFAR-100 tables: dump the teacher once, distil every loss, write a table.

    RECIPE is a YAML file or the name of a packaged one (`--list`), e.g. res32x4_res8x4.
    """
    from kdcache.recipe import recipe_listing, run_recipe

    if list_only:
        click.echo(recipe_listing())
        return
    run_recipe(recipe, checkpoint, data_root, out, cache, epochs, losses or None, device, views, resume)


# what to do after an interruption, per command: exactly what continues the work (a test holds every command to one)
WRITES_NOTHING = "it writes nothing, so nothing was left half-done"
RESUME_ADVICE = {
    "dump-teacher": "rerun the same command to resume: finished blocks are kept",
    "distill": "rerun the same command with --resume to continue each run from its last finished epoch",
    "recipe": "rerun the same command with --resume to continue (its cache resumes by itself)",
    "synthesize": "rerun the same command to resume: finished batches are kept (the cache over them is dumped anew)",
    "train-teacher": "train-teacher does not resume: rerun it to train again",
    "quickstart": "quickstart does not resume: rerun it to start again (in a folder of its own: this one's files "
                  "are kept)",
    **dict.fromkeys(("inspect", "verify", "eval", "models", "datasets", "losses"), WRITES_NOTHING),
}


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM, Kubernetes and `kill` send), handled as Ctrl-C is: writers stop cleanly, locks go."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> None:
    """Entry point: a user's mistake is one line on stderr and exit code 2, never a traceback."""
    argv = sys.argv[1:] if argv is None else argv
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        cli.main(args=argv, prog_name="kdcache", standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.UsageError as error:
        hint = f" (see `{error.ctx.command_path} --help`)" if error.ctx is not None else ""
        click.echo(f"kdcache: error: {error.format_message()}{hint}", err=True)
        sys.exit(2)
    except KdcacheError as error:
        click.echo(f"kdcache: error: {error}", err=True)
        sys.exit(error.exit_code)
    except (click.Abort, KeyboardInterrupt) as stop:
        command = next((word for word in argv if not word.startswith("-")), "")
        advice = RESUME_ADVICE.get(command, WRITES_NOTHING)  # no command yet: only its arguments were read
        terminated = isinstance(stop, Terminated) or isinstance(stop.__cause__, Terminated)  # click wraps it in Abort
        click.echo(f"kdcache: {'terminated (SIGTERM)' if terminated else 'interrupted'}; {advice}", err=True)
        sys.exit(143 if terminated else 130)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
