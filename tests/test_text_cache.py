"""Token caches (issue 33): a causal LM teacher's top-k next-token distributions, dumped once over a text source,
equal the live teacher's on the same sequences, resume to the arrays of an uninterrupted dump, verify, and are
refused for another tokenizer or corpus, naming which; students train from them through the CLI."""

import json
import math

import numpy as np
import pytest
import torch

from kdcache.cache import open_cache, verify
from kdcache.errors import KdcacheError
from kdcache.data.text import load_text, train_bpe, load_corpus
from kdcache.models import create_model
from kdcache.report import describe_cache
from kdcache.stages.text_dump import dump_tokens
from kdcache.stages.text_train import cache_text
from cache_faults import disk_full_at_write
from console import run_cli

TEACHER = "gpt:layers=1,width=32,heads=2"
VOCAB, SEQ_LEN, K = 300, 16, 8
WORDS = "the cache holds what the teacher said once so that many students learn from it again".split()
SUFFIX = {"zarr": ".zarr", "hdf5": ".h5"}


def _corpus(path, seed):
    """A corpus of 40 short documents of words drawn with a seed: enough text for a 300-token BPE."""
    generator = np.random.default_rng(seed)
    documents = [" ".join(generator.choice(WORDS, size=30)) for _ in range(40)]
    path.write_text("\n\n".join(documents))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("text") / "corpus.txt", 0)


