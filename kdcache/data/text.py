"""`text`: a tokenised corpus as a data source, packed into fixed-length sequences with a mask; nothing downloaded.

A corpus (`load_corpus`) is a list of documents: `pydoc` (the help topics that ship with CPython in
`pydoc_data`, about 465 k characters), one UTF-8 text file, a folder of them, or a Hugging Face `datasets`
dataset saved with `save_to_disk` (`hf-disk:PATH`). The tokenizer is read from a local folder or file
(`load_tokenizer`: tokenizer.json, or a GPT-2 style vocab.json + merges.txt; never code) or trained on the
corpus (`train_bpe`: byte-level BPE, the same bytes every time).

Packing (`pack`): the documents' ids joined by the end-of-text id into one stream, cut into sequences of
seq_len + 1 ids, sequence i being stream[i*T : i*T + T + 1]. Consecutive sequences share their boundary token
(the last id of one is the first of the next), so every token but the stream's first is a next-token target
exactly once: inputs are ids[:, :-1], targets ids[:, 1:]. The last sequence is padded with the end-of-text id
and its padding masked out of the targets (`mask`, False there).

Splits: the last `held_out` fraction of the packed sequences (at least one) is the test split, the rest the
train split, both in stream order: whole sequences, none in both (the train split's last token is the test
split's first input, the one token they share, as a target in train only).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import Tensor

from kdcache.data.augment import Identity, get_policy
from kdcache.data.source import EVAL_BATCH
from kdcache.data.sources import SPLITS, register_dataset

if TYPE_CHECKING:  # imported when text is read: an image-only install (a GPU image without it) imports kdcache
    from tokenizers import Tokenizer
from kdcache.errors import KdcacheError

DEFAULT_CORPUS = "pydoc"  # CPython's pydoc_data help topics: a corpus on every Python, nothing to download
HF_DISK = "hf-disk:"  # the prefix of a `datasets` dataset saved with save_to_disk
TEXT_SUFFIXES = (".txt", ".md", ".rst")  # the files a corpus folder contributes, matched case-insensitively
TEXT_COLUMN = "text"
END_OF_TEXT = "<|endoftext|>"  # the special token train_bpe adds: between documents, and as padding
END_OF_TEXT_TOKENS = (END_OF_TEXT, "<|end_of_text|>", "</s>", "<eos>")  # what a loaded tokenizer may call it
BYTE_ALPHABET = 256  # byte-level BPE starts from every byte
DEFAULT_SEQ_LEN = 64
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_HELD_OUT = 0.1
TOKENIZER_FILE = "tokenizer.json"  # a text model's run folder keeps its tokenizer beside model.pt
UINT16_VOCAB = 65536  # ids of a vocabulary up to this size are stored as uint16, else int32

CORPUS_FORMS = (f"a UTF-8 text file, a folder of {'/'.join(TEXT_SUFFIXES)} files, {HF_DISK}PATH (a datasets "
                f"dataset saved with save_to_disk) or {DEFAULT_CORPUS} (the help topics that ship with Python)")


def load_corpus(spec: str) -> list[str]:
    """The documents of the corpus `spec`: `pydoc` (pydoc_data's topics, in sorted key order); a UTF-8 text file
    (one document); a folder (every *.txt, *.md, *.rst file below it, hidden ones skipped, sorted by relative
    path, one document each); `hf-disk:PATH` (the `text` column of a saved dataset, a DatasetDict's train split).
    Empty documents are dropped."""
    if spec == DEFAULT_CORPUS:
        from pydoc_data.topics import topics

        documents = [topics[key] for key in sorted(topics)]
    elif spec.startswith(HF_DISK):
        documents = _saved_dataset(spec[len(HF_DISK):])
    elif Path(spec).is_dir():
        documents = [_read_text(path) for path in _text_files(Path(spec))]
    elif Path(spec).is_file():
        documents = [_read_text(Path(spec))]
    else:
        raise KdcacheError(f"text corpus {spec!r}: no such file or folder; give {CORPUS_FORMS}")
    documents = [document for document in documents if document]
    if not documents:
        raise KdcacheError(f"text corpus {spec!r}: holds no text (every document is empty); give {CORPUS_FORMS}")
    return documents


def _read_text(path: Path) -> str:
    """A file's text, strictly UTF-8 (a leading byte order mark dropped); one line naming the file otherwise."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise KdcacheError(f"{path}: cannot be read ({error.strerror}); make it readable or leave it out") from None
    try:
        return data.decode("utf-8", errors="strict").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        raise KdcacheError(f"{path}: not UTF-8 text (byte offset {error.start}: {error.reason}); convert it to "
                           f"UTF-8 (iconv -t UTF-8) or leave it out of the corpus") from None


def _text_files(folder: Path) -> list[Path]:
    """The text files below `folder`, sorted by relative path; hidden files and folders (.git) skipped, links to
    folders not followed (no loop)."""
    found = []
    for parent, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        found += [Path(parent, name) for name in names
                  if not name.startswith(".") and name.lower().endswith(TEXT_SUFFIXES)]
    if not found:
        raise KdcacheError(f"{folder}: no text files below it (looked for "
                           f"{', '.join('*' + suffix for suffix in TEXT_SUFFIXES)}); add some or name a file")
    return sorted(found, key=lambda path: path.relative_to(folder).as_posix())


def _saved_dataset(path: str) -> list[str]:
    """The `text` column of a `datasets` dataset saved at `path` with save_to_disk (a DatasetDict's train split)."""
    where = f"{HF_DISK}{path}"
    if not Path(path).is_dir():
        raise KdcacheError(f"{where}: no such folder; give the folder a datasets dataset was saved to with "
                           f"save_to_disk")
    import datasets  # a heavy import, needed only here

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as error:  # untrusted files read by a third-party library: any failure is the input's
        raise KdcacheError(f"{where}: not a datasets dataset saved with save_to_disk ({_first_line(error)}); "
                           f"save one with Dataset.save_to_disk(PATH)") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise KdcacheError(f"{where}: a DatasetDict without a train split (its splits: {', '.join(loaded)}); "
                               f"save the split to read as its own dataset, or under the name train")
        loaded = loaded["train"]
    if TEXT_COLUMN not in loaded.column_names:
        raise KdcacheError(f"{where}: no {TEXT_COLUMN!r} column (its columns: {', '.join(loaded.column_names)}); "
                           f"rename the column holding the documents to {TEXT_COLUMN!r}")
    documents = list(loaded[TEXT_COLUMN])
    for row, document in enumerate(documents):
        if not isinstance(document, str):
            raise KdcacheError(f"{where}: row {row}'s {TEXT_COLUMN!r} is {type(document).__name__}, not a string; "
                               f"give every row a text")
    return documents


def _first_line(error: Exception) -> str:
    """An exception's message, cut to its first line (errors are one line)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def train_bpe(documents: Sequence[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE (GPT-2's pre-tokenizer) of up to vocab_size tokens: the 256 bytes, END_OF_TEXT and the
    merges learnt from the documents; two trainings on the same documents give the same bytes."""
    _check_integer("vocab_size", vocab_size, BYTE_ALPHABET + 1)
    tokenizers = _tokenizers()
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def _tokenizers() -> ModuleType:
    """The tokenizers package (a dependency of kdcache), imported when text is first tokenised."""
    try:
        import tokenizers
        import tokenizers.decoders, tokenizers.models, tokenizers.pre_tokenizers, tokenizers.trainers  # noqa: E401
    except ImportError as error:
        raise KdcacheError(f"text data needs the tokenizers package ({error}): pip install tokenizers") from None
    return tokenizers


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a local tokenizer.json file, or a folder holding one, or a folder holding a GPT-2 style
    vocab.json + merges.txt (byte-level BPE); nothing in the folder is run (tokenizer_config.json is not read)."""
    path = Path(path)
    if path.is_dir() and not (path / "tokenizer.json").is_file():
        if not ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()):
            raise KdcacheError(f"tokenizer {path}: holds no tokenizer.json, nor vocab.json with merges.txt; give "
                               f"the folder a tokenizers or transformers tokenizer was saved to")
        tokenizer = _byte_level_bpe(path / "vocab.json", path / "merges.txt")
    elif path.is_dir() or path.is_file():
        file, tokenizers = path / "tokenizer.json" if path.is_dir() else path, _tokenizers()
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(file))
        except Exception as error:  # untrusted bytes parsed by the tokenizers library: any failure is the file's
            raise KdcacheError(f"tokenizer {file}: not a tokenizers tokenizer.json ({_first_line(error)}); give "
                               f"the file a tokenizers or transformers tokenizer saved") from None
    else:
        raise KdcacheError(f"tokenizer {path}: no such file or folder; give a tokenizer.json or the folder holding it")
    end_of_text_id(tokenizer)  # packing needs one: refused now rather than when packing
    return tokenizer


def _byte_level_bpe(vocab: Path, merges: Path) -> Tokenizer:
    """GPT-2's tokenizer from its vocab.json and merges.txt: byte-level BPE, no prefix space."""
    tokenizers = _tokenizers()
    try:
        tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(vocab), str(merges)))
    except Exception as error:  # untrusted bytes parsed by the tokenizers library: any failure is the files'
        raise KdcacheError(f"tokenizer {vocab.parent}: its vocab.json and merges.txt are not a BPE vocabulary "
                           f"({_first_line(error)}); give the files a GPT-2 style tokenizer saved") from None
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    return tokenizer


