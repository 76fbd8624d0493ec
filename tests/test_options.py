"""Options declared once: each command's flags come from its config dataclass, `--config FILE` takes the flag names as
keys (flags override it), and every run folder and cache keeps the resolved config, which repeats the run."""

import inspect
from dataclasses import fields, replace
from pathlib import Path

import pytest
from console import run_cli

from kdcache.config import (
    DistillConfig,
    DumpConfig,
    QuickstartConfig,
    RecipeConfig,
    SynthesizeConfig,
    TeacherConfig,
    load_config,
    save_config,
)
from kdcache.errors import KdcacheError


class Captured(KdcacheError):
    """Raised by a stand-in for a command's library call, once it has kept what the command passed."""


def resolved(command, monkeypatch):
    """A function running `kdcache COMMAND ARGS...` that returns the arguments the command passed to the library (its
    config; quickstart's and recipe's values), and its stderr: the library call is replaced by a stand-in that keeps
    them and stops the command (exit code 2)."""
    import kdcache.quickstart
    import kdcache.recipe
    import kdcache.report
    import kdcache.stages
    import kdcache.stages.synthesize

    target = {"quickstart": (kdcache.quickstart, "run_quickstart"), "train-teacher": (kdcache.stages, "train_teacher"),
              "dump-teacher": (kdcache.stages, "dump_from_config"), "distill": (kdcache.report, "distill_sweep"),
              "synthesize": (kdcache.stages.synthesize, "synthesize"), "recipe": (kdcache.recipe, "run_recipe")}
    kept = []

    def stand_in(*args):
        kept.append(args)
        raise Captured("captured")
    monkeypatch.setattr(*target[command], stand_in)

    def run(args, capsys):
        code, _, err = run_cli([command, *args], capsys)
        assert code == 2 and "kdcache: error: captured" in err, err
        passed = kept.pop()
        return (passed[0] if len(passed) == 1 else passed), err
    return run


# each command, a config file in its flag names (one renamed flag among them), and a flag given over it
SIX = [
    ("quickstart", "out: q\ncache: c.zarr\n", ["--device", "cpu"], lambda out, cache, device, text: (out.name, device)),
    ("train-teacher", "model: resnet8\naug: none\nepochs: 3\n", ["--epochs", "2"],
     lambda c: (c.model, c.augmentation, c.epochs)),
    ("dump-teacher", "checkpoint: t.pt\naug: none\nloss: [at]\nscales: [1, 2]\n", ["--views", "2"],
     lambda c: (c.checkpoint, c.augmentation, c.losses, c.scales, c.views)),
    ("distill", "cache: c.zarr\nstudent: resnet8\nloss: kd\nbatch-size: 32\n", ["--loss", "dkd"],
     lambda c: (c.cache, c.students, c.losses, c.batch_size)),
    ("synthesize", "checkpoint: t.pt\naug: none\nnum: 8\n", ["--num", "4"],
     lambda c: (c.checkpoint, c.augmentation, c.num)),
    ("recipe", "recipe: res32x4_res8x4\nloss: [kd]\nepochs: 3\n", ["--epochs", "2"],
     lambda recipe, *args: (recipe, args[5], args[4])),
]
EXPECTED = {"quickstart": ("q", "cpu"), "train-teacher": ("resnet8", "none", 2),
            "dump-teacher": ("t.pt", "none", ("at",), (1, 2), 2), "distill": ("c.zarr", ("resnet8",), ("dkd",), 32),
            "synthesize": ("t.pt", "none", 4), "recipe": ("res32x4_res8x4", ("kd",), 2)}


