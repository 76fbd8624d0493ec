"""`kdcache recipe`: the packaged CIFAR-100 recipes load and check, and one runs end to end on a fake CIFAR-100 root."""

import csv

import click
import pytest
import torch
import yaml
from console import run_cli
from fake_cifar import write_fake_cifar

from kdcache.cache import open_cache
from kdcache.cli import cli
from kdcache.config import DistillConfig, DumpConfig
from kdcache.losses import list_losses
from kdcache.models import create_model, list_models, save_checkpoint
from kdcache.recipe import load_recipe, packaged_recipes

PAIRS = ["res32x4_res8x4", "wrn40_2_wrn16_2", "res32x4_shuv1", "res32x4_shuv2", "vgg13_mv2"]
REQUIRED_LOSSES = {"ce", "kd", "dkd", "sdd-dkd", "sdd-lskd"}




def test_the_five_pairs_ship_in_kdcache_configs():
    assert sorted(packaged_recipes()) == sorted(PAIRS)


@pytest.mark.parametrize("name", PAIRS)
def test_a_packaged_recipe_loads_names_registered_models_and_losses_and_published_numbers(name):
    recipe = load_recipe(name)
    assert {recipe.teacher, recipe.student} <= set(list_models())
    assert REQUIRED_LOSSES <= set(recipe.losses) <= set(list_losses())
    dump = recipe.dump_config()
    assert isinstance(dump, DumpConfig) and (dump.dataset, dump.split, dump.scales) == ("cifar100", "train", (1, 2, 4))
    assert dump.checkpoint == "" and dump.data_root is None  # the user's
    for loss in recipe.losses:
        config = recipe.distill_config(loss)
        assert isinstance(config, DistillConfig) and (config.epochs, config.batch_size) == (240, 64)
        assert config.lr_milestones() == [150, 180, 210] and config.lr == (0.05 if recipe.student in (
            "resnet8x4", "wrn_16_2") else 0.01)
    assert {"teacher", "student", "kd", "dkd"} <= set(recipe.published) and recipe.sources
    for value in recipe.published.values():
        assert value is None or (isinstance(value, float) and 0 < value < 100)


