"""`kdcache recipe`: a row of the published CIFAR-100 tables, end to end: one teacher cache, every loss, one table.

A recipe (configs/cifar100/*.yaml) names a teacher-student pair, a `dump:` section (DumpConfig), a
`distill:` section (DistillConfig), the losses to run with the fields each one's released config
changes, and the papers' numbers, every field by its flag's name (`aug`, `batch_size`: kdcache.config's
keys). An optional `feature_dump:` section (DumpConfig fields on top of `dump:`)
makes a second cache, of the teacher's features, that the feature and relation losses train from.
DistillConfig holds one set of loss overrides, so each loss is one
`distill` call on the same cache and output folder (its run folder and resume state do not depend on
which other losses run).
"""

from __future__ import annotations

import csv
import importlib.resources
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from kdcache.cache import open_cache
from kdcache.cache.location import Location, store_exists
from kdcache.config import DistillConfig, DumpConfig, RecipeConfig, config_keys, fields_from_keys, load_config, \
    save_config
from kdcache.data import ImageData, class_names, load_dataset
from kdcache.errors import KdcacheError, unknown_name
from kdcache.losses import PAPER_EPOCHS, get_loss, list_losses, scaled_loss
from kdcache.models import (
    check_model_spec,
    file_sha256,
    load_teacher,
    resolve_checkpoint,
)
from kdcache.report import dump_summary, write_summary
from kdcache.runtime import pick_device, prepare_model
from kdcache.stages.distill import RunSummary, distill
from kdcache.stages.dump import DEFAULT_VIEWS, dump_from_config
from kdcache.stages.evaluate import evaluate_batches
from kdcache.stages.splits import EvalSplit

RECIPE_KEYS = ("teacher", "student", "dump", "distill", "losses", "published", "sources")
OPTIONAL_KEYS = ("feature_dump",)
# DistillConfig fields that come from the recipe's pair and the user's flags, never from a loss's overrides
RUNNER_FIELDS = {"cache", "live_teacher", "teacher", "students", "losses", "pairs", "dataset", "data_root", "out",
                 "name", "resume", "device"}


@dataclass(frozen=True)
class Recipe:
    """A teacher-student pair of the published tables: how to dump, how to distil each loss, what the papers got."""

    path: Path
    teacher: str
    student: str
    losses: dict[str, dict[str, Any]]  # loss name -> DistillConfig fields its released config changes
    published: dict[str, float | None]  # "teacher", "student" (the ce baseline) and each other loss -> top-1 %
    sources: tuple[str, ...]
    feature_dump: dict[str, Any] | None = None  # DumpConfig fields of the features' cache, on top of `dump:`

    @property
    def name(self) -> str:
        return self.path.stem

    def dump_config(self, **overrides: Any) -> DumpConfig:
        """The `dump:` section with the pair's teacher, and `overrides` (None: keep the recipe's) on top."""
        return load_config(DumpConfig, self.path, {"teacher": self.teacher, **overrides}, section="dump")

    def feature_dump_config(self, dump: DumpConfig) -> DumpConfig:
        """The features' cache: `dump` with the `feature_dump:` fields, beside its cache (NAME-features.zarr)."""
        out = Location.of(dump.out)
        features = out.sibling(f"{out.name.removesuffix(out.suffix)}-features{out.suffix}")
        return replace(dump, exhaustive=False, out=str(features),
                       **(self.feature_dump or {}))

    def distill_config(self, loss: str, **overrides: Any) -> DistillConfig:
        """The `distill:` section with the loss and its overrides, and `overrides` (None: keep) on top."""
        pair = {"teacher": self.teacher, "students": (self.student,), "losses": (loss,)}
        return load_config(DistillConfig, self.path, {**self.losses.get(loss, {}), **pair, **overrides},
                           section="distill")


