"""What kdcache tells people: a dump's closing lines, inspect's text, verify's progress, a sweep's summary.csv,
summary.png and table, and the listings of models, datasets and losses."""

from __future__ import annotations

import csv
import math
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kdcache.cache import Problem, open_cache, verify
from kdcache.cache.location import store_bytes
from kdcache.cache.lock import WriterLock
from kdcache.cache.verify import self_check_scope
from kdcache.config import DistillConfig
from kdcache.data import ImageData, list_datasets, list_policies
from kdcache.distributed import world
from kdcache.errors import KdcacheError
from kdcache.losses import TOKEN_LOSSES, get_loss, list_losses
from kdcache.models import count_parameters, create_model, list_models
from kdcache.models.lm import GPT_FORM
from kdcache.stages.dense_train import SegmentationRun
from kdcache.stages.distill import RunSummary, distill
from kdcache.stages.dump import DumpResult
from kdcache.stages.generations import STUDENT_CACHE, Generation, distill_generations
from kdcache.stages.text_train import TOKEN_LOSS_DEFAULTS, LanguageRun
from kdcache.stages.evaluate import CacheEvaluation, ModelEvaluation, SegmentationEvaluation

SUMMARY_WAIT_SECONDS = 60.0  # another call into the same --out adding its rows takes well under a second


def dump_summary(result: DumpResult) -> str:
    """The closing lines of a dump: what, how big, how fast, how good the teacher is per view."""
    accuracy = " ".join(f"{a:.4f}" for a in result.view_accuracy[:16])
    more = f" ... ({len(result.view_accuracy)} views)" if len(result.view_accuracy) > 16 else ""
    how = "resumed and finished" if result.resumed else "wrote"
    if result.unit == "sequence":  # a token cache: one view, the accuracy of the teacher's next-token guesses
        return (f"{how} {result.path}: {_megabytes(result.bytes_on_disk)} on disk; {result.images} teacher sequences "
                f"in {result.seconds:.1f} s ({result.images_per_second:.0f} seq/s)\nteacher next-token top-1: "
                f"{accuracy}")
    return (f"{how} {result.path}: {_megabytes(result.bytes_on_disk)} on disk; {result.images} teacher images in "
            f"{result.seconds:.1f} s ({result.images_per_second:.0f} img/s)\nteacher accuracy per view: {accuracy}{more}")


def describe_cache(path: str | Path) -> dict[str, Any]:
    """`kdcache inspect`: metadata, shapes, size on disk, completeness and teacher accuracy per view."""
    with open_cache(path) as cache:
        spec, progress = cache.spec, cache.progress()
        written = int((progress >= 0).sum())
        accuracy = cache.view_accuracy()
        size = store_bytes(cache.store.location)
        report = {"path": str(path), "format": cache.store.format_name, "metadata": cache.metadata,
                  "shape": {"logits": list(spec.logits_shape), "aug": [spec.num_views, spec.num_samples, spec.num_params],
                            **{name: [spec.num_views, spec.num_samples, *shape] for name, shape in spec.outputs.items()},
                            **{name: list(spec.constant_layout(name)[0]) for name in spec.constant_arrays}},
                  "bytes_on_disk": size, "blocks_written": written, "blocks_total": progress.size,
                  "complete": written == progress.size, "view_accuracy": accuracy,
                  "self_check": self_check_scope(cache)[1]}
    if spec.kind in ("tokens", "dense"):
        report["shape"] = {name: list(spec.array_layout(name)[0]) for name in spec.data_arrays}
        report["text"] = (_token_cache_text if spec.kind == "tokens" else _dense_cache_text)(path, spec, report)
        return report
    shown = [("-" if a is None else f"{a:.4f}") for a in accuracy[:16]]
    report["text"] = "\n".join([
        f"{path} ({report['format']}, format version {spec.format_version})",
        f"teacher   {spec.teacher['arch']} ({spec.num_classes} classes, sha256 {spec.teacher.get('checkpoint_sha256', '?')[:12]}, "
        f"{spec.teacher.get('precision')})",
        f"dataset   {spec.dataset['name']} {spec.dataset['split']}, {spec.num_samples} samples, fingerprint "
        f"{spec.dataset['fingerprint'][:12]}, mean {spec.dataset['mean']} std {spec.dataset['std']}"
        + (f"; streamed from its files at {spec.dataset['image_shape'][-1]} px, each file's crc32c recorded"
           if spec.streamed else ""),
        f"views     {spec.num_views}{' (exhaustive)' if spec.exhaustive else ''} of policy "
        f"{spec.augmentation['name']} {spec.augmentation.get('param_names')}, seed {spec.seed}"
        + _policy_extras(spec.augmentation),
        f"logits    {list(spec.logits_shape)} {spec.dtype} (views, samples, regions, classes); scales "
        f"{list(spec.scales)}; {spec.block_size} samples per chunk"
        + (f"; top {spec.topk} per region stored, the rest rebuilt" if spec.topk else ""),
        f"head      {spec.head}; verify's self-check: {report['self_check']}",
        "outputs   " + ("; ".join(f"{name} {[spec.num_views, spec.num_samples, *shape]}"
                                  for name, shape in spec.outputs.items()) or "region logits only"),
        *_zero_shot_lines(spec),
        f"size      {_megabytes(size)} on disk",
        f"complete  {'yes' if report['complete'] else 'no'}: {written} of {progress.size} (view, block) units written",
        f"accuracy  teacher top-1 per view: {' '.join(shown)}{' ...' if len(accuracy) > 16 else ''}"
        + ("; of a mixed image, against the sample's own label (its partner's not counted)"
           if "mix" in spec.augmentation else ""),
    ])
    return report


