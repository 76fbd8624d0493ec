"""`kdcache verify`: read every chunk of a cache and check it, naming array, view and block of what is wrong."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kdcache.cache.layout import DIGEST_ARRAY, DIGEST_SINCE, PENDING, TOPK_ARRAYS
from kdcache.cache.reader import Problem, TeacherCache
from kdcache.cache.store import ChunkReadError

# |region 0 - mean of a scale's cells| allowed, relative to the sample's largest logit: fp16 storage
# of fp32 logits, or logits computed under bf16 autocast (8 mantissa bits)
SELF_CHECK_TOLERANCE = {"float32": 4e-3, "bfloat16": 4e-2}
SMALL_ARRAYS = ("labels", "progress", "aug")
ProblemAt = Callable[..., list[Problem]]  # (what, array name) -> [the Problem at this view and block]


def verify(cache: TeacherCache, on_block: Callable[[], None] | None = None) -> list[Problem]:
    """Read every chunk: checksums, missing chunks, completeness, finiteness, region-0 self-check."""
    small = SMALL_ARRAYS + ((DIGEST_ARRAY,) if cache.spec.format_version >= DIGEST_SINCE else ()) + \
        cache.spec.file_arrays + cache.spec.constant_arrays
    problems = [p for name in small for p in cache.missing_chunks(name, None)]
    problems += [p for name in small for p in cache.unreadable_chunks(name, None)]
    if any(p.array == "progress" for p in problems):
        return problems
    problems += [Problem(name, None, None, None, "holds NaN or Inf values") for name in cache.spec.constant_arrays
                 if not any(p.array == name for p in problems) and not np.isfinite(cache.store.read(name)).all()]
    progress, labels = cache.progress(), cache.labels()
    tolerance = SELF_CHECK_TOLERANCE.get(cache.spec.teacher["precision"], 4e-2)
    for view in range(cache.num_views):
        for block in range(cache.spec.num_blocks):
            problems += _verify_block(cache, view, block, int(progress[view, block]), labels, tolerance)
            if on_block is not None:
                on_block()
    return problems


def _verify_block(cache: TeacherCache, view: int, block: int, progress: int, labels: np.ndarray,
                  tolerance: float) -> list[Problem]:
    """The problems of one (view, block) unit of the data arrays."""
    spec, rows = cache.spec, cache.spec.block_range(block)

    def problem(what: str, name: str = spec.data_arrays[0]) -> list[Problem]:
        return [Problem(name, view, block, rows, what)]

    if progress == PENDING:
        return problem("not written yet (the dump did not finish; rerun it to resume)")
    arrays = {}
    for name in spec.data_arrays:
        coords = (view, block) + (0,) * (len(spec.array_layout(name)[0]) - 2)
        if not cache.store.chunk_exists(name, coords):
            return problem("the chunk is missing (deleted); it is never read as zeros", name)
        try:
            arrays[name] = cache.store.read(name, (view, slice(rows.start, rows.stop)))
        except ChunkReadError as error:
            return problem(f"fails its checksum ({error.__cause__})", name)
        finite = np.isfinite(arrays[name]).reshape(len(rows), -1).all(1)
        if not finite.all():
            what = "logits" if name in spec.logit_arrays else "values"
            return problem(f"NaN or Inf {what} for samples {list(np.flatnonzero(~finite)[:10] + rows.start)}", name)
    if spec.kind == "dense":
        return (_topk_invariants(cache, arrays, problem) if spec.topk else []) or \
            _within_labelled(int(labels[view, rows.start:rows.stop].sum()), progress, problem)
    block_labels = labels[rows.start:rows.stop]
    if spec.kind == "tokens":
        return _verify_tokens(cache, arrays, block_labels, progress, problem)
    if spec.topk:
        return _verify_topk(cache, arrays, block_labels, progress, problem)
    logits = arrays["logits"].astype(np.float32)
    return _recount(logits[:, 0].argmax(-1), block_labels, progress, problem) + \
        _self_check(cache, logits, tolerance, problem)


def _self_check(cache: TeacherCache, logits: np.ndarray, tolerance: float, problem: ProblemAt) -> list[Problem]:
    """Region 0 equals the mean of each evenly tiling scale's cells (a linear head after pooling)."""
    scales, found = cache.scales, []
    for scale in self_check_scope(cache)[0]:
        start = sum(s * s for s in scales[: scales.index(scale)])
        cells = logits[:, start:start + scale * scale].mean(1)
        error = np.abs(cells - logits[:, 0]).max(-1) / np.maximum(np.abs(logits[:, 0]).max(-1), 1.0)
        if (error > tolerance).any():
            found += problem(f"region 0 differs from the mean of the scale-{scale} cells by up to {error.max():.3g} "
                             f"(relative; allowed {tolerance}): the logits do not fit the region layout")
    return found


