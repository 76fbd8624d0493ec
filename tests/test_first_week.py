"""A newcomer's first week (issue 32): defaults that fit the data, listings that say what they promise, messages that
name the flag or function the user actually has."""

import re
from pathlib import Path

import pytest

from console import run_cli
from image_folders import write_folder
from small_runs import saved_teacher
from kdcache.cache import open_cache
from kdcache.cli import cli
from kdcache.data import load_dataset, policy_for
from kdcache.errors import KdcacheError
from kdcache.losses import get_loss

REPO = Path(__file__).resolve().parents[1]


def test_the_default_policy_is_the_one_the_source_can_take(tmp_path):
    folder = write_folder(tmp_path / "pets")
    streamed = load_dataset("imagefolder", folder, "train", image_size=32)
    in_memory = load_dataset("imagefolder", folder, "train", image_size=32, preload=True)
    assert policy_for(streamed, None).describe()["name"] == "imagenet"
    assert policy_for(in_memory, None).describe()["name"] == "cifar"
    with pytest.raises(KdcacheError, match="--aug cifar: works on images held in memory"):
        policy_for(streamed, "cifar")  # named, it is still refused with its way out


def test_dump_teacher_on_a_streamed_folder_without_aug_takes_imagenet(tmp_path, capsys):
    folder = write_folder(tmp_path / "pets")
    _, checkpoint = saved_teacher(tmp_path, num_classes=3, seed=0)
    code, _, err = run_cli(["dump-teacher", "--checkpoint", checkpoint, "--teacher", "resnet8", "--dataset",
                            "imagefolder", "--data-root", folder, "--image-size", 32, "--views", 1, "--workers", 0,
                            "--out", tmp_path / "pets.zarr", "--device", "cpu"], capsys)
    assert code == 0, err
    with open_cache(tmp_path / "pets.zarr") as cache:
        assert cache.spec.augmentation["name"] == "imagenet"


@pytest.mark.parametrize("command", ["dump-teacher", "train-teacher", "distill"])
def test_help_says_which_policy_is_the_default(command, capsys):
    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0
    assert "Default: cifar for data held in memory, imagenet for an image folder streamed from its files" in \
        " ".join(out.split())


def test_models_lists_timm_pretrained_tags(capsys):
    code, out, _ = run_cli(["models", "--source", "timm", "--pretrained", "resnet18*"], capsys)
    assert code == 0
    names = out.splitlines()[:-1]
    assert "timm:resnet18.a1_in1k" in names and all(name.startswith("timm:resnet18") and "." in name for name in names)
    assert "--checkpoint" in out.splitlines()[-1]
    code, _, err = run_cli(["models", "--pretrained"], capsys)
    assert code == 2 and "only timm names its pretrained weights by tag (--source timm)" in err


def test_losses_lists_the_default_weights_its_help_promises(capsys):
    assert "default weights" in cli.commands["losses"].help
    code, out, _ = run_cli(["losses"], capsys)
    row = next(line for line in out.splitlines() if line.startswith("dkd "))
    dkd = get_loss("dkd")
    for field in ("ce_weight", "distill_weight", "temperature", "alpha", "beta", "warmup_epochs"):
        assert f"{field}={getattr(dkd, field):g}" in row


def test_datasets_says_the_image_folder_size_it_uses(capsys):
    code, out, _ = run_cli(["datasets"], capsys)
    folder = next(line for line in out.splitlines() if "imagefolder reads" in line)
    assert "at 224×224 (--image-size)" in folder and "64×64" not in folder


@pytest.mark.parametrize("name", ["cifar100", "imagefolder", "synthesized"])
def test_a_dataset_without_its_folder_names_the_flag_and_the_argument(name, tmp_path, capsys):
    with pytest.raises(KdcacheError) as caught:
        load_dataset(name)
    assert "--data-root DIR on the command line, root=DIR in load_dataset()" in str(caught.value)
    code, _, err = run_cli(["train-teacher", "--dataset", name, "--epochs", 1, "--out", tmp_path], capsys)
    assert code == 2 and "--data-root DIR on the command line" in err


def test_the_recipes_cite_only_files_in_the_repository():
    # configs/... paths are cited inside upstream repositories at a commit (mdistiller@a08d46f configs/...)
    for recipe in (REPO / "configs").rglob("*.yaml"):
        for cited in re.findall(r"\b((?:docs|benchmarks|shared)/[\w./-]+\.(?:md|yaml|py))", recipe.read_text()):
            assert (REPO / cited).is_file(), f"{recipe.name} cites {cited}, which is not in the repository"


def test_inspect_on_a_run_folder_says_what_it_is(tmp_path, capsys):
    saved_teacher(tmp_path / "run", num_classes=3, seed=0)
    (tmp_path / "run" / "teacher.pt").rename(tmp_path / "run" / "model.pt")
    code, _, err = run_cli(["inspect", tmp_path / "run"], capsys)
    assert code == 2 and "is a kdcache run folder (model.pt holds a model's weights: pass it as --checkpoint)" in err
    assert "--overwrite" not in err


def test_a_cache_of_another_dataset_is_named_by_the_dataset_not_its_class_count(digits_cache, tmp_path, capsys):
    code, _, err = run_cli(["distill", "--cache", digits_cache, "--dataset", "synthetic", "--student", "resnet8",
                            "--out", tmp_path, "--device", "cpu"], capsys)
    assert code == 2 and "was written for dataset.name digits but this run has synthetic" in err


def test_caches_on_other_views_name_the_differing_field_whole(digits_cache, tmp_path):
    import kdcache
    from kdcache.stages import dump_teacher
    from kdcache.cache.fit import require_same_views

    teacher, checkpoint = saved_teacher(tmp_path, num_classes=10, seed=1)
    info = {"arch": "resnet8", "checkpoint": str(checkpoint), "checkpoint_sha256": "0" * 64}
    policy = kdcache.get_policy("cifar", image_size=(32, 32))
    mixed = kdcache.data.mixing.with_mixing(policy, {"mode": "mixup", "alpha": 1.0, "prob": 1.0}, (32, 32))
    dump_teacher(teacher, info, kdcache.load_dataset("digits"), mixed, tmp_path / "mixed.zarr", views=2,
                 scales=(1, 2), block_size=500, show_progress=False)
    with kdcache.open_cache(digits_cache) as plain, kdcache.open_cache(tmp_path / "mixed.zarr") as other:
        with pytest.raises(KdcacheError) as refused:
            require_same_views(plain, other)
    message = str(refused.value)
    # the first leaf that differs, both values whole (the augmentation dicts were cut at 80 characters)
    assert "differ in augmentation.param_names (['dx', 'dy', 'flip'] and ['dx', 'dy', 'flip', 'partner', 'lam'])" \
        in message