def _zero_shot_lines(spec: Any) -> list[str]:
    """inspect's line for a zero-shot teacher: its stored text embedding and the prompts it embeds."""
    if not spec.constant_arrays:
        return []
    zero_shot, (shape, dtype) = spec.teacher["zero_shot"], spec.constant_layout("text_embedding")
    names = zero_shot["class_names"]
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} classes)" if len(names) > 8 else "")
    return [f"zero-shot text_embedding {list(shape)} {dtype}: prompts {zero_shot['template']!r} for {shown}; the "
            f"logits are the image embedding's scores against them"]


def _token_cache_text(path: str | Path, spec: Any, report: dict[str, Any]) -> str:
    """inspect's text for a token cache: teacher, corpus and tokenizer, what each position stores and its bytes."""
    dataset, codec, accuracy = spec.dataset, spec.codec, report["view_accuracy"][0]
    return "\n".join([
        f"{path} ({report['format']}, format version {spec.format_version}, a token cache)",
        f"teacher   {spec.teacher['arch']} ({spec.num_classes} tokens, sha256 "
        f"{spec.teacher.get('checkpoint_sha256', '?')[:12]}, {spec.teacher.get('precision')})",
        f"dataset   {dataset['name']} {dataset['split']} of corpus {dataset.get('corpus')}: {spec.num_samples} "
        f"sequences of {spec.positions} positions ({dataset['num_tokens']} next tokens), fingerprint "
        f"{dataset['fingerprint'][:12]}, tokenizer sha256 {dataset['tokenizer'].get('sha256', '?')[:12]}",
        f"tokens    per position the top {codec.k} token ids ({codec.id_bits} bits each) and log-probabilities "
        f"({codec.width}) with the tail's mass: {codec.bytes_per_token()} bytes per position; {spec.block_size} "
        f"sequences per chunk",
        f"size      {_megabytes(report['bytes_on_disk'])} on disk",
        f"complete  {'yes' if report['complete'] else 'no'}: {report['blocks_written']} of {report['blocks_total']} "
        f"blocks written",
        f"accuracy  teacher next-token top-1: {'-' if accuracy is None else f'{accuracy:.4f}'}"])


