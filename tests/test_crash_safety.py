"""A kill or a full disk at any instant leaves what the same command resumes or finishes, and every message about
what is found says exactly that: the writer lock's record, an HDF5 cache's creation and finish, paths that hold no
cache, and each command's advice after an interrupt."""

import errno
import multiprocessing
import os

import numpy as np
import pytest
import torch
from console import run_cli
from small_runs import saved_teacher
from test_lock import tiny_spec

from kdcache.cache import CacheWriter, open_cache, verify
from kdcache.cache.hdf5_store import HDF5Store
from kdcache.cache.lock import WriterLock, lock_path
from kdcache.cli import cli, main
from kdcache.errors import KdcacheError


def test_a_full_disk_when_the_lock_records_its_holder_is_one_line_and_leaves_no_lock(tmp_path, monkeypatch):
    cache = tmp_path / "c.zarr"
    write = os.write

    def full_disk(fd, data):
        if os.fstat(fd).st_ino == os.stat(lock_path(cache)).st_ino:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(KdcacheError) as refused:
        WriterLock(cache).acquire()
    message = str(refused.value)
    assert "\n" not in message and "the disk is full: free space, then rerun the same command" in message
    assert str(lock_path(cache)) in message
    assert not lock_path(cache).exists()
    monkeypatch.setattr(os, "write", write)
    with WriterLock(cache):  # the rerun takes it
        assert lock_path(cache).exists()


# -- kill -9 at chosen instants of an HDF5 dump, then the same command ------------------------------

FORK = multiprocessing.get_context("fork")  # the killed writer starts in milliseconds, its imports done


def killed_when(method: str, when) -> None:
    """Make HDF5Store.<method> end the process as kill -9 does (no close, no flush) once when(args) holds."""
    original = getattr(HDF5Store, method)

    def then_killed(self, *args):
        original(self, *args)
        if when(args):
            os._exit(9)

    setattr(HDF5Store, method, then_killed)


KILL_POINTS = {
    # the third of the file's arrays made: the file is being built, under its temporary name
    "while creating": ("_create_array", lambda args, made=iter(range(3)): next(made, None) is None),
    # the new file just put in place, before it is reopened for writing
    "just after creating": ("_publish", lambda args: True),
    # every block done, finish() has set the metadata that records the teacher's accuracy
    "just after finish set the metadata": ("_set_metadata", lambda args: args[0].get("view_accuracy") is not None),
}


def dump(path) -> None:
    """What dump-teacher does to a cache: open (create or resume) it, write its pending blocks, finish."""
    with CacheWriter.open(path, tiny_spec(), np.zeros(8, np.int64), np.zeros((1, 8, 0), np.int32)) as writer:
        for view, block in writer.pending():
            logits = np.zeros((4, 1, 2), np.float16)
            logits[..., 0] = block + 1  # class 0 (every label) predicted: all 4 correct
            writer.write_block(view, block, {"logits": logits}, 4)
        writer.finish()


def dump_killed(path, point: str) -> None:
    killed_when(*KILL_POINTS[point])
    dump(path)


def dump_killed_at(point: str, path) -> None:
    dying = FORK.Process(target=dump_killed, args=(path, point))
    dying.start()
    dying.join(60)
    assert dying.exitcode == 9, "the dump was not killed at that point"


