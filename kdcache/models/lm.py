"""Language models behind timm's interface over tokens: a small GPT trained from scratch, and a local Hugging Face
causal LM.

- `gpt:layers=L,width=D,heads=H[,context=T][,dropout=P]`: a nanoGPT-style decoder (pre-LayerNorm, causal
  self-attention, a GELU MLP 4x as wide, learned positions, input and output embeddings tied); the vocabulary is
  the class count the model is created for. Keys left out take GPT_DEFAULTS (layers=6, width=384, heads=6,
  context=1024, dropout=0), so `gpt:` alone is nanoGPT's baby GPT.
- `hf:PATH`: a Hugging Face causal LM in a local folder (config.json and model.safetensors, or shards with their
  index), loaded by transformers with nothing downloaded and no code from the folder run: a config that names its
  own code (`auto_map`) or weights in a pickle (pytorch_model.bin) are refused before transformers sees the folder.
  The model keeps its class, parameter names and weights; it gains forward_features and forward_head.

Both take tokens [B, T] (int64) and give logits [B, T, V]: `forward_features(tokens)` is the hidden state [B, T, D]
after the final norm and `forward_head(hidden, pre_logits=False)` the logits (`pre_logits=True`: the hidden state).
Both refuse, in one line, a sequence longer than their `context`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.errors import KdcacheError

# -- a small GPT -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GPTShape:
    """What a `gpt:` spec sets; the vocabulary is the class count the model is created for."""

    layers: int = 6
    width: int = 384
    heads: int = 6
    context: int = 1024
    dropout: float = 0.0


GPT_DEFAULTS = GPTShape()
GPT_FORM = ("gpt:layers=L,width=D,heads=H[,context=T][,dropout=P] (keys left out take "
            + ", ".join(f"{field.name}={getattr(GPT_DEFAULTS, field.name):g}" for field in dataclasses.fields(GPTShape))
            + "; the vocabulary is the model's class count)")
# shapes `kdcache models --source gpt` lists: from a test-sized model to GPT-2 small's (124 M with its 50257 tokens)
GPT_EXAMPLES = ("layers=2,width=128,heads=2", "layers=4,width=256,heads=4", "layers=6,width=384,heads=6",
                "layers=12,width=768,heads=12")


def parse_gpt_spec(body: str) -> GPTShape:
    """The shape a `gpt:` spec's body names (`layers=2,width=128,heads=4`); every mistake is one line."""
    def refuse(problem: str) -> KdcacheError:
        return KdcacheError(f"model spec 'gpt:{body}': {problem}; a GPT is named as {GPT_FORM}")

    known = {field.name: field.type for field in dataclasses.fields(GPTShape)}
    settings: dict[str, float] = {}
    for item in body.split(",") if body else []:
        key, equals, value = item.partition("=")
        if not equals:
            raise refuse(f"expected key=value, found {item!r}")
        if key not in known:
            raise refuse(f"unknown key {key!r}; known: {', '.join(known)}")
        if key in settings:
            raise refuse(f"{key} is given twice")
        settings[key] = _gpt_value(key, value, known[key] == "int", refuse)
    shape = GPTShape(**settings)
    if shape.width % shape.heads:
        raise refuse(f"width {shape.width} is not divisible by heads {shape.heads}: each head takes width/heads "
                     f"channels")
    return shape


def _gpt_value(key: str, value: str, integer: bool, refuse: Callable[[str], KdcacheError]) -> float:
    """One key's value: a positive integer, or for dropout a probability in [0, 1)."""
    if integer:
        if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
            raise refuse(f"{key} should be a positive integer, found {value!r}")
        return int(value)
    try:
        probability = float(value)
    except ValueError:
        probability = math.nan
    if not 0 <= probability < 1:
        raise refuse(f"{key} should be a probability in [0, 1), found {value!r}")
    return probability


def gpt_examples(pattern: str) -> list[str]:
    """The listed `gpt:` shapes (spec bodies) matching a shell-style pattern."""
    return [body for body in GPT_EXAMPLES if fnmatch.fnmatchcase(body, pattern)]