def _dense_cache_text(path: str | Path, spec: Any, report: dict[str, Any]) -> str:
    """inspect's text for a dense cache: teacher, data, views, the maps' stride and storage, their bytes."""
    dataset, accuracy = spec.dataset, report["view_accuracy"]
    (height, width), stride = spec.map_size, spec.stride
    stored = f"the top {spec.topk} classes per position, the rest rebuilt" if spec.topk else "every class's logit"
    shown = [("-" if a is None else f"{a:.4f}") for a in accuracy[:16]]
    return "\n".join([
        f"{path} ({report['format']}, format version {spec.format_version}, a dense cache)",
        f"teacher   {spec.teacher['arch']} ({spec.num_classes} classes, sha256 "
        f"{spec.teacher.get('checkpoint_sha256', '?')[:12]}, {spec.teacher.get('precision')})",
        f"dataset   {dataset['name']} {dataset['split']}, {spec.num_samples} images {dataset['image_shape']} with label "
        f"maps, fingerprint {dataset['fingerprint'][:12]}, mean {dataset['mean']} std {dataset['std']}",
        f"views     {spec.num_views}{' (exhaustive)' if spec.exhaustive else ''} of policy "
        f"{spec.augmentation['name']} {spec.augmentation.get('param_names')} (label maps padded with "
        f"{spec.augmentation.get('mask_fill')}), seed {spec.seed}",
        f"maps      {height}×{width} at stride {stride} (each position the mean of a {stride}×{stride} block of the "
        f"teacher's logits), {stored}, {spec.dtype}: {spec.bytes_per_sample} bytes per view of an image; "
        f"{spec.block_size} samples per chunk",
        f"size      {_megabytes(report['bytes_on_disk'])} on disk",
        f"complete  {'yes' if report['complete'] else 'no'}: {report['blocks_written']} of {report['blocks_total']} "
        f"(view, block) units written",
        f"accuracy  teacher pixel accuracy per view (labelled pixels, full size): {' '.join(shown)}"
        f"{' ...' if len(accuracy) > 16 else ''}"])


def _policy_extras(augmentation: dict) -> str:
    """What RandAugment and mixing add to a policy, for inspect's views line."""
    extras = []
    if "randaugment" in augmentation:
        randaugment = augmentation["randaugment"]
        extras.append(f"RandAugment {randaugment['num_ops']} ops at magnitude {randaugment['magnitude']} of "
                      f"{randaugment['num_magnitude_bins']}")
    if "mix" in augmentation:
        mix = augmentation["mix"]
        extras.append(f"{mix['mode']} (alpha {mix['alpha']}, prob {mix['prob']}) with a partner per view and sample")
    return "".join(f"; {extra}" for extra in extras)


def model_evaluation_text(found: ModelEvaluation | SegmentationEvaluation) -> str:
    """`kdcache eval MODEL`'s line: which weights on which data, top-1, top-5 (more than 5 classes) and loss; a
    segmentation model's mIoU, pixel accuracy and loss per labelled pixel."""
    if isinstance(found, SegmentationEvaluation):
        return (f"{found.checkpoint} ({found.model}, {found.num_classes} classes) on {found.dataset} {found.split}, "
                f"{found.images} images, {found.pixels} labelled pixels: mIoU {found.miou:.4f} (over the "
                f"{found.classes} classes present in labels or predictions)  pixel accuracy {found.pixel_acc:.4f}  "
                f"loss {found.loss:.4f}")
    if found.dataset == "text":  # a language model: its positions' next tokens, and the perplexity
        return (f"{found.checkpoint} ({found.model}, {found.num_classes} tokens) on text {found.split}, "
                f"{found.samples} next tokens: top-1 {found.top1:.4f}  top-5 {found.top5:.4f}  loss {found.loss:.4f}  "
                f"perplexity {math.exp(found.loss):.2f}")
    top5 = "" if found.top5 is None else f"  top-5 {found.top5:.4f}"
    among = "" if found.among is None else f" among the logits of classes {','.join(map(str, found.among))}"
    return (f"{found.checkpoint} ({found.model}, {found.num_classes} classes) on {found.dataset} {found.split}, "
            f"{found.samples} samples{among}: top-1 {found.top1:.4f}{top5}  loss {found.loss:.4f}")


def cache_evaluation_text(found: CacheEvaluation) -> str:
    """`kdcache eval --cache`'s table: per view the top-1 the dump recorded, and top-1 and top-5 of the stored
    logits; their means over the views."""
    def shown(values: list[float | None]) -> str:
        return " ".join(f"{'-' if value is None else f'{value:.4f}':>{width}}" for value, width in zip(values, widths))

    columns, widths = ("recorded top-1", "top-1", "top-5"), (14, 7, 7)
    rows = [[view.recorded_top1, view.top1, view.top5] for view in found.views]
    means = [None if None in column else sum(column) / len(column) for column in zip(*rows)]
    return "\n".join([
        f"{found.cache}: teacher {found.teacher} ({found.num_classes} classes) over {len(found.views)} views of "
        f"{found.dataset} {found.split}, {found.samples} samples; recorded: by the dump on the logits before "
        f"storage; top-1, top-5: of region 0 of the stored logits",
        f"{'view':>5} " + " ".join(f"{name:>{width}}" for name, width in zip(columns, widths)),
        *(f"{view.view:>5} {shown(row)}" for view, row in zip(found.views, rows)),
        f"{'mean':>5} {shown(means)}"])


