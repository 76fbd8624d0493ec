"""Whether a cache fits a run: its data, normalisation, policy and scales; the outputs a loss reads; the views of a
second teacher's cache. The run's side arrives as plain descriptions (a source's and a policy's `describe()`, a
split's file listing), so these checks stay with the cache reading code without knowing torch, models or data
sources."""

from __future__ import annotations

from typing import Any

import numpy as np

from kdcache.cache.layout import first_difference, metadata_field
from kdcache.cache.reader import TeacherCache
from kdcache.errors import KdcacheError


def require_fits(cache: TeacherCache, dataset: dict[str, Any], augmentation: dict[str, Any], scales: tuple[int, ...],
                 teacher: str | None = None, files: tuple[str, list[bytes]] | None = None) -> None:
    """Refuse to train on a cache unless it was made from this data (`dataset`, a source's description), policy
    (`augmentation`, its description), scales, teacher spec (where given) and files ((folder, relative paths) of a
    streamed split).

    Checked from the most telling field to the most exact one, so a CIFAR-10 run on a CIFAR-100
    cache hears about the dataset rather than its class count or a fingerprint, and a folder whose files
    changed hears which file.
    """
    expected = {"dataset.name": dataset["name"], "dataset.split": dataset["split"],
                "teacher.num_classes": dataset["num_classes"], "dataset.source": dataset.get("source"),
                "scales": scales, "augmentation": augmentation, "dataset.mean": list(dataset["mean"]),
                "dataset.std": list(dataset["std"]), "dataset.classes": dataset.get("classes")}
    if teacher is not None:
        expected = {"teacher.arch": teacher, **expected}
    cache.require(expected)
    if files is not None:
        require_same_files(cache, *files)
    cache.require({"dataset.fingerprint": dataset["fingerprint"]})


def require_same_files(cache: TeacherCache, root: str, listed: list[bytes]) -> None:
    """Refuse a folder whose listing differs from the one the teacher's dump read, naming the first difference."""
    recorded = cache.file_listing()
    if recorded == listed:
        return
    first = next((i for i, (a, b) in enumerate(zip(recorded, listed)) if a != b), min(len(recorded), len(listed)))
    then, now = _listed(recorded, first), _listed(listed, first)
    raise KdcacheError(f"{root} lists other files than the teacher's dump of {cache.path} read "
                       f"({len(recorded)} files then, {len(listed)} now): sample {first} is {then} in the "
                       f"cache but {now} in the folder (a file added, removed or renamed); restore the "
                       f"folder as it was, or dump the teacher again over it as it is now")


def _listed(paths: list[bytes], index: int) -> str:
    """The relative path at index of a listing, or what stands there when the listing is shorter."""
    return repr(paths[index].decode(errors="replace")) if index < len(paths) else "nothing (the listing ends)"


def require_outputs(cache: TeacherCache, outputs: tuple[str, ...]) -> tuple[str, ...]:
    """The outputs, after refusing one the cache lacks, naming the command that caches it."""
    missing = [name for name in outputs if name not in cache.spec.outputs]
    if missing:
        raise KdcacheError(f"cache {cache.path} holds {', '.join(['regions', *cache.spec.outputs])}, not {missing[0]}: "
                           f"{_how_to_add(cache, missing[0].replace('/', ':'))}")
    return outputs


def outputs_of_kinds(cache: TeacherCache, kinds: tuple[str, ...], losses: str) -> tuple[str, ...]:
    """Every output of the cache of the kinds a loss reads (embedding, attention, hint); a kind it lacks refused."""
    found = {kind: [name for name in cache.spec.outputs if name.split("/", 1)[0] == kind] for kind in kinds}
    missing = [kind for kind, names in found.items() if not names]
    if missing:
        raise KdcacheError(f"loss {losses} reads the teacher's {missing[0]} outputs, but cache {cache.path} holds "
                           f"{', '.join(['regions', *cache.spec.outputs])}: {_how_to_add(cache, missing[0])}")
    return tuple(name for names in found.values() for name in names)


def _how_to_add(cache: TeacherCache, output: str) -> str:
    """The dump-teacher command that writes a cache with this output over the same views."""
    return (f"cache it with `kdcache dump-teacher --views-from {cache.path} --teacher {cache.spec.teacher['arch']} "
            f"--checkpoint CHECKPOINT --outputs regions,{output} --out NEW_CACHE` (the same views, the same teacher "
            f"or another), then train from NEW_CACHE")


# what two caches must share for one to hold another teacher's outputs on exactly the other's views
SAME_VIEWS = ("dataset.name", "dataset.split", "dataset.num_samples", "dataset.fingerprint", "augmentation",
              "views.count", "views.exhaustive", "views.seed")


def require_same_views(cache: TeacherCache, other: TeacherCache) -> None:
    """Refuse a cache whose views are not exactly those of `cache`, naming the first field (or view) that differs."""
    if other is cache:
        return
    mine, theirs = cache.spec.to_metadata(), other.spec.to_metadata()
    for name in SAME_VIEWS:
        field, one, another = first_difference(name, metadata_field(mine, name), metadata_field(theirs, name))
        if one != another:
            raise KdcacheError(f"caches {cache.path} and {other.path} differ in {field} ({one!r} and {another!r}): "
                               f"several teachers train together only on the same views; dump the second with "
                               f"`kdcache dump-teacher --views-from {cache.path} ...`")
    for view in range(cache.num_views):
        if not np.array_equal(cache.aug_params(view), other.aug_params(view)):  # shapes and values
            raise KdcacheError(f"caches {cache.path} and {other.path} store other augmentation parameters for view "
                               f"{view}, though their fields agree: dump the second with `kdcache dump-teacher "
                               f"--views-from {cache.path} ...`")
