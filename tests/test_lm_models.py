"""Language-model specs (issue 33, point 2): `gpt:layers=..,width=..,heads=..` builds a small GPT for students trained
from scratch, `hf:PATH` loads a local Hugging Face causal LM; both speak timm's interface over tokens, round-trip
through kdcache's checkpoints, and a folder's config never makes kdcache run code."""

import json
import math
import sys

import pytest
import torch
from safetensors.torch import save_file

from console import run_cli
from kdcache.errors import KdcacheError
from kdcache.models import (
    GPT,
    count_parameters,
    create_model,
    list_models,
    load_checkpoint,
    load_teacher,
    save_checkpoint,
)
from kdcache.models.lm import GPTShape, hf_weight_files, parse_gpt_spec
from kdcache.models.specs import require_spec_from_file

transformers = pytest.importorskip("transformers")

TINY = "gpt:layers=2,width=32,heads=4,context=16"
VOCAB = 100


def tokens(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- gpt: --------------------------------------------------------------------------------------------------------------
def test_a_gpt_spec_builds_a_gpt_of_that_shape_with_the_class_count_as_vocabulary():
    model = create_model(TINY, num_classes=VOCAB)
    assert isinstance(model, GPT) and model.arch == TINY
    assert (model.num_classes, model.num_features, model.context) == (VOCAB, 32, 16)
    assert len(model.blocks) == 2 and model.blocks[0].attention.heads == 4
    x = tokens()
    hidden = model.forward_features(x)
    assert hidden.shape == (2, 8, 32) and model(x).shape == (2, 8, VOCAB)
    assert torch.equal(model.forward_head(hidden), model(x))
    assert model.forward_head(hidden, pre_logits=True) is hidden


def test_keys_left_out_take_the_stated_defaults():
    assert parse_gpt_spec("") == GPTShape(layers=6, width=384, heads=6, context=1024, dropout=0.0)
    assert parse_gpt_spec("width=64,heads=2,dropout=0.1") == GPTShape(6, 64, 2, 1024, 0.1)


def test_a_position_sees_only_itself_and_the_positions_before_it():
    model = create_model(TINY, num_classes=VOCAB).eval()
    x = tokens(1, 10)
    changed = x.clone()
    changed[0, 6] = (x[0, 6] + 1) % VOCAB
    before, after = model(x), model(changed)
    assert torch.allclose(before[:, :6], after[:, :6], atol=1e-6)
    assert not torch.allclose(before[:, 6:], after[:, 6:])


def test_the_output_layer_is_the_input_embedding():
    model = create_model(TINY, num_classes=VOCAB)
    assert torch.equal(model.forward_head(torch.eye(32)), model.token_embedding.weight.T)
    # one tensor, so the state dict (and safetensors, which refuses shared tensors) holds it once
    assert [name for name in model.state_dict() if "embedding" in name] == ["token_embedding.weight",
                                                                            "position_embedding.weight"]
    assert count_parameters(model) == sum(tensor.numel() for tensor in model.state_dict().values())


def test_a_gpt_learns_a_sequence():
    torch.manual_seed(0)
    model = create_model(TINY, num_classes=VOCAB)
    x = tokens(4, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(VOCAB), rel=0.05) and losses[-1] < 0.3 * losses[0]


def test_the_initialisation_is_gpt2s():
    torch.manual_seed(0)
    model = create_model("gpt:layers=8,width=128,heads=4", num_classes=VOCAB)
    block = model.blocks[0]
    assert block.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for projection in (block.attention.proj, block.mlp[2]):  # the residual branches' last layers: 1/sqrt(2 * 8)
        assert projection.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert not block.attention.qkv.bias.any() and torch.equal(block.norm1.weight, torch.ones(128))


def test_gpt2_small_shape_has_gpt2_small_parameter_count():
    with torch.device("meta"):
        model = create_model("gpt:layers=12,width=768,heads=12", num_classes=50257)
    assert count_parameters(model) == 124_439_808  # GPT-2 small's, its tied head counted once


def test_a_sequence_longer_than_the_context_is_one_line():
    model = create_model(TINY, num_classes=VOCAB)
    with pytest.raises(KdcacheError) as refused:
        model(tokens(1, 17))
    assert str(refused.value) == ("GPT: a sequence of 17 tokens is longer than its context of 16 positions; cut the "
                                  "text into sequences of at most 16 tokens")


@pytest.mark.parametrize("body, problem", [
    ("layers=2,depth=3", "unknown key 'depth'; known: layers, width, heads, context, dropout"),
    ("layers=two", "layers should be a positive integer, found 'two'"),
    ("layers=2.0", "layers should be a positive integer, found '2.0'"),
    ("heads=0", "heads should be a positive integer, found '0'"),
    ("width=100,heads=3", "width 100 is not divisible by heads 3: each head takes width/heads channels"),
    ("layers=2,layers=3", "layers is given twice"),
    ("layers=2,", "expected key=value, found ''"),
    ("dropout=1.5", "dropout should be a probability in [0, 1), found '1.5'"),
])
def test_a_malformed_gpt_spec_is_one_line_naming_the_form(body, problem):
    with pytest.raises(KdcacheError) as refused:
        create_model(f"gpt:{body}", num_classes=VOCAB)
    assert str(refused.value) == (
        f"model spec 'gpt:{body}': {problem}; a GPT is named as gpt:layers=L,width=D,heads=H[,context=T][,dropout=P] "
        f"(keys left out take layers=6, width=384, heads=6, context=1024, dropout=0; the vocabulary is the model's "
        f"class count)")


def test_a_gpt_needs_a_vocabulary():
    with pytest.raises(KdcacheError, match=r"num_classes=None\): a GPT model is built for a class count"):
        create_model(TINY, num_classes=None)


def test_a_gpt_round_trips_through_kdcache_checkpoints_and_run_folders(tmp_path):
    model = create_model(TINY, num_classes=VOCAB)
    save_checkpoint(tmp_path / "run" / "model.pt", model)
    (tmp_path / "run" / "model.json").write_text(json.dumps({"arch": TINY, "num_classes": VOCAB}))
    teacher, info = load_teacher(tmp_path / "run", None, VOCAB)  # the spec read from model.json is data
    assert info["arch"] == TINY and torch.equal(teacher(tokens()), model.eval()(tokens()))
    save_file(model.state_dict(), tmp_path / "model.safetensors")  # no shared tensor for safetensors to refuse
    loaded = load_checkpoint(tmp_path / "model.safetensors", create_model(TINY, num_classes=VOCAB))
    assert torch.equal(loaded.eval()(tokens()), model(tokens()))


def test_gpt_and_hf_specs_are_taken_from_a_file_python_ones_are_not():
    assert require_spec_from_file(TINY, "model.json") == TINY
    assert require_spec_from_file("hf:/models/gpt2", "model.json") == "hf:/models/gpt2"
    with pytest.raises(KdcacheError, match="a python: spec imports and runs the code it names"):
        require_spec_from_file("python:os:getpid", "model.json")


def test_kdcache_models_lists_gpt_shapes_with_their_parameter_counts(capsys):
    assert list_models("layers=2*", source="gpt") == ["gpt:layers=2,width=128,heads=2"]
    code, out, _ = run_cli(["models", "--source", "gpt"], capsys)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["model", "params", "(vocab", "50257)"]
    assert lines[4].split() == ["gpt:layers=12,width=768,heads=12", "124.44", "M"]
    assert lines[-1].startswith("(example shapes; a GPT is named as gpt:layers=L,width=D,heads=H")


def test_kdcache_models_names_no_list_of_hf_folders(capsys):
    with pytest.raises(KdcacheError, match="an hf:PATH spec names a local model folder; there is no list"):
        list_models(source="hf")


# -- hf: ---------------------------------------------------------------------------------------------------------------
def tiny_configs() -> dict:
    return {
        "gpt2": transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                                        bos_token_id=0, eos_token_id=0),
        "llama": transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                          num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                                          max_position_embeddings=64, bos_token_id=0, eos_token_id=0),
    }


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """A tiny random GPT-2 and Llama, each saved with save_pretrained as safetensors, with the models themselves."""
    folders = {}
    for name, config in tiny_configs().items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder, safe_serialization=True)
        folders[name] = (folder, model)
    return folders


