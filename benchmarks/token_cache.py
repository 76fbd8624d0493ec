"""Bytes per token and KL error of a language-model teacher stored by `kdcache.cache.token_codec`, vs. full logits.

    python benchmarks/token_cache.py --logits FILE.safetensors      # a tensor "logits" [N, V] of a real teacher
    python benchmarks/token_cache.py --synthetic 4096 --vocab 4096  # Zipf-like synthetic logits (no teacher)
    python benchmarks/token_cache.py --teacher runs/quickstart-text/teacher --sequences 64 --dump-repeats 5
                                  # a kdcache text teacher's logits on its corpus (train split's first sequences), and
                                  # the token dump timed against the teacher's pure forward over the same batches

For each (k, width) the codec encodes the logits, decodes them, and reports per token position, in float64:
  bytes/token     `TokenCodec.bytes_per_token()` at the logits' vocabulary, and at 150k (18-bit ids)
  full KL         KL(p_full ‖ q), q the k decoded probabilities and the decoded tail spread evenly over the other
                  V − k ids (`reconstruction_kl`): truncation and quantisation together; mean and 99th percentile
  k+1 KL          KL of the k + 1-way distributions (`bucket_kl`): the quantisation's error alone
  worse           the fraction of positions whose full KL exceeds the baseline's at the same position
  decode          µs per 1,000 positions of `TokenCodec.decode_full` (numpy, one thread of this machine) decoding
                  every position at once, best of 3
The baseline "top-32 bf16 + int32 ids" (DistillKit's 192-byte setting) is measured the same way: the true top-32
log-probabilities rounded to bf16 (to nearest even), 32-bit ids, and the tail 1 − Σ p̂ spread evenly (floored at
2⁻²⁴ where the rounded probabilities sum to 1 or more; the table gives how often). The full logits' bytes (fp16,
fp32 × V) end the table; the fp16 row's KL is that of rounding the logits.
DistillKit's budget setting (top-50 with a fitted tail, ~150k vocabulary) is 114 bytes per token; kdcache's default
must take at most that at 150k and lose no more (full KL) than the top-32 bf16 baseline.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import numpy as np
import torch

from kdcache.cache.token_codec import TokenCodec, bucket_kl, logsumexp, reconstruction_kl, top_tokens
from kdcache.report import cpu_model, source_commit
from kdcache.runtime import autocast, prepare_model

LARGE_VOCAB = 150_000  # ~Qwen's 151,646: 18-bit ids
BUDGET_BYTES = 114  # DistillKit's budget setting
CHUNK_VALUES = 2 ** 22  # logits measured at a time: a few float64 copies of them stay within a few hundred MB
BASELINE_K, BASELINE_BYTES = 32, 32 * (2 + 4)  # top-32 bf16 log-probs, int32 ids
# where the bf16 probabilities sum to 1 or more, the baseline's tail is floored here (else KL = inf wherever a token
# outside the 32 has mass): 2^-24, the smallest mass 1 − Σ p resolves in float32, as a loss's clamp_min would
BASELINE_TAIL_FLOOR = 2.0 ** -24
DEFAULT_ROWS = ((26, "fp16"), (32, "fp16"), (33, "q8"), (34, "q8f"), (36, "q6"), (40, "q4"), (50, "q4"), (64, "q8"))


def bf16_round(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    finite = np.isfinite(values)
    return np.where(finite, rounded.view(np.float32), values)


def _codec_parts(codec: TokenCodec, encoded: list[dict]) -> Callable[[np.ndarray], tuple]:
    """logits chunk -> (ids, log p̂, log m̂, 0 floored) through the codec; each chunk's arrays kept in `encoded`."""
    def run(chunk: np.ndarray) -> tuple:
        encoded.append(codec.encode(chunk))
        return (*codec.decode_full(encoded[-1]), 0.0)
    return run


def _decode_us_per_1k(codec: TokenCodec, encoded: list[dict], repeats: int = 3) -> float:
    """µs per 1,000 positions of one `decode_full` of every position at once (as a training batch is), best of 3."""
    arrays = {name: np.concatenate([part[name] for part in encoded]) for name in encoded[0]}
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        codec.decode_full(arrays)
        best = min(best, time.perf_counter() - started)
    return best / len(arrays["token_tail"]) * 1e9


