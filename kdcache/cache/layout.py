"""Cache format versions 1 to 7: the arrays, the metadata schema, and the checks
that a cache fits its use."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import math
import re
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import numpy as np

from kdcache.cache.topk import index_dtype_for
from kdcache.errors import CorruptCacheError, KdcacheError

FORMAT = "kdcache-teacher-logits"
# every version ever written, and what it stores; a reader reads them all, a writer writes the last
FORMAT_VERSIONS = {
    1: "every logit; `progress` chunked one chunk per view (kdcache before 6a2eddd) or one per block (6a2eddd "
       "to 6894b6c): the chunk shape tells which",
    2: "per region the top k logits, their classes and one value for the rest; `progress` one chunk per block",
    3: "every logit, or with `logits.topk` the top k as in 2; `progress` one chunk per block",
    4: "as 3; a split streamed from files (`dataset.source` files) adds `files` and `file_crc32c`, and its `aug` "
       "is float32 fractions of each original image, written with each block",
    5: "as 4, plus the metadata's `outputs`: the teacher's further outputs per view besides its region logits "
       "(`embedding`, `attention.<stage>`, `hint.<stage>`), each an array chunked as the logits are",
    6: "as 5; or a token cache (metadata `tokens`): a causal language model's next-token distribution per sequence "
       "and position, its top-k token ids and log-probabilities quantised as `tokens` describes, `labels` the next "
       "token of each position",
    7: "as 6, where a zero-shot teacher's cache (metadata `teacher.zero_shot`) adds `text_embedding`; or a dense cache (metadata `dense`): a segmentation teacher's per-pixel logits at an output stride, "
       "each map's positions row-major where regions stand ([views, samples, positions, classes], or their top k per "
       "position as format 2 keeps per region), `labels` [views, samples] the labelled pixels of each view",
}
WRITTEN_VERSION = 7
TOKENS_SINCE = 6  # the first format version that may be a token cache
DENSE_SINCE = 7  # the first format version that may be a dense cache
OUTPUTS_SINCE = 5  # the first format version that may hold outputs besides the region logits
TARGET_CHUNK_BYTES = 2 * 2**20  # one view x one block of samples per chunk: 1-4 MB reads well from disk
PENDING = -1  # progress value of a block not yet written
FINITE_CHECK_BLOCK = 2**18  # values tested at a time: the scratch stays in cache
# float dtype -> (same-size unsigned int, its exponent bits): a value is NaN or Inf iff all of them are set
_EXPONENT_BITS = {np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(np.float32): (np.uint32, 0x7F800000)}

ARRAYS = {
    "logits": "[views, samples, regions, classes] raw pre-softmax teacher logits of each region",
    "topk_values": "[views, samples, regions, k] the k largest raw teacher logits of each region, descending",
    "topk_indices": "[views, samples, regions, k] their classes",
    "topk_rest": "[views, samples, regions] the logit that, given to each of the other classes, keeps their total "
                 "softmax mass at temperature 1: logsumexp(other logits) - log(classes - k)",
    "aug": "[views, samples, params] augmentation parameters that replay each view (see augmentation): int32 "
           "pixels of the stored images, or float32 fractions of each original file for a streamed split",
    "files": "[bytes] the streamed split's files, relative to its folder, '\\n'-separated, in sample order (UTF-8)",
    "file_crc32c": "[samples] crc32c of each file's bytes as the teacher read them",
    "embedding": "[views, samples, D] the teacher's pooled features, the classifier's input "
                 "(forward_head(..., pre_logits=True))",
    "attention.<stage>": "[views, samples, H, W] the attention-transfer map of the stage's output: the channel mean "
                         "of its squares, L2-normalised over the H*W positions (Zagoruyko & Komodakis 2017, p = 2)",
    "hint.<stage>": "[views, samples, C, H, W] the stage's output feature map, FitNet's hint (Romero et al. 2015)",
    "text_embedding": "[classes, D] float32: a zero-shot teacher's (CLIP's) L2-normalised text embedding of one "
                      "prompt per class, teacher.zero_shot.template with the class name of "
                      "teacher.zero_shot.class_names (underscores read as spaces); its logits are "
                      "logit_scale.exp() * embedding @ text_embedding.T",
    "labels": "[samples] class labels",
    "progress": "[views, blocks] -1 while a block is not written; then how many of its samples the "
                "teacher's global logit (region 0) classifies correctly",
    "metadata_sha256": "[32] sha256 of this metadata document less view_accuracy (JSON, keys sorted), in a "
                       "checksummed chunk: an edit or bit rot of the document is found when the cache is opened",
}
DIGEST_ARRAY, DIGEST_BYTES = "metadata_sha256", 32
DIGEST_SINCE = 3  # the first format version that stores the digest
# a random id, written into the metadata once, when the store is created (resume and finish keep it): a reader
# that reopens a cache by path checks it is still the store it validated (see cache_id)
CACHE_ID, CACHE_ID_SHOWN = "cache_id", 12  # the field, and the hex digits of it an error shows
REGION_LAYOUT = "region 0 is the global logit; then, for each scale s in order, its s*s cells row-major"

# fields that define what a cache holds: a rerun must match them all to resume
IDENTITY_FIELDS = (
    "teacher.arch", "teacher.num_classes", "teacher.checkpoint_sha256", "teacher.precision",
    "dataset.name", "dataset.split", "dataset.num_samples", "dataset.image_shape", "dataset.num_classes",
    "dataset.mean", "dataset.std", "dataset.fingerprint",
    "augmentation", "views.count", "views.exhaustive", "views.seed", "scales", "logits.dtype",
    "logits.block_size", "logits.topk", "outputs", "tokens", "teacher.zero_shot", "dense",
)
FULL_ARRAYS = ("logits",)
TEXT_EMBEDDING = "text_embedding"  # a zero-shot teacher's class prompts, embedded: written once, with the arrays
FILE_ARRAYS = ("files", "file_crc32c")
TOPK_ARRAYS = ("topk_values", "topk_indices", "topk_rest")


@dataclass(frozen=True)
class CacheSpec:
    """Everything that defines the contents of a cache."""

    teacher: dict[str, Any]  # arch, num_classes, checkpoint_sha256, precision (+ checkpoint path, informative)
    dataset: dict[str, Any]  # ImageData.describe()
    augmentation: dict[str, Any]  # policy.describe()
    num_views: int
    exhaustive: bool
    seed: int
    scales: tuple[int, ...]
    dtype: str = "float16"
    block_size: int = 0  # 0: chosen from TARGET_CHUNK_BYTES
    topk: int = 0  # 0: every logit; k: the top k per region
    view_accuracy: list[float] | None = field(default=None, compare=False)
    format_version: int = field(default=WRITTEN_VERSION, compare=False)  # of a stored cache: as it was written
    # further outputs than the region logits (models.outputs): name -> the shape of one sample's, e.g.
    # {"embedding": [256], "attention/layer1": [32, 32]}
    outputs: dict[str, list[int]] = field(default_factory=dict)

    kind: ClassVar[str] = "regions"  # what a sample's values are: region logits (or a token cache's positions)
    since: ClassVar[int] = 1  # the first format version that may hold this kind

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            object.__setattr__(self, "block_size", max(1, min(self.num_samples,
                                                              TARGET_CHUNK_BYTES // self.bytes_per_sample)))

    @property
    def streamed(self) -> bool:
        """Whether the dataset was read from files (format 4): the views are fractions of each original file."""
        return self.dataset.get("source") == "files"

    @property
    def aug_dtype(self) -> str:
        """int32 pixel parameters of in-memory images; float32 fractions of the original file for a streamed split."""
        return "float32" if self.streamed else "int32"

    @property
    def file_arrays(self) -> tuple[str, ...]:
        """The arrays that record a streamed split's files and their checksums."""
        return FILE_ARRAYS if self.streamed else ()

    @property
    def logit_arrays(self) -> tuple[str, ...]:
        """The arrays that hold the teacher's region logits: whole, or their top-k encoding."""
        return TOPK_ARRAYS if self.topk else FULL_ARRAYS

    @property
    def output_arrays(self) -> dict[str, str]:
        """The arrays of the further outputs, by output name (`attention/layer1` is stored as `attention.layer1`)."""
        return {name: output_array(name) for name in self.outputs}

    @property
    def constant_arrays(self) -> tuple[str, ...]:
        """The arrays written once when the cache is created, of the teacher rather than the samples: a zero-shot
        teacher's text embedding."""
        return (TEXT_EMBEDDING,) if "zero_shot" in self.teacher else ()

    def constant_layout(self, name: str) -> tuple[tuple[int, ...], str]:
        """Shape and dtype of one of the constant arrays."""
        return {TEXT_EMBEDDING: ((self.num_classes, int(self.teacher["zero_shot"]["dim"])), "float32")}[name]

    @property
    def data_arrays(self) -> tuple[str, ...]:
        """The arrays written per (view, block), chunked (1 view, 1 block, ...): the logits', then the outputs'."""
        return (*self.logit_arrays, *self.output_arrays.values())

    @property
    def index_dtype(self) -> str:
        """Class indices of top-k storage: int16 up to 32768 classes."""
        return index_dtype_for(self.num_classes)

    def array_layout(self, name: str) -> tuple[tuple[int, ...], str]:
        """Shape and dtype of one of the data arrays."""
        views, samples, regions = self.num_views, self.num_samples, self.num_regions
        outputs = {array: ((views, samples, *self.outputs[name]), self.dtype)
                   for name, array in self.output_arrays.items()}
        return outputs.get(name) or {"logits": ((views, samples, regions, self.num_classes), self.dtype),
                "topk_values": ((views, samples, regions, self.topk), self.dtype),
                "topk_indices": ((views, samples, regions, self.topk), self.index_dtype),
                "topk_rest": ((views, samples, regions), self.dtype)}[name]

    def sample_bytes(self, name: str) -> int:
        """Bytes one sample of one view takes in one of the data arrays."""
        shape, dtype = self.array_layout(name)
        return math.prod(shape[2:]) * np.dtype(dtype).itemsize

    @property
    def bytes_per_sample(self) -> int:
        """Bytes one sample of one view takes in the data arrays."""
        return sum(map(self.sample_bytes, self.data_arrays))

    def view_bytes(self, arrays: Iterable[str] | None = None, samples: int | None = None) -> int:
        """Bytes one view takes in the named data arrays (all of them by default), over every sample or `samples`."""
        names = self.data_arrays if arrays is None else arrays
        return (self.num_samples if samples is None else samples) * sum(map(self.sample_bytes, names))

    @property
    def num_samples(self) -> int:
        return int(self.dataset["num_samples"])

    @property
    def num_classes(self) -> int:
        return int(self.teacher["num_classes"])

    @property
    def head(self) -> str:
        """The teacher's head kind (kdcache.models.HEAD_KINDS); caches from before it was recorded had linear heads."""
        return str(self.teacher.get("head", "linear"))

    @property
    def num_regions(self) -> int:
        return sum(s * s for s in self.scales)

    @property
    def num_params(self) -> int:
        return len(self.augmentation["param_names"])

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.num_samples / self.block_size)

    def block_range(self, block: int) -> range:
        """The sample indices of one block."""
        return range(block * self.block_size, min((block + 1) * self.block_size, self.num_samples))

    @property
    def logits_shape(self) -> tuple[int, int, int, int]:
        return (self.num_views, self.num_samples, self.num_regions, self.num_classes)

    def to_metadata(self) -> dict[str, Any]:
        """The JSON metadata document stored with the cache."""
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "kdcache_version": tool_version(),
            "description": "Teacher logits over replayable augmented views, written by `kdcache dump-teacher`; "
                           "train students from it with `kdcache distill --cache`.",
            "teacher": self.teacher,
            "dataset": self.dataset,
            "augmentation": self.augmentation,
            "views": {"count": self.num_views, "exhaustive": self.exhaustive, "seed": self.seed},
            "scales": list(self.scales),
            "regions": {"count": self.num_regions, "layout": REGION_LAYOUT},
            "logits": {"dtype": self.dtype, "block_size": self.block_size,
                       "values": "raw pre-softmax logits; temperature, standardisation and masks are "
                                 "applied when training",
                       **({"topk": self.topk, "rebuilt": "each region's logits are rebuilt as topk_rest for every "
                           "class, then topk_values at topk_indices (FKD/ReLabel: the other classes share the "
                           "remaining mass evenly)"} if self.topk else {})},
            **({"outputs": self.outputs} if self.format_version >= OUTPUTS_SINCE else {}),
            "arrays": {name: self.array_description(name) for name in (*self.data_arrays, "aug", "labels", "progress",
                                                                          DIGEST_ARRAY, *self.file_arrays,
                                                                          *self.constant_arrays)},
            "view_accuracy": self.view_accuracy,
        }

    def array_description(self, name: str) -> str:
        """What one of the cache's arrays holds, for the metadata's `arrays`."""
        return ARRAYS[generic_array(name)]

    @property
    def labels_shape(self) -> tuple[int, ...]:
        """The `labels` array's shape: a class per sample."""
        return (self.num_samples,)

    @property
    def num_scored(self) -> int:
        """How many predictions `progress` counts the right ones of, per view: one per sample."""
        return self.num_samples

    def scored(self, view: int) -> int:
        """How many predictions `progress` counts the right ones of in view `view` (the same in every view here)."""
        return self.num_scored

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], where: str) -> CacheSpec:
        """Parse and check a stored metadata document; a missing or malformed field names itself."""
        version = _format_version(metadata, where)
        kind = next((kind for kind in SPEC_KINDS if kind in metadata), None)
        if kind is not None and version >= SPEC_KINDS[kind].since and cls is CacheSpec:
            return SPEC_KINDS[kind].from_metadata(metadata, where)
        get, shared = shared_fields(metadata, where)
        scales = tuple(get("scales", list))
        if not (scales and all(isinstance(s, int) and not isinstance(s, bool) for s in scales) and scales[0] == 1
                and all(a < b for a, b in zip(scales, scales[1:]))):
            # the stored regions follow the scales in order: any other order would name the wrong cells
            raise CorruptCacheError(f"{where}: metadata field 'scales' must be integers ascending from 1, as dumps "
                                    f"write them, found {list(scales)!r}")
        spec = cls(**shared, scales=scales, outputs=get("outputs", dict) if version >= OUTPUTS_SINCE else {})
        if spec.streamed:
            get("dataset.listing_bytes", int)
        return spec.checked(get, REGION_FIELDS, where)

    def checked(self, get: _FieldReader, required: tuple[tuple[str, type], ...], where: str) -> Self:
        """This spec, read from a metadata document, once each field a reader relies on later is found with its type
        (so that a missing one is named here) and the values are ones a dump writes."""
        for name, kind in required:
            get(name, kind)
        self._check_values(where)
        return self

    def _check_values(self, where: str) -> None:
        """Refuse fields whose type is right but whose value no dump writes."""
        for name, shape in self.outputs.items():
            if not (_is_output_name(name) and isinstance(shape, list) and shape
                    and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
                raise CorruptCacheError(f"{where}: metadata field 'outputs' should map output names (embedding, "
                                        f"attention/<stage>, hint/<stage>) to positive sizes, found {name!r}: "
                                        f"{_short(shape)}")
        if "zero_shot" in self.teacher:
            self._check_zero_shot(where)
        if self.streamed and self.format_version < 4:
            raise CorruptCacheError(f"{where}: metadata says format {self.format_version} but 'dataset.source' files, "
                                    f"which format 4 introduced: the metadata was edited — rebuild it with "
                                    f"`kdcache dump-teacher --overwrite`")
        feature_map = self.teacher["feature_map"]
        if len(feature_map) != 2 or not all(isinstance(n, int) and n > 0 for n in feature_map):
            raise CorruptCacheError(f"{where}: metadata field 'teacher.feature_map' should be [height, width] of the "
                                    f"teacher's final feature map, found {_short(feature_map)}")
        self._check_counts(where)

    def _check_counts(self, where: str) -> None:
        """Refuse views, block size, dtype, top-k or per-view accuracy that no dump writes (every kind's fields)."""
        if self.num_views < 1 or self.block_size < 1 or self.dtype not in ("float16", "float32"):
            raise CorruptCacheError(f"{where}: metadata has views.count={self.num_views}, logits.block_size="
                                    f"{self.block_size}, logits.dtype={self.dtype!r}; expected positive counts "
                                    f"and float16 or float32")
        if self.topk and not 1 <= self.topk < self.num_classes:
            raise CorruptCacheError(f"{where}: metadata field 'logits.topk' should be in 1..{self.num_classes - 1} "
                                    f"(teacher.num_classes - 1), found {self.topk}")
        accuracy = self.view_accuracy
        if accuracy is not None and not (isinstance(accuracy, list) and len(accuracy) == self.num_views and all(
                a is None or (isinstance(a, (int, float)) and not isinstance(a, bool)) for a in accuracy)):
            raise CorruptCacheError(f"{where}: metadata field 'view_accuracy' should be null or one number per view "
                                    f"(views.count = {self.num_views}), found {_short(accuracy)}")

    def _check_zero_shot(self, where: str) -> None:
        """Refuse a zero-shot teacher's description that no dump writes: a template, a name per class, a dimension."""
        zero_shot = self.teacher["zero_shot"]
        fields = zero_shot if isinstance(zero_shot, dict) else {}
        names, dim = fields.get("class_names"), fields.get("dim")
        if not (isinstance(fields.get("template"), str) and isinstance(names, list) and len(names) == self.num_classes
                and all(isinstance(name, str) for name in names)
                and isinstance(dim, int) and not isinstance(dim, bool) and dim > 0):
            raise CorruptCacheError(f"{where}: metadata field 'teacher.zero_shot' should hold a template, one class "
                                    f"name per class ({self.num_classes}) and a positive dim, found "
                                    f"{_short(zero_shot)}; the metadata was edited: rebuild the cache with "
                                    f"`kdcache dump-teacher --overwrite`")

    def identity_digest(self) -> str:
        """sha256 of the identity fields: names a cache by what it holds, wherever it lies."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()

    def identity(self) -> dict[str, Any]:
        """The fields that define the cache's contents, by dotted name."""
        flat = {**_flatten(self.to_metadata()), "logits.topk": self.topk}  # 0 for a full cache, which has no field
        return {name: value for name, value in flat.items()
                if any(name == f or name.startswith(f + ".") for f in IDENTITY_FIELDS)}


# the metadata fields a region cache's reader relies on, with their types
REGION_FIELDS = (("teacher.arch", str), ("teacher.num_classes", int), ("teacher.checkpoint_sha256", str),
                 ("teacher.precision", str), ("teacher.feature_map", list), ("dataset.name", str),
                 ("dataset.split", str), ("dataset.num_samples", int), ("dataset.mean", list), ("dataset.std", list),
                 ("dataset.fingerprint", str), ("augmentation.name", str), ("augmentation.param_names", list))


def shared_fields(metadata: dict[str, Any], where: str) -> tuple[_FieldReader, dict[str, Any]]:
    """A reader of a metadata document's fields (after its format and version are checked), and the CacheSpec fields
    that every kind of cache stores alike, read with it."""
    version = _format_version(metadata, where)
    get = _FieldReader(metadata, where)
    return get, {"teacher": get("teacher", dict), "dataset": get("dataset", dict),
                 "augmentation": get("augmentation", dict), "num_views": get("views.count", int),
                 "exhaustive": get("views.exhaustive", bool), "seed": get("views.seed", int),
                 "dtype": get("logits.dtype", str), "block_size": get("logits.block_size", int),
                 "topk": get("logits.topk", int) if "topk" in metadata["logits"] else 0,
                 "view_accuracy": metadata.get("view_accuracy"), "format_version": version}


# the kinds of cache besides region logits, by the metadata field that marks them: token_layout and dense_layout
# register their specs
SPEC_KINDS: dict[str, type[CacheSpec]] = {}


def output_array(name: str) -> str:
    """The array an output is stored in: its name with the first '/' made '.' (arrays are not nested)."""
    return name.replace("/", ".", 1)


def generic_array(array: str) -> str:
    """The ARRAYS entry that describes an array: `attention.<stage>` for `attention.layer1`."""
    kind = array.split(".", 1)[0]
    return f"{kind}.<stage>" if kind in ("attention", "hint") else array


def _is_output_name(name: object) -> bool:
    """Whether a metadata `outputs` key names an output kdcache writes."""
    if not isinstance(name, str):
        return False
    kind, _, stage = name.partition("/")
    return name == "embedding" or (kind in ("attention", "hint") and bool(stage) and stage.isprintable())


def differences(stored: CacheSpec, wanted: CacheSpec) -> list[str]:
    """Each identity field that differs, as 'field: cache has X, this run has Y'."""
    ours, theirs = stored.identity(), wanted.identity()
    return [f"{name}: cache has {_short(ours.get(name))}, this run has {_short(theirs.get(name))}"
            for name in sorted(set(ours) | set(theirs)) if ours.get(name) != theirs.get(name)]


def require_match(spec: CacheSpec, where: str, expected: dict[str, Any]) -> None:
    """Refuse a cache whose field differs from what this use expects, naming the field and both values.

    Keys are dotted metadata names (`dataset.fingerprint`, `augmentation`, `teacher.num_classes`);
    `scales` asks for a subset of the cache's scales.
    """
    metadata = spec.to_metadata()
    for name, value in expected.items():
        if name == "scales":
            if not set(value) <= set(spec.scales):
                raise KdcacheError(f"cache {where} holds scales {list(spec.scales)} but this run asks for "
                                   f"{list(value)}: choose --scales among the cache's or rebuild it with them")
            continue
        field, have, value = first_difference(name, metadata_field(metadata, name), value)
        if _normal(have) != _normal(value):
            raise KdcacheError(f"cache {where} was written for {field} {_short(have)} but this run has "
                               f"{_short(value)}: rebuild the cache or pass the {_MADE_FROM.get(name, name.split('.')[0])} "
                               f"it was made from")


# what a run passes to match a field whose name does not say it: the class count is the dataset's
_MADE_FROM = {"teacher.num_classes": "dataset (its class count)",
              "teacher.zero_shot": "class names (the dataset, or --class-names)"}


def first_difference(name: str, have: Any, want: Any) -> tuple[str, Any, Any]:
    """Where two metadata values first differ, descending into dicts: (dotted field, one's value, the other's), so a
    message names the differing leaf, not a long dict cut short."""
    if isinstance(have, dict) and isinstance(want, dict):
        for key in [*have, *(key for key in want if key not in have)]:
            if _normal(have.get(key)) != _normal(want.get(key)):
                return first_difference(f"{name}.{key}", have.get(key), want.get(key))
    return name, have, want


def metadata_digest(metadata: dict[str, Any]) -> np.ndarray:
    """sha256 of a metadata document less view_accuracy (which finish() adds), as 32 bytes."""
    covered = {key: value for key, value in metadata.items() if key != "view_accuracy"}
    text = json.dumps(covered, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8).copy()


def require_metadata_digest(metadata: dict[str, Any], stored: np.ndarray, where: str) -> None:
    """Refuse a metadata document whose digest is not the one stored when the cache was written."""
    if not np.array_equal(metadata_digest(metadata), stored):
        raise CorruptCacheError(f"{where}: its metadata document (zarr.json or the HDF5 'kdcache' attribute) was "
                                f"edited or damaged: its sha256 differs from the one stored beside it in array "
                                f"{DIGEST_ARRAY!r}; the cache was altered: rebuild it with `kdcache dump-teacher "
                                f"--overwrite`")


def new_cache_id(metadata: dict[str, Any]) -> dict[str, Any]:
    """The metadata document of a store being created: with a cache_id of its own, never written again."""
    return {**metadata, CACHE_ID: uuid.uuid4().hex}


def cache_id(metadata: dict[str, Any], where: str) -> str:
    """The id of the store this metadata document is of: its cache_id, written when the store was created.

    A cache written by a kdcache from before cache ids (any format up to 5) has none; it is named by the sha256 of
    its metadata less view_accuracy, the digest formats 3 on keep beside it: stable over a resume and finish (which
    adds only view_accuracy), and another after any rewrite that changed a field. Only a rewrite by such a kdcache
    with the very same arguments, teacher weights and data keeps it, and that rewrite holds the same values.
    """
    found = metadata.get(CACHE_ID)
    if found is None:
        return metadata_digest(metadata).tobytes().hex()
    if not (isinstance(found, str) and re.fullmatch("[0-9a-f]{32}", found)):
        raise CorruptCacheError(f"{where}: metadata field {CACHE_ID!r} should be 32 hex digits, found {_short(found)}; "
                                f"the metadata was edited: rebuild the cache with `kdcache dump-teacher --overwrite`")
    return found


def require_same_cache(found: str | None, opened: str, where: str) -> None:
    """Refuse a store at a path whose cache_id (None: none can be read there now) is not the one opened there."""
    if found != opened:
        now = "no cache there now: it was removed, or is being rewritten" if found is None else \
            f"{found[:CACHE_ID_SHOWN]} now: it was rewritten, e.g. by `kdcache dump-teacher --overwrite`"
        raise KdcacheError(f"cache {where} changed since this run opened it ({CACHE_ID} {opened[:CACHE_ID_SHOWN]} "
                           f"then, {now}); restart the run to train from the new cache")


@functools.cache
def tool_version() -> str:
    """The installed kdcache's version, recorded in every cache it writes."""
    return importlib.metadata.version("kdcache")


def _format_version(metadata: dict[str, Any], where: str) -> int:
    """The document's format version, after checking that it is a kdcache cache of a version this kdcache reads."""
    if not metadata:
        raise CorruptCacheError(f"{where} has no kdcache metadata: it was not written by `kdcache dump-teacher`, "
                                f"or its creation was interrupted before it started; rerun dump-teacher")
    if metadata.get("format") != FORMAT:
        raise CorruptCacheError(f"{where}: metadata field 'format' is {metadata.get('format')!r}, "
                                f"expected {FORMAT!r}; this is not a kdcache teacher cache")
    version = metadata.get("format_version")
    if not (isinstance(version, int) and not isinstance(version, bool) and version in FORMAT_VERSIONS):
        raise CorruptCacheError(f"{where}: cache format version {version!r}, this kdcache ({tool_version()}) reads "
                                f"versions {', '.join(map(str, FORMAT_VERSIONS))}; rebuild the cache or use the "
                                f"kdcache that wrote it")
    logits = metadata.get("logits")
    topk_allowed = {1: False, 2: True}.get(version)
    if isinstance(logits, dict) and topk_allowed is not None and topk_allowed != ("topk" in logits):
        raise CorruptCacheError(f"{where}: metadata field 'format_version' is {version} but 'logits.topk' is "
                                f"{'missing' if version == 2 else 'present'}; format {version} stores "
                                f"{'top-k' if version == 2 else 'full'} logits: the metadata was edited — rebuild "
                                f"it with `kdcache dump-teacher --overwrite`")
    if not isinstance(logits, dict):
        _FieldReader(metadata, where)("logits", dict)
    return version


def metadata_field(tree: dict[str, Any], name: str) -> Any:
    """The value of a dotted field (`views.seed`) of a metadata document; None where it is missing."""
    for part in name.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


class _FieldReader:
    def __init__(self, metadata: dict[str, Any], where: str) -> None:
        self.metadata, self.where = metadata, where

    def __call__(self, name: str, kind: type) -> Any:
        value: Any = self.metadata
        for part in name.split("."):
            if not isinstance(value, dict) or part not in value:
                raise CorruptCacheError(f"{self.where}: metadata field {name!r} is missing; the cache's metadata "
                                        f"was edited or truncated — rebuild it with `kdcache dump-teacher --overwrite`")
            value = value[part]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CorruptCacheError(f"{self.where}: metadata field {name!r} should be {kind.__name__}, "
                                    f"found {_short(value)}")
        return value


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = _normal(value)
    return flat


def _normal(value: Any) -> Any:
    """JSON-comparable form: tuples become lists, nested dicts compared by content."""
    if isinstance(value, (tuple, list)):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def _short(value: Any) -> str:
    # an edited value may hold a line break or other control character: repr keeps the message on one line
    text = repr(value) if isinstance(value, str) and not value.isprintable() else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def all_finite(values: np.ndarray) -> bool:
    """np.isfinite(values).all(), ten times faster for float16 (numpy upcasts each half float): the exponent bits
    tested block by block, by two threads, which keeps a whole-view read of 200 MB from spending more time here
    than on the disk."""
    if values.dtype not in _EXPONENT_BITS or not values.flags.c_contiguous:
        return bool(np.isfinite(values).all())
    unsigned, mask = _EXPONENT_BITS[values.dtype]
    words, mask = values.reshape(-1).view(unsigned), unsigned(mask)
    half = words.size // 2
    if half < FINITE_CHECK_BLOCK:
        return _exponents_below(words, mask)
    with ThreadPoolExecutor(1) as helper:  # numpy releases the GIL: the halves run on two cores
        other = helper.submit(_exponents_below, words[half:], mask)
        return _exponents_below(words[:half], mask) and other.result()


def _exponents_below(words: np.ndarray, mask: np.unsignedinteger) -> bool:
    """Whether no word has every bit of mask set."""
    scratch = np.empty(min(words.size, FINITE_CHECK_BLOCK), words.dtype)
    for start in range(0, words.size, FINITE_CHECK_BLOCK):
        part = words[start:start + FINITE_CHECK_BLOCK]
        if np.bitwise_and(part, mask, out=scratch[:part.size]).max() == mask:
            return False
    return True
