"""CLIP teachers (#35, point 5): a random-weight open_clip CLIP at 32 px as a zero-shot teacher in timm's interface,
its zero-shot logits and image embedding cached per view and its class prompts' text embedding stored once,
checksummed, in both backends; an image-only student distils both (--loss clip); a user's mistakes are one line."""

import csv
import json
import shutil
import sys

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import loss_reference as ref
from cache_faults import flip_chunk_byte
from console import run_cli
from image_folders import CLASSES, write_folder
from kdcache.cache import open_cache
from kdcache.config import DumpConfig
from kdcache.data import get_policy, load_dataset, normalize
from kdcache.errors import KdcacheError
from kdcache.losses import get_loss
from kdcache.models import create_model, list_models, load_teacher, read_checkpoint, save_checkpoint
from kdcache.models.outputs import ModelOutputs, embedding_heads
from kdcache.report import describe_cache, verify_cache
from kdcache.stages import CachedTargets
from kdcache.stages.dump import dump_from_config

SMALL = "image_size=32,patch_size=8,width=64,layers=2,head_width=32,embed_dim=32,text_width=32,text_layers=1,text_heads=2"
SPEC = f"clip:ViT-B-32,{SMALL}"
SCALES = (1, 2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random CLIP's weights as open_clip's state dict in a .safetensors file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "open_clip_model.safetensors"
    save_file(create_model(SPEC, num_classes=len(CLASSES)).state_dict(), path)
    return path


def dump(folder, weights, out, **fields):
    return dump_from_config(DumpConfig(**{
        "teacher": SPEC, "checkpoint": str(weights), "dataset": "imagefolder", "data_root": str(folder),
        "preload": True, "image_size": 32, "views": 2, "scales": SCALES, "block_size": 8, "losses": ("clip",),
        "device": "cpu", "out": str(out), **fields}), show_progress=False)


@pytest.fixture(scope="module", params=["zarr", "h5"])
def cache(request, folder, weights, tmp_path_factory):
    return dump(folder, weights, tmp_path_factory.mktemp("cache") / f"c.{request.param}").path


@pytest.fixture(scope="module")
def zarr_cache(folder, weights, tmp_path_factory):
    return dump(folder, weights, tmp_path_factory.mktemp("cache") / "c.zarr").path


def test_the_teacher_gives_open_clips_embedding_and_zero_shot_logits_in_timms_interface(weights):
    model, info = load_teacher(weights, SPEC, 3, ("cat", "maple_tree", "dog"))
    assert info["zero_shot"] == {"template": "a photo of a {}.", "class_names": ["cat", "maple_tree", "dog"],
                                 "dim": 32}
    prompts = open_clip.tokenizer.SimpleTokenizer()(["a photo of a cat.", "a photo of a maple tree.",
                                                     "a photo of a dog."])
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = model.encode_text(prompts, normalize=True)
        image = model.encode_image(images, normalize=True)  # open_clip's own path through the image tower
        features = model.forward_features(images)
        torch.testing.assert_close(model.text_embedding, text, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), image)
        torch.testing.assert_close(model(images), model.logit_scale.exp() * image @ text.T)


def test_the_cache_holds_the_live_teachers_logits_and_embedding_and_the_text_towers_embedding(cache, weights, folder):
    data = load_dataset("imagefolder", str(folder), preload=True, image_size=32)
    teacher, _ = load_teacher(weights, SPEC, len(CLASSES), CLASSES)
    live = ModelOutputs(teacher, SCALES, ("regions", "embedding")).eval()
    with open_cache(cache) as opened:
        assert opened.spec.teacher["zero_shot"]["class_names"] == list(CLASSES)
        np.testing.assert_array_equal(opened.text_embedding(), teacher.text_embedding.numpy())
        targets = CachedTargets(opened, outputs=("embedding",))
        for view in range(2):
            params = torch.from_numpy(opened.aug_params(view)).long()
            x = normalize(get_policy("cifar").apply(data.images, params), data.mean, data.std)
            with torch.no_grad():
                expected = live(x)
            targets.begin_epoch(view)
            given = targets(torch.arange(len(data.labels)), x)
            for name, value in expected.items():  # stored as float16
                torch.testing.assert_close(given[name], value.half().float(), rtol=2e-3, atol=2e-3, msg=name)


