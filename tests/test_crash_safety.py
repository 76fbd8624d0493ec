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
from test_lock import tiny_spec

from kdcache.cache import CacheWriter, open_cache, verify
from kdcache.cache.hdf5_store import HDF5Store
from kdcache.cache.lock import WriterLock, lock_path
from kdcache.cli import main
from kdcache.errors import KdcacheError
from kdcache.models import create_model, save_checkpoint


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
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(path, create_model("resnet8", num_classes=10))
    return path


def test_kill_9_just_after_an_hdf5_dumps_finish_then_the_same_command_finishes_it(checkpoint, tmp_path, capsys):
    out = tmp_path / "cache.h5"
    # digits (1438 images) through an untrained resnet8: one view of 6 blocks
    argv = ["dump-teacher", "--checkpoint", str(checkpoint), "--out", str(out), "--teacher", "resnet8", "--dataset",
            "digits", "--views", "1", "--batch-size", "256", "--block-size", "256", "--device", "cpu"]
    dying = FORK.Process(target=lambda: (killed_when(*KILL_POINTS["just after finish set the metadata"]), main(argv)))
    dying.start()
    dying.join(60)
    assert dying.exitcode == 9, "the dump was not killed at its finish"
    code, printed, err = run_cli(argv, capsys)
    assert code == 0 and "resumed and finished" in printed, err
    code, _, err = run_cli(["verify", out], capsys)
    assert code == 0, err
