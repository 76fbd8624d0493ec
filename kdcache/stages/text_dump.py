"""Stage 1 on text: a causal language model runs once over every sequence of a text source, and its next-token
distribution at each position goes to a token cache (format 6: top k ids and log-probabilities with the tail, as
kdcache.cache.token_codec stores them), which resumes, shards under torchrun and verifies as image caches do."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from kdcache import distributed
from kdcache.cache.location import Location, Place
from kdcache.cache.token_codec import DEFAULT_K, DEFAULT_WIDTH, TokenCodec, TopTokens
from kdcache.cache.token_layout import HIDDEN, TokenCacheSpec, token_cache_spec
from kdcache.config import DumpConfig, options_given
from kdcache.data.text import TextData
from kdcache.errors import KdcacheError
from kdcache.models import load_teacher
from kdcache.runtime import autocast, pick_device, precision, prepare_model
from kdcache.stages.token_topk import top_tokens_on_device
from kdcache.stages.writing import Block, DumpResult, dump_pending, open_writer

HEAD_ROWS = 512  # positions whose logits the head computes at a time: a [512, V] slice stays in cache for V ~ 4k


def dump_tokens(teacher: nn.Module, teacher_info: dict[str, Any], data: TextData, out: Place, *,
                topk: int = DEFAULT_K, width: str = DEFAULT_WIDTH, batch_size: int = 32,
                device: torch.device | str = "auto", format: str | None = None, block_size: int = 0,
                overwrite: bool = False, hidden: bool = False, show_progress: bool = True) -> DumpResult:
    """Write the teacher's top-k next-token distribution at every position of every sequence of `data` to a token
    cache; resumes an interrupted dump, and under torchrun each rank writes its own blocks. hidden: also its final
    hidden state at each position (forward_features; DistilBERT's cosine target)."""
    out = Location.of(out)
    device = pick_device(device) if isinstance(device, str) else device
    here = distributed.init(device)
    if teacher_info["num_classes"] != data.num_classes:
        raise KdcacheError(f"the teacher {teacher_info['arch']} predicts {teacher_info['num_classes']} tokens but "
                           f"the tokenizer of {data.name} has {data.num_classes}: pass the tokenizer the teacher "
                           f"was trained with (--tokenizer; a kdcache teacher's run folder holds it)")
    if not 1 <= topk < data.num_classes:
        raise KdcacheError(f"--topk: expected a number of token ids per position below the vocabulary's "
                           f"{data.num_classes}, got {topk}")
    codec = TokenCodec(k=topk, vocab=data.num_classes, width=width)
    spec = token_cache_spec({**teacher_info, "precision": precision(device)}, data.describe(), codec, block_size,
                            teacher.num_features if hidden else 0)
    model = prepare_model(teacher, device).eval()
    writer = open_writer(out, spec, data.next_tokens().numpy(), np.zeros((1, spec.num_samples, 0), np.int32),
                         format, overwrite, here)
    return dump_pending(writer, out, lambda pending: token_blocks(model, data, spec, batch_size, device, pending),
                        here, show_progress, unit="sequence")


def token_blocks(model: nn.Module, data: TextData, spec: TokenCacheSpec, batch_size: int, device: torch.device,
                 pending: list[tuple[int, int]]) -> Iterator[Block]:
    """Each pending block's stored arrays and its count of positions whose next token is the teacher's first."""
    for view, block in pending:
        rows = spec.block_range(block)
        parts, correct = [], 0
        # batches start at the block's start: a resumed block computes exactly what it would have
        for start in range(rows.start, rows.stop, batch_size):
            inputs, targets, mask = data.batch(torch.arange(start, min(start + batch_size, rows.stop)), device)
            with torch.no_grad(), autocast(device):
                features = model.forward_features(inputs)
                top = head_top_tokens(model, features, spec.codec.k)
            arrays = spec.codec.pack(top)
            if spec.outputs:
                arrays[HIDDEN] = features.float().cpu().numpy()
            correct += int(((torch.from_numpy(top.ids[..., 0]) == targets.cpu()) & mask.cpu()).sum())
            parts.append(arrays)
        yield view, block, {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}, correct


def head_top_tokens(model: nn.Module, features: torch.Tensor, k: int) -> TopTokens:
    """The top-k of the teacher's head over features [b, T, D], HEAD_ROWS positions at a time: each slice of the
    logits is read again (top-k, logsumexp) while it is still in the CPU's cache, not the whole [b, T, V] from
    memory; arrays [b, T, ...]."""
    flat = features.flatten(0, 1)
    parts = [top_tokens_on_device(model.forward_head(flat[start:start + HEAD_ROWS]).float(), k)
             for start in range(0, len(flat), HEAD_ROWS)]
    return TopTokens(*(np.concatenate(field).reshape(*features.shape[:2], *field[0].shape[1:])
                       for field in zip(*parts)))


# dump-teacher's options for images: a token cache takes none of them
IMAGE_DUMP_OPTIONS = ("views", "exhaustive", "augmentation", "mix", "outputs", "losses", "views_from", "scales", "dtype")


def dump_text_from_config(config: DumpConfig, data: TextData, device: torch.device,
                          show_progress: bool = True) -> DumpResult:
    """`kdcache dump-teacher --dataset text`: the teacher's token cache, --topk ids per position (default
    token_codec.DEFAULT_K, benchmarks/TOKENS.md's choice)."""
    given = options_given(config, IMAGE_DUMP_OPTIONS, allowed=("none", HIDDEN))
    if given:
        raise KdcacheError(f"dump-teacher --dataset text: a token cache has one view of each sequence and stores "
                           f"next-token distributions; {', '.join(given)} are for images: leave them out")
    teacher, info = load_teacher(config.checkpoint, config.teacher or None, data.num_classes)
    return dump_tokens(teacher, info, data, config.out, topk=config.topk or DEFAULT_K,
                       width=config.token_width, batch_size=config.batch_size, device=device, format=config.format,
                       block_size=config.block_size, overwrite=config.overwrite, hidden=config.outputs == HIDDEN,
                       show_progress=show_progress)