def packaged_recipes() -> dict[str, Path]:
    """The recipes shipped in kdcache.configs (one folder per dataset), by name."""
    root = importlib.resources.files("kdcache.configs")
    return {Path(recipe.name).stem: Path(str(recipe)) for folder in root.iterdir() if folder.is_dir()
            for recipe in folder.iterdir() if recipe.name.endswith(".yaml")}


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: the path itself when it exists, else the packaged recipe of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = packaged_recipes()
    if path.stem in packaged and path.suffix in ("", ".yaml"):
        return packaged[path.stem]
    raise KdcacheError(f"recipe: no file {name_or_path} and no packaged recipe of that name; packaged: "
                       f"{', '.join(sorted(packaged))} (`kdcache recipe --list`)")


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Read and check a recipe: known keys, registered models and losses, sane published numbers, valid configs."""
    path = find_recipe(name_or_path)
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise KdcacheError(f"recipe {path}: not valid YAML ({error})".replace("\n", " ")) from error
    if not isinstance(document, dict) or not set(RECIPE_KEYS) <= set(document) <= {*RECIPE_KEYS, *OPTIONAL_KEYS}:
        found = sorted(document) if isinstance(document, dict) else type(document).__name__
        raise KdcacheError(f"recipe {path}: expected the keys {', '.join(RECIPE_KEYS)} (and optionally "
                           f"{', '.join(OPTIONAL_KEYS)}); found {found}")
    feature_dump = document.get("feature_dump")
    if feature_dump is not None and not isinstance(feature_dump, dict):
        raise KdcacheError(f"recipe {path}: feature_dump should map dump-teacher's flag names (views, outputs, ...) "
                           f"to values; got {feature_dump!r}")
    feature_dump = None if feature_dump is None else fields_from_keys(DumpConfig, feature_dump,
                                                                      f"recipe {path}: feature_dump")
    for role in ("teacher", "student"):
        try:
            check_model_spec(str(document[role]))
        except KdcacheError as error:
            raise KdcacheError(f"recipe {path}: {role}: {error}") from None
    losses = document["losses"]
    if not isinstance(losses, dict) or not losses:
        raise KdcacheError(f"recipe {path}: losses should map each loss to its overrides, e.g. `dkd: {{beta: 6.0}}`")
    overridable = {f.name for f in fields(DistillConfig)} - RUNNER_FIELDS
    for loss, overrides in losses.items():
        if loss not in list_losses():
            raise unknown_name(f"recipe {path}: losses", loss, list_losses())
        if isinstance(overrides or {}, dict):
            losses[loss] = overrides = fields_from_keys(DistillConfig, overrides or {}, f"recipe {path}: losses.{loss}")
        if not isinstance(overrides, dict) or set(overrides) - overridable:
            names = sorted(key for key, name in config_keys(DistillConfig).items() if name in overridable)
            raise KdcacheError(f"recipe {path}: losses.{loss} should map DistillConfig fields (by distill's flag "
                               f"names) to values; got {overrides!r}; names: {', '.join(names)}")
    columns = {"teacher", "student"} | set(list_losses()) - {"ce"}
    published = document["published"] or {}
    if not isinstance(published, dict):
        raise KdcacheError(f"recipe {path}: published should map columns ({', '.join(sorted(columns))}) to top-1 %")
    for column, value in published.items():
        if column not in columns:
            raise KdcacheError(f"recipe {path}: published.{column} is no column of the table; columns: "
                               f"{', '.join(sorted(columns))} (the student column is the ce run)")
        if value is not None and not (isinstance(value, (int, float)) and 0 < value < 100):
            raise KdcacheError(f"recipe {path}: published.{column} should be a top-1 % in (0, 100) or null; "
                               f"got {value!r}")
    if not isinstance(document["sources"], list):
        raise KdcacheError(f"recipe {path}: sources should be a list of where the published numbers come from")
    recipe = Recipe(path, document["teacher"], document["student"],
                    {loss: dict(overrides or {}) for loss, overrides in losses.items()},
                    {column: None if value is None else float(value) for column, value in published.items()},
                    tuple(map(str, document["sources"])), feature_dump)
    # every value is checked now rather than after an hour of dumping
    recipe.feature_dump_config(recipe.dump_config())
    for loss in losses:
        config = recipe.distill_config(loss)
        scaled_loss(loss, config.loss_overrides(), config.epochs)
    return recipe


def default_cache(dump: DumpConfig) -> Path:
    """Where a recipe's cache goes unless told: one per dataset, teacher and views, shared by its recipes."""
    views = "exhaustive" if dump.exhaustive else f"{dump.views or DEFAULT_VIEWS}views"
    return Path("caches") / f"{dump.dataset}-{dump.teacher}-{views}.zarr"