@pytest.mark.parametrize(("command", "text", "flags", "seen"), SIX, ids=[row[0] for row in SIX])
def test_every_command_that_trains_or_writes_takes_a_config_in_its_flag_names_and_flags_override_it(
        command, text, flags, seen, tmp_path, capsys, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    (tmp_path / "t.pt").write_bytes(b"")  # synthesize's --checkpoint must exist, in a file as on the command line
    monkeypatch.chdir(tmp_path)
    passed, err = resolved(command, monkeypatch)(["--config", path, *flags], capsys)
    assert (seen(*passed) if isinstance(passed, tuple) else seen(passed)) == EXPECTED[command]
    assert "deprecated" not in err


def test_a_student_in_a_config_selects_it_and_a_list_selects_several(tmp_path, capsys, monkeypatch):
    path = tmp_path / "sweep.yaml"
    path.write_text("cache: /nonexistent/c.zarr\nstudent: resnet9\n")
    code, _, err = run_cli(["distill", "--config", path], capsys)
    assert code == 2 and "kdcache's registry has no model 'resnet9'" in err  # the file's student is the one tried
    path.write_text("cache: [a.zarr, b.zarr]\nstudent: [resnet8, resnet20]\nloss: [kd, dkd]\npair: []\n")
    config, _ = resolved("distill", monkeypatch)(["--config", path], capsys)
    assert (config.cache, config.extra_caches) == ("a.zarr", ("b.zarr",))
    assert config.runs() == [("resnet8", "kd"), ("resnet8", "dkd"), ("resnet20", "kd"), ("resnet20", "dkd")]


@pytest.mark.parametrize(("key", "nearest"), [("studnet", "student"), ("batch_sise", "batch_size"),
                                              ("students-x", "student")])
def test_an_unknown_key_is_one_line_naming_the_nearest_known_one(key, nearest, tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(f"cache: c.zarr\n{key}: resnet8\n")
    code, _, err = run_cli(["distill", "--config", path], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"kdcache: error: {path}: unknown key '{key.replace('-', '_')}'; did you mean {nearest}?")


def test_an_old_key_still_works_for_a_release_with_a_line_naming_the_new_one(tmp_path, capsys, monkeypatch):
    path = tmp_path / "old.yaml"
    path.write_text("cache: c.zarr\nstudents: [resnet8]\nlosses: [kd]\naugmentation: none\n")
    config, err = resolved("distill", monkeypatch)(["--config", path], capsys)
    assert (config.students, config.losses, config.augmentation) == (("resnet8",), ("kd",), "none")
    lines = err.strip().splitlines()
    assert lines[:3] == [f"kdcache: {old} (in {path}) is deprecated and goes in the next release; use {new}"
                         for old, new in (("students", "student"), ("losses", "loss"), ("augmentation", "aug"))]


def test_the_shipped_recipes_use_the_flag_names(capsys):
    from kdcache.recipe import load_recipe, packaged_recipes

    for name in packaged_recipes():
        recipe = load_recipe(name)
        assert recipe.dump_config().augmentation == "cifar" and recipe.distill_config("kd").momentum == 0.9
    assert "deprecated" not in capsys.readouterr().err


@pytest.mark.parametrize("cls", [TeacherConfig, DumpConfig, DistillConfig, SynthesizeConfig, QuickstartConfig,
                                 RecipeConfig])
def test_a_saved_config_reads_back_as_the_same_config(cls, tmp_path):
    changed = {field.name: field.default for field in fields(cls)}
    changed.update({name: value for name, value in {"students": ("resnet8", "resnet20"), "losses": ("kd",),
                                                     "cache": "a.zarr", "extra_caches": ("b.zarr",), "scales": (1, 2),
                                                     "augmentation": "none", "lr_decay_at": (0.5,)}.items()
                    if name in changed})
    config = cls(**changed)
    assert load_config(cls, save_config(config, tmp_path)) == config


@pytest.mark.parametrize(("function", "cls", "least"), [("kdcache.stages:dump_teacher", DumpConfig, 13),
                                                       ("kdcache.recipe:run_recipe", RecipeConfig, 7),
                                                       ("kdcache.quickstart:run_quickstart", QuickstartConfig, 1)])
def test_the_python_entry_points_have_the_commands_defaults(function, cls, least):
    import importlib

    module, name = function.split(":")
    defaults = {field.name: field.default for field in fields(cls)}
    parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters.items()
    shared = {name: parameter.default for name, parameter in parameters
              if name in defaults and parameter.default is not inspect.Parameter.empty}
    assert len(shared) >= least and shared == {name: defaults[name] for name in shared}


def repeats(command, saved, config, monkeypatch, capsys):
    """Whether `kdcache COMMAND --config SAVED` resolves to `config`, the config of the run that saved it."""
    return resolved(command, monkeypatch)(["--config", saved], capsys)[0] == config


def test_a_teachers_run_folder_keeps_the_config_that_repeats_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher.yaml").write_text("teacher:\n  model: resnet8\n  epochs: 1\n  batch-size: 256\n")
    assert run_cli(["train-teacher", "--config", "teacher.yaml", "--out", "t"], capsys)[0] == 0
    config = TeacherConfig(model="resnet8", epochs=1, batch_size=256, out="t")
    assert (tmp_path / "t/model.json").exists() and load_config(TeacherConfig, tmp_path / "t/config.yaml") == config
    assert repeats("train-teacher", tmp_path / "t/config.yaml", config, monkeypatch, capsys)


def test_a_cache_keeps_the_config_that_repeats_it(tmp_path, capsys, monkeypatch):
    from small_runs import saved_teacher

    from kdcache.stages.dump import save_cache_config

    saved_teacher(tmp_path, 10, seed=3)
    monkeypatch.chdir(tmp_path)
    argv = ["--checkpoint", "teacher.pt", "--teacher", "resnet8", "--views", "1", "--scales", "1", "--out", "c.zarr"]
    assert run_cli(["dump-teacher", *argv], capsys)[0] == 0
    assert run_cli(["verify", "c.zarr"], capsys)[0] == 0  # config.yaml beside zarr.json is no part of the store
    config = DumpConfig(checkpoint="teacher.pt", teacher="resnet8", views=1, scales=(1,), out="c.zarr")
    assert load_config(DumpConfig, tmp_path / "c.zarr/config.yaml") == config
    assert repeats("dump-teacher", tmp_path / "c.zarr/config.yaml", config, monkeypatch, capsys)
    # an HDF5 cache is one file: its config goes beside it
    assert save_cache_config(replace(config, out="c.h5")) == Path("c.h5.config.yaml")
    assert load_config(DumpConfig, tmp_path / "c.h5.config.yaml") == replace(config, out="c.h5")


def test_a_students_run_folder_keeps_the_config_of_its_own_run(digits_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(["distill", "--cache", digits_cache, "--student", "resnet8", "--loss", "kd",
                    "--epochs", "1", "--out", "s", "--batch-size", "256"], capsys)[0] == 0
    for loss in ("kd",):
        saved = tmp_path / f"s/resnet8-{loss}/config.yaml"
        config = DistillConfig(cache=str(digits_cache), students=("resnet8",), losses=(loss,), epochs=1, out="s",
                               batch_size=256)
        assert load_config(DistillConfig, saved) == config
        assert repeats("distill", saved, config, monkeypatch, capsys)


def test_a_sweeps_run_folder_keeps_the_config_of_its_own_run():
    sweep = DistillConfig(cache="c.zarr", students=("resnet8", "resnet20"), losses=("kd", "dkd"), name=None,
                          resume=True)
    assert sweep.one_run("resnet20", "kd") == replace(sweep, students=("resnet20",), losses=("kd",), resume=False)
    mutual = replace(sweep, mutual=True)
    assert mutual.one_run("resnet8", "dml").students == ("resnet8", "resnet20")


@pytest.mark.parametrize(("text", "expected"), [("epochs: 0", "epochs: 0 is not in the range x>=1."),
                                                ("optimizer: adam", "optimizer: 'adam' is not one of 'sgd', 'adamw'."),
                                                ("student-checkpoint: /nonexistent/s.pt", "student_checkpoint: Path "
                                                 "'/nonexistent/s.pt' does not exist.")])
def test_a_value_in_a_config_is_held_to_its_flags_range_in_one_line(text, expected, tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(f"cache: c.zarr\n{text}\n")
    code, _, err = run_cli(["distill", "--config", path], capsys)
    assert code == 2 and err == f"kdcache: error: {path}: {expected}\n"