def test_inspect_names_the_prompts_and_verify_reads_the_text_embeddings_checksum(cache, tmp_path):
    text = describe_cache(cache)["text"]
    assert "zero-shot text_embedding [3, 32] float32: prompts 'a photo of a {}.' for cat, dog, owl" in text
    assert verify_cache(cache, show_progress=False) == []
    damaged = tmp_path / cache.name
    (shutil.copytree if cache.is_dir() else shutil.copy)(cache, damaged)
    flip_chunk_byte(damaged, "text_embedding", (0, 0))
    problems = verify_cache(damaged, show_progress=False)
    assert [problem.array for problem in problems] == ["text_embedding"] and "checksum" in problems[0].what
    with open_cache(damaged) as opened, pytest.raises(KdcacheError, match="text_embedding.*fails its checksum"):
        opened.text_embedding()


def test_a_student_distils_the_zero_shot_logits_and_the_embedding_from_the_cache(zarr_cache, folder, tmp_path,
                                                                                  capsys):
    code, out, err = run_cli(["distill", "--cache", zarr_cache, "--data-root", folder, "--preload", "--student", "resnet8",
                              "--loss", "clip", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                              "--out", tmp_path / "runs"], capsys)
    assert code == 0, err
    assert "resnet8" in out and "clip" in out
    with open(tmp_path / "runs" / "resnet8-clip" / "metrics.csv") as file:
        row = next(csv.DictReader(file))
    assert float(row["loss_zero_shot_kd"]) > 0 and 0 < float(row["loss_embedding_cos"]) <= 2
    assert 0 <= float(row["test_acc"]) <= 1
    saved = read_checkpoint(tmp_path / "runs" / "resnet8-clip" / "regressors.pt")  # the head on the embedding
    assert saved["outputs"] == ["clip/embedding"] and saved["model"]["0.weight"].shape == (32, 64)


def test_the_dump_command_on_streamed_files_caches_the_zero_shot_teacher_and_inspect_shows_it(folder, weights,
                                                                                               tmp_path, capsys):
    out = tmp_path / "c.zarr"  # the folder's files read by workers: its class names are its folders' too
    code, _, err = run_cli(["dump-teacher", "--teacher", SPEC, "--checkpoint", weights, "--dataset", "imagefolder",
                            "--data-root", folder, "--image-size", "32", "--views", "1", "--scales", "1",
                            "--loss", "clip", "--device", "cpu", "--out", out], capsys)
    assert code == 0, err
    code, text, _ = run_cli(["inspect", out], capsys)
    assert code == 0 and "embedding [1, 15, 32]" in text and "streamed from its files" in text
    assert "zero-shot text_embedding [3, 32] float32: prompts 'a photo of a {}.' for cat, dog, owl" in text


def test_the_clip_loss_is_cross_entropy_kd_on_the_zero_shot_logits_and_the_cosine_of_the_heads_embedding():
    generator = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(4, 1, 3, generator=generator, dtype=torch.float64) for _ in range(2))
    head, embedding = (torch.randn(4, 5, generator=generator, dtype=torch.float64) for _ in range(2))
    labels = torch.tensor([0, 2, 1, 0])
    terms = get_loss("clip", embedding_weight=2.0, distill_weight=0.5).compute(
        {"regions": student, "embedding": torch.zeros(4, 7), "clip/embedding": head},
        {"regions": teacher, "embedding": embedding}, labels, 1)
    assert float(terms["zero_shot_kd"]) == pytest.approx(0.5 * ref.kd(student[:, 0].tolist(), teacher[:, 0].tolist(),
                                                                        4.0), rel=1e-10)
    assert float(terms["embedding_cos"]) == pytest.approx(0.5 * 2.0 * ref.embedding_cosine(head.tolist(),
                                                                                          embedding.tolist()), rel=1e-10)
    assert float(terms["total"]) == pytest.approx(float(F.cross_entropy(student[:, 0], labels) + terms["zero_shot_kd"]
                                                        + terms["embedding_cos"]), rel=1e-10)


def test_the_student_learns_a_head_to_the_teachers_embedding_even_of_the_same_dimension():
    heads = embedding_heads(get_loss("clip").heads, 32, {"embedding": 32, "embedding#1": 16})
    assert {name: (head.in_features, head.out_features) for name, head in heads.items()} == {
        "clip/embedding": (32, 32), "clip/embedding#1": (32, 16)}