def verify_cache(path: str | Path, show_progress: bool = True) -> list[Problem]:
    """`kdcache verify`: read every chunk; the problems found, located by array, view and block."""
    with open_cache(path) as cache:
        total = cache.num_views * cache.spec.num_blocks
        with tqdm(total=total, unit="block", desc=f"verify {cache.store.location.name}",
                  disable=not show_progress) as bar:
            problems = verify(cache, on_block=lambda: bar.update(1))
    if show_progress and not problems:
        print(f"{path}: ok, {total} blocks of logits and every other chunk read and checked")
    return problems


def model_table(pattern: str = "*", source: str = "kdcache", pretrained: bool = False) -> str:
    """The models a source offers that match a pattern: kdcache's with their parameter counts at 100 classes; with
    `pretrained`, timm's pretrained tags."""
    names = list_models(pattern, source, pretrained)
    what = "pretrained tag" if pretrained else "model"
    if not names:
        flags = f"--source {source}" + (" --pretrained" if pretrained else "")
        raise KdcacheError(f"models: {source} has no {what} matching {pattern!r}; `kdcache models {flags}` lists "
                           f"every one")
    if pretrained:
        return "\n".join([*names, f"({len(names)} timm pretrained tags; kdcache downloads no weights: fetch the tag's "
                                  f"model.safetensors where there is internet and pass it with --checkpoint, e.g. "
                                  f"--teacher {names[0]} --checkpoint model.safetensors)"])
    if source == "gpt":
        return "\n".join([*_parameter_rows(names, GPT2_VOCAB, f"vocab {GPT2_VOCAB}"),
                          f"(example shapes; a GPT is named as {GPT_FORM})"])
    if source != "kdcache":
        return "\n".join([*names, f"({len(names)} {source} models; name one as shown, e.g. --teacher {names[0]})"])
    return "\n".join(_parameter_rows(names, 100, "100 classes"))


GPT2_VOCAB = 50257  # GPT-2's tokenizer: the vocabulary `kdcache models --source gpt` counts parameters at


def _parameter_rows(names: list[str], num_classes: int, counted_at: str) -> list[str]:
    """A table of models and their parameter counts at a class count (built on the meta device: no memory, no
    initialisation)."""
    width = max(len(name) for name in names)
    rows = [f"{'model':<{width}} {f'params ({counted_at})':>22}"]
    for name in names:
        with torch.device("meta"):
            count = count_parameters(create_model(name, num_classes=num_classes))
        rows.append(f"{name:<{width}} {count / 1e6:>20.2f} M")
    return rows


def dataset_table() -> str:
    """Data sources and augmentation policies."""
    return "\n".join([
        "datasets:  " + ", ".join(list_datasets()),
        "           digits needs nothing (scikit-learn's bundled digits); cifar10/cifar100 read --data-root in "
        "torchvision's on-disk format and never download; synthetic is generated",
        "           imagefolder reads --data-root/train and val/ (or test/) in torchvision's ImageFolder layout, at 224×224 "
        "(--image-size), streamed from its files (--preload: decoded into memory)",
        "           digits-scenes needs nothing: scikit-learn's digits composed into 48×48 scenes labelled per pixel "
        "(11 classes: background and the ten digits), for segmentation",
        "           voc and cityscapes read --data-root in torchvision's VOCSegmentation (VOC2012) and Cityscapes "
        "(gtFine) layouts: images with a label per pixel, held in memory at 64×64 (--image-size); test is their val "
        "split",
        "           text packs a tokenised corpus (a text file, a folder of .txt/.md/.rst, hf-disk:PATH, or Python's own "
        "pydoc topics) into next-token sequences; from Python for now (load_dataset('text', CORPUS)), not the commands",
        "policies:  " + ", ".join(list_policies()) + " (imagenet: RandomResizedCrop + flip, sampled views only)",
    ])


# the weights a loss may set, as `kdcache losses` shows them beside each loss (the distill flags that override them)
LOSS_DEFAULTS = ("ce_weight", "distill_weight", "temperature", "alpha", "beta", "warmup_epochs", "negatives")