@pytest.fixture
def hf_folder(hf_folders, tmp_path):
    """A copy of the tiny GPT-2's folder that a test may damage."""
    folder = tmp_path / "gpt2"
    folder.mkdir()
    for file in hf_folders["gpt2"][0].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_an_hf_model_gives_its_own_logits_through_features_and_head(hf_folders, name):
    folder, reference = hf_folders[name]
    model = create_model(f"hf:{folder}", num_classes=VOCAB).eval()
    x = tokens()
    with torch.no_grad():
        expected = reference(input_ids=x).logits
        hidden = model.forward_features(x)
        assert hidden.shape == (2, 8, 32)
        assert torch.allclose(model.forward_head(hidden), expected, atol=1e-5)
        assert torch.allclose(model(x), expected, atol=1e-5)
    assert model.forward_head(hidden, pre_logits=True) is hidden
    assert (model.num_classes, model.num_features, model.context) == (VOCAB, 32, 64)
    assert model.arch == f"hf:{folder}" and isinstance(model, type(reference))
    assert list(model.state_dict()) == list(reference.state_dict())  # transformers' names: its files load strictly


def test_an_hf_model_takes_its_own_vocabulary_when_none_is_asked_for(hf_folders):
    assert create_model(f"hf:{hf_folders['llama'][0]}", num_classes=None).num_classes == VOCAB