@pytest.mark.parametrize("point", KILL_POINTS)
def test_an_hdf5_cache_killed_at_any_instant_is_finished_by_the_same_dump(tmp_path, point):
    path = tmp_path / "cache.h5"
    dump_killed_at(point, path)
    dump(path)
    with open_cache(path) as cache:
        assert verify(cache) == []
        assert cache.is_complete() and cache.metadata["view_accuracy"] == [1.0]
        np.testing.assert_array_equal(cache.store.read("logits")[0, :, 0, 0], [1] * 4 + [2] * 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.h5"]  # no lock, no temporary file left


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return saved_teacher(tmp_path_factory.mktemp("teacher"), num_classes=10, seed=0)[1]


def dump_command_killed_at_finish(argv: list[str]) -> None:
    # OpenMP's threads do not survive a fork: a parent that ran torch on them leaves the child's first parallel
    # region waiting for them forever. On one thread torch runs none (as DataLoader's forked workers do)
    torch.set_num_threads(1)
    killed_when(*KILL_POINTS["just after finish set the metadata"])
    main(argv)


def test_kill_9_just_after_an_hdf5_dumps_finish_then_the_same_command_finishes_it(checkpoint, tmp_path, capsys):
    out = tmp_path / "cache.h5"
    # digits (1438 images) through an untrained resnet8: one view of 6 blocks
    argv = ["dump-teacher", "--checkpoint", str(checkpoint), "--out", str(out), "--teacher", "resnet8", "--dataset",
            "digits", "--views", "1", "--batch-size", "256", "--block-size", "256", "--device", "cpu"]
    dying = FORK.Process(target=dump_command_killed_at_finish, args=(argv,))
    dying.start()
    dying.join(60)
    assert dying.exitcode == 9, "the dump was not killed at its finish"
    code, printed, err = run_cli(argv, capsys)
    assert code == 0 and "resumed and finished" in printed, err
    code, _, err = run_cli(["verify", out], capsys)
    assert code == 0, err


# -- what is found at a path that holds no cache -------------------------------------------------------

def plain_file(path):
    path.write_text("months of work")


def run_folder(path):
    path.mkdir()
    (path / "model.pt").write_bytes(b"weights")


def cut_hdf5_file(path):
    path.write_bytes(b"\x89HDF\r\n\x1a\n")  # what a kill left of an HDF5 file before kdcache built it aside


@pytest.mark.parametrize("name, make, found", [
    ("notes.txt", plain_file, "a plain file"),
    ("empty", lambda path: path.mkdir(), "a folder without zarr.json"),
    ("runs", run_folder, "a kdcache run folder (model.pt holds a model's weights: pass it as --checkpoint)"),
    ("c.h5", cut_hdf5_file, "an HDF5 file that HDF5 cannot open"),
])
def test_inspect_says_what_it_found_at_a_path_that_holds_no_cache(tmp_path, capsys, name, make, found):
    path = tmp_path / name
    make(path)
    code, _, err = run_cli(["inspect", path], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"kdcache: error: {path} is {found}")
    assert err.rstrip().endswith(", not a kdcache cache (a .zarr folder or an .h5 file); pass the path of a cache "
                                 "written by `kdcache dump-teacher`")
    assert "--overwrite" not in err


def test_dump_teacher_refuses_what_is_no_cache_in_one_consistent_sentence(tmp_path):
    path = tmp_path / "c.h5"
    cut_hdf5_file(path)
    with pytest.raises(KdcacheError) as refused:
        CacheWriter.open(path, tiny_spec(), np.zeros(8, np.int64), np.zeros((1, 8, 0), np.int32), overwrite=True)
    message = str(refused.value)
    assert message.startswith(f"{path} exists and is not a kdcache cache (an HDF5 file that HDF5 cannot open (")
    assert "rebuild" not in message and "not even with --overwrite" in message  # one piece of advice, not two
    assert path.read_bytes() == b"\x89HDF\r\n\x1a\n"


def test_an_empty_folder_left_by_a_zarr_creation_killed_before_its_zarr_json_is_started_anew(tmp_path):
    path = tmp_path / "c.zarr"
    path.mkdir()
    dump(path)
    with open_cache(path) as cache:
        assert cache.is_complete()


# -- what each command says when it is interrupted -------------------------------------------------

ADVICE = {
    "dump-teacher": "rerun the same command to resume: finished blocks are kept",
    "distill": "rerun the same command with --resume to continue each run from its last finished epoch; a language "
               "model's or a segmentation model's run does not resume: the same command without --resume starts it "
               "again in a folder of its own",
    "recipe": "rerun the same command with --resume to continue (its cache resumes by itself)",
    "synthesize": "rerun the same command to resume: finished batches are kept (the cache over them is dumped anew)",
    "train-teacher": "train-teacher does not resume: rerun it to train again",
    "quickstart": "quickstart does not resume: rerun it to start again (in a folder of its own: this one's files are kept)",
    **dict.fromkeys(("inspect", "verify", "eval", "models", "datasets", "losses"),
                    "it writes nothing, so nothing was left half-done"),
}


def test_every_command_has_its_own_interrupt_advice():
    assert set(ADVICE) == set(cli.commands)


@pytest.mark.parametrize("command", ADVICE)
def test_an_interrupted_command_says_exactly_what_continues_it(monkeypatch, capsys, command):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", interrupted)
    code, _, err = run_cli([command], capsys)
    assert code == 130 and err.strip() == f"kdcache: interrupted; {ADVICE[command]}"
