"""One writer at a time, proven by racing: processes started together on one cache, fresh or with a stale lock left
by a dead process, and the paths that lead to the same cache another way (a symlink) or to what is not a cache."""

import json
import multiprocessing
import os
import queue
import socket
import subprocess

import numpy as np
import pytest

from kdcache.cache import CacheSpec, CacheWriter, open_cache
from kdcache.cache.lock import WriterLock, lock_path
from kdcache.errors import KdcacheError

ROUNDS = 20
SUFFIX = {"zarr": ".zarr", "hdf5": ".h5"}
FORK = multiprocessing.get_context("fork")  # a forked process starts in milliseconds: 20 rounds stay fast


def tiny_spec() -> CacheSpec:
    """A cache of 8 samples, 1 view, 2 classes: the writer's real work, in a few kilobytes."""
    dataset = {"name": "synthetic", "split": "train", "num_samples": 8, "image_shape": [3, 8, 8], "num_classes": 2,
               "mean": [0.5] * 3, "std": [0.5] * 3, "fingerprint": "0" * 64}
    teacher = {"arch": "resnet8", "num_classes": 2, "checkpoint_sha256": "0" * 64, "precision": "float32",
               "feature_map": [2, 2]}
    return CacheSpec(teacher=teacher, dataset=dataset, augmentation={"name": "none", "param_names": []},
                     num_views=1, exhaustive=False, seed=0, scales=(1,), block_size=4)


def write_cache(path, start, attempted, results) -> None:
    """One contender: wait for the start, open the writer; the winner writes and holds it until both have tried."""
    start.wait()
    try:
        writer = CacheWriter.open(path, tiny_spec(), np.zeros(8, np.int64), np.zeros((1, 8, 0), np.int32))
    except KdcacheError as refused:
        results.put(("refused", str(refused)))
        attempted.wait()
        return
    results.put(("wrote", os.getpid()))
    attempted.wait()  # the other has tried while this one held the lock
    with writer:
        for block in range(2):
            writer.write_block(0, block, {"logits": np.zeros((4, 1, 2), np.float16)}, 0)
        writer.finish()