@pytest.fixture(scope="module")
def text(corpus):
    return load_text(str(corpus), "train", seq_len=SEQ_LEN, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def teacher(text):
    torch.manual_seed(0)
    model = create_model(TEACHER, num_classes=text.num_classes).eval()
    return model, {"arch": TEACHER, "num_classes": text.num_classes, "checkpoint": "random",
                   "checkpoint_sha256": "0" * 64}


def _dump(teacher, text, out, **options):
    options = {"topk": K, "batch_size": 8, "block_size": 16, "device": "cpu", "show_progress": False, **options}
    return dump_tokens(*teacher, text, out, **options)


@pytest.mark.parametrize("width, tolerance", [("fp16", 2e-3), ("q8", 1 / 32 + 1e-3)])
def test_cached_targets_equal_the_live_teachers_top_k_on_the_same_sequences(teacher, text, tmp_path, width, tolerance):
    result = _dump(teacher, text, tmp_path / "c.zarr", width=width)
    with torch.no_grad():
        logprobs = torch.log_softmax(teacher[0](text.tokens[:, :-1]).float(), -1)
    top = logprobs.topk(K, dim=-1)
    with open_cache(tmp_path / "c.zarr") as cache:
        ids, stored = cache.spec.codec.decode(cache.view_arrays(0))
        assert cache.spec.kind == "tokens" and cache.labels().shape == (text.num_samples, SEQ_LEN)
        np.testing.assert_array_equal(cache.labels(), text.next_tokens().numpy())
        assert verify(cache) == []
    np.testing.assert_array_equal(ids, top.indices.numpy())
    np.testing.assert_allclose(stored, top.values.numpy(), atol=tolerance, rtol=0)
    # the teacher's next-token accuracy the dump recorded is the live teacher's over the unmasked positions
    right = ((logprobs.argmax(-1) == text.tokens[:, 1:]) & text.mask).sum() / text.mask.sum()
    assert result.view_accuracy == [pytest.approx(float(right))]


@pytest.mark.parametrize("fmt", SUFFIX)
def test_a_token_dump_interrupted_mid_way_resumes_to_the_arrays_of_an_uninterrupted_one(teacher, text, tmp_path, fmt,
                                                                                          monkeypatch):
    whole, broken = tmp_path / f"whole{SUFFIX[fmt]}", tmp_path / f"broken{SUFFIX[fmt]}"
    _dump(teacher, text, whole)
    with disk_full_at_write(monkeypatch, "token_ids", 2), pytest.raises(KdcacheError, match=r"could not write view 0, block 1 .*rerun the same command"):
        _dump(teacher, text, broken)
    result = _dump(teacher, text, broken)
    assert result.resumed and result.images == text.num_samples - 16
    with open_cache(whole) as a, open_cache(broken) as b:
        assert a.spec.data_arrays == b.spec.data_arrays
        for name in (*a.spec.data_arrays, "labels", "progress"):
            np.testing.assert_array_equal(a.store.read(name), b.store.read(name))
        assert a.metadata["view_accuracy"] == b.metadata["view_accuracy"]


def test_a_token_cache_is_refused_for_another_corpus_or_tokenizer_naming_which(teacher, text, corpus, tmp_path):
    _dump(teacher, text, tmp_path / "c.zarr")
    other = _corpus(tmp_path / "other.txt", 1)
    with open_cache(tmp_path / "c.zarr") as cache:
        data, test = cache_text(cache.spec, None, None)  # the cache's own corpus, its BPE trained again: accepted
        assert data.fingerprint == text.fingerprint and test.split == "test"
        with pytest.raises(KdcacheError, match=r"^corpus: the cache's tokenizer is a BPE trained on its corpus"):
            cache_text(cache.spec, str(other), None)
        own = train_bpe(load_corpus(str(other)), VOCAB)  # a tokenizer file that is not the cache's
        own.save(str(tmp_path / "tokenizer.json"))
        with pytest.raises(KdcacheError, match=r"^tokenizer: the cache was made with a BPE trained on its corpus, "
                                               r"this run tokenises with .*tokenizer.json"):
            cache_text(cache.spec, None, str(tmp_path / "tokenizer.json"))
    # the same text with a few words changed, under the cache's own tokenizer: the token ids differ
    text.tokenizer.save(str(tmp_path / "cache-tokenizer.json"))
    with_tokenizer = tmp_path / "t.zarr"
    data = load_text(str(corpus), "train", seq_len=SEQ_LEN, tokenizer=str(tmp_path / "cache-tokenizer.json"))
    _dump(teacher, data, with_tokenizer)
    edited = tmp_path / "edited.txt"
    edited.write_text(corpus.read_text().replace("teacher", "student", 3))
    with open_cache(with_tokenizer) as cache, pytest.raises(KdcacheError, match=r"^corpus: the cache holds .* the text "
                                                                                 r"differs; pass the corpus"):
        cache_text(cache.spec, str(edited), None)


def test_inspect_and_verify_understand_a_token_cache(teacher, text, tmp_path):
    _dump(teacher, text, tmp_path / "c.zarr", width="q8")
    report = describe_cache(tmp_path / "c.zarr")
    assert "a token cache" in report["text"] and f"top {K} token ids" in report["text"]
    assert report["shape"]["token_ids"][:3] == [1, text.num_samples, SEQ_LEN]
    with open_cache(tmp_path / "c.zarr") as cache:
        bytes_per_token = cache.spec.codec.bytes_per_token()
    assert f"{bytes_per_token} bytes per position" in report["text"]
    # a block whose recorded count no longer matches its stored ids is found by verify
    with open_cache(tmp_path / "c.zarr") as cache:
        progress = cache.store.read("progress")
    from kdcache.cache.backends import open_store
    with open_store(tmp_path / "c.zarr", read_only=False) as store:
        store.write("progress", (0, 1), np.int64(progress[0, 1] + 1))
    with open_cache(tmp_path / "c.zarr") as cache:
        problems = verify(cache)
    assert len(problems) == 1 and "progress records" in str(problems[0]) and "block 1" in str(problems[0])


def test_the_commands_train_a_text_teacher_dump_it_and_distil_students_from_its_cache(corpus, tmp_path, capsys):
    common = ["--dataset", "text", "--data-root", corpus, "--seq-len", SEQ_LEN, "--device", "cpu"]
    training = ["--epochs", 1, "--batch-size", 8, "--optimizer", "adamw", "--lr", 3e-3]
    code, out, err = run_cli(["train-teacher", "--model", TEACHER, "--vocab-size", VOCAB, *common, *training,
                              "--out", tmp_path / "teacher"], capsys)
    assert code == 0, err
    assert "held-out perplexity" in out and (tmp_path / "teacher" / "tokenizer.json").is_file()
    code, out, err = run_cli(["dump-teacher", "--checkpoint", tmp_path / "teacher", *common, "--topk", K,
                              "--out", tmp_path / "c.zarr"], capsys)
    assert code == 0, err
    sidecar = json.loads((tmp_path / "teacher" / "model.json").read_text())
    with open_cache(tmp_path / "c.zarr") as cache:  # the teacher's own tokenizer, from its run folder
        assert cache.spec.dataset["tokenizer"]["sha256"] == sidecar["dataset"]["tokenizer"]["sha256"]
    code, out, err = run_cli(["distill", "--cache", tmp_path / "c.zarr", "--student", "gpt:layers=1,width=16,heads=2",
                              "--loss", "ce", "--loss", "token-kl", *training, "--device", "cpu",
                              "--out", tmp_path / "students"], capsys)
    assert code == 0, err
    assert "held-out ppl" in out
    rows = (tmp_path / "students" / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("run,model,loss,test_ppl") and len(rows) == 3
    for row in rows[1:]:
        record = json.loads((tmp_path / "students" / row.split(",")[0] / "model.json").read_text())
        assert 1 < record["test_ppl"] < 10 * VOCAB and record["loss"] in ("ce", "token-kl")
    code, out, err = run_cli(["eval", tmp_path / "students" / rows[2].split(",")[0], "--json"], capsys)
    assert code == 0, err  # eval reads the run's own text and tokenizer from its model.json
    found = json.loads(out)
    assert found["dataset"] == "text" and found["samples"] == load_text(str(corpus), "test", SEQ_LEN,
                                                                         vocab_size=VOCAB).num_tokens
    assert found["loss"] == pytest.approx(math.log(record["test_ppl"]), rel=1e-6)
    code, out, err = run_cli(["dump-teacher", "--checkpoint", tmp_path / "teacher", *common, "--views", 2,
                              "--out", tmp_path / "d.zarr"], capsys)
    assert code == 2 and "--views are for images" in err and not (tmp_path / "d.zarr").exists()
    code, out, err = run_cli(["dump-teacher", "--checkpoint", tmp_path / "teacher", *common, "--aug", "cifar",
                              "--scales", "1,2", "--out", tmp_path / "d.zarr"], capsys)
    assert code == 2 and "--aug, --scales are for images" in err  # each named by its flag
    code, out, err = run_cli(["distill", "--cache", tmp_path / "c.zarr", "--student", TEACHER, "--loss", "token-kl",
                              "--aug", "cifar", "--label-smoothing", 0.1, "--out", tmp_path / "more"], capsys)
    assert code == 2 and "trains without --aug, --label-smoothing:" in err and not (tmp_path / "more").exists()


def test_distilbert_trains_from_cached_hidden_states_and_is_refused_without_them(teacher, text, tmp_path):
    from kdcache.config import DistillConfig
    from kdcache.stages.text_train import distill_text

    _dump(teacher, text, tmp_path / "plain.zarr")
    _dump(teacher, text, tmp_path / "hidden.zarr", hidden=True)
    with torch.no_grad():
        live = teacher[0].forward_features(text.tokens[:, :-1])
    test = load_text(str(text.corpus), "test", seq_len=SEQ_LEN, vocab_size=VOCAB)
    config = DistillConfig(students=("gpt:layers=1,width=32,heads=2",), losses=("distilbert",), epochs=1,
                           batch_size=8, optimizer="adamw", lr=3e-3, out=str(tmp_path / "runs"))
    with open_cache(tmp_path / "hidden.zarr") as cache:
        assert cache.spec.outputs == {"hidden": [SEQ_LEN, 32]} and verify(cache) == []
        torch.testing.assert_close(torch.from_numpy(cache.view_arrays(0)["hidden"]).float(), live, rtol=2e-3,
                                   atol=2e-3)
        runs = distill_text(config, cache, text, test, torch.device("cpu"), show_progress=False)
    assert [run.loss for run in runs] == ["distilbert"] and 1 < runs[0].test_ppl < 10 * VOCAB
    with open_cache(tmp_path / "plain.zarr") as cache, pytest.raises(KdcacheError, match="dump the teacher with "
                                                                                         "--outputs hidden"):
        distill_text(config, cache, text, test, torch.device("cpu"), show_progress=False)
    narrow = DistillConfig(students=("gpt:layers=1,width=16,heads=2",), losses=("distilbert",), epochs=1,
                           out=str(tmp_path / "runs"))
    with open_cache(tmp_path / "hidden.zarr") as cache, pytest.raises(KdcacheError, match="has 16 features where "
                                                                                          "the teacher has 32"):
        distill_text(narrow, cache, text, test, torch.device("cpu"), show_progress=False)


def test_dump_teachers_token_defaults_are_the_codecs_and_its_help_says_them():
    from kdcache.cache.token_codec import DEFAULT_K, DEFAULT_WIDTH
    from kdcache.config import DumpConfig, option_fields

    fields = {field.name: field for field in option_fields(DumpConfig)}
    assert DumpConfig().token_width == DEFAULT_WIDTH
    assert f"(0: {DEFAULT_K}," in fields["topk"].metadata["help"]
    assert f"(default {DEFAULT_K})" in fields["token_width"].metadata["help"]


def test_the_text_quickstart_trains_dumps_distils_and_prints_its_table(tmp_path, monkeypatch, capsys):
    import kdcache.quickstart_text as quickstart

    # the quickstart's own stages at the smallest sizes (its full run is measured in benchmarks/RESULTS.md)
    monkeypatch.setattr(quickstart, "TEXT_TEACHER", "gpt:layers=1,width=32,heads=2")
    monkeypatch.setattr(quickstart, "TEXT_STUDENT", "gpt:layers=1,width=16,heads=2")
    monkeypatch.setattr(quickstart, "TEXT_TEACHER_EPOCHS", 1)
    monkeypatch.setattr(quickstart, "TEXT_STUDENT_EPOCHS", 1)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["quickstart", "--text", "--device", "cpu"], capsys)
    assert code == 0, err
    table = out[out.index("kdcache quickstart --text"):]
    assert "held-out perplexity" in table and "student, token-kl" in table and "vs ce" in table
    assert (tmp_path / "runs/quickstart-text/teacher/tokenizer.json").is_file()
    with open_cache(tmp_path / "caches/quickstart-text.zarr") as cache:
        assert cache.spec.kind == "tokens" and cache.is_complete()
    rows = (tmp_path / "runs/quickstart-text/students/summary.csv").read_text().splitlines()
    assert len(rows) == 3


def test_an_image_model_or_loss_on_text_is_refused_in_one_line_before_any_folder(teacher, text, tmp_path):
    from kdcache.config import DistillConfig
    from kdcache.stages.text_train import distill_text

    _dump(teacher, text, tmp_path / "c.zarr")
    test = load_text(str(text.corpus), "test", seq_len=SEQ_LEN, vocab_size=VOCAB)
    with open_cache(tmp_path / "c.zarr") as cache:
        for students, losses, message in [(("resnet8x4",), ("ce",), "--student resnet8x4: text trains a language "
                                                                    "model, and resnet8x4 is an image model"),
                                          ((TEACHER,), ("sdd-lskd",), "--loss sdd-lskd: a language model trains with "
                                                                      "ce, token-kl")]:
            config = DistillConfig(students=students, losses=losses, epochs=1, out=str(tmp_path / "runs"))
            with pytest.raises(KdcacheError, match=message):
                distill_text(config, cache, text, test, torch.device("cpu"), show_progress=False)
    assert not (tmp_path / "runs").exists()


def test_a_hugging_face_teacher_dumps_the_top_k_of_its_own_logits(text, tmp_path):
    import transformers

    from kdcache.models import load_teacher

    config = transformers.GPT2Config(vocab_size=text.num_classes, n_positions=SEQ_LEN, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    model, info = load_teacher(None, f"hf:{tmp_path / 'gpt2'}", text.num_classes)  # its folder's weights
    _dump((model, info), text, tmp_path / "c.zarr", width="fp16")
    with open_cache(tmp_path / "c.zarr") as cache:
        assert cache.spec.teacher["arch"] == f"hf:{tmp_path / 'gpt2'}" and verify(cache) == []
        ids, stored = cache.spec.codec.decode(cache.view_arrays(0))
    with torch.no_grad():
        top = torch.log_softmax(model(text.tokens[:, :-1]).float(), -1).topk(K, dim=-1)
    np.testing.assert_array_equal(ids, top.indices.numpy())
    np.testing.assert_allclose(stored, top.values.numpy(), atol=2e-3, rtol=0)


def test_a_sharded_token_dump_equals_a_single_process_one(corpus, tmp_path):
    from test_scale_out import ENV, kdcache

    from kdcache.config import TeacherConfig
    from kdcache.stages import train_teacher

    train_teacher(TeacherConfig(model=TEACHER, dataset="text", data_root=str(corpus), seq_len=SEQ_LEN,
                                vocab_size=VOCAB, epochs=1, batch_size=8, optimizer="adamw", lr=3e-3,
                                out=str(tmp_path / "teacher"), device="cpu"), show_progress=False)
    args = ["dump-teacher", "--dataset", "text", "--data-root", corpus, "--seq-len", SEQ_LEN, "--checkpoint",
            tmp_path / "teacher", "--block-size", 16, "--device", "cpu"]
    assert ENV["OMP_NUM_THREADS"] == "1"  # both dumps at one thread a process: the same float32 sums
    kdcache(tmp_path, *args, "--out", "one.zarr")
    printed = kdcache(tmp_path, *args, "--out", "sharded.zarr", processes=2)
    assert printed.count("wrote sharded.zarr") == 1
    with open_cache(tmp_path / "sharded.zarr") as sharded, open_cache(tmp_path / "one.zarr") as one:
        assert sharded.spec.kind == "tokens" and sharded.spec.num_blocks > 2 and verify(sharded) == []
        for name in (*one.spec.data_arrays, "labels", "progress"):
            np.testing.assert_array_equal(sharded.store.read(name), one.store.read(name), err_msg=name)
