"""Runs are never lost or overwritten: each run holds a folder of its own, summary.csv only gains rows."""

import csv
import os
import socket
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest

from small_runs import synthetic_splits
from kdcache.config import DistillConfig
from kdcache.errors import KdcacheError
from kdcache.quickstart import fresh_place
from kdcache.report import distill_sweep, write_summary
from kdcache.stages import distill

# another process holding a lock (a run's folder, summary.csv), as a concurrent kdcache run does; with a row to
# add, it adds it after a while and lets go, as a run finishing at the same moment does
HOLDER = """import csv, sys, time
from kdcache.cache.lock import WriterLock
lock = WriterLock(sys.argv[1]).acquire()
print("held", flush=True)
if len(sys.argv) > 2:
    time.sleep(1.0)
    with open(sys.argv[1], "a", newline="") as file:
        csv.writer(file).writerow(sys.argv[2:])
    lock.release()
else:
    time.sleep(120)
"""


@pytest.fixture(scope="module")
def data():
    return synthetic_splits(24, 3, seed=4)


@pytest.fixture
def holder():
    """Start another process holding the lock of a path (and maybe adding a row to it); ended after the test."""
    started = []

    def hold(path, *row):
        process = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), *row], stdout=subprocess.PIPE, text=True,
                                   env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
        started.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield hold
    for process in started:
        process.kill()
        process.wait()


def config(tmp_path, **options):
    settings = {"students": ("resnet8",), "losses": ("kd",), "ema_teacher": 0.99, "epochs": 1, "batch_size": 8,
                "out": str(tmp_path / "runs"), "device": "cpu"}
    return DistillConfig(**{**settings, **options})


def summary_rows(tmp_path):
    with open(tmp_path / "runs" / "summary.csv", newline="") as file:
        return [row["run"] for row in csv.DictReader(file)]


def test_a_second_run_into_one_out_takes_the_next_folder_and_summary_keeps_every_row(data, tmp_path, holder):
    first = distill_sweep(config(tmp_path), show_progress=False, data=data)
    second = distill(config(tmp_path), show_progress=False, data=data)
    assert [run.folder.name for run in first + second] == ["resnet8-kd", "resnet8-kd-2"]
    assert all((run.folder / "model.pt").exists() for run in first + second)
    # another run adds its row while this one's summary is written: the summary waits for it, and keeps it
    other = holder(tmp_path / "runs" / "summary.csv", "other-run", "resnet8", "ce", "0.5", "0.5", "1", "9.0", "x")
    write_summary(second, tmp_path / "runs")
    other.wait(timeout=30)
    assert summary_rows(tmp_path) == ["resnet8-kd", "other-run", "resnet8-kd-2"]
    assert (tmp_path / "runs" / "summary.csv").read_text().count("run,student,loss") == 1
    assert (tmp_path / "runs" / "summary.png").stat().st_size > 1000


def test_a_folder_another_process_holds_is_never_shared_and_naming_it_is_refused_naming_the_holder(
        data, tmp_path, holder):
    other = holder(tmp_path / "runs" / "resnet8-kd")
    runs = distill(config(tmp_path), show_progress=False, data=data)
    assert runs[0].folder == tmp_path / "runs" / "resnet8-kd-2"
    assert not (tmp_path / "runs" / "resnet8-kd").exists()
    with pytest.raises(KdcacheError, match=f"resnet8-kd is being written by another kdcache process \\(pid "
                                           f"{other.pid} on {socket.gethostname()}, .*; or give another --name$"):
        distill(config(tmp_path, name="resnet8-kd"), show_progress=False, data=data)


def test_name_names_the_folder_exactly_and_never_replaces_a_run_there(data, tmp_path):
    runs = distill(config(tmp_path, name="lr-test"), show_progress=False, data=data)
    assert runs[0].folder == tmp_path / "runs" / "lr-test" and runs[0].name == "lr-test"
    with pytest.raises(KdcacheError, match="--name lr-test: .*lr-test holds a finished run, which is never replaced; "
                                           "give another --name, or add --resume"):
        distill(config(tmp_path, name="lr-test"), show_progress=False, data=data)
    with pytest.raises(KdcacheError, match="--name: expected a folder name .* got '../elsewhere'"):
        distill(config(tmp_path, name="../elsewhere"), show_progress=False, data=data)
    with pytest.raises(KdcacheError, match="--name x: names one run's folder, and this sweep has 2 runs"):
        distill(config(tmp_path, name="x", losses=("kd", "ce")), show_progress=False, data=data)


def test_resume_continues_the_latest_unfinished_run_and_keeps_a_finished_one(data, tmp_path, monkeypatch, capsys):
    from interrupt import interrupted_after_first_epoch

    distill_sweep(config(tmp_path, epochs=2), show_progress=False, data=data)
    interrupted_after_first_epoch(monkeypatch, lambda: distill_sweep(config(tmp_path, epochs=2), show_progress=False,
                                                                     data=data))
    resumed = distill_sweep(config(tmp_path, epochs=2, resume=True), data=data)
    latest = tmp_path / "runs" / "resnet8-kd-2"
    assert resumed[0].folder == latest and not resumed[0].kept
    assert f"--resume: resnet8-kd: the latest run is {latest}; continuing it" in capsys.readouterr().out
    with open(latest / "metrics.csv") as file:
        assert [int(row["epoch"]) for row in csv.DictReader(file)] == [1, 2]
    # every run of it finished: the latest is kept as it is, and its row is not added twice
    again = distill_sweep(config(tmp_path, epochs=2, resume=True), data=data)
    assert again[0].folder == latest and again[0].kept and again[0].test_acc == resumed[0].test_acc
    assert "finished already: kept as it is" in capsys.readouterr().out
    assert summary_rows(tmp_path) == ["resnet8-kd", "resnet8-kd-2"]


def test_a_quickstart_rerun_writes_a_place_of_its_own_and_keeps_the_earlier_one(tmp_path, capsys):
    out, cache = tmp_path / "runs" / "quickstart", tmp_path / "caches" / "quickstart-digits.zarr"
    with ExitStack() as first, ExitStack() as running:
        assert fresh_place(out, cache, first) == (out, cache)
        # one running now holds the first place: a second, started meanwhile, takes the next
        assert fresh_place(out, cache, running) == (out.with_name("quickstart-2"),
                                                    cache.with_name("quickstart-digits-2.zarr"))
    out.mkdir(parents=True)  # the earlier quickstart's files
    with ExitStack() as held:
        assert fresh_place(out, cache, held)[0] == out.with_name("quickstart-2")
    assert (f"earlier quickstarts are kept as they are ({out}, {cache}, ...): this one writes "
            f"{out.with_name('quickstart-2')}") in capsys.readouterr().out
