"""The `kdcache` command: thin, every command one call into the library."""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from kdcache.config import (
    DistillConfig,
    DumpConfig,
    QuickstartConfig,
    RecipeConfig,
    SynthesizeConfig,
    TeacherConfig,
    load_config,
    option_fields,
)
from kdcache.errors import KdcacheError

C = TypeVar("C")

# a flag renamed so that one idea has one name in every command: old parameter -> the config field it sets
RENAMED = {"augmentation_old_name": "augmentation"}
NOT_CONFIG = {"config", "list_only"}  # parameters that say how to run a command rather than what it computes


def _overrides(ctx: click.Context) -> dict[str, Any]:
    """The flags given on the command line (they win over the --config file, which wins over the defaults)."""
    given = {name: value for name, value in ctx.params.items()
             if name not in NOT_CONFIG and ctx.get_parameter_source(name) is not ParameterSource.DEFAULT}
    for old, new in RENAMED.items():
        if old in given:
            given[new] = given.pop(old)
    return given


def _resolved(cls: type[C], ctx: click.Context, section: str | None) -> C:
    """The command's config: its fields' defaults, then the --config file (its `section` when it has one), then the
    flags given."""
    return load_config(cls, ctx.params.get("config"), _overrides(ctx), section=section)


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


PARSERS = {"scales": _scales, "floats": _floats}  # option(parse=...): comma-separated values
CLICK_TYPES = {int: click.INT, float: click.FLOAT, str: click.STRING}
config_option = click.option("--config", type=click.Path(dir_okay=False), default=None,
                             help="YAML file of these options, keyed by their flag names (`batch-size: 64` or "
                                  "batch_size; a list for a repeatable flag); flags given here override it. Every "
                                  "run folder and cache keeps its resolved config.yaml, which repeats it.")


def _shown_default(field: dataclasses.Field) -> Any:
    """A field's default as --help shows it, None where there is nothing to show (None, empty, off); comma-separated
    values as they are typed."""
    value = field.default
    if value is None or value is False or value in ("", ()):
        return None
    return ",".join(map(str, value)) if isinstance(value, tuple) and field.metadata["parse"] else value


def _click_option(field: dataclasses.Field, hint: Any, show_default: bool = True) -> Callable:
    """The click option a config field declares (`kdcache.config.option`); its value is the field's only when given
    (the default is shown, not used), so that the --config file and then the field's default stand otherwise;
    without show_default, a flag not given is None."""
    meta, shown = field.metadata, _shown_default(field) if show_default else None
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kind = next(option for option in options if option is not type(None))
    settings: dict[str, Any] = {"help": meta["help"], "default": shown, "show_default": shown is not None}
    if kind is bool:
        settings.update(is_flag=True, default=None)
    elif meta["multiple"]:
        settings["multiple"] = True
    elif meta["parse"]:
        settings["callback"] = PARSERS[meta["parse"]]
    else:
        settings["type"] = meta["type"] or CLICK_TYPES.get(kind, click.STRING)
    return click.option(meta["flag"] or "--" + field.name.replace("_", "-"), field.name, **settings)


