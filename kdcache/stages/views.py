"""Which augmentation parameters each epoch uses (a cached view replayed, or fresh draws as online training does),
and whether a cache's views fit the data and policy of a run."""

from __future__ import annotations

from typing import Protocol

import torch

from kdcache.cache import TeacherCache
from kdcache.cache.layout import first_difference, metadata_field
from kdcache.data import AugmentPolicy, FilePolicy, ImageData, ImageFiles
from kdcache.data.files import FILE_POLICIES
from kdcache.errors import CorruptCacheError, KdcacheError
from kdcache.runtime import epoch_generator

VIEW_ORDERS = ("cycle", "shuffle")


class Views(Protocol):
    """What the loop asks of each epoch's views."""

    def view_of(self, epoch: int) -> int | None:
        """The cached view that epoch replays (None for fresh views)."""
        ...

    def params(self, epoch: int) -> torch.Tensor | None:
        """[N, P] augmentation parameters of the epoch; None: each file's view drawn fresh where it is read."""
        ...


class CachedViews:
    """Epoch e replays view e mod K of a cache (`cycle`), or a seeded permutation of the K views per round (`shuffle`).

    With S views per step (distill --views-per-step), epoch e trains on the sequence's places e·S to e·S + S - 1:
    `view_of` and `params` take that place.
    """

    def __init__(self, cache: TeacherCache, policy: AugmentPolicy | FilePolicy, order: str = "cycle",
                 seed: int = 0) -> None:
        if order not in VIEW_ORDERS:
            raise KdcacheError(f"--view-order: unknown order {order!r}; known: {', '.join(VIEW_ORDERS)}")
        self.cache, self.policy, self.order, self.seed = cache, policy, order, seed

    def view_of(self, epoch: int) -> int:
        """The cached view that epoch replays."""
        views = self.cache.num_views
        if self.order == "cycle":
            return epoch % views
        return int(torch.randperm(views, generator=epoch_generator(self.seed, epoch // views))[epoch % views])

    def params(self, epoch: int) -> torch.Tensor:
        """[N, P] augmentation parameters of the epoch's view, refused if the policy could not have drawn them."""
        view = self.view_of(epoch)
        stored = torch.from_numpy(self.cache.aug_params(view))
        params = stored if self.cache.spec.streamed else stored.long()
        bad = torch.nonzero(self.policy.out_of_range(params)).flatten()
        if len(bad):
            first = int(bad[0])
            raise CorruptCacheError(f"{self.cache.path}: array 'aug', view {view}: {len(bad)} samples hold parameters "
                                    f"the {self.policy.describe()['name']} policy never draws (first: sample {first}, "
                                    f"{dict(zip(self.policy.param_names, params[first].tolist()))}); the cache was "
                                    f"altered: rebuild it with `kdcache dump-teacher --overwrite`")
        return params


class FreshViews:
    """New random parameters every epoch (online distillation and teacher training), seeded per epoch."""

    def __init__(self, policy: AugmentPolicy | FilePolicy, num_samples: int, seed: int = 0) -> None:
        self.policy, self.num_samples, self.seed = policy, num_samples, seed

    def view_of(self, epoch: int) -> None:
        """Fresh views belong to no cached view."""
        return None

    def params(self, epoch: int) -> torch.Tensor | None:
        """[N, P] parameters drawn for this epoch; None for files, whose views are drawn for each image's own size
        where it is decoded (from the seed, the epoch and the sample)."""
        if isinstance(self.policy, tuple(FILE_POLICIES.values())):
            return None
        return self.policy.sample(epoch_generator(self.seed, epoch), self.num_samples)


def require_fits(cache: TeacherCache, data: ImageData | ImageFiles, policy: AugmentPolicy | FilePolicy,
                 scales: tuple[int, ...], teacher: str | None = None) -> None:
    """Refuse to train on a cache unless it was made from this data, normalisation, policy and scales.

    Checked from the most telling field to the most exact one, so a CIFAR-10 run on a CIFAR-100
    cache hears about the dataset rather than its class count or a fingerprint, and a folder whose files
    changed hears which file.
    """
    expected = {"dataset.name": data.name, "dataset.split": data.split, "teacher.num_classes": data.num_classes,
                "dataset.source": data.describe().get("source"), "scales": scales, "augmentation": policy.describe(),
                "dataset.mean": list(data.mean), "dataset.std": list(data.std)}
    if teacher is not None:
        expected = {"teacher.arch": teacher, **expected}
    cache.require(expected)
    if isinstance(data, ImageFiles):
        require_same_files(cache, data)
    cache.require({"dataset.fingerprint": data.fingerprint})


def require_same_files(cache: TeacherCache, files: ImageFiles) -> None:
    """Refuse a folder whose listing differs from the one the teacher's dump read, naming the first difference."""
    recorded, listed = cache.file_listing(), files.paths.tolist()
    if recorded == listed:
        return
    first = next((i for i, (a, b) in enumerate(zip(recorded, listed)) if a != b), min(len(recorded), len(listed)))
    then, now = _listed(recorded, first), _listed(listed, first)
    raise KdcacheError(f"{files.root} lists other files than the teacher's dump of {cache.path} read "
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
        if not torch.equal(torch.from_numpy(cache.aug_params(view)), torch.from_numpy(other.aug_params(view))):
            raise KdcacheError(f"caches {cache.path} and {other.path} store other augmentation parameters for view "
                               f"{view}, though their fields agree: dump the second with `kdcache dump-teacher "
                               f"--views-from {cache.path} ...`")