def ensure_cache(dump: DumpConfig, show_progress: bool = True) -> bool:
    """Reuse a complete cache at dump.out that fits the dump, else dump it (resuming a partial one); True if reused."""
    path = Location.of(dump.out)  # a URL too: Path() would collapse its `//`
    if store_exists(path):
        with open_cache(path) as cache:
            if cache.is_complete():
                views = {"views.exhaustive": True} if dump.exhaustive else {"views.exhaustive": False,
                                                                             "views.count": dump.views or DEFAULT_VIEWS}
                weights = file_sha256(resolve_checkpoint(dump.checkpoint))
                cache.require({"teacher.arch": dump.teacher, "teacher.checkpoint_sha256": weights,
                               "dataset.name": dump.dataset, "dataset.split": dump.split,
                               "augmentation.name": dump.augmentation, **views, "scales": dump.scales})
                if show_progress:
                    print(f"reusing the complete cache {path} ({cache.num_views} views of {dump.dataset} {dump.split}, "
                          f"teacher {dump.teacher}); nothing dumped")
                return True
    result = dump_from_config(dump, show_progress)
    if show_progress:
        print(dump_summary(result))
    return False


def teacher_test_accuracy(dump: DumpConfig, test: ImageData) -> float:
    """Top-1 accuracy of the dump's teacher checkpoint on the un-augmented test split."""
    device = pick_device(dump.device)
    teacher = load_teacher(dump.checkpoint, dump.teacher, test.num_classes, class_names(test))[0]
    testing = EvalSplit(test, device)
    return evaluate_batches(prepare_model(teacher, device), testing.batches(range(len(testing))), len(testing)).top1