def test_eval_gives_the_zero_shot_accuracy_on_the_test_split(folder, weights, capsys):
    code, out, err = run_cli(["eval", weights, "--model", SPEC, "--dataset", "imagefolder", "--data-root", folder,
                              "--preload", "--image-size", "32", "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    test = load_dataset("imagefolder", str(folder), "test", preload=True, image_size=32)
    teacher, _ = load_teacher(weights, SPEC, len(CLASSES), CLASSES)
    with torch.no_grad():
        right = (teacher(test.normalized()).argmax(1) == test.labels).float().mean().item()
    assert json.loads(out)["top1"] == pytest.approx(right) and json.loads(out)["samples"] == len(test.labels)


# -- one line for each mistake -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, message", [
    ("clip:ViT-Q-99", "open_clip has no model 'ViT-Q-99'"),
    ("clip:RN50", "RN50 has a timm or ResNet image tower"),
    ("clip:ViT-B-16-SigLIP", "uses a Hugging Face text model or tokenizer"),
    ("clip:hf-hub:timm/ViT-B-32", "open_clip has no model 'hf-hub:timm/ViT-B-32'"),
    (f"{SPEC},colour=3", "'colour' is no field of open_clip's CLIP config"),
    ("clip:ViT-B-32,width=wide", "value 'wide' is not a number, true or false"),
])
def test_a_spec_kdcache_cannot_build_without_a_download_is_one_line(spec, message):
    with pytest.raises(KdcacheError, match=message) as caught:
        create_model(spec, num_classes=3)
    assert "\n" not in str(caught.value)


def test_models_lists_the_architectures_kdcache_builds_as_teachers():
    listed = list_models("*", "clip")
    assert {"clip:ViT-B-32", "clip:ViT-L-14-quickgelu"} <= set(listed)
    assert not {"clip:RN50", "clip:ViT-B-16-SigLIP", "clip:coca_ViT-B-32", "clip:convnext_base"} & set(listed)


def test_without_open_clip_a_clip_spec_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip raises ImportError
    with pytest.raises(KdcacheError, match=r'pip install "kdcache\[clip\]"'):
        create_model(SPEC, num_classes=3)


def test_weights_of_another_clip_do_not_fit(weights, tmp_path):
    with pytest.raises(KdcacheError, match=r"does not fit clip:ViT-B-32,.*visual\.positional_embedding has shape "
                                           r"\[17, 64\] in the file"):
        load_teacher(weights, SPEC.replace("patch_size=8", "patch_size=4"), 3, CLASSES)


def test_a_dataset_without_class_names_and_a_clip_student_are_refused(weights, tmp_path, capsys):
    code, _, err = run_cli(["dump-teacher", "--teacher", SPEC, "--checkpoint", weights, "--dataset", "synthetic",
                            "--views", "1", "--scales", "1", "--device", "cpu", "--out", tmp_path / "c.zarr"], capsys)
    assert code == 2 and "zero-shot logits need a name per class" in err and len(err.strip().splitlines()) == 1
    model = create_model(SPEC, num_classes=3)
    with pytest.raises(KdcacheError, match="has no class prompts embedded yet"):
        model(torch.zeros(1, 3, 32, 32))


def test_views_of_another_size_than_the_towers_are_one_line(folder, weights, tmp_path, capsys):
    code, _, err = run_cli(["dump-teacher", "--teacher", SPEC, "--checkpoint", weights, "--dataset", "imagefolder",
                            "--data-root", folder, "--image-size", "48", "--views", "1", "--scales", "1",
                            "--device", "cpu", "--out", tmp_path / "c.zarr"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "takes 32x32 images (its positional embedding's), and these views are 48x48" in err


def test_class_names_from_a_file_name_the_prompts_and_a_live_teacher_with_others_is_refused(
        folder, weights, zarr_cache, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("tabby cat\nhound\nbarn owl\n", encoding="utf-8")
    written = dump(folder, weights, tmp_path / "c.zarr", class_names=str(names)).path
    teacher, _ = load_teacher(weights, SPEC, 3, ("tabby cat", "hound", "barn owl"))
    with open_cache(written) as opened:
        assert opened.spec.teacher["zero_shot"]["class_names"] == ["tabby cat", "hound", "barn owl"]
        np.testing.assert_array_equal(opened.text_embedding(), teacher.text_embedding.numpy())
    code, _, err = run_cli(["distill", "--cache", zarr_cache, "--live-teacher", weights, "--teacher", SPEC,
                            "--class-names", names, "--data-root", folder, "--preload", "--student", "resnet8",
                            "--loss", "clip", "--epochs", "1", "--device", "cpu", "--out", tmp_path / "runs"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "was written for teacher.zero_shot.class_names ['cat', 'dog', 'owl'] but this run has ['tabby cat'" in err
    names.write_text("tabby cat\n\nbarn owl\n", encoding="utf-8")
    with pytest.raises(KdcacheError, match="line 2 is empty"):
        dump(folder, weights, tmp_path / "d.zarr", class_names=str(names))


def test_a_pickled_checkpoint_loads_weights_only(tmp_path):
    torch.manual_seed(1)
    model = create_model(SPEC, num_classes=3)
    save_checkpoint(tmp_path / "clip.pt", model)
    loaded, info = load_teacher(tmp_path / "clip.pt", SPEC, 3, CLASSES)
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in model.state_dict().items())