def end_of_text_id(tokenizer: Tokenizer) -> int:
    """The id of the tokenizer's end-of-text token (the first of END_OF_TEXT_TOKENS it has)."""
    for token in END_OF_TEXT_TOKENS:
        found = tokenizer.token_to_id(token)
        if found is not None:
            return found
    raise KdcacheError(f"tokenizer: has no end-of-text token (looked for {', '.join(END_OF_TEXT_TOKENS)}), which "
                       f"separates documents and pads the last sequence; use a tokenizer with one, or train one on "
                       f"the corpus (no tokenizer given)")


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 hex of the tokenizer's serialised JSON (what `tokenizer.save(path)` writes)."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def token_stream(documents: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """The documents' ids (no special tokens added, none read from the text) joined by the end-of-text id between
    documents: int64 [L]."""
    separator = np.array([end_of_text_id(tokenizer)], dtype=np.int64)
    literal = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True  # "<|endoftext|>" inside a document is text: only the joins separate
    try:
        encodings = tokenizer.encode_batch(list(documents), add_special_tokens=False)
    finally:
        tokenizer.encode_special_tokens = literal
    parts = []
    for number, encoding in enumerate(encodings):
        parts += [separator] if number else []
        parts.append(np.asarray(encoding.ids, dtype=np.int64))
    stream = np.concatenate(parts)
    vocab_size = tokenizer.get_vocab_size()
    if len(stream) and stream.max() >= vocab_size:
        raise KdcacheError(f"tokenizer: gives id {int(stream.max())} beyond its vocabulary of {vocab_size}; its "
                           f"tokenizer.json is inconsistent: use another")
    return stream


def pack(documents: Sequence[str], tokenizer: Tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The token stream cut into sequences of seq_len + 1 ids sharing their boundary token (module docstring):
    ids [N, seq_len + 1] (uint16 up to 65,536 tokens, else int32) and mask [N, seq_len] bool, False where the
    target is the last sequence's padding."""
    stream = token_stream(documents, tokenizer)
    num_targets = len(stream) - 1
    if num_targets < 1:
        raise KdcacheError(f"text corpus: tokenises to {len(stream)} token(s), which predict nothing; give more text")
    count = math.ceil(num_targets / seq_len)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= UINT16_VOCAB else np.int32
    padded = np.full(count * seq_len + 1, end_of_text_id(tokenizer), dtype=dtype)
    padded[:len(stream)] = stream
    ids = np.lib.stride_tricks.sliding_window_view(padded, seq_len + 1)[::seq_len].copy()
    mask = (np.arange(count * seq_len) < num_targets).reshape(count, seq_len)
    return ids, mask