def _verify_topk(cache: TeacherCache, arrays: dict[str, np.ndarray], labels: np.ndarray, progress: int,
                 problem: ProblemAt) -> list[Problem]:
    """Top-k storage's own invariants, then the count of region-0 predictions that are right."""
    return _topk_invariants(cache, arrays, problem) or \
        _recount(arrays["topk_indices"][:, 0, 0], labels, progress, problem)


def _topk_invariants(cache: TeacherCache, arrays: dict[str, np.ndarray], problem: ProblemAt) -> list[Problem]:
    """Top-k storage's own invariants: valid distinct classes, values descending, the rest below them."""
    values, indices, rest = (arrays[name] for name in TOPK_ARRAYS)
    num_classes = cache.spec.num_classes
    if indices.min() < 0 or indices.max() >= num_classes:
        return problem(f"class indices outside 0-{num_classes - 1}", "topk_indices")
    ordered = np.sort(indices, axis=-1)
    if (ordered[..., 1:] == ordered[..., :-1]).any():
        return problem("a region lists the same class twice", "topk_indices")
    if (np.diff(values.astype(np.float32), axis=-1) > 0).any():
        return problem("values are not in descending order", "topk_values")
    if (rest.astype(np.float32) > values[..., -1].astype(np.float32)).any():
        return problem("the rest logit exceeds the k-th largest one, which no top-k encoding gives", "topk_rest")
    return []


def _within_labelled(labelled: int, progress: int, problem: ProblemAt) -> list[Problem]:
    """A dense block's recorded count of right pixels is at most its labelled pixels (the count itself is of the
    teacher's logits at full size, which a map at a stride does not hold)."""
    if not 0 <= progress <= labelled:
        return problem(f"progress records {progress} correct teacher pixels, but the block's views have {labelled} "
                       f"labelled pixels ('labels')")
    return []


def _verify_tokens(cache: TeacherCache, arrays: dict[str, np.ndarray], labels: np.ndarray, progress: int,
                   problem: ProblemAt) -> list[Problem]:
    """A token cache's own invariants: valid distinct token ids, log-probabilities in descending order, no more
    mass than one; then the count of positions whose next token is the teacher's first."""
    ids, logprobs = cache.spec.codec.decode(arrays)
    vocabulary = cache.spec.num_classes
    if ids.min() < 0 or ids.max() >= vocabulary:
        return problem(f"token ids outside 0-{vocabulary - 1}", "token_ids")
    ordered = np.sort(ids, axis=-1)
    if (ordered[..., 1:] == ordered[..., :-1]).any():
        return problem("a position lists the same token twice", "token_ids")
    if (np.diff(logprobs, axis=-1) > 0).any() or (np.exp(logprobs).sum(-1) > 1 + 1e-3).any():
        return problem("log-probabilities not in descending order, or summing to more than one", "token_logprobs")
    return _recount(np.where(labels >= 0, ids[..., 0], -2), labels, progress, problem)


def _recount(predicted: np.ndarray, labels: np.ndarray, progress: int, problem: ProblemAt) -> list[Problem]:
    """The block's recorded count of correct teacher predictions equals the count from its stored logits."""
    correct = int((predicted == labels).sum())
    if correct != progress:
        return problem(f"progress records {progress} correct teacher predictions, the logits give {correct}")
    return []


# why verify does not check region 0 against the mean of the cells, by the teacher's head kind
SELF_CHECK_SKIPPED = {
    "nonlinear": "the teacher's head is not affine after pooling (a norm, MLP or conv layer), so its cells' logits "
                 "do not average to its global logit",
    "token": "the teacher is a token model: region 0 is its own output (class token or pool), not the mean of the "
             "cells' logits",
    "plain": "the teacher gives its global logits only",
}


def self_check_scope(cache: TeacherCache) -> tuple[list[int], str]:
    """The scales whose cells verify checks against region 0, and a line that says which and why."""
    spec = cache.spec
    if spec.kind == "tokens":
        return [], "skipped: a token cache has positions, not regions"
    if spec.kind == "dense":
        return [], "skipped: a dense cache has a map's positions, not regions"
    if spec.head != "linear":
        return [], "skipped: " + SELF_CHECK_SKIPPED.get(spec.head, f"the teacher's head kind {spec.head!r} is unknown")
    if spec.topk:
        return [], "skipped: top-k storage keeps part of each region's logits, so their mean is not stored"
    height, width = spec.teacher["feature_map"]
    scales = [s for s in cache.scales if s > 1 and height and width
              and (height % s == 0 or s % height == 0) and (width % s == 0 or s % width == 0)]
    if not scales:
        return [], (f"skipped: no scale beyond 1 tiles the teacher's {height}×{width} feature map evenly, so the "
                    f"cells overlap and their mean is not the global logit")
    return scales, f"region 0 = the mean of the scale {', '.join(map(str, scales))} cells (a linear head)"
