"""Text as a data source: corpora (file, folder, hf-disk, pydoc), tokenizers (local, trained), packing, splits,
fingerprints and the refusals, each in one line."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.data import load_dataset
from kdcache.data.text import (
    END_OF_TEXT,
    TextData,
    load_corpus,
    load_text,
    load_tokenizer,
    pack,
    split_rows,
    text_fingerprint,
    token_stream,
    tokenizer_fingerprint,
    train_bpe,
)
from kdcache.errors import KdcacheError

DOCUMENTS = [f"Document {number}: the quick brown fox jumps over {number} lazy dogs, then naps. " * (number % 3 + 1)
             for number in range(12)] + ["Ünïcödé text, with émoji 🦊 too."]
SMALL_VOCAB = 300


@pytest.fixture(scope="module")
def small_tokenizer():
    return train_bpe(DOCUMENTS, SMALL_VOCAB)


def refusal(call, *args, **kwargs) -> str:
    """The one line a KdcacheError says."""
    with pytest.raises(KdcacheError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def write_folder(root):
    (root / "b").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b" / "two.md").write_text("second, in b/")
    (root / "a.txt").write_text("first, in the root")
    (root / "c.RST").write_text("third, upper-case suffix")
    (root / "notes.py").write_text("not a text file")
    (root / ".git" / "HEAD.txt").write_text("hidden: skipped")
    return root


def test_every_corpus_form_reads_its_documents(tmp_path):
    file = tmp_path / "one.txt"
    file.write_bytes("\ufeffone document\nof two lines".encode())
    assert load_corpus(str(file)) == ["one document\nof two lines"]
    folder = write_folder(tmp_path / "folder")
    assert load_corpus(str(folder)) == ["first, in the root", "second, in b/", "third, upper-case suffix"]
    import datasets

    datasets.Dataset.from_dict({"text": ["alpha", "", "beta"], "id": [1, 2, 3]}).save_to_disk(str(tmp_path / "hf"))
    assert load_corpus(f"hf-disk:{tmp_path / 'hf'}") == ["alpha", "beta"]  # the empty document dropped
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["gamma"]})}).save_to_disk(str(tmp_path / "dd"))
    assert load_corpus(f"hf-disk:{tmp_path / 'dd'}") == ["gamma"]
    from pydoc_data.topics import topics

    pydoc = load_corpus("pydoc")
    assert pydoc == [topics[key] for key in sorted(topics)] and sum(map(len, pydoc)) > 400_000


def test_bad_corpora_are_refused_in_one_line(tmp_path):
    assert "no such file or folder" in refusal(load_corpus, str(tmp_path / "absent"))
    (tmp_path / "empty.txt").write_text("")
    assert "holds no text" in refusal(load_corpus, str(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf".encode() + "é".encode("latin-1") + b" au lait")
    message = refusal(load_corpus, str(tmp_path / "latin1.txt"))
    assert "latin1.txt: not UTF-8 text (byte offset 3" in message
    (tmp_path / "no-text").mkdir()
    (tmp_path / "no-text" / "image.png").write_bytes(b"\x89PNG")
    assert "no text files below it (looked for *.txt, *.md, *.rst)" in refusal(load_corpus, str(tmp_path / "no-text"))


def test_bad_saved_datasets_are_refused_in_one_line(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"body": ["x"], "id": [1]}).save_to_disk(str(tmp_path / "columns"))
    assert "no 'text' column (its columns: body, id)" in refusal(load_corpus, f"hf-disk:{tmp_path / 'columns'}")
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(tmp_path / "dd"))
    assert "without a train split (its splits: validation)" in refusal(load_corpus, f"hf-disk:{tmp_path / 'dd'}")
    (tmp_path / "not-a-dataset").mkdir()
    assert "not a datasets dataset" in refusal(load_corpus, f"hf-disk:{tmp_path / 'not-a-dataset'}")
    assert "no such folder" in refusal(load_corpus, f"hf-disk:{tmp_path / 'absent'}")


def test_bpe_training_is_deterministic_and_sized(small_tokenizer):
    again = train_bpe(DOCUMENTS, SMALL_VOCAB)
    assert again.to_str() == small_tokenizer.to_str()
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(small_tokenizer)
    assert small_tokenizer.get_vocab_size() == SMALL_VOCAB and small_tokenizer.token_to_id(END_OF_TEXT) is not None
    assert small_tokenizer.decode(small_tokenizer.encode(DOCUMENTS[-1]).ids) == DOCUMENTS[-1]  # byte-level: lossless
    assert "vocab_size should be an integer >= 257" in refusal(train_bpe, DOCUMENTS, 100)


def test_bpe_training_is_the_same_in_another_process(small_tokenizer):
    """The tokenizers library's hash maps are seeded per process: equal trainings in one process prove too little."""
    script = ("import sys; sys.path[:0] = sys.argv[1:]; from test_text_data import DOCUMENTS, SMALL_VOCAB; "
              "from kdcache.data.text import train_bpe; print(train_bpe(DOCUMENTS, SMALL_VOCAB).to_str())")
    path = [str(Path(__file__).parent), *sys.path]  # this test module and the kdcache this test imports
    printed = subprocess.run([sys.executable, "-c", script, *path], capture_output=True, text=True, check=True)
    assert printed.stdout.strip() == small_tokenizer.to_str()