def split_rows(count: int, split: str, held_out: float) -> slice:
    """The sequences of `split` among `count`: test the last round(count * held_out) (at least one), train the rest."""
    test = max(1, round(count * held_out))
    if count - test < 1:
        raise KdcacheError(f"text corpus: packs into {count} sequence(s), too few for a train and a held-out test "
                           f"split; give more text, a smaller seq_len or a smaller held_out")
    return slice(0, count - test) if split == "train" else slice(count - test, count)


def text_fingerprint(ids: np.ndarray, mask: np.ndarray, tokenizer_sha256: str) -> str:
    """sha256 hex of the shapes, the token ids (as int32, whatever their storage), the mask and the tokenizer's
    fingerprint: another token, order, mask or tokenizer gives another digest."""
    digest = hashlib.sha256(f"kdcache-text-v1 ids int32 {list(ids.shape)} mask bool {list(mask.shape)} "
                            f"tokenizer {tokenizer_sha256}\n".encode())
    digest.update(ids.astype("<i4").tobytes())
    digest.update(mask.astype(np.uint8).tobytes())
    return digest.hexdigest()


TextBatch = tuple[Tensor, Tensor, Tensor]  # inputs [b, T] int64, next-token targets [b, T] int64, mask [b, T] bool


class TextData:
    """One split of a packed corpus held in memory: token sequences whose targets are their next tokens. A
    DataSource where its members mean something for text; those that mean images only (labels, mean, std,
    first_images, sample_view, evaluation) refuse in one line."""

    name: ClassVar[str] = "text"
    streamed: ClassVar[bool] = False
    default_policy: ClassVar[str] = "none"  # no augmentation: one view, the sequence itself

    def __init__(self, split: str, ids: np.ndarray, mask: np.ndarray, tokenizer: Tokenizer, corpus: str,
                 held_out: float, tokenizer_path: str | None = None) -> None:
        """ids [N, T + 1] (uint16 or int32) and mask [N, T] bool of one split, as `pack` and `split_rows` cut them;
        `corpus` is the spec they were read from, `tokenizer_path` the tokenizer's file (None: trained on it)."""
        if ids.ndim != 2 or ids.shape[1] < 2 or mask.dtype != np.bool_ or mask.shape != (len(ids), ids.shape[1] - 1):
            raise KdcacheError(f"TextData: needs ids [N, T + 1] and a bool mask [N, T], found ids "
                               f"{list(ids.shape)} and mask {mask.dtype} {list(mask.shape)}")
        self.split, self.corpus, self.held_out, self.tokenizer = split, corpus, float(held_out), tokenizer
        self.tokenizer_path = tokenizer_path
        self._ids = ids
        self.mask = torch.from_numpy(mask)  # bool [N, T]: False where the target is padding
        self.seq_len = ids.shape[1] - 1
        self.num_classes = self.vocab_size = tokenizer.get_vocab_size()
        self.end_of_text = end_of_text_id(tokenizer)
        self.tokenizer_sha256 = tokenizer_fingerprint(tokenizer)
        self.fingerprint = text_fingerprint(ids, mask, self.tokenizer_sha256)

    @property
    def tokens(self) -> Tensor:
        """Every sequence's ids, int64 [N, seq_len + 1] on the CPU (inputs [:, :-1], targets [:, 1:])."""
        return torch.from_numpy(self._ids.astype(np.int64))

    @property
    def num_samples(self) -> int:
        """The number of sequences."""
        return len(self._ids)

    @property
    def num_tokens(self) -> int:
        """The number of real (unmasked) next-token targets."""
        return int(self.mask.sum())

    def next_tokens(self) -> Tensor:
        """int64 [N, seq_len]: each position's next token, -1 where it is padding (a token cache's labels)."""
        return self.tokens[:, 1:].masked_fill(~self.mask, -1)

    def batch(self, indices: Tensor | Sequence[int] | slice, device: torch.device | str = "cpu") -> TextBatch:
        """The sequences `indices` names: inputs and next-token targets int64 [b, seq_len], mask bool [b, seq_len],
        on the device."""
        rows = indices if isinstance(indices, slice) else torch.as_tensor(indices, dtype=torch.int64).cpu().numpy()
        ids = torch.from_numpy(self._ids[rows].astype(np.int64)).to(device)
        return ids[:, :-1], ids[:, 1:], self.mask[rows].to(device)

    def eval_batches(self, batch_size: int = EVAL_BATCH, device: torch.device | str = "cpu") -> Iterator[TextBatch]:
        """The whole split in order, batch_size sequences at a time (the last batch smaller), on the device."""
        for start in range(0, self.num_samples, batch_size):
            yield self.batch(slice(start, start + batch_size), device)

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """The text of token ids (special tokens shown), for showing samples."""
        return self.tokenizer.decode(torch.as_tensor(ids).reshape(-1).tolist(), skip_special_tokens=False)

    def describe(self) -> dict:
        """What identifies this data in cache metadata (JSON-able)."""
        return {"name": self.name, "split": self.split, "source": "tokens", "num_samples": self.num_samples,
                "seq_len": self.seq_len, "num_tokens": self.num_tokens, "vocab_size": self.vocab_size,
                "corpus": self.corpus, "tokenizer": {"sha256": self.tokenizer_sha256, "vocab_size": self.vocab_size,
                                                     "path": self.tokenizer_path},
                "fingerprint": self.fingerprint, "held_out": self.held_out}

    def listing(self) -> bytes:
        """No files: the sequences are held in memory."""
        return b""

    def listed_files(self) -> None:
        """No files for a cache's fit check to compare."""
        return None

    def policy(self, name: str, mix: dict | None = None, **options: object) -> Identity:
        """The `none` policy (one view, no parameters): a token sequence has no augmentation and no mixing."""
        if name != "none" or mix or options:
            raise KdcacheError(f"text data: takes no augmentation (asked for {name!r}"
                               f"{', mixing' if mix else ''}{', options' if options else ''}); a token sequence "
                               f"has one view, itself: use --aug none, without --mix")
        return get_policy("none")

    @property
    def labels(self) -> Tensor:
        """Refused: text has no class labels."""
        raise _images_only("labels", "its targets are the next tokens (batch(), tokens)")

    @property
    def mean(self) -> tuple[float, ...]:
        """Refused: text has no pixel normalisation."""
        raise _images_only("mean", "token ids are not normalised")

    @property
    def std(self) -> tuple[float, ...]:
        """Refused: text has no pixel normalisation."""
        raise _images_only("std", "token ids are not normalised")

    def first_images(self, count: int = 2) -> Tensor:
        """Refused: text has no images (decode(tokens[i]) shows a sequence)."""
        raise _images_only("first_images", "decode(tokens[i]) shows a sequence")

    def evaluation(self, device: torch.device, workers: int = 0, resident: bool = True,
                   batch_size: int = EVAL_BATCH) -> None:
        """Refused: text is evaluated on next tokens (eval_batches), not class labels."""
        raise _images_only("evaluation", "eval_batches() gives its inputs, targets and mask")

    def sample_view(self, policy: Identity, params: Tensor, index: int, checksums: None = None) -> Tensor:
        """Refused: a sequence has one view, itself (tokens[index])."""
        raise _images_only("sample_view", "a sequence has one view, itself: tokens[index]")