def check_context(tokens: torch.Tensor, context: int | None, model: str) -> None:
    """Refuse, in one line, a sequence the model has no positions for."""
    if context is not None and tokens.shape[-1] > context:
        raise KdcacheError(f"{model}: a sequence of {tokens.shape[-1]} tokens is longer than its context of {context} "
                           f"positions; cut the text into sequences of at most {context} tokens")


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees itself and the positions before it."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.heads, self.dropout = heads, dropout
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj_dropout(self.proj(y.transpose(1, 2).reshape(batch, length, width)))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: attention, then a GELU MLP four times as wide, each around a residual."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """A small GPT (nanoGPT's design): tokens [B, T] -> logits [B, T, vocab], the output layer tied to the input
    embedding (one tensor in the state dict, so a checkpoint holds it once)."""

    def __init__(self, vocab: int, layers: int = 6, width: int = 384, heads: int = 6, context: int = 1024,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.num_classes, self.num_features, self.context = vocab, width, context
        self.token_embedding = nn.Embedding(vocab, width)
        self.position_embedding = nn.Embedding(context, width)
        self.embedding_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.apply(_gpt2_init)
        # GPT-2's scaling: each residual branch's last layer starts 1/sqrt(2 * layers) as large, so the residual
        # stream's variance does not grow with depth
        for block in self.blocks:
            for projection in (block.attention.proj, block.mlp[2]):
                nn.init.normal_(projection.weight, std=0.02 / math.sqrt(2 * layers))

    def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The hidden state [B, T, width] after the final LayerNorm."""
        check_context(tokens, self.context, "GPT")
        positions = torch.arange(tokens.shape[-1], device=tokens.device)
        x = self.embedding_dropout(self.token_embedding(tokens) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, hidden: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab] through the tied embedding; pre_logits: the hidden state itself."""
        return hidden if pre_logits else F.linear(hidden, self.token_embedding.weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, T, vocab] for tokens [B, T]."""
        return self.forward_head(self.forward_features(tokens))


def _gpt2_init(module: nn.Module) -> None:
    """GPT-2's initialisation: linear and embedding weights normal with std 0.02, biases zero."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def build_gpt(body: str, num_classes: int) -> GPT:
    """The GPT a `gpt:` spec's body names, with a vocabulary of `num_classes` tokens."""
    return GPT(num_classes, **dataclasses.asdict(parse_gpt_spec(body)))


# -- a local Hugging Face causal LM ---------------------------------------------------------------------------------
HF_FORM = ("hf:PATH, a local folder holding a Hugging Face causal LM (config.json and model.safetensors); kdcache "
           "downloads nothing: fetch it once with `hf download NAME --local-dir PATH`")
CAUSAL_ARCHITECTURES = ("ForCausalLM", "LMHeadModel")  # the class names transformers gives its causal LMs


def _transformers():
    try:
        import transformers
    except ImportError:
        raise KdcacheError('hf: models named hf:PATH need transformers; install it with pip install "kdcache[lm]" '
                           '(or pip install transformers)') from None
    return transformers


def _hf_config(path: str) -> tuple[Path, dict, list[Path]]:
    """The folder an `hf:` spec names, its config.json and its safetensors files, refused in one line unless it is
    a causal LM whose weights are safetensors and whose architecture transformers has built in (no code from the
    folder runs)."""
    spec, folder = f"hf:{path}", Path(path).expanduser()
    if not path or not folder.is_dir():
        raise KdcacheError(f"model spec {spec!r}: {'no folder named' if not path else f'{folder} is not a folder'}; "
                           f"expected {HF_FORM}")
    if not (folder / "config.json").is_file():
        raise KdcacheError(f"model spec {spec!r}: {folder} has no config.json; expected {HF_FORM}")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise KdcacheError(f"model spec {spec!r}: {folder / 'config.json'} is not valid JSON ({error}); fetch the "
                           f"model folder again") from None
    if not isinstance(config, dict):
        raise KdcacheError(f"model spec {spec!r}: {folder / 'config.json'} holds no JSON object; fetch the model "
                           f"folder again")
    if "auto_map" in config:  # before transformers sees the folder: its code is never imported
        raise KdcacheError(f"model spec {spec!r}: its config.json has an auto_map, naming model code shipped with "
                           f"the weights, and kdcache never runs a model folder's code (trust_remote_code stays off); "
                           f"use a model whose architecture transformers has built in")
    _check_causal(spec, config)
    return folder, config, _safetensors_files(spec, folder)


def _check_causal(spec: str, config: dict) -> None:
    """Refuse a config that is no causal LM built into transformers, naming what it says."""
    architectures = config.get("architectures") or []
    other = [name for name in architectures if not str(name).endswith(CAUSAL_ARCHITECTURES)]
    if other:
        raise KdcacheError(f"model spec {spec!r}: its config.json names the architecture {other[0]}, which is no "
                           f"causal language model (a ...ForCausalLM or ...LMHeadModel); distil from a causal LM")
    version = _transformers().__version__
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise KdcacheError(f"model spec {spec!r}: its config.json has model_type {model_type!r}, which is no causal "
                           f"language model transformers {version} has built in; use one it has "
                           f"(such as gpt2 or llama), or a newer transformers")


def _safetensors_files(spec: str, folder: Path) -> list[Path]:
    """A folder's safetensors files (model.safetensors, or the shards its index names, in order); a folder whose
    weights are not all there as safetensors is refused (a pickle is never loaded: it can run code)."""
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if not index.is_file():
        pickled = sorted(folder.glob("pytorch_model*.bin"))
        found = (f"only {pickled[0].name}, a pickle, which can run code when loaded" if pickled else "no weights")
        raise KdcacheError(f"model spec {spec!r}: {folder} has {found}; kdcache loads model.safetensors (or its "
                           f"shards with model.safetensors.index.json): convert the weights to safetensors where you "
                           f"trust them (model.save_pretrained(folder, safe_serialization=True))")
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise KdcacheError(f"model spec {spec!r}: {index} is no safetensors index (JSON with a weight_map); fetch "
                           f"the model folder again") from None
    missing = [shard for shard in shards if not (folder / str(shard)).is_file()]
    if missing:
        raise KdcacheError(f"model spec {spec!r}: {folder} lacks {missing[0]} and {len(missing) - 1} more of the "
                           f"shards its index names; fetch the model folder again")
    return [folder / str(shard) for shard in shards]


def hf_weight_files(path: str) -> list[Path]:
    """The files that make an `hf:` folder's model: config.json, then its safetensors (the shards, in order)."""
    folder, _, weights = _hf_config(path)
    return [folder / "config.json", *weights]


def hf_exists(path: str) -> bool:
    """Whether an `hf:` spec names a loadable folder; every way it does not is one line."""
    _hf_config(path)
    return True


class _HFAdapter:
    """timm's interface for a transformers causal LM: tokens in, logits out, hidden state and head apart. forward
    is the model's own; forward_head(forward_features(x)) equals it for GPT-2 and Llama-type models (tested), not
    for one that scales or soft-caps its logits after the output layer (Gemma 2, Cohere)."""

    @property
    def num_classes(self) -> int:
        """The vocabulary: how many logits each position has."""
        return self.get_output_embeddings().out_features

    @property
    def num_features(self) -> int:
        """The width of the hidden state the head reads."""
        return self.get_output_embeddings().in_features

    @property
    def context(self) -> int | None:
        """How many positions the model has (None where its config does not say)."""
        return getattr(self.config, "max_position_embeddings", None)

    def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The base model's last hidden state [B, T, D], after its final norm."""
        check_context(tokens, self.context, self.arch_name)
        return self.base_model(input_ids=tokens, use_cache=False).last_hidden_state

    def forward_head(self, hidden: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits [B, T, V] through the model's output embedding; pre_logits: the hidden state itself."""
        return hidden if pre_logits else self.get_output_embeddings()(hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's own logits [B, T, V] (its logit scaling or soft-capping included, where it has one)."""
        check_context(tokens, self.context, self.arch_name)
        return super().forward(input_ids=tokens, use_cache=False).logits

    @property
    def arch_name(self) -> str:
        """How messages name the model: its spec once create_model has set it."""
        return getattr(self, "arch", type(self).__name__)


@functools.cache
def _adapted_class(model_class: type) -> type:
    """The subclass of a transformers class with the adapter's methods (one per class, so instances share it)."""
    return type(model_class.__name__, (_HFAdapter, model_class), {"__module__": __name__})


def build_hf(path: str, num_classes: int | None) -> nn.Module:
    """The causal LM in a local folder, in float32, with its own weights; `num_classes`, where given, must be its
    vocabulary (None: whatever its config says)."""
    folder, config, _ = _hf_config(path)
    if "vocab_size" in config:  # refused before the weights are read
        _check_vocab(path, config["vocab_size"], num_classes)
    transformers = _transformers()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a CLI's output stays kdcache's lines
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, trust_remote_code=False, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as error:
        raise KdcacheError(f"model spec 'hf:{path}': transformers could not load {folder} "
                           f"({str(error).strip().splitlines()[0]}); fetch the model folder again") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    model.__class__ = _adapted_class(type(model))
    _check_vocab(path, model.num_classes, num_classes)
    return model


def _check_vocab(path: str, vocab: int, num_classes: int | None) -> None:
    """Refuse a model whose vocabulary is not the one asked for (None: no vocabulary was asked for)."""
    if num_classes is not None and vocab != num_classes:
        raise KdcacheError(f"model spec 'hf:{path}': its vocabulary is {vocab} tokens (config.json's vocab_size) but "
                           f"{num_classes} were asked for; a model and its data share one tokenizer: tokenise the "
                           f"text with this model's")