def test_an_hf_model_of_another_vocabulary_is_one_line(hf_folders):
    folder = hf_folders["gpt2"][0]
    with pytest.raises(KdcacheError) as refused:
        create_model(f"hf:{folder}", num_classes=50)
    assert str(refused.value) == (f"model spec 'hf:{folder}': its vocabulary is 100 tokens (config.json's vocab_size) "
                                  f"but 50 were asked for; a model and its data share one tokenizer: tokenise the "
                                  f"text with this model's")


def test_an_hf_sequence_longer_than_its_positions_is_one_line(hf_folders):
    folder = hf_folders["gpt2"][0]
    with pytest.raises(KdcacheError, match=f"^hf:{folder}: a sequence of 65 tokens is longer than its context of 64"):
        create_model(f"hf:{folder}", num_classes=VOCAB)(tokens(1, 65))


def test_a_config_naming_its_own_code_is_refused_before_transformers_sees_the_folder(hf_folder, monkeypatch):
    config = json.loads((hf_folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (hf_folder / "config.json").write_text(json.dumps(config))
    (hf_folder / "modeling_evil.py").write_text(f"open({str(hf_folder / 'ran')!r}, 'w')\n")
    monkeypatch.setitem(sys.modules, "transformers", None)  # any import of transformers would fail
    with pytest.raises(KdcacheError) as refused:
        create_model(f"hf:{hf_folder}", num_classes=VOCAB)
    assert str(refused.value) == (f"model spec 'hf:{hf_folder}': its config.json has an auto_map, naming model code "
                                  f"shipped with the weights, and kdcache never runs a model folder's code "
                                  f"(trust_remote_code stays off); use a model whose architecture transformers has "
                                  f"built in")
    assert not (hf_folder / "ran").exists()


def edit_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("damage, problem", [
    (lambda folder: edit_config(folder, architectures=["BertForMaskedLM"]),
     "its config.json names the architecture BertForMaskedLM, which is no causal language model (a ...ForCausalLM or "
     "...LMHeadModel); distil from a causal LM"),
    (lambda folder: edit_config(folder, architectures=None, model_type="my_own_lm"),
     "its config.json has model_type 'my_own_lm', which is no causal language model transformers"),
    (lambda folder: (folder / "config.json").write_text("{not json"), "config.json is not valid JSON"),
    (lambda folder: (folder / "config.json").unlink(), "has no config.json; expected hf:PATH, a local folder"),
    (lambda folder: (folder / "model.safetensors").rename(folder / "pytorch_model.bin"),
     "has only pytorch_model.bin, a pickle, which can run code when loaded; kdcache loads model.safetensors (or its "
     "shards with model.safetensors.index.json): convert the weights to safetensors where you trust them"),
    (lambda folder: (folder / "model.safetensors").unlink(), "has no weights; kdcache loads model.safetensors"),
])
def test_a_folder_that_is_no_safe_causal_lm_is_one_line(hf_folder, damage, problem):
    damage(hf_folder)
    with pytest.raises(KdcacheError) as refused:
        create_model(f"hf:{hf_folder}", num_classes=VOCAB)
    message = str(refused.value)
    assert message.startswith(f"model spec 'hf:{hf_folder}': ") and problem in message and "\n" not in message


def test_a_missing_folder_says_how_to_fetch_one(tmp_path):
    with pytest.raises(KdcacheError) as refused:
        create_model(f"hf:{tmp_path / 'gpt2'}", num_classes=VOCAB)
    assert str(refused.value) == (f"model spec 'hf:{tmp_path / 'gpt2'}': {tmp_path / 'gpt2'} is not a folder; expected "
                                  f"hf:PATH, a local folder holding a Hugging Face causal LM (config.json and "
                                  f"model.safetensors); kdcache downloads nothing: fetch it once with `hf download "
                                  f"NAME --local-dir PATH`")


def test_sharded_safetensors_load_and_a_missing_shard_is_one_line(hf_folders, tmp_path):
    folder, reference = hf_folders["llama"]
    reference.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    weights = hf_weight_files(str(tmp_path / "sharded"))
    assert weights[0].name == "config.json" and len(weights) > 2
    model = create_model(f"hf:{tmp_path / 'sharded'}", num_classes=VOCAB).eval()
    with torch.no_grad():
        assert torch.allclose(model(tokens()), reference(input_ids=tokens()).logits, atol=1e-5)
    weights[1].unlink()
    with pytest.raises(KdcacheError, match=f"lacks {weights[1].name} and 0 more of the shards its index names"):
        create_model(f"hf:{tmp_path / 'sharded'}", num_classes=VOCAB)


def test_an_hf_teacher_needs_no_checkpoint_and_one_given_overrides_its_weights(hf_folders, tmp_path):
    folder, reference = hf_folders["gpt2"]
    teacher, info = load_teacher(None, f"hf:{folder}", VOCAB)
    assert info["checkpoint"] == str(folder) and len(info["checkpoint_sha256"]) == 64
    assert load_teacher(None, f"hf:{folder}", VOCAB)[1] == info  # the folder's digest names the weights
    with torch.no_grad():
        assert torch.allclose(teacher(tokens()), reference(input_ids=tokens()).logits, atol=1e-5)
        for parameter in teacher.parameters():
            parameter.mul_(0.5)
    save_checkpoint(tmp_path / "run" / "model.pt", teacher)  # GPT-2's tied head and embedding: one shared tensor
    (tmp_path / "run" / "model.json").write_text(json.dumps({"arch": f"hf:{folder}"}))
    tuned, tuned_info = load_teacher(tmp_path / "run", None, VOCAB)
    assert tuned_info["arch"] == f"hf:{folder}" and tuned_info["checkpoint"] == str(tmp_path / "run" / "model.pt")
    with torch.no_grad():
        assert torch.equal(tuned(tokens()), teacher(tokens()))
    assert tuned.get_output_embeddings().weight is tuned.get_input_embeddings().weight  # still tied


def test_an_hf_folders_own_safetensors_load_as_a_checkpoint(hf_folders):
    folder, reference = hf_folders["llama"]
    model = load_checkpoint(folder / "model.safetensors", create_model(f"hf:{folder}", num_classes=VOCAB))
    assert torch.equal(model.state_dict()["lm_head.weight"], reference.state_dict()["lm_head.weight"])


def test_a_file_that_stores_a_tied_weight_once_loads(hf_folders):
    folder, reference = hf_folders["gpt2"]  # save_pretrained keeps GPT-2's tied lm_head.weight as wte's only
    model = create_model(f"hf:{folder}", num_classes=VOCAB)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    load_checkpoint(folder / "model.safetensors", model)
    assert torch.equal(model.get_output_embeddings().weight, reference.get_output_embeddings().weight)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_an_hf_spec_without_transformers_is_one_line(hf_folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(KdcacheError) as refused:
        create_model(f"hf:{hf_folders['gpt2'][0]}", num_classes=VOCAB)
    assert str(refused.value) == ('hf: models named hf:PATH need transformers; install it with pip install '
                                  '"kdcache[lm]" (or pip install transformers)')
