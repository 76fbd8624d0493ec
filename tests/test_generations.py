"""Born-again generations (`distill --generations N`): each generation learns from a cache of its predecessor's
student, dumped on exactly the first cache's views; every generation's run is kept with its accuracy."""

import csv
import json
from pathlib import Path

import pytest
import torch

from console import run_cli

from kdcache.cache import open_cache
from kdcache.config import DistillConfig, DumpConfig
from kdcache.data import get_policy, load_dataset, normalize
from kdcache.errors import KdcacheError
from kdcache.models import create_model, load_teacher, save_checkpoint
from kdcache.report import distill_sweep
from kdcache.stages.dump import dump_from_config
from kdcache.stages.targets import CachedTargets, EnsembleTargets


@pytest.fixture(scope="module")
def first_cache(tmp_path_factory):
    """A random resnet8's cache over digits' test split (359 images), 2 views, full precision."""
    folder = tmp_path_factory.mktemp("generations")
    torch.manual_seed(0)
    save_checkpoint(folder / "t.pt", create_model("resnet8", num_classes=10))
    dump_from_config(DumpConfig(teacher="resnet8", checkpoint=str(folder / "t.pt"), split="test", views=2,
                                scales=(1,), dtype="float32", seed=3, out=str(folder / "t.zarr"), device="cpu"),
                     show_progress=False)
    return folder / "t.zarr"


def generations_config(cache, out, **overrides) -> DistillConfig:
    settings = {"cache": str(cache), "students": ("resnet8",), "losses": ("kd",), "epochs": 1, "batch_size": 64,
                "device": "cpu", "out": str(out), "generations": 3, "generations_ensemble": True}
    return DistillConfig(**(settings | overrides))


def test_each_generation_learns_from_its_predecessors_student_on_the_first_caches_views(first_cache, tmp_path):
    out = tmp_path / "ban"
    runs = distill_sweep(generations_config(first_cache, out), show_progress=False)
    assert [run.folder for run in runs] == [out / f"gen{g}" / "resnet8-kd" for g in (1, 2, 3)]
    with open(out / "summary.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["generation"] for row in rows] == ["1", "2", "3"]
    assert [row["test_acc"] for row in rows] == [f"{run.test_acc:.4f}" for run in runs]  # every generation kept
    assert rows[0]["teachers"] == str(first_cache)
    gen1, gen2 = (out / f"gen{g}" / "student.zarr" for g in (1, 2))
    assert rows[2]["teachers"] == f"{gen1} {gen2}" and not (out / "gen3" / "student.zarr").exists()
    dataset = load_dataset("digits", split="test")
    with open_cache(first_cache) as first, open_cache(gen1) as dumped:
        assert dumped.spec.teacher["checkpoint_sha256"] != first.spec.teacher["checkpoint_sha256"]
        for view in range(2):  # the same views, parameter for parameter
            assert torch.equal(torch.from_numpy(first.aug_params(view)), torch.from_numpy(dumped.aug_params(view)))
        # generation 1's student, live on the replayed view 1, gives the logits its dump stored
        student, _ = load_teacher(str(runs[0].folder), "resnet8", 10)
        pixels = get_policy("cifar").apply(dataset.images, torch.from_numpy(dumped.aug_params(1)))
        with torch.no_grad():
            live = student(normalize(pixels, dataset.mean, dataset.std))
        torch.testing.assert_close(torch.from_numpy(dumped.view(1))[:, 0], live, atol=1e-5, rtol=1e-4)
    record = json.loads((runs[2].folder / "model.json").read_text())
    assert record["cache"] == str(gen1) and record["extra_caches"] == [str(gen2)]
    assert record["teacher_weights"] == [1.0, 1.0]
    with open_cache(gen1) as one, open_cache(gen2) as two:  # BANE's targets: the mean of the generations' probabilities
        ensemble = EnsembleTargets([CachedTargets(one), CachedTargets(two)], record["teacher_weights"])
        ensemble.begin_epoch(0)
        expected = (torch.from_numpy(one.view(0)).softmax(-1) + torch.from_numpy(two.view(0)).softmax(-1)) / 2
        torch.testing.assert_close(ensemble(torch.arange(one.spec.num_samples), None)["regions"].exp(), expected)

    again = distill_sweep(generations_config(first_cache, out, resume=True), show_progress=False)
    assert all(run.kept for run in again) and [run.test_acc for run in again] == [run.test_acc for run in runs]
    with open(out / "summary.csv", newline="") as file:
        assert len(list(csv.DictReader(file))) == 3


def test_a_generations_run_refuses_what_it_cannot_do_in_one_line(first_cache, tmp_path, capsys):
    cache = str(first_cache)
    base = ["distill", "--cache", cache, "--out", str(tmp_path / "out"), "--generations", "2"]
    code, err = run_cli([*base, "--loss", "kd", "--loss", "ce"], capsys)[::2]
    assert code == 2 and "--generations: trains one student with one loss" in err and "resnet8x4:ce" in err
    code, err = run_cli([*base, "--name", "x"], capsys)[::2]
    assert code == 2 and "--name x: a generations run names its folders" in err
    code, err = run_cli(["distill", "--cache", cache, "--generations-ensemble", "--out", str(tmp_path / "o")], capsys)[::2]
    assert code == 2 and "give --generations 2 or more (got 1)" in err
    tokens = Path(__file__).resolve().parent / "fixtures" / "formats" / "v6-tokens.zarr"
    code, err = run_cli(["distill", "--cache", tokens, "--generations", "2", "--out", tmp_path / "o"], capsys)[::2]
    assert code == 2 and "is a token cache, and born-again generations are dumped as image caches" in err
    (tmp_path / "out" / "gen1").mkdir(parents=True)
    with pytest.raises(KdcacheError, match="holds an earlier generations run .*continue it with --resume"):
        distill_sweep(generations_config(first_cache, tmp_path / "out"), show_progress=False)


def test_the_families_table_gives_each_born_again_generation_a_row(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import families

    stats = {"last_mean": 0.5, "last_std": 0.01, "best_mean": 0.6, "best_std": 0.02, "seconds_mean": 3.0}
    method = {"label": families.METHODS["born-again"][0], **stats, "correct_last": [180, 181],
              "generations": [{**stats, "last_mean": 0.5 + g / 10} for g in range(3)]}
    result = {"config": {"dataset": "digits", "student": "resnet8", "epochs": 1, "seeds": 2, "views": 1},
              "environment": {"device": "cpu"}, "teachers": {}, "caches": {}, "methods": {"born-again": method}}
    rows = families.table(result).splitlines()[-4:]
    assert rows[0].startswith("born-again (KD), 3 generations from teacher A")
    assert [row.split()[:3] for row in rows[1:]] == [["generation", "1", "50.00"], ["generation", "2", "60.00"],
                                                     ["generation", "3", "70.00"]]
    assert families.METHODS["born-again-ensemble"][3] == {"generations": 3, "generations_ensemble": True}
