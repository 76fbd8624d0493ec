"""The general path, and the one for your own training loop: a torch Dataset of replayed views and cached targets.

`CacheDataset` pickles by the cache's path and opens the cache lazily in each process that reads it, so it works
under any DataLoader (fork, spawn, forkserver workers; DistributedSampler). The epoch that `set_epoch` selects
lives in shared memory, so persistent workers follow it too. Each reopening checks the cache_id of the cache the
dataset checked: a cache rewritten since (`dump-teacher --overwrite` between epochs) is refused, never served.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdcache.cache import TeacherCache, open_cache
from kdcache.cache.layout import CacheSpec
from kdcache.data import FileBatches, ImageData, ImageFiles, dataset_options, load_dataset, normalize, stored_policy
from kdcache.data.mixing import mix_targets, replay
from kdcache.models import region_indices
from kdcache.models.outputs import REGIONS
from kdcache.stages.views import CachedViews, require_fits, require_outputs


def load_cache_data(spec: CacheSpec, data_root: str | Path | None = None, split: str | None = None,
                    **options: object) -> ImageData | ImageFiles:
    """The split a cache was made from (or `split` of the same dataset), loaded at the image size it was made at."""
    return load_described_data(spec.dataset, data_root, split, **options)


def load_described_data(described: dict[str, Any], data_root: str | Path | None = None, split: str | None = None,
                        **options: object) -> ImageData | ImageFiles:
    """The split a dataset's description names (`ImageData.describe()`, as caches and run folders record it), or
    `split` of the same dataset, at the image size it had and read as it was (from its files or held in memory)."""
    name = described["name"]
    data_root = data_root or described.get("root")  # a synthesised set's folder, recorded with it
    if "image_size" in dataset_options(name):
        options = {"image_size": described["image_shape"][-1], **options}
    if "preload" in dataset_options(name):  # a split of files streams them; an older cache held the split in memory
        options = {"preload": described.get("source") != "files", **options}
    return load_dataset(name, data_root, split or described["split"], **options)


class CacheDataset(Dataset):
    """Item i: (sample i under the current view, normalised, then `transform`; its label; its targets).

    `targets` is a dict of the cache's named outputs: `"regions"`, the region logits `[R, C]` float32 (the
    cache's regions, or those of `scales`), and the further outputs the cache holds (`embedding` `[D]`,
    `attention/<stage>` `[H, W]`, `hint/<stage>` `[C, H, W]`), or those of `outputs`. A cache of mixed views
    (dump-teacher --mix) adds `mix.label`, the partner's label, and `mix.weight`, λ, the weight of the item's own
    label: `kdcache.data.mixing.soft_labels` turns a batch's into mixed labels for the cross-entropy.
    `set_epoch(e)` selects the view epoch e replays (`view_order` cycle: e mod K), as a DistributedSampler's
    set_epoch selects its order. `data`: the dataset already loaded, instead of loading the one the cache names
    (from `data_root` where it needs one). A streamed split's files are read in `__getitem__` (in the loader's
    workers), each checked against the crc32c the teacher's dump recorded.
    """

    def __init__(self, cache: str | os.PathLike | TeacherCache, data_root: str | os.PathLike | None = None,
                 transform: Callable[[torch.Tensor], Any] | None = None, *, data: ImageData | ImageFiles | None = None,
                 scales: tuple[int, ...] | None = None, view_order: str = "cycle", seed: int = 0,
                 outputs: tuple[str, ...] | None = None) -> None:
        self.path = cache.path if isinstance(cache, TeacherCache) else cache
        self.transform, self.view_order, self.seed = transform, view_order, seed
        opened = cache if isinstance(cache, TeacherCache) else open_cache(self.path)
        try:
            self.data = data if data is not None else load_cache_data(opened.spec, data_root)
            self.policy = stored_policy(self.data, opened.spec.augmentation)
            require_fits(opened, self.data, self.policy, scales or opened.spec.scales)
            self.regions = None if scales is None else region_indices(opened.spec.scales, scales)
            self.scales = tuple(scales or opened.spec.scales)  # the targets' regions: LogitMap(student, scales)
            self.outputs = require_outputs(opened, tuple(opened.spec.outputs) if outputs is None else outputs)
            CachedViews(opened, self.policy, view_order, seed)  # an unknown order is refused here, not in a worker
            self.cache_id = opened.cache_id  # what was checked here: a worker refuses a cache rewritten since
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
            if isinstance(self.data, ImageFiles) and self._checksums is None:
                self._checksums = self._cache.file_checksums()
        return self._loaded

    def __getstate__(self) -> dict[str, Any]:
        """Pickled by path: the open cache and the loaded view stay behind, each worker opens and reads its own."""
        return {**self.__dict__, "_cache": None, "_loaded": None, "_checksums": None}

    def __len__(self) -> int:
        return len(self.data.labels)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
        _, _, params, targets = self._current()
        x = normalize(self._view_of(index, params), self.data.mean, self.data.std)[0]
        if self.transform is not None:
            x = self.transform(x)
        mixed = {name: value[0] for name, value in mix_targets(self.policy, self.data.labels, params, [index]).items()}
        outputs = {name: values[index].float() for name, values in targets.items()}
        return x, self.data.labels[index], {**outputs, **mixed}

    def _view_of(self, index: int, params: torch.Tensor) -> torch.Tensor:
        """Sample index under its view, uint8 [1, C, H, W]: replayed from memory, or from its file (checked)."""
        if isinstance(self.data, ImageData):
            return replay(self.policy, self.data.images, params, [index])
        files = FileBatches(self.data, self.policy, checksums=self._checksums)
        files.replay(params)
        return files.sample_view(0, index)[0][None]
