"""Language models: train-teacher (cross-entropy) and distill (a token cache's losses plus cross-entropy) on a text
source, through one loop on one screen; held-out perplexity after every epoch."""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from kdcache import distributed
from kdcache.cache import TeacherCache
from kdcache.cache.token_layout import HIDDEN, TokenCacheSpec
from kdcache.config import DistillConfig, TeacherConfig, TrainConfig, options_given, recorded_config, save_config
from kdcache.data.text import TOKENIZER_FILE, TextData, load_text
from kdcache.errors import KdcacheError
from kdcache.losses.tokens import TOKEN_LOSSES, distilbert
from kdcache.models import create_model
from kdcache.models.checkpoint import file_sha256, save_checkpoint
from kdcache.runtime import epoch_generator
from kdcache.schedules import Schedule
from kdcache.stages.folders import hold_run_folder, run_name
from kdcache.stages.recipe_options import learning_rate, make_optimizer, step_autocast, training_dtype

EVAL_SEQUENCES = 64  # held-out sequences per forward pass
IGNORED = -100  # cross_entropy's ignore_index: a masked position's target
# (model, inputs, targets, mask, sequence indices) -> the loss terms, 'total' among them
Objective = Callable[[nn.Module, Tensor, Tensor, Tensor, Tensor], dict[str, Tensor]]
LM_LOSSES = ("ce", *TOKEN_LOSSES, "distilbert")
# a token loss's weights where distill's --ce-weight, --distill-weight, --temperature leave them: the teacher's
# distribution carries most of the signal (DistillKit's and the trial's setting)
TOKEN_LOSS_DEFAULTS = {"ce_weight": 0.1, "distill_weight": 0.9, "temperature": 1.0}


@dataclass(frozen=True)
class LanguageRun:
    """How one language model did: held-out perplexity after its last epoch and at its best."""

    name: str
    model: str
    loss: str
    test_ppl: float
    best_test_ppl: float
    tokens_per_s: float
    seconds: float
    folder: Path


def perplexity(model: nn.Module, data: TextData, device: torch.device) -> float:
    """exp of the mean next-token cross-entropy over every unmasked position of `data`, in order."""
    return math.exp(next_token_metrics(model, data, device)[2])


@torch.no_grad()
def next_token_metrics(model: nn.Module, data: TextData, device: torch.device) -> tuple[float, float, float, int]:
    """Top-1 and top-5 accuracy of the next token, its mean cross-entropy, and how many positions: over every
    unmasked position of `data`, in order."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, summed cross-entropy
    for start in range(0, data.num_samples, EVAL_SEQUENCES):
        inputs, targets, mask = data.batch(torch.arange(start, min(start + EVAL_SEQUENCES, data.num_samples)), device)
        logits = model(inputs).float()
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        totals += torch.stack([((top[..., 0] == targets) & mask).sum(), ((top == targets[..., None]).any(-1) & mask).sum(),
                               cross_entropy(logits, targets, mask, "sum")]).double()
    model.train()
    count = max(data.num_tokens, 1)
    return float(totals[0]) / count, float(totals[1]) / count, float(totals[2]) / count, data.num_tokens


def train_language_model(model: nn.Module, data: TextData, test: TextData, objective: Objective,
                         config: TrainConfig, folder: Path, record: dict[str, Any], device: torch.device,
                         show_progress: bool = True) -> LanguageRun:
    """Train `model` on `data`'s sequences, `objective` giving each batch's loss terms ('total' among them); after
    each epoch the held-out perplexity goes to folder/metrics.csv; model.pt and model.json at the end."""
    model.to(device).train()
    optimizer, dtype = make_optimizer(model.parameters(), config), _autocast_dtype(config, device)
    steps = data.num_samples // config.batch_size
    if steps == 0:
        raise KdcacheError(f"--batch-size {config.batch_size} exceeds the {data.num_samples} training sequences; "
                           f"give a smaller --batch-size")
    history, started = [], time.perf_counter()
    for epoch in range(config.epochs):
        order = torch.randperm(data.num_samples, generator=epoch_generator(config.seed, epoch))
        sums: dict[str, Tensor | float] = {}
        for step in tqdm(range(steps), desc=f"{folder.name} epoch {epoch + 1}/{config.epochs}", leave=False,
                         disable=not show_progress):
            indices = order[step * config.batch_size:(step + 1) * config.batch_size]
            inputs, targets, mask = data.batch(indices, device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, epoch, step, steps)
            with step_autocast(device, dtype):
                terms = objective(model, inputs, targets, mask, indices)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            if config.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
            optimizer.step()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach() / steps  # on the device: no sync per step
        seconds = time.perf_counter() - started
        row = {"epoch": epoch + 1, **{f"loss_{name}": float(value) for name, value in sums.items()},
               "test_ppl": perplexity(model, test, device), "lr": optimizer.param_groups[0]["lr"],
               "tokens_per_s": (epoch + 1) * steps * config.batch_size * data.seq_len / seconds, "seconds": seconds}
        _non_finite(row, folder)
        history.append(row)
        append_metrics(folder / "metrics.csv", row)
        if show_progress:
            tqdm.write(f"{folder.name:>28} epoch {epoch + 1:>3}/{config.epochs}  loss {row['loss_total']:.4f}  "
                       f"held-out perplexity {row['test_ppl']:.1f}  {row['tokens_per_s']:.0f} tok/s")
    return _finish(model, folder, record, history)


def _autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """--precision's autocast dtype (bf16 on CUDA by default); fp16, which needs loss scaling, is refused."""
    dtype = training_dtype(config.precision, device)
    if dtype == torch.float16:
        raise KdcacheError("--precision fp16: a language model here trains in fp32 or bf16 (no loss scaling); use "
                           "--precision bf16 or auto")
    return dtype