def _images_only(member: str, instead: str) -> KdcacheError:
    """The one-line refusal of a DataSource member that means images only."""
    return KdcacheError(f"text data: has no {member} (a member for images with class labels); {instead}")


def load_text(corpus: str = DEFAULT_CORPUS, split: str = "train", seq_len: int = DEFAULT_SEQ_LEN,
              tokenizer: str | Path | None = None, vocab_size: int | None = None,
              held_out: float = DEFAULT_HELD_OUT) -> TextData:
    """One split of `corpus` (load_corpus's spec) packed into sequences of seq_len (+ 1) tokens, by the tokenizer
    at `tokenizer` or, without one, a byte-level BPE of vocab_size (4096 when None) trained on the corpus."""
    if split not in SPLITS:
        raise KdcacheError(f"load_text(): unknown split {split!r}; known: {', '.join(SPLITS)}")
    _check_integer("seq_len", seq_len, 1)
    if not isinstance(held_out, (int, float)) or not 0 < held_out < 1:
        raise KdcacheError(f"text data: held_out should be a fraction between 0 and 1 (exclusive), found {held_out!r}")
    if tokenizer is not None and vocab_size is not None:
        raise KdcacheError(f"text data: vocab_size {vocab_size} sizes a tokenizer trained on the corpus, and the "
                           f"tokenizer {tokenizer} is given; drop one of them")
    documents = load_corpus(corpus)
    loaded = load_tokenizer(tokenizer) if tokenizer is not None else train_bpe(documents, vocab_size or DEFAULT_VOCAB_SIZE)
    ids, mask = pack(documents, loaded, seq_len)
    rows = split_rows(len(ids), split, held_out)
    # paths absolute: a cache names the corpus and tokenizer it was made from wherever it is read
    where = corpus if corpus == DEFAULT_CORPUS or corpus.startswith(HF_DISK) else str(Path(corpus).resolve())
    return TextData(split, ids[rows].copy(), mask[rows].copy(), loaded, where, held_out,
                    None if tokenizer is None else str(Path(tokenizer).resolve()))


def is_text(data: object) -> bool:
    """Whether a data source is a text corpus (its stages are the language models'), not images."""
    return isinstance(data, TextData)


@register_dataset
def text(root: str | Path | None, split: str, *, seq_len: int = DEFAULT_SEQ_LEN, tokenizer: str | Path | None = None,
         vocab_size: int | None = None, held_out: float = DEFAULT_HELD_OUT) -> TextData:
    """A tokenised corpus (`root`: a text file, a folder of them, hf-disk:PATH; pydoc's topics when None) packed
    into sequences of seq_len tokens; load_text's options."""
    return load_text(DEFAULT_CORPUS if root is None else str(root), split, seq_len, tokenizer, vocab_size, held_out)


def _check_integer(option: str, value: object, least: int) -> None:
    """One line unless `value` is an integer >= least."""
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise KdcacheError(f"text data: {option} should be an integer >= {least}, found {value!r}")