def loss_table() -> str:
    """Losses with their default weights (the ones they set) and papers."""
    rows = [f"{'loss':<12} {'default weights (distill --ce-weight, --temperature, ... override them)':<74} paper"]
    for name in list_losses():
        spec = get_loss(name)
        weights = " ".join(f"{field}={getattr(spec, field):g}" for field in LOSS_DEFAULTS
                           if getattr(spec, field) not in (None, 0.0) or field == "ce_weight")
        rows.append(f"{name:<12} {weights:<74} {spec.paper}")
    defaults = " ".join(f"{name}={value:g}" for name, value in TOKEN_LOSS_DEFAULTS.items())
    rows += ["", f"language models (distill --cache of a token cache; {defaults} unless overridden):",
             *(f"{name:<18} {_first_line(loss.__doc__)}" for name, loss in TOKEN_LOSSES.items())]
    return "\n".join(rows)


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if text else ""


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB" if size < 2**30 else f"{size / 2**30:.2f} GB"


def distill_sweep(config: DistillConfig, show_progress: bool = True,
                  data: tuple[ImageData, ImageData] | None = None) -> list[RunSummary]:
    """`kdcache distill`: train the sweep, then (rank 0) add its rows to summary.csv, redraw summary.png and print
    this call's table."""
    started = time.perf_counter()
    if config.generations > 1:
        return generations_sweep(config, show_progress, data)
    summaries = distill(config, show_progress, data)
    if not world().is_main:
        return summaries
    if summaries and all(isinstance(run, LanguageRun) for run in summaries):
        write_language_summary(summaries, Path(config.out))
        table, written = language_table(summaries), "and per run folder: metrics.csv, model.pt, model.json"
    elif summaries and all(isinstance(run, SegmentationRun) for run in summaries):
        write_segmentation_summary(summaries, Path(config.out))
        table, written = segmentation_table(summaries), "and per run folder: metrics.csv, model.pt, model.json"
    else:
        write_summary(summaries, Path(config.out))
        table, written = summary_table(summaries), "summary.png, and per run folder: metrics.csv, model.pt, last.pt" + (
            ", model_int8.pt: the int8 weights (eval reads them), model_int8.torchscript.pt: the int8 program, "
            "for your deployment" if config.qat else "")
    if show_progress:
        print(table)
        print(f"{len(summaries)} run(s) in {time.perf_counter() - started:.0f} s; written to {config.out}/ (a row per "
              f"run added to summary.csv, {written})")
    return summaries


def write_summary(summaries: list[RunSummary], out: Path) -> None:
    """Add a row per newly finished run to out/summary.csv, never rewriting it (every call into one --out, at once
    or one after another, keeps its rows), and redraw summary.png from every run it lists; under its lock."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summary.csv"
    lock = WriterLock(path).acquire_waiting(SUMMARY_WAIT_SECONDS)
    try:
        # a summary.csv begun by an earlier version keeps its own columns (one without test_top5 stays without)
        columns = _summary_columns(path)
        with open(path, "a", newline="") as file:
            writer = csv.DictWriter(file, columns, extrasaction="ignore")
            if file.tell() == 0:
                writer.writeheader()
            writer.writerows(_summary_row(s) for s in summaries if not s.kept)
        with open(path, newline="") as file:
            _plot_summary([row["run"] for row in csv.DictReader(file)], out)
    finally:
        lock.release()


def generations_sweep(config: DistillConfig, show_progress: bool = True,
                      data: tuple[ImageData, ImageData] | None = None) -> list[RunSummary]:
    """`kdcache distill --generations N`: train the generations, then write OUT/summary.csv (a row per generation)
    and print their table; each generation's run, in order."""
    if data is not None:
        raise KdcacheError("--generations dumps each generation's student on the data its cache names, loaded by "
                           "name; pass no data (the cache's dataset is read as the cache recorded it)")
    generations = distill_generations(config, show_progress)
    if world().is_main:
        write_generations_summary(generations, Path(config.out))
    if world().is_main and show_progress:
        print(generations_table(generations))
        print(f"{len(generations)} generations written to {config.out}/ (a row per generation in summary.csv; per "
              f"generation genG/: its run folder and, but for the last, its student's cache {STUDENT_CACHE})")
    return [generation.run for generation in generations]