def test_tokenizers_load_from_a_file_or_a_folder(tmp_path, small_tokenizer):
    small_tokenizer.save(str(tmp_path / "tokenizer.json"))
    for path in (tmp_path / "tokenizer.json", tmp_path):
        assert tokenizer_fingerprint(load_tokenizer(path)) == tokenizer_fingerprint(small_tokenizer)
    gpt2_style = tmp_path / "gpt2"
    gpt2_style.mkdir()
    small_tokenizer.model.save(str(gpt2_style))  # vocab.json + merges.txt, as transformers' GPT-2 folders hold
    (gpt2_style / "tokenizer_config.json").write_text('{"auto_map": {"AutoTokenizer": "evil.Tokenizer"}}')
    loaded = load_tokenizer(gpt2_style)
    assert sorted(path.name for path in gpt2_style.iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    for document in DOCUMENTS:
        assert loaded.encode(document).ids == small_tokenizer.encode(document).ids


def test_bad_tokenizers_are_refused_in_one_line(tmp_path):
    assert "no such file or folder" in refusal(load_tokenizer, tmp_path / "absent")
    assert "holds no tokenizer.json, nor vocab.json with merges.txt" in refusal(load_tokenizer, tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    assert "not a tokenizers tokenizer.json" in refusal(load_tokenizer, tmp_path)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "vocab.json").write_text('{"a": 0}')
    (tmp_path / "gpt2" / "merges.txt").write_text("a b\n")
    assert "not a BPE vocabulary" in refusal(load_tokenizer, tmp_path / "gpt2")
    (tmp_path / "gpt2" / "merges.txt").write_text("")
    assert "has no end-of-text token" in refusal(load_tokenizer, tmp_path / "gpt2")


@pytest.mark.parametrize("seq_len", [1, 7, 16])
def test_packing_makes_every_token_a_target_once(small_tokenizer, seq_len):
    stream = token_stream(DOCUMENTS, small_tokenizer)
    ids, mask = pack(DOCUMENTS, small_tokenizer, seq_len)
    assert ids.dtype == np.uint16 and ids.shape == (len(mask), seq_len + 1) and mask.shape == (len(ids), seq_len)
    tokens = torch.from_numpy(ids.astype(np.int64))
    assert torch.equal(tokens[1:, 0], tokens[:-1, -1])  # neighbours share their boundary token
    targets = tokens[:, 1:][torch.from_numpy(mask)]
    assert torch.equal(torch.cat([tokens[:1, 0], targets]), torch.from_numpy(stream))  # every target once, in order
    assert mask.sum() == len(stream) - 1 and mask[:-1].all()  # only the last sequence holds padding
    padding = tokens[:, 1:][~torch.from_numpy(mask)]
    assert bool((padding == small_tokenizer.token_to_id(END_OF_TEXT)).all())
    end_of_text = small_tokenizer.token_to_id(END_OF_TEXT)
    assert (stream == end_of_text).sum() == len(DOCUMENTS) - 1  # between documents, not after the last
    quoting = token_stream([f"a document that quotes {END_OF_TEXT} as text", "another"], small_tokenizer)
    assert (quoting == end_of_text).sum() == 1 and small_tokenizer.encode(END_OF_TEXT).ids == [end_of_text]


def test_text_data_batches_are_shifted_inputs_and_targets(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(DOCUMENTS))
    data = load_text(str(corpus), seq_len=8, vocab_size=SMALL_VOCAB)
    inputs, targets, mask = data.batch(torch.tensor([2, 0]), "cpu")
    assert inputs.dtype == targets.dtype == torch.int64 and mask.dtype == torch.bool and inputs.shape == (2, 8)
    assert torch.equal(inputs, data.tokens[[2, 0], :-1]) and torch.equal(targets[:, :-1], inputs[:, 1:])
    batches = list(data.eval_batches(3, "cpu"))
    assert sum(len(batch[0]) for batch in batches) == data.num_samples and len(batches[-1][0]) <= 3
    assert torch.equal(torch.cat([batch[2] for batch in batches]), data.mask)
    assert data.num_tokens == int(data.mask.sum()) and data.num_classes == data.vocab_size == SMALL_VOCAB
    assert data.decode(data.tokens[0]) in "".join(DOCUMENTS)


def test_splits_are_disjoint_whole_sequences(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(DOCUMENTS))
    train, test = (load_dataset("text", str(corpus), split, seq_len=8, vocab_size=SMALL_VOCAB, held_out=0.25)
                   for split in ("train", "test"))
    total = train.num_samples + test.num_samples
    assert test.num_samples == round(total * 0.25) and train.tokenizer_sha256 == test.tokenizer_sha256
    assert torch.equal(train.tokens[-1, -1], test.tokens[0, 0])  # the stream continues from train into test
    whole, _ = pack(load_corpus(str(corpus)), train.tokenizer, 8)  # the two splits tile the packed stream, once
    assert torch.equal(torch.cat([train.tokens, test.tokens]), torch.from_numpy(whole.astype(np.int64)))
    assert train.mask.all() and train.fingerprint != test.fingerprint
    assert split_rows(10, "test", 0.01) == slice(9, 10)  # at least one sequence held out
    assert "too few for a train and a held-out test split" in refusal(split_rows, 1, "train", 0.1)


def test_the_fingerprint_covers_every_token_the_mask_and_the_tokenizer(tmp_path, small_tokenizer):
    ids, mask = pack(DOCUMENTS, small_tokenizer, 8)
    base = text_fingerprint(ids, mask, tokenizer_fingerprint(small_tokenizer))
    changed = ids.copy()
    changed[-1, 3] += 1
    assert text_fingerprint(changed, mask, tokenizer_fingerprint(small_tokenizer)) != base
    unmasked = mask.copy()
    unmasked[-1, -1] = True
    assert text_fingerprint(ids, unmasked, tokenizer_fingerprint(small_tokenizer)) != base
    other = train_bpe(DOCUMENTS, SMALL_VOCAB + 10)
    assert text_fingerprint(ids, mask, tokenizer_fingerprint(other)) != base
    data = TextData("train", ids, mask, small_tokenizer, "corpus", 0.1)
    assert data.fingerprint == base


def test_describe_is_json_and_image_members_refuse(tmp_path, small_tokenizer):
    small_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "corpus.txt").write_text(" ".join(DOCUMENTS))
    data = load_text(str(tmp_path / "corpus.txt"), "test", seq_len=4, tokenizer=str(tmp_path), held_out=0.5)
    described = json.loads(json.dumps(data.describe()))
    assert described == {"name": "text", "split": "test", "source": "tokens", "num_samples": data.num_samples,
                         "seq_len": 4, "num_tokens": data.num_tokens, "vocab_size": SMALL_VOCAB,
                         "corpus": str(tmp_path / "corpus.txt"), "held_out": 0.5, "fingerprint": data.fingerprint,
                         "tokenizer": {"sha256": tokenizer_fingerprint(small_tokenizer), "vocab_size": SMALL_VOCAB,
                                       "path": str(tmp_path.resolve())}}
    assert data.policy("none").num_views == 1 and data.default_policy == "none" and not data.streamed
    assert "takes no augmentation" in refusal(data.policy, "cifar")
    assert "takes no augmentation" in refusal(data.policy, "none", {"mode": "mixup"})
    assert "text data: has no labels" in refusal(lambda: data.labels)
    assert "has no mean" in refusal(lambda: data.mean) and "has no evaluation" in refusal(data.evaluation, "cpu")
    assert data.listing() == b"" and data.listed_files() is None


