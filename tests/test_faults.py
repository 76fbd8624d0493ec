"""Nothing lost, nothing wrong: every fault a cache meets on the way, each with the behaviour promised in the README."""

import csv
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_faults import delete_chunk, flip_chunk_byte
from console import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdcache.cache import Store, open_cache, open_store, verify
from kdcache.cache.layout import DIGEST_ARRAY, WRITTEN_VERSION, metadata_digest
from kdcache.cache.lock import lock_path
from kdcache.config import DistillConfig, DumpConfig
from kdcache.data import get_policy, load_dataset
from kdcache.errors import CorruptCacheError, KdcacheError
from kdcache.models import create_model, read_checkpoint, save_checkpoint
from kdcache.report import describe_cache
from kdcache.stages import CacheDataset, distill, require_fits
from kdcache.stages.dump import dump_from_config, dump_teacher

FORMATS = ["zarr", "hdf5"]
SUFFIX = {"zarr": ".zarr", "hdf5": ".h5"}
# digits (1438 training images, 10 classes) with an untrained resnet8: a cache of 2 views x 6 blocks in a second
DUMP_ARGS = {"teacher": "resnet8", "dataset": "digits", "views": 2, "batch_size": 64, "block_size": 256,
             "device": "cpu"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(path, create_model("resnet8", num_classes=10))
    return path


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", split="train"), load_dataset("digits", split="test")


@pytest.fixture(scope="module")
def pristine(checkpoint, tmp_path_factory):
    """One complete cache per format, copied by each test that damages it."""
    folder = tmp_path_factory.mktemp("pristine")
    paths = {fmt: folder / f"cache{SUFFIX[fmt]}" for fmt in FORMATS}
    for path in paths.values():
        dump_from_config(DumpConfig(checkpoint=str(checkpoint), out=str(path), **DUMP_ARGS),
                                 show_progress=False)
    return paths


def copy_of(pristine, fmt, tmp_path):
    target = tmp_path / pristine[fmt].name
    (shutil.copytree if pristine[fmt].is_dir() else shutil.copy)(pristine[fmt], target)
    return target




def read_arrays(path):
    with open_cache(path) as cache:
        arrays = {name: cache.store.read(name) for name in ("logits", "aug", "labels", "progress")}
        return arrays, cache.metadata["view_accuracy"]


def assert_same_cache(a, b):
    (arrays_a, accuracy_a), (arrays_b, accuracy_b) = read_arrays(a), read_arrays(b)
    for name in arrays_a:
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)
    assert accuracy_a == accuracy_b


def file_digests(path):
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


# -- kill -9, and a second writer -----------------------------------------------------------------

def blocks_done(path):
    try:
        with open_cache(path) as cache:
            return int((cache.progress() >= 0).sum()), cache.progress().size
    except KdcacheError:  # not created yet, or caught between two writes of its metadata
        return 0, 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_kill_9_mid_dump_then_the_same_command_resumes_to_an_uninterrupted_runs_arrays(checkpoint, pristine, tmp_path,
                                                                                     fmt):
    out = tmp_path / f"killed{SUFFIX[fmt]}"
    command = [sys.executable, "-m", "kdcache", "dump-teacher", "--checkpoint", str(checkpoint), "--out", str(out),
               "--teacher", "resnet8", "--dataset", "digits", "--views", "2", "--batch-size", "64",
               "--block-size", "256", "--device", "cpu"]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while blocks_done(out)[0] == 0 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # frozen mid-run: alive, holding its lock
        done, total = blocks_done(out)
        assert 0 < done < total, f"the dump was not caught mid-run ({done} of {total} blocks)"

        second = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "being written by another kdcache process" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    assert lock_path(out).exists()  # a dead process leaves its lock file, but the kernel dropped its lock
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed and finished" in rerun.stdout
    assert not lock_path(out).exists()
    assert_same_cache(out, pristine[fmt])


# -- damaged chunks -------------------------------------------------------------------------------

DAMAGE = {"flipped byte": flip_chunk_byte, "deleted chunk": delete_chunk}
CASES = [("zarr", "flipped byte"), ("hdf5", "flipped byte"), ("zarr", "deleted chunk")]  # HDF5 has no chunk files