def write_generations_summary(generations: list[Generation], out: Path) -> None:
    """OUT/summary.csv of a generations run: a row per generation (its number, the caches it learned from, then the
    columns of a sweep's summary.csv), rewritten whole: the folder holds this one generations run."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "summary.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, GENERATION_COLUMNS)
        writer.writeheader()
        writer.writerows({"generation": g.number, "teachers": " ".join(g.teachers), **_summary_row(g.run)}
                         for g in generations)


def generations_table(generations: list[Generation]) -> str:
    """A printed table: each generation's accuracy and its gain over generation 1."""
    first = generations[0].run.test_acc
    lines = [f"{'generation':>10} {'test acc':>9} {'best (epoch)':>14} {'vs gen 1':>9}  teacher"]
    for g in generations:
        gain = f"{100 * (g.run.test_acc - first):+.2f}" if g.number > 1 else ""
        lines.append(f"{g.number:>10} {100 * g.run.test_acc:>8.2f}% {100 * g.run.best_test_acc:>7.2f}% "
                     f"({g.run.best_epoch:>3}) {gain:>9}  {' + '.join(g.teachers)}")
    return "\n".join(lines)


def write_language_summary(runs: list[LanguageRun], out: Path) -> None:
    """Add a row per run to out/summary.csv (run, model, loss, held-out perplexity, its best, tokens/s, folder)."""
    _append_summary_rows(out, ["run", "model", "loss", "test_ppl", "best_test_ppl", "tokens_per_s", "folder"],
                         [[run.name, run.model, run.loss, f"{run.test_ppl:.2f}", f"{run.best_test_ppl:.2f}",
                           f"{run.tokens_per_s:.0f}", run.folder] for run in runs])


def write_segmentation_summary(runs: list[SegmentationRun], out: Path) -> None:
    """Add a row per run to out/summary.csv (run, student, loss, test mIoU, pixel accuracy, best mIoU and its epoch,
    img/s, folder)."""
    _append_summary_rows(out, ["run", "student", "loss", "test_miou", "test_pixel_acc", "best_test_miou",
                               "best_epoch", "img_per_s", "folder"],
                         [[run.name, run.student, run.loss, f"{run.test_miou:.4f}", f"{run.test_pixel_acc:.4f}",
                           f"{run.best_test_miou:.4f}", run.best_epoch, f"{run.img_per_s:.1f}", run.folder]
                          for run in runs])


def _append_summary_rows(out: Path, header: list[str], rows: list[list[Any]]) -> None:
    """Add rows to out/summary.csv, its header first when it is new, under its lock (as write_summary: the rows of
    every call into one --out are kept)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summary.csv"
    lock = WriterLock(path).acquire_waiting(SUMMARY_WAIT_SECONDS)
    try:
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as file:
            writer = csv.writer(file)
            if new:
                writer.writerow(header)
            writer.writerows(rows)
    finally:
        lock.release()


def segmentation_table(runs: list[SegmentationRun]) -> str:
    """A printed table: each run's test mIoU and pixel accuracy, its best mIoU, and its mIoU's difference from the
    same student's ce run (in points)."""
    def row(run: SegmentationRun, ce: SegmentationRun | None) -> str:
        gain = "" if ce is None else f"{100 * (run.test_miou - ce.test_miou):+.2f}"
        return (f"{100 * run.test_miou:>8.2f}% {100 * run.test_pixel_acc:>8.2f}% {100 * run.best_test_miou:>10.2f}% "
                f"({run.best_epoch:>3}) {gain:>7} {run.img_per_s:>8.0f}")
    return _table_of_runs(runs, lambda run: run.student,
                          f"{'test mIoU':>9} {'pixel acc':>9} {'best mIoU (epoch)':>18} {'vs ce':>7} {'img/s':>8}", row)


def _table_of_runs(runs: list[Any], model: Callable[[Any], str], header: str,
                   row: Callable[[Any, Any | None], str]) -> str:
    """A printed table: `header` beside 'run', then per run its name beside `row(run, ce)`, ce the same model's
    cross-entropy run (None for a ce run itself, or a model without one)."""
    ce = {model(run): run for run in runs if run.loss == "ce"}
    width = max([30, *(len(run.name) for run in runs)])  # a spec's run name (timm_resnet18-kd) can be long
    return "\n".join([f"{'run':<{width}} {header}", *(f"{run.name:<{width}} "
                                                       f"{row(run, None if run.loss == 'ce' else ce.get(model(run)))}"
                                                       for run in runs)])