@dataclass(frozen=True)
class ResultTable:
    """The papers' layout: teacher, student, then each method; a published row and a measured row (top-1 %)."""

    title: str
    columns: list[tuple[str, str]]  # (key in table.csv, header in table.md)
    rows: list[tuple[str, list[float | None]]]
    notes: list[str]

    def markdown(self) -> str:
        """table.md: title, the table, then the notes."""
        lines = [f"## {self.title}", "", "| | " + " | ".join(header for _, header in self.columns) + " |",
                 "|---|" + "---:|" * len(self.columns)]
        lines += [f"| {label} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in values) + " |"
                  for label, values in self.rows]
        return "\n".join(lines + [""] + [f"- {note}" for note in self.notes]) + "\n"

    def write(self, out: Path) -> None:
        """out/table.md and out/table.csv (empty cells where there is no number)."""
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(self.markdown())
        with open(out / "table.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["row"] + [key for key, _ in self.columns])
            writer.writerows([label] + ["" if v is None else f"{v:.2f}" for v in values] for label, values in self.rows)


def result_table(recipe: Recipe, losses: tuple[str, ...], summaries: list[RunSummary], teacher_acc: float,
                 caches: dict[str, DumpConfig], epochs: int) -> ResultTable:
    """The published numbers beside this run's: best test top-1 of each run, as mdistiller reports (best_acc)."""
    best = {s.loss: 100 * s.best_test_acc for s in summaries}
    methods = [loss for loss in losses if loss != "ce"]
    columns = ([("teacher", f"teacher ({recipe.teacher})"), ("student", f"student ({recipe.student})")]
               + [(loss, loss.upper()) for loss in methods])
    published = [recipe.published.get(key) for key, _ in columns]
    measured = [100 * teacher_acc, best.get("ce")] + [best[loss] for loss in methods]
    dump = next(iter(caches.values()))
    used = {config.out: sorted(loss for loss in losses if caches[loss].out == config.out) for config in caches.values()}
    notes = ["published: the papers' numbers (– where none is published; sources below)",
             "kdcache: best test top-1 over the epochs of each run; teacher: the checkpoint on the test split; "
             "student: the ce run; from the cache " + "; ".join(f"{path} ({', '.join(names)})"
                                                                for path, names in used.items())]
    trained = f"{epochs} epoch{'s' * (epochs != 1)}"
    if epochs != PAPER_EPOCHS:
        notes.append(f"this run trained {trained}, the papers {PAPER_EPOCHS}: its row is not comparable with the "
                     f"published one")
    return ResultTable(f"{dump.dataset}: {recipe.teacher} → {recipe.student}, test top-1 (%)", columns,
                       [("published", published), (f"kdcache (this run, {trained})", measured)],
                       notes + [f"source: {source}" for source in recipe.sources])


def run_recipe(recipe_path: str | Path | None, checkpoint: str | Path | None, data_root: str | Path | None,
               out: str | Path | None = RecipeConfig.out, cache: str | Path | None = RecipeConfig.cache,
               epochs: int | None = RecipeConfig.epochs, losses: tuple[str, ...] | None = RecipeConfig.losses,
               device: str = RecipeConfig.device, views: int | None = RecipeConfig.views,
               resume: bool = RecipeConfig.resume, show_progress: bool = True) -> ResultTable:
    """Dump the teacher cache unless a complete matching one exists, distil every loss from it, write the table."""
    if recipe_path is None:
        raise KdcacheError(f"recipe: name a recipe; packaged: {', '.join(sorted(packaged_recipes()))}")
    find_recipe(recipe_path)  # an unknown recipe is named before a missing checkpoint
    if checkpoint is None:
        raise KdcacheError("recipe: --checkpoint is required (the teacher's weights, e.g. mdistiller's "
                           "cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth)")
    recipe = load_recipe(recipe_path)
    losses = tuple(losses or recipe.losses)
    for loss in losses:  # before the dump, which can take a while
        get_loss(loss)
    if not Path(checkpoint).is_file():
        raise KdcacheError(f"--checkpoint: no file at {checkpoint}; pass the teacher's weights ({recipe.teacher})")
    root = None if data_root is None else str(data_root)
    dump = recipe.dump_config(checkpoint=str(checkpoint), data_root=root, device=device, views=views,
                              exhaustive=False if views else None)
    dump = replace(dump, out=str(cache or default_cache(dump)))
    out = Path(out or Path("runs") / recipe.name)
    save_config(RecipeConfig(str(recipe_path), str(checkpoint), root, str(out), None if cache is None else str(cache),
                             epochs, losses, views, device, resume), out)

    # the feature and relation losses train from the features' cache, the others from the logits'
    caches = {loss: recipe.feature_dump_config(dump) if get_loss(loss).needs else dump for loss in losses}
    for cache_dump in {config.out: config for config in caches.values()}.values():
        ensure_cache(cache_dump, show_progress)
    data = (load_dataset(dump.dataset, root, dump.split), load_dataset(dump.dataset, root, "test"))
    teacher_acc = teacher_test_accuracy(dump, data[1])
    summaries = []
    for loss in losses:
        config = recipe.distill_config(loss, cache=caches[loss].out, data_root=root, out=str(out), epochs=epochs,
                                       device=device, resume=resume)
        summaries += distill(config, show_progress, data=data)
    write_summary(summaries, out)
    table = result_table(recipe, losses, summaries, teacher_acc, caches, config.epochs)
    table.write(out)
    if show_progress:
        print(f"\n{table.markdown()}\nwritten: {out / 'table.md'}, {out / 'table.csv'}, {out / 'summary.csv'}")
    return table


def recipe_listing() -> str:
    """`kdcache recipe --list`: each packaged recipe's pair and losses, one line each."""
    lines = []
    for name, path in sorted(packaged_recipes().items()):
        listed = load_recipe(path)
        lines.append(f"{name:<18} {listed.teacher} → {listed.student}: {', '.join(listed.losses)}")
    return "\n".join(lines)