def test_bad_options_are_refused_in_one_line(tmp_path, small_tokenizer):
    small_tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert "seq_len should be an integer >= 1" in refusal(load_dataset, "text", split="train", seq_len=0)
    assert "held_out should be a fraction" in refusal(load_dataset, "text", split="train", held_out=1.0)
    assert "drop one of them" in refusal(load_text, "pydoc", tokenizer=str(tmp_path), vocab_size=500)
    (tmp_path / "one.txt").write_text("x")
    assert "predict nothing" in refusal(load_text, str(tmp_path / "one.txt"), tokenizer=str(tmp_path))


def test_the_default_corpus_loads_quickly_with_a_4096_bpe():
    train, test = load_dataset("text", split="train"), load_dataset("text", split="test")
    assert train.vocab_size == 4096 and train.seq_len == 64 and train.corpus == "pydoc"
    assert train.num_samples > 1000 and test.num_samples == round((train.num_samples + test.num_samples) * 0.1)
    assert train.fingerprint == load_dataset("text", split="train").fingerprint  # the same tokens every time


def test_kdcache_imports_without_tokenizers_and_text_then_says_what_to_install(tmp_path):
    import subprocess
    import sys

    # an image-only install (the GPU image of benchmarks/gpu.sh has no tokenizers): kdcache imports, text refuses
    code = ("import sys; sys.modules['tokenizers'] = None\n"
            "import kdcache, kdcache.cli\n"
            "from kdcache.data.text import load_text\n"
            "from kdcache.errors import KdcacheError\n"
            "try:\n    load_text('pydoc')\nexcept KdcacheError as error:\n    print(error)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "text data needs the tokenizers package" in done.stdout and "pip install tokenizers" in done.stdout