def options_from(cls: type, skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> Callable:
    """A command's options, made from its config class's fields (with --config first), less `skip`; or, with `only`,
    just those fields' options for a command without a config (no --config; None where not given)."""
    hints = typing.get_type_hints(cls)
    chosen = [f for f in option_fields(cls) if f.name not in skip and (only is None or f.name in only)]

    def decorate(command: Callable) -> Callable:
        for field in reversed(chosen):
            command = _click_option(field, hints[field.name], show_default=only is None)(command)
        return command if only is not None else config_option(command)
    return decorate


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
    Any command that trains or writes takes --config FILE (keys: its flag names); flags override the file.
    """


@cli.command()
@options_from(QuickstartConfig)
@click.pass_context
def quickstart(ctx: click.Context, **_: Any) -> None:
    """The whole mission on scikit-learn's bundled digits: train a teacher, dump its cache, distil two students.

    Needs no download and no flags; about 80 s on two idle CPU cores (77-79 s measured on a 2-core Xeon, 100 s on
    a 2-core EPYC: README.md). With --text, the same for language models on CPython's bundled documentation: a BPE,
    a GPT teacher, its token cache and two GPT students compared by held-out perplexity.
    """
    from kdcache.quickstart import run_quickstart

    config = _resolved(QuickstartConfig, ctx, None)
    run_quickstart(config.out and Path(config.out), config.cache and Path(config.cache), config.device, config.text)


@cli.command("train-teacher")
@options_from(TeacherConfig)
@click.option("--augmentation", "augmentation_old_name", hidden=True, callback=_deprecated("--aug"),
              help="The old name of --aug, kept for one release.")
@click.pass_context
def train_teacher_command(ctx: click.Context, **_: Any) -> None:
    """Train a teacher (cross-entropy, the SGD recipe of the KD literature) and write a weights-only checkpoint.

    On data labelled per pixel (--dataset digits-scenes) it trains a segmentation model (--model fcn_resnet20) with
    cross-entropy per pixel and records the test mIoU and pixel accuracy each epoch.
    """
    from kdcache.distributed import world
    from kdcache.stages import train_teacher

    result = train_teacher(_resolved(TeacherConfig, ctx, "teacher"))
    if world().is_main and hasattr(result, "test_ppl"):  # a language model (--dataset text)
        click.echo(f"teacher held-out perplexity {result.test_ppl:.2f} (best {result.best_test_ppl:.2f}); checkpoint "
                   f"{result.folder / 'model.pt'}, sidecar {result.folder / 'model.json'}, tokenizer "
                   f"{result.folder / 'tokenizer.json'}")
    elif world().is_main and hasattr(result, "test_miou"):  # a segmentation model (--dataset digits-scenes)
        click.echo(f"teacher test mIoU {result.test_miou:.4f} (best {result.best_test_miou:.4f}), pixel accuracy "
                   f"{result.test_pixel_acc:.4f}; checkpoint {result.folder / 'model.pt'}, sidecar "
                   f"{result.folder / 'model.json'}")
    elif world().is_main:
        click.echo(f"teacher test accuracy {result.test_acc:.4f} (best {result.best_test_acc:.4f}); "
                   f"checkpoint {result.checkpoint}, sidecar {result.sidecar}")


@cli.command("dump-teacher")
@options_from(DumpConfig)
@click.pass_context
def dump_teacher_command(ctx: click.Context, **_: Any) -> None:
    """Stage 1: run the teacher once over K replayable views and cache its region logits (resumes when rerun)."""
    from kdcache.distributed import world
    from kdcache.report import dump_summary
    from kdcache.stages import dump_from_config

    result = dump_from_config(_resolved(DumpConfig, ctx, "dump"))
    if world().is_main:
        click.echo(dump_summary(result))


@cli.command("distill")
@options_from(DistillConfig)
@click.pass_context
def distill_command(ctx: click.Context, **_: Any) -> None:
    """Stage 2: train students from a teacher cache (SDD-LSKD by default) and compare them.

    A segmentation teacher's cache (or --live-teacher on --dataset digits-scenes) trains segmentation students
    (--student fcn_resnet8) with --loss ce, pixel-kd or cwd, compared by test mIoU and pixel accuracy.
    """
    from kdcache.report import distill_sweep

    distill_sweep(_resolved(DistillConfig, ctx, "distill"))


@cli.command("synthesize")
@options_from(SynthesizeConfig)
@click.pass_context
def synthesize_command(ctx: click.Context, **_: Any) -> None:
    """Data-free distillation: synthesise a transfer set from the teacher alone (DeepInversion) and cache the
    teacher on it; train students with `kdcache distill --cache OUT/teacher.zarr`."""
    from kdcache.stages.synthesize import synthesize

    result = synthesize(_resolved(SynthesizeConfig, ctx, "synthesize"))
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
              "torchvision:NAME, clip:NAME (its zero-shot accuracy over the data's class names) or "
              "python:module:callable); read from a run folder's model.json when omitted, where a python: spec is "
              "never taken: type it here.")
@click.option("--cache", help="Instead of a model: a teacher cache; report the teacher's top-1 and top-5 over each "
              "of its views, from the stored logits, beside the top-1 the dump recorded.")
@click.option("--recorded", is_flag=True, help="With --cache: only the recorded top-1 per view (reads no logits).")
@click.option("--dataset", help="Dataset from `kdcache datasets` (default: the run's, from model.json).")
@click.option("--data-root", type=click.Path(file_okay=False), help="Folder holding the dataset (default: the run's).")
@options_from(TeacherConfig, only=("image_size", "workers", "preload", "max_image_pixels", "classes"))
@click.option("--within-classes", is_flag=True, default=None, help="Top-1, top-5 and loss among the logits of the "
              "split's classes alone (--classes, or the run's), as a model with a head per task answers that task: "
              "Learning without Forgetting's evaluation (without it, the answer is among every class's logits).")
@click.option("--split", type=click.Choice(["train", "test"]), help="Which split to evaluate on, un-augmented "
              "(default test).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per forward pass (default 250, as the "
              "training loop evaluates).")
@options_from(TeacherConfig, only=("device",))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_command(checkpoint: str | None, model: str | None, cache: str | None, recorded: bool, as_json: bool,
                 **options: Any) -> None:
    """A model's top-1, top-5 and mean cross-entropy on a test split, or a teacher's accuracy over a cache's views; a
    segmentation model's mIoU, pixel accuracy and mean cross-entropy per labelled pixel.

    \b
    kdcache eval runs/distill/resnet8x4-sdd-lskd    (a run folder: model.json names model, data)
    kdcache eval model.pt --model resnet8 --dataset digits --json
    kdcache eval runs/distill/resnet8-kd   (a --qat run folder: its int8 model, rebuilt on the CPU from the
                                            weights-only model_int8.pt; its TorchScript copy is never run)
    kdcache eval runs/lwf/lwf --classes 0-4         (the test images of classes 0-4 alone; --within-classes:
                                                     answered among their logits alone)
    kdcache eval runs/seg-teacher                   (a segmentation run: mIoU over the classes present in the
                                                     labels or predictions, pixel accuracy)
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
@click.option("--source", type=click.Choice(["kdcache", "timm", "torchvision", "gpt", "smp", "clip"]), default="kdcache",
              show_default=True, help="Whose models: kdcache's registry (with parameter counts), timm's, torchvision's "
              "(segmentation models too), example shapes of kdcache's GPT (with parameter counts), the architectures "
              "of segmentation-models-pytorch, or open_clip's CLIP architectures.")
@click.option("--pretrained", is_flag=True, help="With --source timm: list timm's pretrained tags (such as "
              "timm:resnet50.a1_in1k), whose weights you fetch yourself and pass with --checkpoint.")
def models_command(pattern: str, source: str, pretrained: bool) -> None:
    """List the models a source offers, optionally matching a pattern such as 'convnext*'.

    \b
    Wherever a model is named (--teacher, --student, --model, recipes, the Python API):
      NAME                          kdcache's registry (this list)
      timm:NAME                     any timm model (pip install "kdcache[timm]"), e.g. timm:convnext_atto
      timm:NAME,key=value,...       with constructor arguments (numbers, true, false), e.g. a ViT at 32 px:
                                    timm:deit_tiny_distilled_patch16_224,img_size=32,patch_size=8
      torchvision:NAME              torchvision.models.get_model(NAME), e.g. torchvision:resnet50; a segmentation
                                    NAME (torchvision:deeplabv3_resnet50) without backbone weights, per-pixel logits
      smp:ARCH,key=value,...        a segmentation-models-pytorch model (pip install "kdcache[seg]"), arguments its
                                    constructor's (numbers, true, false, names), e.g. smp:Unet,encoder_name=resnet18
      gpt:layers=L,width=D,heads=H  a small GPT (defaults layers=6, width=384, heads=6; optional context=1024,
                                    dropout=0); its vocabulary is the data's
      hf:PATH                       a Hugging Face causal LM in a local folder (config.json, model.safetensors),
                                    with the folder's weights; no code from the folder runs
      clip:NAME[,key=value,...]     open_clip's CLIP architecture NAME as a zero-shot teacher over the data's
                                    class names (pip install "kdcache[clip]"), e.g. clip:ViT-B-32
      python:module.path:callable   your own factory returning an nn.Module (num_classes= passed if accepted)
    Weights always come from a local file (--checkpoint, or an hf: folder): kdcache never downloads any.
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
@options_from(RecipeConfig, skip=("recipe",))
@click.option("--list", "list_only", is_flag=True, help="List the packaged recipes and exit.")
@click.pass_context
def recipe_command(ctx: click.Context, list_only: bool, **_: Any) -> None:
    """Reproduce a row of the published CIFAR-100 tables: dump the teacher once, distil every loss, write a table.

    RECIPE is a YAML file or the name of a packaged one (`--list`), e.g. res32x4_res8x4.
    """
    from kdcache.recipe import recipe_listing, run_recipe

    if list_only:
        click.echo(recipe_listing())
        return
    config = _resolved(RecipeConfig, ctx, None)
    run_recipe(config.recipe, config.checkpoint, config.data_root, config.out, config.cache, config.epochs,
               config.losses or None, config.device, config.views, config.resume)


# what to do after an interruption, per command: exactly what continues the work (a test holds every command to one)
WRITES_NOTHING = "it writes nothing, so nothing was left half-done"
RESUME_ADVICE = {
    "dump-teacher": "rerun the same command to resume: finished blocks are kept",
    "distill": "rerun the same command with --resume to continue each run from its last finished epoch; a language "
               "model's or a segmentation model's run does not resume: the same command without --resume starts it "
               "again in a folder of its own",
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
