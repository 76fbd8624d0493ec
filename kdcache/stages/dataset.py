"""The general path, and the one for your own training loop: a torch Dataset of replayed views and cached targets.

Items come as `(image, label, targets)` (`item="triple"`) or `(image, TeacherTargets)` (`item="pair"`, what
timm's loaders and a default collate carry: the label is `targets["label"]`), the image normalised float32 or,
`images="uint8"`, the cached view's pixels as they are, for loaders that normalise on the device with the
dataset's `mean` and `std`. The image is always the view the teacher saw: a transform assigned after
construction (timm's create_loader assigns one) is refused, or dropped inside `transforms_ignored()`.

`CacheDataset` pickles by the cache's path and opens the cache lazily in each process that reads it, so it works
under any DataLoader (fork, spawn, forkserver workers; DistributedSampler). The epoch that `set_epoch` selects
lives in shared memory, so persistent workers follow it too. Each reopening checks the cache_id of the cache the
dataset checked: a cache rewritten since (`dump-teacher --overwrite` between epochs) is refused, never served.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from kdcache.cache import TeacherCache, open_cache
from kdcache.cache.layout import CacheSpec
from kdcache.data import DataSource, dataset_options, load_at_size, normalize, stored_policy, student_views
from kdcache.data.mixing import mix_targets
from kdcache.errors import KdcacheError
from kdcache.models import region_indices
from kdcache.models.outputs import REGIONS
from kdcache.stages.views import CachedViews, require_fits, require_outputs


IMAGE_MODES = ("normalized", "uint8")  # CacheDataset(images=...): float32 (x / 255 - mean) / std, or the pixels
ITEM_FORMS = ("triple", "pair")  # CacheDataset(item=...): (image, label, targets), or (image, TeacherTargets)
LABEL = "label"  # a TeacherTargets' key for the samples' labels


class TensorExpected(KdcacheError, AttributeError):
    """Code that took a TeacherTargets for a tensor: one line; an AttributeError too, so hasattr() says False."""


class TeacherTargets(dict):
    """A sample's or batch's targets by name: `label` ([B] int64), `regions` ([B, R, C], the teacher's region
    logits), the further outputs the cache holds, and `mix.label`, `mix.weight` of a mixed cache.

    A dict (torch's default_collate keeps the class); `.to(...)` moves every tensor, as a tensor's `.to` would, so
    a loop or timm's PrefetchLoader (`target.to(device, non_blocking=True)`) moves it whole.
    """

    def to(self, *args: Any, **kwargs: Any) -> TeacherTargets:
        """Every target moved or cast as `Tensor.to(*args, **kwargs)` does, in a new TeacherTargets."""
        return TeacherTargets({name: value.to(*args, **kwargs) for name, value in self.items()})

    @property
    def ndim(self) -> int:
        """Refused: code that reads ndim takes the targets for one tensor and would lose the teacher's."""
        raise TensorExpected("a collate took the CacheDataset's targets (a kdcache.TeacherTargets dict of the label "
                             "and the teacher's outputs) for one tensor, as timm's fast_collate (create_loader's "
                             "collate with the prefetcher) does, and would drop the teacher's targets: pass "
                             "collate_fn=kdcache.collate, which keeps the images as they are and the targets whole")


def collate(batch: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
    """A batch of CacheDataset items of any form: the images stacked as they are (dtype and values kept), the
    labels [B], the targets a TeacherTargets of [B, ...] tensors. Module-level, so spawned workers pickle it."""
    return tuple(TeacherTargets(part) if isinstance(part, Mapping) else part for part in default_collate(batch))


def load_cache_data(spec: CacheSpec, data_root: str | Path | None = None, split: str | None = None,
                    **options: object) -> DataSource:
    """The split a cache was made from (or `split` of the same dataset), loaded at the image size it was made at."""
    return load_described_data(spec.dataset, data_root, split, **options)


def load_described_data(described: dict[str, Any], data_root: str | Path | None = None, split: str | None = None,
                        **options: object) -> DataSource:
    """The split a dataset's description names (`ImageData.describe()`, as caches and run folders record it), or
    `split` of the same dataset, at the image size it had and read as it was (from its files or held in memory),
    its views resized to the recorded `view_size` (a student's smaller than the teacher's) unless `options` name an
    image_size."""
    name, resized = described["name"], described.get("view_size") is not None and "image_size" not in options
    data_root = data_root or described.get("root")  # a synthesised set's folder, recorded with it
    if "image_size" in dataset_options(name):
        options = {"image_size": described["image_shape"][-1], **options}
    if "preload" in dataset_options(name):  # a split of files streams them; an older cache held the split in memory
        options = {"preload": described.get("source") != "files", **options}
    if described.get("classes") is not None:  # a split of some classes (--classes): the same classes of any split
        options = {"classes": described["classes"], **options}
    data = load_at_size(name, data_root, split or described["split"], **options)
    return data.at_size(described["view_size"]) if resized else data


class CacheDataset(Dataset):
    """Item i: (sample i under the current view, normalised (or uint8), then `transform`; its label; its targets),
    or `item="pair"`: (that image, its targets with the label as `targets["label"]`).

    `targets` is a dict of the cache's named outputs: `"regions"`, the region logits `[R, C]` float32 (the
    cache's regions, or those of `scales`), and the further outputs the cache holds (`embedding` `[D]`,
    `attention/<stage>` `[H, W]`, `hint/<stage>` `[C, H, W]`), or those of `outputs`. A cache of mixed views
    (dump-teacher --mix) adds `mix.label`, the partner's label, and `mix.weight`, λ, the weight of the item's own
    label: `kdcache.data.mixing.soft_labels` turns a batch's into mixed labels for the cross-entropy.
    `set_epoch(e)` selects the view epoch e replays (`view_order` cycle: e mod K), as a DistributedSampler's
    set_epoch selects its order. `data`: the dataset already loaded, instead of loading the one the cache names
    (from `data_root` where it needs one). A streamed split's files are read in `__getitem__` (in the loader's
    workers), each checked against the crc32c the teacher's dump recorded. `image_size`: a side smaller than the
    cache's views serves the same views at that size (cross-resolution distillation: a file's box cut from the
    original and resized to it, a view held in memory resized from the teacher's), a larger one is refused. `mean`,
    `std` (0-1 units, timm's convention), `image_size`, `input_size` (3, H, W) and `num_classes` are those of the
    images served; `check_loader_inputs` compares a loader's settings with them.
    """

    def __init__(self, cache: str | os.PathLike | TeacherCache, data_root: str | os.PathLike | None = None,
                 transform: Callable[[torch.Tensor], Any] | None = None, *, data: DataSource | None = None,
                 scales: tuple[int, ...] | None = None, view_order: str = "cycle", seed: int = 0,
                 outputs: tuple[str, ...] | None = None, images: str = "normalized", item: str = "triple",
                 image_size: int | None = None) -> None:
        self.path = cache.path if isinstance(cache, TeacherCache) else cache
        self._transform, self._ignoring_transforms = transform, False
        self.images, self.item = _one_of("images", images, IMAGE_MODES), _one_of("item", item, ITEM_FORMS)
        self.view_order, self.seed = view_order, seed
        opened = cache if isinstance(cache, TeacherCache) else open_cache(self.path)
        try:
            cached_data = data if data is not None else load_cache_data(opened.spec, data_root)
            require_fits(opened, cached_data, stored_policy(cached_data, opened.spec.augmentation),
                         scales or opened.spec.scales)
            self.data, self.policy = student_views(cached_data, opened.spec.augmentation, image_size)
            self.regions = None if scales is None else region_indices(opened.spec.scales, scales)
            self.scales = tuple(scales or opened.spec.scales)  # the targets' regions: LogitMap(student, scales)
            self.outputs = require_outputs(opened, tuple(opened.spec.outputs) if outputs is None else outputs)
            CachedViews(opened, self.policy, view_order, seed)  # an unknown order is refused here, not in a worker
            self.cache_id = opened.cache_id  # what was checked here: a worker refuses a cache rewritten since
            self.cached_size = tuple(opened.spec.dataset["image_shape"])  # (3, H, W): the views the teacher saw
            self.input_size = self.cached_size[:1] + ((image_size,) * 2 if image_size else self.cached_size[1:])
        finally:
            if opened is not cache:
                opened.close()
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()  # seen by every worker, persistent too
        self._cache: TeacherCache | None = None
        self._opened_by = os.getpid()
        self._loaded: tuple[int, int, torch.Tensor, dict[str, torch.Tensor]] | None = None  # epoch, view, params, targets
        self._checksums: np.ndarray | None = None  # a streamed split's crc32c per file, read once per process

    @property
    def num_classes(self) -> int:
        """How many classes the cache's teacher and dataset have."""
        return self.data.num_classes

    @property
    def mean(self) -> tuple[float, ...]:
        """The per-channel mean the images are normalised with, in 0-1 units (timm's convention)."""
        return self.data.mean

    @property
    def std(self) -> tuple[float, ...]:
        """The per-channel standard deviation the images are normalised with, in 0-1 units."""
        return self.data.std

    @property
    def image_size(self) -> int:
        """The side of the cached views (the larger, were they not square)."""
        return max(self.input_size[1:])

    @property
    def transform(self) -> Callable[[torch.Tensor], Any] | None:
        """What the constructor's `transform=` applies after the view (None: the view as it is)."""
        return self._transform

    @transform.setter
    def transform(self, transform: Callable[[torch.Tensor], Any] | None) -> None:
        if self._ignoring_transforms:
            return
        if transform is not None:
            raise KdcacheError(
                f"CacheDataset.transform: the items are the cached views, the pixels the teacher's targets were made "
                f"on, so a transform assigned afterwards (as timm's create_loader assigns its own) would train on "
                f"other images; use a plain DataLoader with collate_fn=kdcache.collate, or the timm integration "
                f"(it builds timm's loader inside dataset.transforms_ignored()), or pass transform= to CacheDataset() "
                f"for what must follow the view")
        self._transform = None

    @contextlib.contextmanager
    def transforms_ignored(self) -> Iterator[CacheDataset]:
        """Within: assignments to `transform` are dropped (the cache's views replace a loader's transforms). For
        pair items only: loaders that assign transforms (timm's) carry (input, target), and timm's fast_collate
        would drop a triple's targets without a word."""
        if self.item != "pair":
            raise KdcacheError("CacheDataset.transforms_ignored(): a loader that assigns transforms (timm's "
                               "create_loader) carries (input, target) items, and its fast_collate keeps only the "
                               "first two of an (image, label, targets) item, dropping the teacher's targets: build "
                               "the dataset with item='pair' and pass collate_fn=kdcache.collate")
        self._ignoring_transforms = True
        try:
            yield self
        finally:
            self._ignoring_transforms = False

    def set_epoch(self, epoch: int) -> None:
        """Select the view that epoch replays, here and in every worker (read when the worker next needs an item)."""
        self._epoch.fill_(epoch)

    @property
    def view(self) -> int:
        """The cached view the current epoch replays."""
        return self._current()[1]

    def _current(self) -> tuple[int, int, torch.Tensor, dict[str, torch.Tensor]]:
        """The current epoch's (epoch, view, parameters [N, P], targets by name: regions [N, R, C], ...), read once
        per epoch and process."""
        epoch = int(self._epoch)
        if self._opened_by != os.getpid():  # a forked worker: the parent's open store is not usable here
            self._cache, self._loaded, self._opened_by = None, None, os.getpid()
        if self._loaded is None or self._loaded[0] != epoch:
            if self._cache is None:
                self._cache = open_cache(self.path, self.cache_id)
            views = CachedViews(self._cache, self.policy, self.view_order, self.seed)
            view = views.view_of(epoch)
            logits = torch.from_numpy(self._cache.view(view))
            arrays = self._cache.view_arrays(view, names=tuple(self._cache.spec.output_arrays[n] for n in self.outputs))
            targets = {REGIONS: logits if self.regions is None else logits[:, self.regions],
                       **{name: torch.from_numpy(arrays[self._cache.spec.output_arrays[name]]) for name in self.outputs}}
            self._loaded = (epoch, view, views.params(epoch), targets)
            if self._cache.spec.streamed and self._checksums is None:
                self._checksums = self._cache.file_checksums()
        return self._loaded

    def __getstate__(self) -> dict[str, Any]:
        """Pickled by path: the open cache and the loaded view stay behind, each worker opens and reads its own."""
        return {**self.__dict__, "_cache": None, "_loaded": None, "_checksums": None}

    def __len__(self) -> int:
        return len(self.data.labels)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor, TeacherTargets] | tuple[Any, TeacherTargets]:
        _, _, params, targets = self._current()
        x = self._view_of(index, params)
        x = normalize(x, self.data.mean, self.data.std)[0] if self.images == "normalized" else x[0]
        if self._transform is not None:
            x = self._transform(x)
        mixed = {name: value[0] for name, value in mix_targets(self.policy, self.data.labels, params, [index]).items()}
        outputs = TeacherTargets({name: values[index].float() for name, values in targets.items()}, **mixed)
        if self.item == "pair":
            return x, TeacherTargets({LABEL: self.data.labels[index]}, **outputs)
        return x, self.data.labels[index], outputs

    def _view_of(self, index: int, params: torch.Tensor) -> torch.Tensor:
        """Sample index under its view, uint8 [1, C, H, W]: replayed from memory, or from its file (checked)."""
        return self.data.sample_view(self.policy, params, index, self._checksums)


def _one_of(option: str, value: str, known: tuple[str, ...]) -> str:
    """A CacheDataset option's value, refused in one line unless it is one of `known`."""
    if value not in known:
        raise KdcacheError(f"CacheDataset({option}={value!r}): expected one of {', '.join(map(repr, known))}")
    return value


def check_loader_inputs(dataset: CacheDataset, *, image_size: int | Sequence[int] | None = None,
                        mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                        num_classes: int | None = None, where: str = "the loader") -> None:
    """Refuse, in one line naming both, a loader or model setting that differs from the cache's: image size (an
    int, (H, W) or (3, H, W)), mean and std (0-1 units), class count. None: not compared."""
    found = {"image size": None if image_size is None else _image_shape(image_size),
             "mean": None if mean is None else tuple(float(value) for value in mean),
             "std": None if std is None else tuple(float(value) for value in std), "class count": num_classes}
    cached = {"image size": dataset.input_size[1:], "mean": dataset.mean, "std": dataset.std,
              "class count": dataset.num_classes}
    for name, value in found.items():
        if value is not None and not _same(value, cached[name]):
            resized = name == "image size" and dataset.input_size != dataset.cached_size  # image_size= given
            made, whose = (f"the dataset serves the cache {dataset.path}'s views at", "dataset") if resized else \
                (f"the cache {dataset.path} was made at", "cache")
            raise KdcacheError(f"{where}'s {name} is {_shown(value)} but {made} {_shown(cached[name])}: give {where} "
                               f"the {whose}'s {name}")


def _image_shape(image_size: int | Sequence[int]) -> tuple[int, ...]:
    """(H, W) of an image size given as an int, (H, W) or (3, H, W)."""
    if isinstance(image_size, int):
        return (image_size, image_size)
    return tuple(int(side) for side in image_size)[-2:]


def _same(found: object, cached: object) -> bool:
    """Equal, numbers to 4 decimals (the precision the cache records mean and std at)."""
    if isinstance(found, tuple):
        return len(found) == len(cached) and all(_same(a, b) for a, b in zip(found, cached))
    return abs(float(found) - float(cached)) < 5e-5 if isinstance(found, float) else found == cached


def _shown(value: object) -> str:
    """A value as a message names it: sides as HxW, numbers as they are."""
    if isinstance(value, tuple) and all(isinstance(side, int) for side in value):
        return "x".join(map(str, value))
    return str(tuple(round(v, 4) for v in value)) if isinstance(value, tuple) else str(value)
