"""The `kdcache` command: help that explains, one-line errors with exit code 2, and the stages end to end."""

import json
import subprocess
import sys

import pytest
from console import run_cli

COMMANDS = ["quickstart", "train-teacher", "dump-teacher", "distill", "eval", "inspect", "verify", "models", "datasets",
            "losses", "recipe"]




@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_that_explains_each_option(command, capsys):
    import click

    from kdcache.cli import cli

    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0 and "Usage: kdcache " + command in out and cli.commands[command].help
    for param in cli.commands[command].params:
        if isinstance(param, click.Option) and not param.hidden:  # hidden: an old flag name kept for a release
            assert param.help, f"kdcache {command} {param.opts[0]} has no help text"
            assert param.opts[0] in out


@pytest.mark.parametrize("argv", [["train-teacher", "--epochs", 1], ["dump-teacher", "--checkpoint", "x.pt"]])
def test_one_idea_has_one_flag_name_and_the_old_one_still_works_for_a_release(argv, capsys):
    command = argv[0]
    code, out, _ = run_cli([command, "--help"], capsys)
    assert "--aug " in out and "--augmentation" not in out
    code, _, err = run_cli(argv + ["--aug", "nope"], capsys)
    assert code == 2 and "get_policy(): unknown name 'nope'" in err and "deprecated" not in err
    if command == "train-teacher":  # the one command that named it --augmentation
        code, _, err = run_cli(argv + ["--augmentation", "nope"], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and lines[0] == "kdcache: --augmentation is deprecated and goes in the next release; use --aug"
        assert "get_policy(): unknown name 'nope'" in lines[1]  # the old name still sets the policy


def test_top_level_help_lists_the_commands(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and all(command in out for command in COMMANDS)


@pytest.mark.parametrize(("argv", "expected"), [
    (["train-teacher", "--model", "resnet9", "--epochs", "1"],
     "model spec 'resnet9': kdcache's registry has no model 'resnet9'; known: fcn_resnet20, fcn_resnet8, mobilenet_v2,"),
    (["train-teacher", "--dataset", "mnist"], "load_dataset(): unknown name 'mnist'; known: cifar10, cifar100, cityscapes, digits, digits-scenes, imagefolder"),
    (["train-teacher", "--dataset", "cifar100", "--data-root", "/nonexistent/data"], "/nonexistent/data"),
    (["dump-teacher", "--checkpoint", "/nonexistent/t.pt", "--teacher", "resnet8"], "/nonexistent/t.pt"),
    (["dump-teacher", "--checkpoint", "x.pt", "--views", "0"], "--views"),
    (["dump-teacher", "--checkpoint", "x.pt", "--scales", "1,,x"], "--scales: expected comma-separated"),
    (["dump-teacher", "--checkpoint", "x.pt", "--scales", "2,4"], "starting with 1"),
    (["distill", "--cache", "/nonexistent/c.zarr"], "no cache at /nonexistent/c.zarr"),
    (["distill"], "--cache CACHE"),
    (["inspect", "/nonexistent/c.zarr"], "no cache at /nonexistent/c.zarr"),
    (["models", "nothing*"], "kdcache has no model matching 'nothing*'"),
    (["models", "--source", "timm", "nothing*"], "timm has no model matching 'nothing*'"),
    (["dump-teacher", "--teacher", "timm:resnet18"], "--checkpoint: the teacher's weights are required for "
                                                     "timm:resnet18 (a .pt, .pth or .safetensors file, or a kdcache "
                                                     "run folder); kdcache never downloads weights"),
    (["dump-teacher", "--teacher", "hub:resnet18", "--checkpoint", "x.pt"], "unknown source 'hub'"),
    (["distill", "--no-such-flag"], "No such option '--no-such-flag'"),
    (["distill", "--cache", "/nonexistent/c.zarr", "--loss", "no-such-loss"],
     "get_loss(): unknown name 'no-such-loss'; known: adversarial, at, ce,"),
    (["distill", "--cache", "/nonexistent/c.zarr", "--student", "resnet9"], "kdcache's registry has no model 'resnet9'"),
    (["distill", "--cache", "/nonexistent/c.zarr", "--student", "timm:resnet_18"],
     "model spec 'timm:resnet_18': timm has no model 'resnet_18'; close names: "),
    (["distill", "--cache", "/nonexistent/c.zarr", "--student", "hub:x"],
     "model spec 'hub:x': unknown source 'hub'; a model is named as NAME (kdcache's registry)"),
    (["distill", "--cache", "/nonexistent/c.zarr", "--student", "python:no_such_module:f"],
     "cannot import module 'no_such_module'"),
])
def test_a_users_mistake_is_one_line_and_exit_code_2(argv, expected, capsys):
    code, out, err = run_cli(argv, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("kdcache: error: ") and expected in err


def test_recipe_keys_are_checked_and_flags_override_the_recipe(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher:\n  model: resnet8\n  epochs: 3\n  bogus: 1\n")
    code, _, err = run_cli(["train-teacher", "--config", str(recipe)], capsys)
    assert code == 2 and "unknown key 'bogus'; known:" in err
    from kdcache.config import TeacherConfig, load_config

    recipe.write_text("teacher:\n  model: resnet8\n  epochs: 3\n  lr_decay_at: [0.5]\n")
    config = load_config(TeacherConfig, recipe, {"epochs": 1}, section="teacher")
    assert (config.model, config.epochs, config.lr_decay_at, config.batch_size) == ("resnet8", 1, (0.5,), 64)
    recipe.write_text("teacher:\n  epochs: many\n")
    with pytest.raises(Exception, match="epochs should be int, got 'many'"):
        load_config(TeacherConfig, recipe, section="teacher")


def test_listing_commands(capsys):
    assert "resnet32x4" in run_cli(["models"], capsys)[1]
    assert "resnet8x4" in run_cli(["models", "resnet8*"], capsys)[1]
    assert run_cli(["models", "--source", "timm", "convnext_at*"], capsys)[1].splitlines()[:3] == [
        "timm:convnext_atto", "timm:convnext_atto_ols", "timm:convnext_atto_rms"]
    assert "torchvision:mobilenet_v3_small" in run_cli(["models", "--source", "torchvision", "mobilenet*"], capsys)[1]
    assert "digits" in run_cli(["datasets"], capsys)[1]
    losses = run_cli(["losses"], capsys)[1]
    assert all(name in losses for name in ["sdd-lskd", "dkd+ls", "sld"])


def test_the_stages_end_to_end_the_first_through_the_console_script(tmp_path, capsys, monkeypatch):
    # the installed `kdcache` script runs the first stage; the others call the same main() in this process,
    # which spares a torch import (seconds) per command
    teacher = subprocess.run(["kdcache", "train-teacher", "--model", "resnet8", "--epochs", "1", "--out", "t"],
                             capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert teacher.returncode == 0, teacher.stderr
    assert "teacher test accuracy" in teacher.stdout and (tmp_path / "t" / "model.json").exists()
    monkeypatch.chdir(tmp_path)

    def kdcache(*args):
        code, out, err = run_cli(list(args), capsys)
        return subprocess.CompletedProcess(args, code, out, err)

    dump = kdcache("dump-teacher", "--checkpoint", "t/model.pt", "--views", "2", "--scales", "1,2", "--out", "c.h5")
    assert dump.returncode == 0, dump.stderr
    assert "wrote c.h5" in dump.stdout and "teacher accuracy per view" in dump.stdout
    again = kdcache("dump-teacher", "--checkpoint", "t/model.pt", "--views", "3", "--scales", "1,2", "--out", "c.h5")
    assert again.returncode == 2 and "views.count: cache has 2, this run has 3" in again.stderr
    inspect = kdcache("inspect", "c.h5", "--json")
    report = json.loads(inspect.stdout)
    assert report["complete"] and report["metadata"]["teacher"]["arch"] == "resnet8"
    assert kdcache("verify", "c.h5").returncode == 0
    students = kdcache("distill", "--cache", "c.h5", "--student", "resnet8", "--loss", "ce", "--loss", "sdd-lskd",
                       "--epochs", "1", "--out", "s")
    assert students.returncode == 0, students.stderr
    assert "resnet8-sdd-lskd" in students.stdout and (tmp_path / "s" / "summary.png").exists()


def test_python_dash_m_kdcache_works_without_importing_torchvision_or_timm():
    # -X importtime lists every module imported on stderr: those two take seconds, and most commands need neither
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "kdcache", "--version"], capture_output=True,
                            text=True)
    assert result.returncode == 0 and "kdcache, version" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "kdcache.cli" in imported and not {"torchvision", "timm"} & imported