def test_per_pair_overrides_of_the_released_configs_reach_the_distill_config():
    for name in ("wrn40_2_wrn16_2", "vgg13_mv2"):
        recipe = load_recipe(name)
        assert recipe.distill_config("dkd").beta == recipe.distill_config("sdd-dkd").beta == 6.0
        assert recipe.distill_config("kd").beta is None
    recipe = load_recipe("res32x4_res8x4")
    assert recipe.distill_config("sdd-kd").scales == (1, 2) and recipe.distill_config("sdd-dkd").scales is None


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda r: r.update(student="resnet9"), "student: model spec 'resnet9': kdcache's registry has no model 'resnet9'"),
    (lambda r: r["losses"].update(**{"no-such-loss": {}}), "losses: unknown name 'no-such-loss'"),
    (lambda r: r["losses"].update(kd={"cache": "x"}), "losses.kd should map DistillConfig fields"),
    (lambda r: r["losses"].update(kd={"beta": 6.0}), "--beta does not apply to loss 'kd'"),
    (lambda r: r["published"].update(kd=7333), "published.kd should be a top-1 % in (0, 100)"),
    (lambda r: r["published"].update(ce=72.5), "published.ce is no column"),
    (lambda r: r["published"].update(dkdd=76.0), "published.dkdd is no column"),
    (lambda r: r["distill"].update(epochs="many"), "epochs should be int"),
    (lambda r: r.pop("sources"), "expected the keys"),
])
def test_a_broken_recipe_is_one_line_naming_what_is_wrong(edit, expected, tmp_path, capsys):
    document = yaml.safe_load(packaged_recipes()["res32x4_res8x4"].read_text())
    edit(document)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(document))
    code, _, err = run_cli(["recipe", str(path), "--checkpoint", str(path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err


def test_recipe_help_explains_each_option_and_list_names_the_pairs(capsys):
    command = cli.commands["recipe"]
    code, out, _ = run_cli(["recipe", "--help"], capsys)
    assert code == 0 and command.help
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help and param.opts[0] in out, param.opts[0]
    code, out, _ = run_cli(["recipe", "--list"], capsys)
    assert code == 0 and all(name in out for name in PAIRS) and "resnet32x4 → resnet8x4" in out


@pytest.mark.parametrize(("argv", "expected"), [
    (["recipe"], "name a recipe; packaged: res32x4_res8x4"),
    (["recipe", "res18_res50"], "no packaged recipe of that name"),
    (["recipe", "res32x4_res8x4"], "--checkpoint is required"),
    (["recipe", "res32x4_res8x4", "--checkpoint", "/nonexistent/t.pt"], "no file at /nonexistent/t.pt"),
])
def test_a_users_mistake_is_one_line_and_exit_code_2(argv, expected, capsys):
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err


def _cache_state(cache):
    return {path: path.stat().st_mtime_ns for path in cache.rglob("*") if path.is_file()}


def test_a_shrunk_recipe_runs_end_to_end_and_a_second_run_reuses_the_cache(tmp_path, capsys):
    # the res32x4 -> res8x4 recipe with resnet8 on both sides, a fake CIFAR-100 root and small batches
    fake = write_fake_cifar(tmp_path / "data", "cifar100", n_train=16, n_test=8)
    document = yaml.safe_load(packaged_recipes()["res32x4_res8x4"].read_text())
    document.update(teacher="resnet8", student="resnet8")
    document["distill"]["batch_size"] = 8
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(document, sort_keys=False))
    torch.manual_seed(0)
    checkpoint = tmp_path / "teacher.pt"
    save_checkpoint(checkpoint, create_model("resnet8", num_classes=100))
    cache, out = tmp_path / "cache.zarr", tmp_path / "runs"
    argv = ["recipe", str(recipe), "--checkpoint", str(checkpoint), "--data-root", str(fake.root), "--out", str(out),
            "--cache", str(cache), "--epochs", "2", "--views", "2", "--device", "cpu"]

    code, printed, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "reusing" not in printed and (cache / "zarr.json").is_file()
    losses = list(document["losses"])
    for loss in losses:
        with open(out / f"resnet8-{loss}" / "metrics.csv") as file:
            assert [int(row["epoch"]) for row in csv.DictReader(file)] == [1, 2], loss
    with open(out / "summary.csv") as file:
        assert sorted(row["loss"] for row in csv.DictReader(file)) == sorted(losses)
    table = (out / "table.md").read_text()
    published_row = next(line for line in table.splitlines() if line.startswith("| published |"))
    measured_row = next(line for line in table.splitlines() if line.startswith("| kdcache (this run, 2 epochs) |"))
    assert published_row.split("|")[2:5] == [" 79.42 ", " 72.50 ", " 73.33 "]  # teacher, student, KD
    assert published_row.split("|")[-6:-1] == [" 78.12 ", " 73.50 ", " 73.44 ", " 72.94 ", " 71.90 "]  # SDD-LSKD, CRD's
    assert "–" in published_row  # SDD-KD has none
    # the feature and relation losses trained from a second cache beside the first, of 4 views with their outputs
    features = tmp_path / "cache-features.zarr"
    with open_cache(features) as opened:
        assert opened.spec.num_views == 4 and {"embedding", "hint/layer2"} <= set(opened.spec.outputs)
    assert f"{features} (at, fitnet, rkd, sp)" in table
    assert "–" not in measured_row and "not comparable" in table and "RepDistiller" in table
    with open(out / "table.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["row"] for row in rows] == ["published", "kdcache (this run, 2 epochs)"]
    assert rows[0]["dkd"] == "76.32" and rows[0]["sdd-kd"] == "" and all(rows[1][k] for k in rows[1] if k != "row")

    before = _cache_state(cache)
    code, printed, err = run_cli(argv + ["--resume", "--loss", "ce", "--loss", "sdd-lskd"], capsys)
    assert code == 0, err
    assert f"reusing the complete cache {cache}" in printed and _cache_state(cache) == before
    assert "| KD |" not in (out / "table.md").read_text() and "SDD-LSKD" in (out / "table.md").read_text()


def test_a_complete_cache_of_another_teacher_checkpoint_is_refused(tmp_path, capsys):
    fake = write_fake_cifar(tmp_path / "data", "cifar100", n_train=16, n_test=8)
    document = yaml.safe_load(packaged_recipes()["res32x4_res8x4"].read_text())
    document.update(teacher="resnet8", student="resnet8", losses={"ce": {}})
    document["distill"]["batch_size"] = 8
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(document))
    cache = tmp_path / "cache.zarr"
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_checkpoint(tmp_path / f"t{seed}.pt", create_model("resnet8", num_classes=100))
    base = ["recipe", str(recipe), "--data-root", str(fake.root), "--cache", str(cache), "--views", "1",
            "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "runs")]
    assert run_cli(base + ["--checkpoint", str(tmp_path / "t0.pt")], capsys)[0] == 0
    code, _, err = run_cli(base + ["--checkpoint", str(tmp_path / "t1.pt")], capsys)
    assert code == 2 and "teacher.checkpoint_sha256" in err, err


@pytest.mark.parametrize("out, features", [("caches/c.zarr", "caches/c-features.zarr"),
                                           ("s3://bucket/caches/c.zarr", "s3://bucket/caches/c-features.zarr")])
def test_the_features_cache_lies_beside_the_recipe_cache_at_a_path_or_url(out, features):
    recipe = load_recipe("res32x4_res8x4")
    assert recipe.feature_dump_config(recipe.dump_config(out=out)).out == features