def language_table(runs: list[LanguageRun]) -> str:
    """A printed table: each run's held-out perplexity, and its difference from the same model's ce run."""
    def row(run: LanguageRun, ce: LanguageRun | None) -> str:
        gain = "" if ce is None else f"{run.test_ppl - ce.test_ppl:+.1f}"
        return f"{run.test_ppl:>12.1f} {run.best_test_ppl:>8.1f} {gain:>8} {run.tokens_per_s:>8.0f}"
    return _table_of_runs(runs, lambda run: run.model, f"{'held-out ppl':>12} {'best':>8} {'vs ce':>8} {'tok/s':>8}",
                          row)


SUMMARY_COLUMNS = ("run", "student", "loss", "test_acc", "test_top5", "best_test_acc", "best_epoch", "img_per_s",
                   "folder")
GENERATION_COLUMNS = ("generation", "teachers", *SUMMARY_COLUMNS)  # a generations run's summary.csv


def _summary_row(s: RunSummary) -> dict[str, Any]:
    """A run's row of summary.csv (test_top5 empty for 5 classes or fewer, where it is always 100 %)."""
    return {"run": s.name, "student": s.student, "loss": s.loss, "test_acc": f"{s.test_acc:.4f}",
            "test_top5": _fraction(s.test_top5), "best_test_acc": f"{s.best_test_acc:.4f}",
            "best_epoch": s.best_epoch, "img_per_s": f"{s.img_per_s:.1f}", "folder": s.folder}


def _summary_columns(path: Path) -> tuple[str, ...]:
    """The columns of summary.csv: its header where it has rows already, else today's."""
    if not path.exists() or path.stat().st_size == 0:
        return SUMMARY_COLUMNS
    with open(path, newline="") as file:
        return tuple(next(csv.reader(file)))


def _plot_summary(runs: list[str], out: Path) -> None:
    """summary.png: test accuracy per epoch of each run listed (once), read from its folder's metrics.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(runs):
        if not (out / name / "metrics.csv").is_file():  # a run folder deleted since: its row stays, its curve goes
            continue
        with open(out / name / "metrics.csv") as file:
            rows = list(csv.DictReader(file))
        axes.plot([int(r["epoch"]) for r in rows], [float(r["test_acc"]) for r in rows], label=name)
    axes.set(xlabel="epoch", ylabel="test accuracy", title="kdcache distill")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "summary.png", dpi=120)
    plt.close(figure)


def summary_table(summaries: list[RunSummary]) -> str:
    """A printed table: each run's accuracy, and its gain over the same student's cross-entropy run."""
    ce = {s.student: s.test_acc for s in summaries if s.loss == "ce"}
    width = max([30, *(len(s.name) for s in summaries)])  # a spec's run name (timm_resnet18-kd) can be long
    top5 = any(s.test_top5 is not None for s in summaries)  # a column only where it says something (> 5 classes)
    int8 = any(s.test_acc_int8 is not None for s in summaries)  # --qat runs': their int8 model's beside test acc
    lines = [f"{'run':<{width}} {'test acc':>9}" + (f" {'int8':>8}" if int8 else "")
             + (f" {'top-5':>8}" if top5 else "")
             + f" {'best (epoch)':>14} {'vs ce':>7} {'img/s':>8}"]
    for s in summaries:
        gain = f"{100 * (s.test_acc - ce[s.student]):+.2f}" if s.student in ce and s.loss != "ce" else ""
        shown_top5 = _percent_column(s.test_top5) if top5 else ""
        shown_int8 = _percent_column(s.test_acc_int8) if int8 else ""
        lines.append(f"{s.name:<{width}} {100 * s.test_acc:>8.2f}%{shown_int8}{shown_top5} "
                     f"{100 * s.best_test_acc:>7.2f}% "
                     f"({s.best_epoch:>3}) {gain:>7} {s.img_per_s:>8.0f}")
    return "\n".join(lines)


def _percent_column(value: float | None) -> str:
    """A column of the printed table: a percentage, or blank where a run has none."""
    return f" {100 * value:>7.2f}%" if value is not None else f" {'':>8}"


def _fraction(value: float | None) -> str:
    """An accuracy as summary.csv writes it; empty where there is none."""
    return "" if value is None else f"{value:.4f}"


def source_commit() -> str:
    """The short commit of the git checkout kdcache runs from, with "+changes" when its tracked files differ from
    it; "unknown" for an installed copy: benchmarks stamp their results with it."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if changed else "")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