def _baseline_parts(chunk: np.ndarray) -> tuple:
    """The top-32 log-probabilities rounded to bf16; the tail 1 − Σ p̂ floored at BASELINE_TAIL_FLOOR (no decode)."""
    top = top_tokens(chunk, BASELINE_K)
    z = chunk.astype(np.float32)
    logprobs = bf16_round(top.relative - logsumexp(z - z.max(-1, keepdims=True))[..., None])
    tail = 1.0 - np.exp(logprobs.astype(np.float64)).sum(-1)
    return top.ids, logprobs, np.log(np.maximum(tail, BASELINE_TAIL_FLOOR)), float((tail <= 0).sum())


def _measure_one(logits: np.ndarray, parts: Callable[[np.ndarray], tuple], chunk: int,
                 baseline: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    """(mean / p99 full KL, mean k+1 KL, the fraction of floored tails, and with `baseline` (its per-position full
    KL) the fraction of positions where this one loses more; the per-position full KL) over logits [N, V]."""
    full, bucket, floored = [], [], 0.0
    for start in range(0, len(logits), chunk):
        part = logits[start:start + chunk]
        ids, logprobs, log_tail, floored_here = parts(part)
        full.append(reconstruction_kl(part, ids, logprobs, log_tail))
        bucket.append(bucket_kl(part, ids, logprobs, log_tail))
        floored += floored_here
    full_kl, bucket_kl_ = np.concatenate(full), np.concatenate(bucket)
    return {"full_kl": float(full_kl.mean()), "full_kl_p99": float(np.percentile(full_kl, 99)),
            "bucket_kl": float(bucket_kl_.mean()), "tail_floored": floored / len(logits),
            "worse_than_baseline": None if baseline is None else float((full_kl > baseline).mean())}, full_kl


def _full_logits_rows(logits: np.ndarray, chunk: int) -> list[dict]:
    vocab = logits.shape[-1]
    fp16_kl = np.concatenate([_rounding_kl(logits[start:start + chunk]) for start in range(0, len(logits), chunk)])
    return [{"what": "full logits fp16", "bytes": 2 * vocab, "bytes_large": 2 * LARGE_VOCAB,
             "full_kl": float(fp16_kl.mean()), "full_kl_p99": float(np.percentile(fp16_kl, 99)), "bucket_kl": None,
             "decode_us_per_1k": None, "tail_floored": 0.0, "worse_than_baseline": None},
            {"what": "full logits fp32", "bytes": 4 * vocab, "bytes_large": 4 * LARGE_VOCAB, "full_kl": 0.0,
             "full_kl_p99": 0.0, "bucket_kl": None, "decode_us_per_1k": None, "tail_floored": 0.0,
             "worse_than_baseline": None}]


def _rounding_kl(logits: np.ndarray) -> np.ndarray:
    """Per-row KL(softmax(z) ‖ softmax(fp16(z))), float64."""
    z, rounded = logits.astype(np.float64), logits.astype(np.float16).astype(np.float64)
    log_p = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    log_q = (rounded - np.log(np.exp(rounded - rounded.max(-1, keepdims=True)).sum(-1, keepdims=True))
             - rounded.max(-1, keepdims=True))
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def measure(logits: torch.Tensor | np.ndarray, rows: Sequence[tuple[int, str]]) -> list[dict]:
    """One dict per (k, width), then the top-32 bf16 baseline and the full logits: what, k, width, bytes (at the
    logits' vocabulary), bytes_large (at 150k), full_kl (mean), full_kl_p99, bucket_kl (mean), decode_us_per_1k,
    tail_floored (the fraction of positions whose baseline tail was floored), worse_than_baseline (the fraction of
    positions whose full KL exceeds the baseline's)."""
    array = logits.detach().float().cpu().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)
    array = array.reshape(-1, array.shape[-1]).astype(np.float32)
    vocab = array.shape[-1]
    chunk = max(1, CHUNK_VALUES // vocab)
    baseline_row, baseline = _measure_one(array, _baseline_parts, chunk)
    table = []
    for k, width in rows:
        codec, encoded = TokenCodec(k, vocab, width), []
        table.append({"what": f"top-{k} {width}", "k": k, "width": width, "bytes": codec.bytes_per_token(),
                      "bytes_large": codec.bytes_per_token(LARGE_VOCAB),
                      **_measure_one(array, _codec_parts(codec, encoded), chunk, baseline)[0],
                      "decode_us_per_1k": _decode_us_per_1k(codec, encoded)})
    table.append({"what": f"baseline top-{BASELINE_K} bf16 + int32 ids", "k": BASELINE_K, "width": "bf16",
                  "bytes": BASELINE_BYTES, "bytes_large": BASELINE_BYTES, **baseline_row, "decode_us_per_1k": None})
    return table + _full_logits_rows(array, chunk)


def _number(value: float | None) -> str:
    return "—" if value is None else "0" if value == 0 else f"{value:.2e}" if abs(value) < 0.01 else f"{value:.3f}"


def markdown_table(rows: Sequence[dict], vocab: int) -> str:
    """The rows of `measure` as Markdown; a verdict column against the budget and the baseline."""
    baseline = next(row for row in rows if row["what"].startswith("baseline"))
    head = ["stored", f"B/token (V={vocab:,})", "B/token (V=150k, 18-bit ids)", "full KL mean", "full KL p99",
            "k+1 KL mean", "positions worse than baseline", "decode µs/1k tokens",
            f"≤ {BUDGET_BYTES} B at 150k and KL ≤ baseline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        meets = "—" if "k" not in row or row is baseline else (
            "yes" if row["bytes_large"] <= BUDGET_BYTES and row["full_kl"] <= baseline["full_kl"] else "no")
        floored = row["tail_floored"]
        what = row["what"] + (f" (tail floored at {floored:.1%} of positions)" if floored else "")
        cells = [what, f"{row['bytes']:,}", f"{row['bytes_large']:,}", _number(row["full_kl"]),
                 _number(row["full_kl_p99"]), _number(row["bucket_kl"]),
                 "—" if row["worse_than_baseline"] is None else f"{row['worse_than_baseline']:.2%}",
                 "—" if row["decode_us_per_1k"] is None else f"{row['decode_us_per_1k']:.0f}", meets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def synthetic_logits(positions: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Zipf-like LM logits [positions, vocab]: −α log rank + noise, α per position in 0.8..2.5, a third of positions
    confident (the top token raised by 2..10), token ids permuted per position."""
    rng = np.random.default_rng(seed)
    alpha = np.exp(rng.uniform(np.log(0.8), np.log(2.5), (positions, 1)))
    logits = -alpha * np.log(np.arange(1, vocab + 1))[None] + rng.normal(0, 0.5, (positions, vocab))
    logits[:, 0] += np.where(rng.random(positions) < 1 / 3, rng.uniform(2, 10, positions), 0)
    order = np.argsort(rng.random((positions, vocab)), axis=-1)  # a random permutation per position
    return np.take_along_axis(logits, order, axis=-1).astype(np.float32)


def describe_logits(logits: np.ndarray) -> str:
    """One line: shape, mean entropy, mean top-1 probability, mean mass outside the top 32."""
    z = logits.astype(np.float64)
    log_p = z - z.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    p = np.exp(log_p)
    top = -np.sort(-p, axis=-1)
    return (f"logits {list(logits.shape)}; mean entropy {float(-(p * log_p).sum(-1).mean()):.3f} nats; mean top-1 "
            f"probability {float(top[:, 0].mean()):.3f}; mean mass outside the top 32 "
            f"{float(1 - top[:, :32].sum(-1).mean()):.4f}")


def _text_teacher(folder: str) -> tuple[torch.nn.Module, object]:
    """A kdcache text teacher's model and the train split of its corpus, tokenised by its own tokenizer."""
    from kdcache.data.text import TOKENIZER_FILE, load_text
    from kdcache.models import load_teacher, resolve_checkpoint
    from kdcache.models.checkpoint import checkpoint_sidecar

    sidecar = checkpoint_sidecar(resolve_checkpoint(folder))
    described = sidecar["dataset"]
    data = load_text(described["corpus"], "train", seq_len=described["seq_len"],
                     tokenizer=f"{folder}/{TOKENIZER_FILE}", held_out=described["held_out"])
    return load_teacher(folder, None, data.num_classes)[0], data


def _teacher_logits(teacher: torch.nn.Module, data: object, sequences: int) -> np.ndarray:
    """float32 [positions, V]: the teacher's logits (on the CPU) at every unmasked position of the first `sequences`."""
    inputs, _, mask = data.batch(torch.arange(min(sequences, data.num_samples)))
    with torch.no_grad():
        return teacher.cpu()(inputs).float()[mask].numpy()


def time_token_dump(teacher: torch.nn.Module, data: object, repeats: int, batch_size: int = 32,
                    device: str = "cpu") -> list[dict]:
    """Sequences per second of `dump_tokens` timed whole (store created, blocks written, finished, default codec)
    against the teacher's pure forward over the same batches (the batches' tokens on the device, logits computed,
    nothing kept), each `repeats` times, the order alternating; medians, and the median of per-repeat ratios."""
    import tempfile

    from kdcache.stages.text_dump import dump_tokens

    info = {"arch": "benchmark", "num_classes": data.num_classes, "checkpoint": "-", "checkpoint_sha256": "0" * 64}
    times: dict[str, list[float]] = {"dump": [], "forward": []}

    model = prepare_model(teacher, torch.device(device)).eval()

    def forward() -> None:
        with torch.no_grad(), autocast(torch.device(device)):  # as the dump runs it: bf16 autocast on CUDA
            for start in range(0, data.num_samples, batch_size):
                model(data.batch(torch.arange(start, min(start + batch_size, data.num_samples)), device)[0])
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(repeats + 1):  # the first of each is a warm-up, dropped
            for name in (("dump", "forward") if repeat % 2 else ("forward", "dump")):
                started = time.perf_counter()
                if name == "dump":
                    dump_tokens(model, info, data, f"{folder}/{repeat}.zarr", batch_size=batch_size,
                                device=device, show_progress=False)
                else:
                    forward()
                if repeat:
                    times[name].append(time.perf_counter() - started)
    ratios = [f / d for f, d in zip(times["forward"], times["dump"])]
    return [{"what": name, "sequences_per_s": data.num_samples / float(np.median(seconds)),
             "ratio": float(np.median(ratios)) if name == "dump" else 1.0} for name, seconds in times.items()]


def dump_table(rows: Sequence[dict]) -> str:
    """The dump-vs-forward rows as markdown."""
    lines = ["| what | sequences/s | vs the pure forward |", "|---|---|---|"]
    return "\n".join(lines + [f"| {row['what']} | {row['sequences_per_s']:.1f} | {row['ratio']:.3f}x |"
                              for row in rows])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--logits", help="a safetensors file with a tensor named 'logits' [N, V] (or [..., V])")
    source.add_argument("--synthetic", type=int, metavar="N", help="N positions of Zipf-like synthetic logits")
    source.add_argument("--teacher", help="a kdcache text teacher's run folder (model.json, tokenizer.json): its logits "
                                          "on the first --sequences of its corpus's train split")
    parser.add_argument("--sequences", type=int, default=64, help="--teacher: sequences whose positions are measured")
    parser.add_argument("--device", default="cpu", help="--dump-repeats: where the dump and the forward run (cpu, cuda)")
    parser.add_argument("--dump-repeats", type=int, default=0, help="--teacher: also time `dump_tokens` over the whole "
                        "train split against the teacher's pure forward over the same batches, this many times each")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary of --synthetic")
    parser.add_argument("--rows", default=",".join(f"{k}:{width}" for k, width in DEFAULT_ROWS),
                        help="k:width pairs, comma-separated")
    parser.add_argument("--out", help="also write the markdown printed to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dump_rows = []
    if args.logits:
        from safetensors.numpy import load_file
        logits, source = load_file(args.logits)["logits"], f"`{args.logits}`"
    elif args.teacher:
        teacher, data = _text_teacher(args.teacher)
        logits, source = _teacher_logits(teacher, data, args.sequences), f"teacher `{args.teacher}` on {data.corpus}"
        dump_rows = time_token_dump(teacher, data, args.dump_repeats, device=args.device) if args.dump_repeats else []
    else:
        logits, source = synthetic_logits(args.synthetic, args.vocab), "synthetic Zipf-like logits (seed 0)"
    logits = logits.reshape(-1, logits.shape[-1]).astype(np.float32)
    rows = [(int(k), width) for k, width in (item.split(":") for item in args.rows.split(","))]
    started = time.perf_counter()
    table = measure(logits, rows)
    command = "python " + " ".join(map(shlex.quote, ["benchmarks/token_cache.py", *(argv or sys.argv[1:])]))
    text = "\n".join([f"- command: `{command}`", f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
                      f"- device: commit {source_commit()}; CPU `{cpu_model()}`, {os.cpu_count()} cores; python "
                      f"{platform.python_version()}, numpy {np.__version__}",
                      f"- source: {source}; {describe_logits(logits)}", "", markdown_table(table, logits.shape[-1]),
                      *(["", dump_table(dump_rows)] if dump_rows else []),
                      "", f"{time.perf_counter() - started:.0f} s"])
    print(text)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text + "\n")


if __name__ == "__main__":
    main()