def _non_finite(row: dict[str, float], folder: Path) -> None:
    """Refuse an epoch whose loss or perplexity is NaN or infinite: the run diverged."""
    if not all(math.isfinite(value) for value in row.values()):
        raise KdcacheError(f"{folder.name}: epoch {row['epoch']} ended with a non-finite loss or perplexity ({row}); "
                           f"the run diverged: lower --lr or set --clip-grad 1.0")


def append_metrics(path: Path, row: dict[str, float]) -> None:
    """One row of metrics.csv, its header with the first."""
    new = not path.exists()
    with open(path, "a", newline="") as file:
        writer = csv.DictWriter(file, list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _finish(model: nn.Module, folder: Path, record: dict[str, Any], history: list[dict[str, float]]) -> LanguageRun:
    """model.pt (weights only) and its model.json sidecar, which every kdcache command that loads a model reads."""
    save_checkpoint(folder / "model.pt", model)
    best = min(history, key=lambda row: row["test_ppl"])
    sidecar = {**record, "test_ppl": history[-1]["test_ppl"], "best_test_ppl": best["test_ppl"],
               "best_epoch": best["epoch"], "epochs": len(history), "sha256": file_sha256(folder / "model.pt")}
    (folder / "model.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return LanguageRun(folder.name, record["arch"], record["loss"], sidecar["test_ppl"], sidecar["best_test_ppl"],
                       history[-1]["tokens_per_s"], history[-1]["seconds"], folder)


def cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy over the unmasked positions (their mean, or sum); masked targets are ignored rather
    than cut out, which would copy the [B, T, V] logits."""
    return F.cross_entropy(logits.flatten(0, 1), targets.masked_fill(~mask, IGNORED).flatten(), ignore_index=IGNORED,
                           reduction=reduction)


def language_objective(loss: str, targets: TokenTargets | None, ce_weight: float, distill_weight: float,
                       temperature: float, tail: str = "bucket") -> Objective:
    """The loss terms of `loss`: cross-entropy alone (ce); ce_weight·CE + distill_weight·the token loss against the
    cached teacher at the batch's sequences; or DistilBERT's combination (its own weights and temperature 2, the
    cosine against the cached hidden states)."""
    if loss not in LM_LOSSES:
        raise KdcacheError(f"--loss {loss}: a language model trains with {', '.join(LM_LOSSES)}")

    def objective(model: nn.Module, inputs: Tensor, labels: Tensor, mask: Tensor, indices: Tensor) -> dict[str, Tensor]:
        if loss == "distilbert":
            hidden = model.forward_features(inputs)
            logits, taught = model.forward_head(hidden).float(), targets(indices)
            total = distilbert(logits, labels, *taught[:2], hidden.float(), taught[2], mask, tail=tail)
            return {"ce": cross_entropy(logits, labels, mask), "total": total}
        logits = model(inputs).float()
        ce = cross_entropy(logits, labels, mask)
        if loss == "ce":
            return {"ce": ce, "total": ce}
        ids, logprobs, _ = targets(indices)
        distill = TOKEN_LOSSES[loss](logits, ids, logprobs, mask, tail=tail, temperature=temperature)
        return {"ce": ce, "distill": distill, "total": ce_weight * ce + distill_weight * distill}

    return objective


class TokenTargets:
    """A token cache's distributions at the batch's sequences: decoded once onto the device (the view is small
    beside the student's own activations: sequences × positions × k ids and log-probabilities), with the teacher's
    hidden states where the cache holds them."""

    def __init__(self, cache: TeacherCache, device: torch.device) -> None:
        arrays = cache.view_arrays(0)
        ids, logprobs = cache.spec.codec.decode({name: arrays[name] for name in cache.spec.logit_arrays})
        self.ids = torch.from_numpy(ids).to(device)
        self.logprobs = torch.from_numpy(logprobs).to(device)
        self.hidden = torch.from_numpy(arrays[HIDDEN]).to(device) if HIDDEN in arrays else None

    def __call__(self, indices: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(token ids [b, T, k] int64, their log-probabilities [b, T, k], hidden states [b, T, D] or None) of
        sequences `indices`."""
        indices = indices.to(self.ids.device)
        return self.ids[indices], self.logprobs[indices], None if self.hidden is None else self.hidden[indices]


def train_text_teacher(config: TeacherConfig, data: TextData, test: TextData, device: torch.device,
                       show_progress: bool = True) -> LanguageRun:
    """`kdcache train-teacher` on a text dataset: cross-entropy; the tokenizer is saved beside the weights."""
    refuse_image_options(config)
    require_one_process("train-teacher")
    folder = Path(config.out)
    data.tokenizer.save(str(folder / TOKENIZER_FILE))
    torch.manual_seed(config.seed)
    model = language_model(config.model, data.num_classes, "--model")
    record = {"arch": config.model, "num_classes": data.num_classes, "loss": "ce", "dataset": data.describe(),
              "config": recorded_config(config)}
    objective = language_objective("ce", None, 1.0, 0.0, 1.0)
    return train_language_model(model, data, test, objective, config, folder, record, device, show_progress)


def distill_text(config: DistillConfig, cache: TeacherCache, data: TextData, test: TextData, device: torch.device,
                 show_progress: bool = True) -> list[LanguageRun]:
    """`kdcache distill --cache` of a token cache: every (student, loss) pair from scratch, each in a run folder of
    its own."""
    refuse_image_options(config)
    targets = TokenTargets(cache, device)
    if any(loss == "distilbert" for _, loss in config.runs()) and targets.hidden is None:
        raise KdcacheError(f"--loss distilbert: its cosine term needs the teacher's hidden states, which {cache.path} "
                           f"does not hold; dump the teacher with --outputs hidden")
    runs = []
    for student, loss in config.runs():
        torch.manual_seed(config.seed)
        model = language_model(student, data.num_classes, "--student")
        weights = {name: default if getattr(config, name) is None else getattr(config, name)
                   for name, default in TOKEN_LOSS_DEFAULTS.items()}
        objective = language_objective(loss, targets, **weights, tail=config.token_tail)
        if loss == "distilbert" and model.num_features != targets.hidden.shape[-1]:
            raise KdcacheError(f"--loss distilbert: the cosine compares hidden states, and student {student} has "
                               f"{model.num_features} features where the teacher has {targets.hidden.shape[-1]}; "
                               f"give the student the teacher's width, or use token-kl")
        with ExitStack() as held:
            folder = hold_run_folder(Path(config.out), run_name(student, loss), config.name, False, held).path
            save_config(config.one_run(student, loss), folder)
            record = {"arch": student, "num_classes": data.num_classes, "loss": loss, "dataset": data.describe(),
                      "teacher_cache": {"path": str(cache.path), "cache_id": cache.cache_id},
                      "config": recorded_config(config)}
            runs.append(train_language_model(model, data, test, objective, config, folder, record, device,
                                             show_progress))
    return runs


# options of the image loop a language model has no use for: refused rather than silently ignored
IMAGE_ONLY = ("augmentation", "ema_decay", "label_smoothing", "views_per_step", "mutual", "ema_teacher", "live_teacher",
              "student_checkpoint", "qat", "negatives")


def language_model(spec: str, vocabulary: int, flag: str) -> nn.Module:
    """A fresh model of `spec` that reads token sequences (a `gpt:` or `hf:` spec); an image model is refused."""
    model = create_model(spec, num_classes=vocabulary)
    if not hasattr(model, "context"):  # what kdcache's language models carry: the longest sequence they read
        raise KdcacheError(f"{flag} {spec}: text trains a language model, and {spec} is an image model; give a "
                           f"language model such as gpt:layers=2,width=128,heads=4 or hf:FOLDER (kdcache models "
                           f"--source gpt)")
    return model


def refuse_image_options(config: Any) -> None:
    """One line for an option the image loop reads and a language model's run would ignore (a loss schedule too)."""
    given = options_given(config, tuple(name for name in IMAGE_ONLY if hasattr(config, name)), allowed=("none",))
    if given:
        raise KdcacheError(f"a language model (--dataset text, or a token cache) trains without {', '.join(given)}: "
                           f"these options are the image loop's; leave them out")
    scheduled = [name for name in TOKEN_LOSS_DEFAULTS if isinstance(getattr(config, name, None), Schedule)]
    if scheduled:
        raise KdcacheError(f"--{scheduled[0].replace('_', '-')} {getattr(config, scheduled[0])}: a token cache's "
                           f"losses take a constant {scheduled[0]}; give a number (schedules are the image loop's)")


def require_one_process(command: str) -> None:
    """Refuse torchrun: a language model trains in one process here (its dump is what shards)."""
    if distributed.world().distributed:
        raise KdcacheError(f"{command} --dataset text: a language model trains in one process here; run it without "
                           f"torchrun (dump-teacher shards a token cache under torchrun)")


def cache_text(spec: TokenCacheSpec, corpus: str | None, tokenizer: str | None) -> tuple[TextData, TextData]:
    """The split a token cache was made from and its held-out split, tokenised as the cache's was (`corpus`,
    `tokenizer`: other places of the same, else the cache's); refused, naming which, where the tokenizer or the
    corpus differs from the cache's."""
    split = spec.dataset["split"]
    return described_text(spec.dataset, corpus, tokenizer, split), described_text(spec.dataset, corpus, tokenizer)


def described_text(described: dict[str, Any], corpus: str | None, tokenizer: str | None,
                   split: str = "test") -> TextData:
    """`split` of the text a description names (a cache's or a run folder's `dataset`), tokenised as it was;
    refused, naming which, where the tokenizer differs, or (the described split itself) the token ids."""
    stored = described["tokenizer"]
    tokenizer = tokenizer or stored.get("path")
    corpus = corpus or described["corpus"]
    data = load_text(corpus, split, seq_len=described["seq_len"], held_out=described["held_out"],
                     **({"tokenizer": tokenizer} if tokenizer else {"vocab_size": stored["vocab_size"]}))
    if data.tokenizer_sha256 != stored["sha256"]:
        raise KdcacheError(_other_tokenizer(stored, data, corpus, described["corpus"]))
    if split == described["split"] and data.fingerprint != described["fingerprint"]:
        raise KdcacheError(f"corpus: the cache holds {described['num_samples']} sequences of corpus "
                           f"{described['corpus']} (fingerprint {described['fingerprint'][:12]}), this run reads "
                           f"{data.num_samples} from {corpus} (fingerprint {data.fingerprint[:12]}) with the same "
                           f"tokenizer: the text differs; pass the corpus the cache was made from with --data-root")
    return data


def _other_tokenizer(stored: dict[str, Any], data: TextData, corpus: str, cache_corpus: str) -> str:
    """Why this run's tokenizer is not the cache's: another file, or a BPE trained on another corpus."""
    shas = f"sha256 {stored['sha256'][:12]} in the cache, {data.tokenizer_sha256[:12]} here"
    if stored.get("path") or data.tokenizer_path:
        return (f"tokenizer: the cache was made with {stored.get('path') or 'a BPE trained on its corpus'}, this run "
                f"tokenises with {data.tokenizer_path or 'a BPE trained on the corpus'} ({shas}); pass the cache's "
                f"with --tokenizer")
    return (f"corpus: the cache's tokenizer is a BPE trained on its corpus {cache_corpus}, and trained on {corpus} it "
            f"comes out another ({shas}): the text differs; pass the corpus the cache was made from with --data-root")


def distill_from_token_cache(config: DistillConfig, cache: TeacherCache, device: torch.device,
                             show_progress: bool = True) -> list[LanguageRun]:
    """`kdcache distill --cache` of a token cache: its corpus and tokenizer checked, then every student."""
    require_one_process("distill")
    if config.extra_caches:
        raise KdcacheError(f"distill: {cache.path} is a token cache, whose students learn from one teacher; give one "
                           f"--cache")
    if config.resume or config.dataset not in (None, "text"):
        raise KdcacheError(f"distill: {cache.path} is a token cache: its students train on its corpus "
                           f"(--data-root moves it, not --dataset), and a language model's run does not resume")
    data, test = cache_text(cache.spec, config.data_root, config.tokenizer)
    cache.require_complete()
    return distill_text(config, cache, data, test, device, show_progress)