@pytest.mark.parametrize(("fmt", "damage"), CASES)
def test_a_damaged_chunk_is_named_by_verify_and_refused_by_distill_in_the_same_words(pristine, tmp_path, capsys,
                                                                                    fmt, damage):
    cache = copy_of(pristine, fmt, tmp_path)
    DAMAGE[damage](cache, "logits", (0, 1, 0, 0))
    where = "array 'logits', view 0, block 1 (samples 256-511)"

    code, _, err = run_cli(["verify", str(cache)], capsys)
    problems = [line for line in err.splitlines() if line.startswith(f"{cache}: ")]  # below verify's progress bar
    assert code == 1 and len(problems) == 1 and problems[0].startswith(f"{cache}: {where}: ")

    code, _, err = run_cli(["distill", "--cache", str(cache), "--student", "resnet8", "--epochs", "1",
                        "--out", str(tmp_path / "runs")], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and where in err and "Traceback" not in err  # as verify
    assert "rebuild it with `kdcache dump-teacher --overwrite`" in err
    assert not (tmp_path / "runs" / "resnet8-sdd-lskd" / "last.pt").exists()  # refused before any training


def test_a_deleted_chunk_is_never_read_as_zeros_even_by_a_direct_view_read(pristine, tmp_path):
    cache = copy_of(pristine, "zarr", tmp_path)
    delete_chunk(cache, "logits", (1, 5, 0, 0))
    with open_cache(cache) as opened:
        opened.view(0)
        with pytest.raises(CorruptCacheError, match=r"view 1, block 5 \(samples 1280-1437\): the chunk is missing"):
            opened.view(1)


# -- a cache that does not fit the run ------------------------------------------------------------

def other_normalisation(data):
    return dataclasses.replace(data, mean=(0.5, 0.5, 0.5))


def other_images(data):
    images = data.images.clone()
    images[0, 0, 0, 0] ^= 1  # one pixel of one image
    return dataclasses.replace(data, images=images)


MISFITS = {
    "dataset.name": lambda data: {"data": dataclasses.replace(data, name="cifar10")},
    "dataset.split": lambda data: {"data": dataclasses.replace(data, split="test")},
    "dataset.mean": lambda data: {"data": other_normalisation(data)},
    "dataset.std": lambda data: {"data": dataclasses.replace(data, std=(0.3, 0.3, 0.3))},
    "dataset.fingerprint": lambda data: {"data": other_images(data)},
    "teacher.num_classes": lambda data: {"data": dataclasses.replace(data, labels=data.labels % 5, num_classes=5)},
    "augmentation": lambda data: {"policy": get_policy("none")},
    "teacher.arch": lambda data: {"teacher": "resnet20"},
}


@pytest.mark.parametrize("field", MISFITS)
def test_a_cache_made_from_something_else_is_refused_naming_the_field_and_both_values(pristine, digits, field):
    train = digits[0]
    misfit = {"data": train, "policy": get_policy("cifar"), "teacher": None, **MISFITS[field](train)}
    with open_cache(pristine["zarr"]) as cache:
        require_fits(cache, train, get_policy("cifar"), (1, 2, 4), teacher="resnet8")  # the fitting run passes
        have = cache.spec.to_metadata()
        for part in field.split("."):
            have = have[part]
        with pytest.raises(KdcacheError) as refused:
            require_fits(cache, misfit["data"], misfit["policy"], (1, 2, 4), teacher=misfit["teacher"])
    message = str(refused.value)
    assert f"was written for {field}" in message and "but this run has" in message
    if isinstance(have, str):
        assert have in message  # the cache's value, then this run's
    assert "rebuild the cache or pass" in message


def test_the_dataset_and_distill_refuse_a_misfit_too(pristine, digits, checkpoint, tmp_path):
    train, test = digits
    with open_cache(pristine["zarr"]) as cache:
        with pytest.raises(KdcacheError, match="written for dataset.mean"):
            CacheDataset(cache, data=other_normalisation(train))
        with pytest.raises(KdcacheError, match=r"holds scales \[1, 2, 4\] but this run asks for \[1, 3\]"):
            CacheDataset(cache, data=train, scales=(1, 3))
    runs = tmp_path / "runs"
    with pytest.raises(KdcacheError, match="written for dataset.mean"):
        distill(DistillConfig(cache=str(pristine["zarr"]), students=("resnet8",), epochs=1, out=str(runs)),
                show_progress=False, data=(other_normalisation(train), test))
    other_teacher = tmp_path / "other.pt"
    torch.manual_seed(1)
    save_checkpoint(other_teacher, create_model("resnet8", num_classes=10))
    with pytest.raises(KdcacheError, match="written for teacher.checkpoint_sha256"):
        distill(DistillConfig(cache=str(pristine["zarr"]), live_teacher=str(other_teacher), teacher="resnet8",
                              students=("resnet8",), epochs=1, out=str(runs)), show_progress=False)
    assert not runs.exists()


# -- teacher output that cannot be stored ----------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_logits_that_overflow_float16_stop_the_dump_naming_the_samples(digits, tmp_path, fmt):
    teacher = create_model("resnet8", num_classes=10).eval()
    with torch.no_grad():
        teacher.fc.weight.mul_(1e7)  # logits beyond float16's 65504: Inf once stored
    path = tmp_path / f"c{SUFFIX[fmt]}"
    info = {"arch": "resnet8", "num_classes": 10, "checkpoint": "t.pt", "checkpoint_sha256": "ab" * 32}
    with pytest.raises(KdcacheError, match=r"NaN or Inf for samples 0, 1, 2, .* of view 0; nothing of block 0 was "
                                           r"marked done.*--dtype float32"):
        dump_teacher(teacher, info, digits[0], get_policy("cifar"), path, views=1, scales=(1, 2), block_size=256,
                     show_progress=False)
    with open_cache(path) as cache:
        assert (cache.progress()[0] == -1).all()


# -- a full disk ----------------------------------------------------------------------------------

def full_disk(capacity):
    """A Store.write that fails with ENOSPC once `capacity` bytes were written, as a small filesystem would."""
    real_write, written = Store.write, [0]

    def write(store, name, selection, values):
        written[0] += np.asarray(values).nbytes
        if written[0] > capacity:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(store, name, selection, values)

    return write


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_full_disk_stops_the_dump_naming_view_and_block_and_the_rerun_completes_it(checkpoint, pristine, tmp_path,
                                                                                   monkeypatch, fmt):
    out = tmp_path / f"c{SUFFIX[fmt]}"
    config = DumpConfig(checkpoint=str(checkpoint), out=str(out), **DUMP_ARGS)
    logits_bytes = 2 * 1438 * 21 * 10 * 2
    monkeypatch.setattr(Store, "write", full_disk(capacity=logits_bytes // 4))
    with pytest.raises(KdcacheError, match=r"could not write view 0, block [0-5] .*No space left on device.*"
                                           r"free space.*rerun the same command") as refused:
        dump_from_config(config, show_progress=False)
    assert "\n" not in str(refused.value)
    monkeypatch.undo()
    assert not lock_path(out).exists()
    done, total = blocks_done(out)
    assert 0 < done < total
    dump_from_config(config, show_progress=False)
    assert_same_cache(out, pristine[fmt])


# -- bad checkpoints, through the command line ---------------------------------------------------

def test_a_checkpoint_of_another_architecture_is_one_line_naming_file_and_parameter(checkpoint, tmp_path, capsys):
    code, _, err = run_cli(["dump-teacher", "--checkpoint", str(checkpoint), "--teacher", "resnet20",
                        "--out", str(tmp_path / "c.zarr")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(checkpoint) in err and "layer1.1." in err  # resnet8 has one block per stage; resnet20 three


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_a_truncated_checkpoint_is_one_line_naming_the_file(checkpoint, tmp_path, capsys, keep):
    truncated = tmp_path / "truncated.pt"
    data = checkpoint.read_bytes()
    truncated.write_bytes(data[:int(len(data) * keep)])
    code, _, err = run_cli(["dump-teacher", "--checkpoint", str(truncated), "--teacher", "resnet8",
                        "--out", str(tmp_path / "c.zarr")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err and str(truncated) in err
    assert not (tmp_path / "c.zarr").exists()


# -- reading never writes -------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_reading_a_cache_for_training_changes_no_byte_of_it(pristine, tmp_path, capsys, fmt):
    cache = copy_of(pristine, fmt, tmp_path)
    before = file_digests(cache)
    assert run_cli(["inspect", str(cache)], capsys)[0] == 0
    assert run_cli(["verify", str(cache)], capsys)[0] == 0
    for path in ("device", "dataset"):
        code, _, err = run_cli(["distill", "--cache", str(cache), "--student", "resnet8", "--epochs", "1", "--batch-size",
                            "256", "--batch-path", path, "--out", str(tmp_path / path)], capsys)
        assert code == 0, err
    assert file_digests(cache) == before


# -- malformed metadata ---------------------------------------------------------------------------

def metadata_fields(metadata, prefix=""):
    """Every dotted field of the metadata document (nested objects included)."""
    for key, value in metadata.items():
        yield prefix + key
        if isinstance(value, dict):
            yield from metadata_fields(value, prefix + key + ".")


def edited(metadata, field, value):
    """A deep copy with `field` set to value, or removed when value is REMOVE."""
    document = json.loads(json.dumps(metadata))
    *parents, last = field.split(".")
    node = document
    for part in parents:
        node = node[part]
    if value is REMOVE:
        del node[last]
    else:
        node[last] = value
    return document


REMOVE = object()
WRONG_VALUES = st.one_of(st.just(REMOVE), st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=3), st.just("line\nbreak"),
                         st.lists(st.integers(-1, 2), max_size=3), st.just({}))


def rewrite_metadata(path, metadata, sign=False):
    """Replace a cache's metadata document; with sign, its digest too, as a cache written so would hold."""
    with open_store(path, read_only=False) as store:
        store.set_metadata(metadata)
        if sign:
            store.write(DIGEST_ARRAY, (), metadata_digest(metadata))


@pytest.fixture(scope="module")
def pristine_metadata(pristine):
    with open_cache(pristine["zarr"]) as cache:
        return cache.metadata, cache.view(0)


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_edited_metadata_is_refused_naming_the_field_or_read_exactly_as_before(pristine, pristine_metadata, fmt, data):
    metadata, view0 = pristine_metadata
    field = data.draw(st.sampled_from(sorted(metadata_fields(metadata))), label="field")
    value = data.draw(WRONG_VALUES, label="value")
    with tempfile.TemporaryDirectory() as folder:
        cache = copy_of(pristine, fmt, Path(folder))
        rewrite_metadata(cache, edited(metadata, field, value))
        try:
            with open_cache(cache) as opened:
                # accepted: then it must read and check exactly as the untouched cache does
                np.testing.assert_array_equal(opened.view(0), view0)
                assert verify(opened) == []
            assert describe_cache(cache)["complete"]
        except KdcacheError as error:
            message = str(error)
            assert "\n" not in message and "Traceback" not in message
            named = {field, field.split(".")[-1], field.replace("_", " "), field.split(".")[0],
                     "its metadata document (zarr.json or the HDF5 'kdcache' attribute) was edited"}
            assert any(name in message for name in named), (field, message)


@settings(max_examples=15, deadline=None)
@given(cut=st.floats(0, 1, exclude_max=True), name=st.sampled_from(["zarr.json", "logits/zarr.json"]))
def test_a_truncated_zarr_json_is_refused_naming_the_file(pristine, cut, name):
    with tempfile.TemporaryDirectory() as folder:
        cache = copy_of(pristine, "zarr", Path(folder))
        document = (cache / name).read_bytes()
        (cache / name).write_bytes(document[:int(len(document) * cut)])
        with pytest.raises(CorruptCacheError, match="zarr.json") as refused:
            with open_cache(cache) as opened:
                opened.view(0)
        assert "rebuild it" in str(refused.value) or "the cache was altered" in str(refused.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_attributes_and_another_format_version_are_named(pristine, pristine_metadata, tmp_path, fmt):
    metadata, _ = pristine_metadata
    cache = copy_of(pristine, fmt, tmp_path)
    rewrite_metadata(cache, {})
    with pytest.raises(CorruptCacheError, match="has no kdcache metadata"):
        open_cache(cache)
    rewrite_metadata(cache, edited(metadata, "format_version", WRITTEN_VERSION + 1))
    with pytest.raises(CorruptCacheError, match=rf"cache format version {WRITTEN_VERSION + 1}, this kdcache .* reads "
                                                rf"versions {', '.join(map(str, range(1, WRITTEN_VERSION + 1)))};"):
        open_cache(cache)
    rewrite_metadata(cache, edited(metadata, "format_version", 2))  # format 2 without its top-k field
    with pytest.raises(CorruptCacheError, match=r"'format_version' is 2 but 'logits.topk' is missing"):
        open_cache(cache)


# -- SIGTERM, as SLURM and Kubernetes stop a job ---------------------------------------------------

@pytest.mark.slow
def test_sigterm_stops_a_dump_cleanly_with_the_right_advice_and_the_rerun_resumes(checkpoint, pristine, tmp_path):
    out = tmp_path / "terminated.zarr"
    command = [sys.executable, "-m", "kdcache", "dump-teacher", "--checkpoint", str(checkpoint), "--out", str(out),
               "--teacher", "resnet8", "--dataset", "digits", "--views", "2", "--batch-size", "64",
               "--block-size", "256", "--device", "cpu"]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while blocks_done(out)[0] == 0 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 143 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("kdcache: terminated (SIGTERM); rerun the same command to resume: "
                                           "finished blocks are kept")
    assert not lock_path(out).exists()  # released on the way out, not left for the kernel to drop
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0 and "resumed and finished" in rerun.stdout, rerun.stderr
    assert_same_cache(out, pristine["zarr"])


@pytest.mark.parametrize("command, advice", [
    ("distill", "rerun the same command with --resume to continue each run from its last finished epoch; a language "
                "model's or a segmentation model's run does not resume: the same command without --resume starts "
                "it again in a folder of its own"),
    ("train-teacher", "train-teacher does not resume: rerun it to train again"),
])
def test_an_interrupted_command_says_exactly_what_continues_it(monkeypatch, capsys, command, advice):
    from console import run_cli

    import kdcache.cli

    def interrupted(*args, **kwargs):
        raise kdcache.cli.Terminated()

    monkeypatch.setattr(kdcache.cli.cli, "main", interrupted)
    code, _, err = run_cli([command], capsys)
    assert code == 143 and err.strip() == f"kdcache: terminated (SIGTERM); {advice}"


# -- a run's own files: last.pt, and where the run and its cache lie --------------------------------

def one_epoch(cache, out, **options):
    """A 1-epoch resnet8 KD run from a cache, as `kdcache distill` makes it (its folder is out/resnet8-kd)."""
    config = DistillConfig(cache=str(cache), students=("resnet8",), losses=("kd",), epochs=options.pop("epochs", 1),
                           batch_size=256, out=str(out), device="cpu", **options)
    return distill(config, show_progress=False)


@pytest.fixture(scope="module")
def trained_run(pristine, tmp_path_factory):
    """One finished 1-epoch run from the pristine Zarr cache; tests copy its folder."""
    runs = tmp_path_factory.mktemp("trained") / "runs"
    one_epoch(pristine["zarr"], runs)
    return runs


def copy_of_run(trained_run, tmp_path):
    shutil.copytree(trained_run, tmp_path / "runs")
    return tmp_path / "runs"


@pytest.mark.parametrize("damage", ["truncated", "not a run", "a pickled object"])
def test_resume_from_a_damaged_last_pt_is_one_line(pristine, trained_run, tmp_path, damage):
    copy_of_run(trained_run, tmp_path)
    last = tmp_path / "runs" / "resnet8-kd" / "last.pt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:1000])
    elif damage == "not a run":
        torch.save({"model": {"w": torch.zeros(1)}}, last)
    else:
        torch.save({"model": {}, "record": DistillConfig()}, last)  # a dataclass: weights-only loading refuses it
    expected = {"truncated": "truncated or corrupt", "not a run": "is not a kdcache run checkpoint",
                "a pickled object": "weights-only loading refuses"}[damage]
    with pytest.raises(KdcacheError, match=expected):
        one_epoch(pristine["zarr"], tmp_path / "runs", resume=True)


def test_a_run_resumes_after_its_cache_and_its_folder_moved(pristine, pristine_metadata, trained_run, tmp_path):
    moved_cache, moved_runs = tmp_path / "elsewhere.zarr", tmp_path / "moved-runs"
    shutil.copytree(pristine["zarr"], moved_cache)  # the run was trained from the pristine cache's own path
    shutil.copytree(trained_run, moved_runs)
    before = (moved_runs / "resnet8-kd" / "model.pt").read_bytes()
    [resumed] = one_epoch(moved_cache, moved_runs, resume=True)  # accepted: the finished run is kept as it was
    assert len(list(csv.DictReader(open(resumed.folder / "metrics.csv")))) == 1
    assert (moved_runs / "resnet8-kd" / "model.pt").read_bytes() == before
    other = tmp_path / "other.zarr"
    shutil.copytree(pristine["zarr"], other)
    rewrite_metadata(other, edited(pristine_metadata[0], "views.seed", 7), sign=True)  # another cache's content
    with pytest.raises(KdcacheError, match=r"other settings \(cache_identity\)"):  # is still refused
        one_epoch(other, moved_runs, resume=True)


def test_distill_never_writes_into_its_cache(pristine, tmp_path):
    cache = copy_of(pristine, "zarr", tmp_path)
    before = file_digests(cache)
    for out in (cache, cache / "runs"):
        with pytest.raises(KdcacheError, match="a cache is never written to: choose another --out"):
            one_epoch(cache, out)
    assert file_digests(cache) == before


def test_a_full_disk_when_last_pt_is_written_is_one_line_and_keeps_the_previous_file(pristine, tmp_path, monkeypatch):
    last, save, kept = tmp_path / "runs" / "resnet8-kd" / "last.pt", torch.save, []

    def full_at_the_second_epoch(*args, **kwargs):  # epoch 1 writes last.pt; the disk is full when epoch 2 ends
        if kept:
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: file write failed")
        save(*args, **kwargs)
        kept.append(True)

    monkeypatch.setattr(torch, "save", full_at_the_second_epoch)
    with pytest.raises(KdcacheError, match=r"could not write .*last.pt .*the previous last.pt is intact: free space"):
        one_epoch(pristine["zarr"], tmp_path / "runs", epochs=2)
    monkeypatch.undo()
    assert read_checkpoint(last)["epoch"] == 1 and not list(last.parent.glob(".last.pt.*.tmp"))


# -- what the checksums cannot see: edits of the metadata and of the arrays' own descriptions ---------

@pytest.mark.parametrize("scales", [[1, 4, 2], [2, 4], [1, 1, 2]])
def test_scales_out_of_order_are_refused_not_read_as_other_cells(pristine, pristine_metadata, tmp_path, scales):
    cache = copy_of(pristine, "zarr", tmp_path)
    rewrite_metadata(cache, edited(pristine_metadata[0], "scales", scales))
    with pytest.raises(CorruptCacheError, match=r"'scales' must be integers ascending from 1"):
        open_cache(cache)


@pytest.mark.parametrize("array, field, value, named", [
    ("aug", "data_type", "float32", "'aug' is .* float32 .* imply .* int32"),
    ("labels", "data_type", "int32", "'labels' is .* int32 .* imply .* int64"),
    ("logits", "data_type", "float32", "'logits' is .* float32 .* imply .* float16"),
    ("logits", "chunk_grid", {"name": "regular", "configuration": {"chunk_shape": [2, 256, 21, 10]}},
     r"'logits' .* in chunks of \[2, 256\] .* imply .* in chunks of \[1, 256\]"),
    ("logits", "codecs", [{"name": "bytes", "configuration": {"endian": "little"}}],
     r"'logits' is encoded \['bytes'\], but kdcache writes \['bytes', 'crc32c'\] \(with its checksum\)"),
])
def test_an_array_whose_dtype_or_chunking_was_edited_is_refused_before_any_read(pristine, tmp_path, array, field,
                                                                               value, named):
    cache = copy_of(pristine, "zarr", tmp_path)
    description = cache / array / "zarr.json"
    document = json.loads(description.read_text())
    document[field] = value
    description.write_text(json.dumps(document))
    with pytest.raises(CorruptCacheError, match=named + ".*the cache was altered"):
        open_cache(cache)


@pytest.mark.parametrize("sample, value", [(5, [9, 0, 0]), (700, [0, -1, 0]), (1437, [3, 3, 2])])
def test_view_parameters_the_policy_never_draws_are_refused_when_the_view_is_loaded(pristine, tmp_path, sample,
                                                                                  value):
    cache = copy_of(pristine, "zarr", tmp_path)
    with open_store(cache, read_only=False) as store:  # rewritten through the store: its checksums stay valid
        params = store.read("aug")
        params[0, sample] = value
        store.write("aug", (), params)
    with pytest.raises(CorruptCacheError, match=rf"array 'aug', view 0: 1 samples hold parameters the cifar policy "
                                                rf"never draws \(first: sample {sample}, .*rebuild it"):
        one_epoch(cache, tmp_path / "runs")  # refused as epoch 1 loads view 0, before a step


@pytest.mark.parametrize("name", ["cifar", "imagenet", "none"])
def test_every_drawn_parameter_is_in_range(name):
    policy = get_policy(name, image_size=(40, 24))
    drawn = policy.sample(torch.Generator().manual_seed(0), 5000)
    assert not policy.out_of_range(drawn).any()
    if name != "none":
        shifted = drawn.clone()
        shifted[:, 1] += 100  # a column or offset far past the image
        assert policy.out_of_range(shifted).all()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("field, value", [("views.seed", 7), ("dataset.split", "test"), ("description", "edited"),
                                          ("teacher.checkpoint_sha256", "f" * 64)])
def test_a_well_formed_edit_of_the_metadata_is_named_by_its_digest(checkpoint, pristine, pristine_metadata, tmp_path,
                                                                   fmt, field, value):
    """Every field still has the right type and range, so only the digest (in a checksummed chunk) can tell."""
    cache = copy_of(pristine, fmt, tmp_path)
    rewrite_metadata(cache, edited(pristine_metadata[0], field, value))
    with pytest.raises(CorruptCacheError, match=r"its metadata document .* was edited or damaged: its sha256 differs "
                                                r"from the one stored beside it in array 'metadata_sha256'"):
        open_cache(cache)
    with pytest.raises(CorruptCacheError, match="metadata_sha256"):  # nor does a dump resume it
        dump_from_config(DumpConfig(checkpoint=str(checkpoint), out=str(cache), **DUMP_ARGS), show_progress=False)


# -- full disks, at the start and in HDF5 ------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_a_disk_full_from_the_start_is_one_line_and_the_rerun_with_room_completes(checkpoint, pristine, tmp_path,
                                                                                 monkeypatch, fmt):
    out = tmp_path / f"c{SUFFIX[fmt]}"
    config = DumpConfig(checkpoint=str(checkpoint), out=str(out), **DUMP_ARGS)
    with monkeypatch.context() as full:
        full.setattr(Store, "write", full_disk(capacity=0))
        with pytest.raises(KdcacheError, match=r"could not create the cache .*the disk is full: free space, then "
                                               r"rerun the same command: the unfinished store is recognised"):
            dump_from_config(config, show_progress=False)
    assert not lock_path(out).exists()
    dump_from_config(config, show_progress=False)  # room again: the unfinished store is started anew
    assert_same_cache(out, pristine[fmt])


def test_hdf5_refuses_a_write_the_disk_has_no_room_for_instead_of_losing_it(checkpoint, pristine, tmp_path,
                                                                           monkeypatch):
    """h5py reports ENOSPC only when objects are freed: the write must be refused before, and its block kept pending."""
    import kdcache.cache.hdf5_store as hdf5_store

    out = tmp_path / "c.h5"
    config = DumpConfig(checkpoint=str(checkpoint), out=str(out), **DUMP_ARGS)
    real = shutil.disk_usage
    calls = []

    def filling(path):
        calls.append(path)
        usage = real(path)
        return usage._replace(free=0) if len(calls) > 12 else usage  # the disk fills during the dump

    monkeypatch.setattr(hdf5_store.shutil, "disk_usage", filling)
    with pytest.raises(KdcacheError, match=r"could not write view \d+, block \d+ .*No space left on device.*the disk "
                                           r"is full: free space, then rerun the same command to resume"):
        dump_from_config(config, show_progress=False)
    with open_cache(out) as cache:
        done, problems = int((cache.progress() >= 0).sum()), verify(cache)
        assert 0 < done < cache.progress().size
        assert problems and all("not written yet" in p.what for p in problems)  # pending blocks, nothing damaged
    monkeypatch.setattr(hdf5_store.shutil, "disk_usage", real)
    dump_from_config(config, show_progress=False)
    assert_same_cache(out, pristine["hdf5"])


@pytest.mark.parametrize("target, edit", [("zarr.json", "num_samples"), ("labels/zarr.json", "shape"),
                                          ("logits/zarr.json", "shape")])
def test_a_description_claiming_a_trillion_samples_is_refused_at_once(pristine, pristine_metadata, tmp_path, target,
                                                                      edit):
    cache = copy_of(pristine, "zarr", tmp_path)
    if edit == "num_samples":
        rewrite_metadata(cache, edited(pristine_metadata[0], "dataset.num_samples", 10**12), sign=True)
    else:
        document = json.loads((cache / target).read_text())
        document["shape"][1 if target.startswith("logits") else 0] = 10**12
        (cache / target).write_text(json.dumps(document))
    started = time.monotonic()
    with pytest.raises(CorruptCacheError, match=r"the metadata fields .* imply .*the cache was altered"):
        with open_cache(cache) as opened:
            verify(opened)
    assert time.monotonic() - started < 5  # no read, no allocation of the claimed size