def race(path) -> list[tuple[str, object]]:
    """Two processes started together on one cache; what each got."""
    start, attempted, results = FORK.Barrier(2), FORK.Barrier(2), FORK.Queue()
    processes = [FORK.Process(target=write_cache, args=(path, start, attempted, results)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    try:
        return sorted(results.get(timeout=5) for _ in processes)
    except queue.Empty:
        pytest.fail("a contender reported nothing")


def assert_one_writer(outcome: list[tuple[str, object]], path) -> None:
    (first, refusal), (second, winner) = outcome
    assert (first, second) == ("refused", "wrote"), outcome
    assert len(refusal.splitlines()) == 1 and f"pid {winner} on {socket.gethostname()}" in refusal, refusal
    with open_cache(path) as cache:
        assert cache.is_complete()
    assert not lock_path(path).exists()


@pytest.mark.parametrize("fmt", SUFFIX)
def test_two_writers_started_together_one_writes_and_the_other_is_told_who(tmp_path, fmt):
    for round_ in range(ROUNDS):
        path = tmp_path / f"c{round_}{SUFFIX[fmt]}"
        assert_one_writer(race(path), path)


@pytest.mark.parametrize("record", ["empty", "dead pid", "live unrelated pid"])
def test_two_writers_racing_a_stale_lock_one_writes(tmp_path, record):
    """A lock file left by a process that died (even one whose pid now runs something else) holds nothing."""
    finished = subprocess.Popen(["true"])
    finished.wait()
    pid = {"empty": None, "dead pid": finished.pid, "live unrelated pid": 1}[record]
    for round_ in range(ROUNDS):
        path = tmp_path / f"c{round_}.zarr"
        stale = "" if pid is None else json.dumps({"pid": pid, "host": socket.gethostname(), "started": "earlier"})
        lock_path(path).write_text(stale)
        assert_one_writer(race(path), path)


def test_a_cache_reached_through_a_symlink_takes_the_same_lock(tmp_path):
    real, link = tmp_path / "real.zarr", tmp_path / "link.zarr"
    link.symlink_to(real)
    with WriterLock(real):
        with pytest.raises(KdcacheError, match="being written by another kdcache process"):
            WriterLock(link).acquire()
    assert lock_path(link) == lock_path(real)


@pytest.mark.parametrize("how", ["symlink", "dangling symlink"])
def test_overwrite_through_a_symlink_rewrites_the_real_cache(tmp_path, how):
    real, link = tmp_path / "real.zarr", tmp_path / "link.zarr"
    link.symlink_to(real)
    arguments = (tiny_spec(), np.zeros(8, np.int64), np.zeros((1, 8, 0), np.int32))
    if how == "symlink":
        CacheWriter.open(real, *arguments).close()
    with CacheWriter.open(link, *arguments, overwrite=True) as writer:
        assert writer.store.path == real
    assert link.is_symlink() and real.is_dir()


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("kind", ["folder", "file", "hdf5 file"])
def test_a_folder_or_file_that_is_no_cache_is_never_deleted(tmp_path, overwrite, kind):
    mine = tmp_path / {"folder": "my_results", "file": "notes.h5", "hdf5 file": "experiment.h5"}[kind]
    if kind == "folder":
        mine.mkdir()
        (mine / "notes.txt").write_text("months of work")
    elif kind == "file":
        mine.write_text("months of work")
    else:
        import h5py

        with h5py.File(mine, "w") as file:
            file["results"] = np.arange(3)
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    with pytest.raises(KdcacheError, match=r"is not a kdcache cache .*neither resumes nor deletes it, not even "
                                           r"with --overwrite"):
        CacheWriter.open(mine, tiny_spec(), np.zeros(8, np.int64), np.zeros((1, 8, 0), np.int32), overwrite=overwrite)
    assert sorted((p.name, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()) == before


def create_then_die(path) -> None:
    """What kill -9 during a cache's creation leaves: the store and its arrays, no metadata (written last)."""
    from kdcache.cache import create_store

    store = create_store(path)
    store.create_array("labels", (8,), "int64", (8,))
    store.create_array("aug", (1, 8, 0), "int32", (1, 4, 0))
    store.write("labels", (), np.zeros(8, np.int64))
    os._exit(0)  # no close, no flush, no cleanup: as a killed process


@pytest.mark.parametrize("fmt", SUFFIX)
def test_a_cache_killed_while_being_created_is_started_anew_by_the_same_command(tmp_path, fmt):
    path = tmp_path / f"c{SUFFIX[fmt]}"
    dying = FORK.Process(target=create_then_die, args=(path,))
    dying.start()
    dying.join(30)
    assert dying.exitcode == 0
    # Zarr leaves its store without metadata; HDF5 builds its file under a temporary name, and nothing is at path
    assert path.exists() if fmt == "zarr" else (not path.exists() and list(tmp_path.glob(".c.h5.tmp-*")))
    finished_cache(path)
    assert not list(tmp_path.glob(".c.h5.tmp-*"))
    with open_cache(path) as cache:
        assert cache.is_complete() and cache.spec == tiny_spec()


def test_a_cache_whose_creation_was_interrupted_is_started_anew(tmp_path):
    """kill -9 between the store's creation and its metadata (written last) leaves arrays without metadata."""
    path = tmp_path / "c.zarr"
    arguments = (tiny_spec(), np.zeros(8, np.int64), np.zeros((1, 8, 0), np.int32))
    with CacheWriter.open(path, *arguments) as writer:
        writer.store.set_metadata({})  # as if the process died before writing it
    with CacheWriter.open(path, *arguments) as writer:
        assert writer.pending() == [(0, 0), (0, 1)]
    with open_cache(path) as cache:
        assert cache.spec == tiny_spec()


# -- readers and a writer that rewrites -------------------------------------------------------------

def finished_cache(path, **options) -> None:
    with CacheWriter.open(path, tiny_spec(), np.zeros(8, np.int64), np.zeros((1, 8, 0), np.int32), **options) as w:
        for block in range(2):
            w.write_block(0, block, {"logits": np.ones((4, 1, 2), np.float16)}, 0)
        w.finish()


def read_and_hold(path, opened, done) -> None:
    """A reader in another process (as distill is): open the cache, say so, hold it until told."""
    with open_cache(path):
        opened.set()
        done.wait(30)


@pytest.mark.parametrize("fmt", SUFFIX)
def test_overwrite_is_refused_while_a_reader_has_the_cache_open_naming_it(tmp_path, fmt):
    path = tmp_path / f"c{SUFFIX[fmt]}"
    finished_cache(path)
    opened, done = FORK.Event(), FORK.Event()
    reader = FORK.Process(target=read_and_hold, args=(path, opened, done))
    reader.start()
    try:
        assert opened.wait(30)
        with pytest.raises(KdcacheError, match=rf"is being read by another kdcache process \(pid {reader.pid}\)"):
            finished_cache(path, overwrite=True)
        with open_cache(path) as cache:  # untouched, and other readers still read it
            assert cache.is_complete() and cache.view(0).sum() == 8 * 2
    finally:
        done.set()
        reader.join(30)
    finished_cache(path, overwrite=True)  # free once the reader is done
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no lock file is left behind


def test_a_reader_is_refused_while_a_writer_rewrites_the_cache(tmp_path):
    path = tmp_path / "c.zarr"
    finished_cache(path)
    with CacheWriter.open(path, tiny_spec(), np.zeros(8, np.int64), np.zeros((1, 8, 0), np.int32), overwrite=True):
        with pytest.raises(KdcacheError, match=rf"being rewritten from scratch by another kdcache process \(pid "
                                               rf"{os.getpid()}\)"):
            open_cache(path)


def test_an_hdf5_reader_does_not_stop_a_resumed_dump_from_finishing(tmp_path):
    """HDF5's own file lock made a writer fail at finish() while a reader in another process held the file open."""
    path = tmp_path / "c.h5"
    arguments = (tiny_spec(), np.zeros(8, np.int64), np.zeros((1, 8, 0), np.int32))
    with CacheWriter.open(path, *arguments) as writer:
        writer.write_block(0, 0, {"logits": np.ones((4, 1, 2), np.float16)}, 0)
    opened, done = FORK.Event(), FORK.Event()
    reader = FORK.Process(target=read_and_hold, args=(path, opened, done))  # inspect, say, while the dump resumes
    reader.start()
    try:
        assert opened.wait(30)
        with CacheWriter.open(path, *arguments) as writer:
            writer.write_block(0, 1, {"logits": np.ones((4, 1, 2), np.float16)}, 0)
            writer.finish()
    finally:
        done.set()
        reader.join(30)
    assert reader.exitcode == 0
    with open_cache(path) as cache:
        assert cache.is_complete() and cache.metadata["view_accuracy"] == [0.0]
