"""Format 6's token caches: a causal language model's next-token distribution at every position of every sequence,
its top k token ids and log-probabilities quantised as `token_codec` describes, in the chunked, checksummed,
resumable store that region logits use.

A sequence is a sample and its positions stand where an image's regions do: the data arrays are
`[views, sequences, positions, ...]` (one view: text has no augmentation), `labels` `[sequences, positions]` holds
each position's next token (-1 past the end of the corpus), and `progress` counts per block the positions whose
next token is the teacher's most likely one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kdcache.cache.layout import SPEC_KINDS, TOKENS_SINCE, CacheSpec, _short, shared_fields
from kdcache.cache.token_codec import TokenCodec
from kdcache.errors import CorruptCacheError

TOKEN_VALUES = ("per position, the teacher's k most likely next tokens and their log-probabilities (of the full "
                "vocabulary's softmax at temperature 1), quantised as `tokens` says, with the tail's mass: the "
                "k + 1-way distribution is exact; temperature is applied when training")
# what each of a token cache's arrays holds (tokens, the codec's description, says how to read the bytes)
TOKEN_ARRAYS = {
    "token_ids": "[views, samples, positions, bytes] the k most probable next tokens' ids, bit-packed as "
                 "tokens.id_bit_order says, most probable first",
    "token_logprobs": "[views, samples, positions, k (fp16) or bytes (codes)] their log-probabilities relative to "
                      "the most probable one's, as tokens.token_logprobs says",
    "token_step": "[views, samples, positions] float16 step of the position's log-probability codes",
    "token_tail": "[views, samples, positions] float16 log of the mass outside the k ids, relative to the most "
                  "probable token's",
    "hidden": "[views, samples, positions, D] float16 the teacher's final hidden state at each position "
              "(forward_features: after its last norm, the head's input), DistilBERT's cosine target",
}
HIDDEN = "hidden"  # the one further output a token cache may hold
TEXT_POLICY = {"name": "none", "param_names": []}  # one view: the sequence as the corpus packs it
# fields every token cache's reader relies on, checked when it is opened so that a missing one names itself
TOKEN_FIELDS = (("teacher.arch", str), ("teacher.num_classes", int), ("teacher.checkpoint_sha256", str),
                ("teacher.precision", str), ("dataset.name", str), ("dataset.split", str),
                ("dataset.num_samples", int), ("dataset.seq_len", int), ("dataset.num_tokens", int),
                ("dataset.fingerprint", str), ("dataset.tokenizer", dict), ("augmentation.name", str),
                ("augmentation.param_names", list))


@dataclass(frozen=True)
class TokenCacheSpec(CacheSpec):
    """A token cache's contents: CacheSpec's fields (no scales, one view) and the codec's description."""

    tokens: dict[str, Any] = field(default_factory=dict)  # TokenCodec.describe()
    kind: ClassVar[str] = "tokens"
    since: ClassVar[int] = TOKENS_SINCE

    @functools.cached_property
    def codec(self) -> TokenCodec:
        """How each position's distribution is stored."""
        return TokenCodec.from_description(self.tokens)

    @property
    def positions(self) -> int:
        """Token positions per sequence."""
        return int(self.dataset["seq_len"])

    @property
    def num_regions(self) -> int:
        return self.positions

    @property
    def logit_arrays(self) -> tuple[str, ...]:
        return tuple(self.codec.arrays())

    def array_layout(self, name: str) -> tuple[tuple[int, ...], str]:
        if name in self.outputs:  # the teacher's hidden states, [positions, D] a sequence
            return (self.num_views, self.num_samples, *self.outputs[name]), "float16"
        shape, dtype = self.codec.arrays()[name]
        return (self.num_views, self.num_samples, self.positions, *shape), dtype

    def array_description(self, name: str) -> str:
        if name == "labels":
            return "[samples, positions] the next token at each position: the corpus's own; -1 past its end"
        return TOKEN_ARRAYS[name] if name in TOKEN_ARRAYS else super().array_description(name)

    @property
    def labels_shape(self) -> tuple[int, ...]:
        return self.num_samples, self.positions

    @property
    def num_scored(self) -> int:
        """Positions with a next token: the teacher's next-token accuracy is over these."""
        return int(self.dataset["num_tokens"])

    def to_metadata(self) -> dict[str, Any]:
        document = super().to_metadata()
        del document["regions"]
        document["description"] = ("A causal language model's next-token distributions, written by `kdcache "
                                   "dump-teacher` on a text dataset; train student LMs from it with `kdcache "
                                   "distill --cache`.")
        document["logits"] = {"dtype": self.dtype, "block_size": self.block_size, "topk": self.topk,
                              "values": TOKEN_VALUES}
        return {**document, "tokens": self.tokens}

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], where: str) -> TokenCacheSpec:
        get, shared = shared_fields(metadata, where)
        spec = cls(**shared, scales=tuple(get("scales", list)), tokens=get("tokens", dict),
                   outputs=get("outputs", dict))
        return spec.checked(get, (("logits.topk", int), *TOKEN_FIELDS), where)

    def _check_values(self, where: str) -> None:
        codec = self.codec  # a malformed description is refused here, naming its field
        hidden = self.outputs.get(HIDDEN)
        plain_hidden = isinstance(hidden, list) and len(hidden) == 2 and hidden[0] == self.positions and \
            isinstance(hidden[1], int) and not isinstance(hidden[1], bool) and hidden[1] > 0
        if self.scales or set(self.outputs) - {HIDDEN} or (self.outputs and not plain_hidden) or self.num_views != 1 \
                or self.augmentation != TEXT_POLICY:
            raise CorruptCacheError(f"{where}: a token cache has one view, no scales, no further output but the "
                                    f"hidden states ([positions, D]) and no "
                                    f"augmentation; its metadata says views.count={self.num_views}, scales="
                                    f"{list(self.scales)}, outputs={_short(self.outputs)}, augmentation="
                                    f"{_short(self.augmentation)}: it was edited — rebuild it with `kdcache "
                                    f"dump-teacher --overwrite`")
        if (codec.k, codec.vocab) != (self.topk, self.num_classes) or self.positions < 1 or self.block_size < 1:
            raise CorruptCacheError(f"{where}: metadata fields disagree: logits.topk={self.topk} and "
                                    f"teacher.num_classes={self.num_classes} against tokens k={codec.k}, vocabulary "
                                    f"{codec.vocab}; dataset.seq_len={self.positions}, logits.block_size="
                                    f"{self.block_size}: it was edited — rebuild it with `kdcache dump-teacher "
                                    f"--overwrite`")


def token_cache_spec(teacher: dict[str, Any], dataset: dict[str, Any], codec: TokenCodec, block_size: int = 0,
                     hidden_size: int = 0) -> TokenCacheSpec:
    """The spec of a new token cache: one view of every sequence of `dataset` (TextData.describe()); with the
    teacher's hidden states where hidden_size (its D) is given."""
    outputs = {HIDDEN: [int(dataset["seq_len"]), hidden_size]} if hidden_size else {}
    return TokenCacheSpec(teacher=teacher, dataset=dataset, augmentation=dict(TEXT_POLICY), num_views=1,
                          exhaustive=False, seed=0, scales=(), dtype=codec.width, block_size=block_size,
                          topk=codec.k, tokens=codec.describe(), outputs=outputs)


SPEC_KINDS["tokens"] = TokenCacheSpec
