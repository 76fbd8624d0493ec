"""Format 7's dense caches: a segmentation teacher's per-pixel logits on every view, at an output stride, in the
chunked, checksummed, resumable store that region logits use.

A view's map at output stride s has h × w = H/s × W/s positions; position p (row-major: row p // w, column p % w)
holds the mean of the teacher's logits over the s × s block of the view's pixels it covers
(kdcache.stages.dense_targets.at_stride). The positions stand where an image cache's regions do, so the arrays are
the region arrays with regions read as positions: `logits` [views, samples, h·w, classes] (float16 by default), or
with `logits.topk` the top k per position, their classes and one value for the rest, exactly as format 2 keeps them
per region (kdcache.cache.topk). `labels` [views, samples] holds how many pixels of each view are labelled (not the
dataset's ignore_index) at full size, and `progress` counts per block how many of them the teacher's per-pixel argmax
at full size gets right: the view's pixel accuracy is their ratio (metadata `dense.labelled_pixels` keeps each
view's total, so that the accuracy is read without the labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from kdcache.cache.layout import ARRAYS, DENSE_SINCE, SPEC_KINDS, CacheSpec, _short, shared_fields
from kdcache.errors import CorruptCacheError

DENSE_POSITIONS = ("row-major over the map: position p is row p // w, column p % w, the mean of the teacher's "
                   "logits over rows s·(p // w) to s·(p // w) + s - 1 and columns s·(p % w) to s·(p % w) + s - 1 "
                   "of the view at full size (s the stride)")
DENSE_ARRAYS = {
    "logits": "[views, samples, positions, classes] raw pre-softmax teacher logits at each position of the view's map "
              "at the stride (dense.positions)",
    "topk_values": "[views, samples, positions, k] the k largest raw teacher logits of each position, descending",
    "topk_indices": "[views, samples, positions, k] their classes",
    "topk_rest": "[views, samples, positions] the logit that, given to each of the other classes, keeps their total "
                 "softmax mass at temperature 1: logsumexp(other logits) - log(classes - k)",
    "labels": "[views, samples] the pixels of each sample's view that are labelled (not dataset.ignore_index), at "
              "full size",
    "progress": "[views, blocks] -1 while a block is not written; then how many of its labelled pixels the teacher's "
                "per-pixel argmax at full size classifies correctly",
}
# fields every dense cache's reader relies on, checked when it is opened so that a missing one names itself
DENSE_FIELDS = (("teacher.arch", str), ("teacher.num_classes", int), ("teacher.checkpoint_sha256", str),
                ("teacher.precision", str), ("dataset.name", str), ("dataset.split", str),
                ("dataset.num_samples", int), ("dataset.image_shape", list), ("dataset.num_classes", int),
                ("dataset.class_names", list), ("dataset.mean", list), ("dataset.std", list),
                ("dataset.fingerprint", str), ("augmentation.name", str), ("augmentation.param_names", list),
                ("augmentation.mask_fill", int))


@dataclass(frozen=True)
class DenseCacheSpec(CacheSpec):
    """A dense cache's contents: CacheSpec's fields (no scales, no further outputs) and the map's description."""

    dense: dict[str, Any] = field(default_factory=dict)  # stride, map [h, w], labelled_pixels [views], positions
    kind: ClassVar[str] = "dense"
    since: ClassVar[int] = DENSE_SINCE

    @property
    def stride(self) -> int:
        """The output stride: each stored position covers stride × stride pixels of the view."""
        return int(self.dense["stride"])

    @property
    def map_size(self) -> tuple[int, int]:
        """(h, w) of each stored map: the view's size divided by the stride."""
        height, width = self.dense["map"]
        return int(height), int(width)

    @property
    def num_regions(self) -> int:
        """The map's positions, where an image cache has its regions."""
        height, width = self.map_size
        return height * width

    @property
    def labels_shape(self) -> tuple[int, ...]:
        return self.num_views, self.num_samples

    def scored(self, view: int) -> int:
        """The labelled pixels of view `view` (at least 1, so that a view of no labelled pixel reads as 0 right)."""
        return max(1, int(self.dense["labelled_pixels"][view]))

    def array_description(self, name: str) -> str:
        return DENSE_ARRAYS.get(name) or ARRAYS[name]

    def to_metadata(self) -> dict[str, Any]:
        document = super().to_metadata()
        del document["regions"]
        document["description"] = ("A segmentation teacher's per-pixel logits over replayable augmented views, at an "
                                    "output stride, written by `kdcache dump-teacher` on a dense dataset.")
        document["logits"]["values"] = ("raw pre-softmax logits at each position of the map; temperature is applied "
                                        "when training")
        if self.topk:
            document["logits"]["rebuilt"] = ("each position's logits are rebuilt as topk_rest for every class, then "
                                             "topk_values at topk_indices (as format 2 rebuilds a region's)")
        return {**document, "dense": {**self.dense, "positions": DENSE_POSITIONS}}

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], where: str) -> DenseCacheSpec:
        get, shared = shared_fields(metadata, where)
        spec = cls(**shared, scales=tuple(get("scales", list)), outputs=get("outputs", dict),
                   dense={"stride": get("dense.stride", int), "map": get("dense.map", list),
                          "labelled_pixels": get("dense.labelled_pixels", list)})
        return spec.checked(get, DENSE_FIELDS, where)

    def _check_values(self, where: str) -> None:
        self._check_counts(where)
        _, height, width = (self.dataset["image_shape"] + [0, 0, 0])[:3]
        stride, pixels = self.stride, self.dense["labelled_pixels"]
        if self.scales or self.outputs or stride < 1 or self.dense["map"] != [height // stride, width // stride] or \
                height % stride or width % stride:
            raise CorruptCacheError(f"{where}: a dense cache has no scales, no further outputs and a map of the "
                                    f"image's size over the stride; its metadata says scales={list(self.scales)}, "
                                    f"outputs={_short(self.outputs)}, dense.stride={stride}, dense.map="
                                    f"{_short(self.dense['map'])} for images {_short(self.dataset['image_shape'])}: "
                                    f"it was edited — rebuild it with `kdcache dump-teacher --overwrite`")
        if len(pixels) != self.num_views or not all(isinstance(n, int) and not isinstance(n, bool) and
                                                    0 <= n <= self.num_samples * height * width for n in pixels):
            raise CorruptCacheError(f"{where}: metadata field 'dense.labelled_pixels' should be one count per view "
                                    f"(views.count = {self.num_views}) of at most samples × pixels, found "
                                    f"{_short(pixels)}: it was edited — rebuild it with `kdcache dump-teacher "
                                    f"--overwrite`")
        if self.num_classes != self.dataset["num_classes"]:
            raise CorruptCacheError(f"{where}: metadata fields disagree: teacher.num_classes={self.num_classes}, "
                                    f"dataset.num_classes={self.dataset['num_classes']}: it was edited — rebuild it "
                                    f"with `kdcache dump-teacher --overwrite`")


def dense_cache_spec(teacher: dict[str, Any], dataset: dict[str, Any], augmentation: dict[str, Any], num_views: int,
                     exhaustive: bool, seed: int, stride: int, labelled_pixels: list[int], dtype: str = "float16",
                     block_size: int = 0, topk: int = 0) -> DenseCacheSpec:
    """The spec of a new dense cache of `dataset` (DenseData.describe(); its image_shape [3, H, W], H and W divisible
    by the stride) under `augmentation` (the policy's describe(), with mask_fill)."""
    height, width = dataset["image_shape"][1:]
    return DenseCacheSpec(teacher=teacher, dataset=dataset, augmentation=augmentation, num_views=num_views,
                          exhaustive=exhaustive, seed=seed, scales=(), dtype=dtype, block_size=block_size, topk=topk,
                          dense={"stride": stride, "map": [height // stride, width // stride],
                                 "labelled_pixels": list(labelled_pixels)})


SPEC_KINDS["dense"] = DenseCacheSpec
