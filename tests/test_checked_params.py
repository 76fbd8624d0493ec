"""Only checked bytes and drawable parameters become targets: a bad file's advice followed literally, files read
again (as partners, in other views) held to their first read, stored views range-checked against what the
policy draws, and a run whose loss turns non-finite stopped with its last good checkpoint kept.

Small: 15 images of 40-200 px (image_folders.py), 32 px views, resnet8.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdcache import open_cache
from kdcache.data import load_dataset
from kdcache.data.files import FileResizedCropFlip
from kdcache.errors import KdcacheError
from kdcache.models import load_teacher
from kdcache.stages.dump import dump_teacher

from image_folders import CLASSES, write_folder
from small_runs import saved_teacher

SIZE, SCALES, VIEWS, BLOCK = 32, (1,), 2, 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("checked") / "images")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    _, path = saved_teacher(tmp_path_factory.mktemp("teacher"), num_classes=len(CLASSES), seed=0)
    return load_teacher(path, "resnet8", len(CLASSES))  # the model in eval mode, and the info a dump records


def dump_command(root, teacher, out, policy=None, **options):
    """What `kdcache dump-teacher` does each time it runs: list the folder, then dump (or resume)."""
    files = load_dataset("imagefolder", root, "train", image_size=SIZE)
    model, info = teacher
    return dump_teacher(model, info, files, policy(files) if policy else FileResizedCropFlip(SIZE), out, views=VIEWS,
                        scales=SCALES, block_size=BLOCK, batch_size=BLOCK, workers=0, show_progress=False, **options)


def one_line(caught) -> str:
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_a_bad_file_replaced_under_its_name_resumes_the_same_command_keeping_the_finished_blocks(folder, teacher,
                                                                                                  tmp_path):
    root = tmp_path / "images"
    shutil.copytree(folder, root)
    bad = root / "train" / "owl" / "a.jpg"  # sample 10, in block 2: blocks 0 and 1 of view 0 come first
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(KdcacheError) as caught:
        dump_command(root, teacher, tmp_path / "cache.zarr")
    assert "put a readable image under the same name and rerun the same command" in one_line(caught)
    Image.new("RGB", (50, 40), (90, 20, 200)).save(bad)  # the advice, literally
    result = dump_command(root, teacher, tmp_path / "cache.zarr")
    assert result.resumed and result.images == VIEWS * 15 - 2 * BLOCK  # view 0's blocks 0 and 1 were kept
    with open_cache(tmp_path / "cache.zarr") as cache:
        cache.require_complete()


def test_a_bad_file_deleted_is_refused_by_the_same_command_and_overwrite_starts_anew(folder, teacher, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(folder, root)
    bad = root / "train" / "owl" / "a.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(KdcacheError) as caught:
        dump_command(root, teacher, tmp_path / "cache.zarr")
    assert "or delete it and rerun (a dump begun over the folder then needs --overwrite" in one_line(caught)
    bad.unlink()
    with pytest.raises(KdcacheError, match="made with other arguments .*--overwrite"):
        dump_command(root, teacher, tmp_path / "cache.zarr")
    result = dump_command(root, teacher, tmp_path / "cache.zarr", overwrite=True)
    assert not result.resumed and result.images == VIEWS * 14


def mixup_policy(files):
    from kdcache.data import policy_for

    return policy_for(files, "imagenet", {"mode": "mixup", "alpha": 1.0, "prob": 1.0})


@pytest.fixture(scope="module")
def mixed_cache(folder, teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mixed") / "mixup.zarr"
    dump_command(folder, teacher, out, mixup_policy)
    return out


def run_distill(cache, root, out, epochs=1, **options):
    from kdcache.config import DistillConfig
    from kdcache.stages import distill

    config = DistillConfig(cache=str(cache), data_root=str(root), students=("resnet8",), losses=("kd",), epochs=epochs,
                           batch_size=5, out=str(out), device="cpu", workers=0, **options)
    return distill(config, show_progress=False)


def tampered(cache: Path, where: Path, column: str, value: float, sample: int = 3, **columns: float) -> Path:
    """A copy of the cache whose view 0 stores `value` in `column` of `sample` (and the further `columns`)."""
    from kdcache.cache.backends import open_store

    shutil.copytree(cache, where)
    with open_cache(where) as cache_view:
        names = list(cache_view.spec.augmentation["param_names"])
    with open_store(where, read_only=False) as store:
        row = store.read("aug", (0, slice(sample, sample + 1)))
        for name, new in {column: value, **columns}.items():
            row[0, names.index(name)] = new
        store.write("aug", (0, slice(sample, sample + 1)), row)
    return where


@pytest.mark.parametrize("column,value,columns,said", [
    ("lam", float("nan"), {}, "array 'aug', view 0: 1 samples hold parameters the imagenet policy never draws"),
    ("partner", float("nan"), {}, "array 'aug', view 0: 1 samples hold parameters the imagenet policy never draws"),
    ("height", 1e-7, {}, "sample 3's stored view .* is no view the imagenet policy draws for its 30x200 image"),
    ("height", 0.02, {"top": 0.0, "left": 0.0, "width": 1.0},  # full width, 2 % high: never drawn for 30x200
     "sample 3's stored view .* is no view the imagenet policy draws for its 30x200 image"),
])
def test_a_stored_parameter_the_policy_never_draws_is_refused_in_one_line_before_training(mixed_cache, folder,
                                                                                         tmp_path, column, value,
                                                                                         columns, said):
    cache = tampered(mixed_cache, tmp_path / "tampered.zarr", column, value, **columns)
    with pytest.raises(KdcacheError, match=said) as caught:
        run_distill(cache, folder, tmp_path / "run")
    assert "rebuild it with `kdcache dump-teacher --overwrite`" in one_line(caught)
    assert not (tmp_path / "run" / "resnet8-kd" / "last.pt").exists()


def test_a_loss_that_becomes_non_finite_stops_the_run_naming_the_epoch_and_step_and_keeps_the_last_good_epoch(
        mixed_cache, folder, tmp_path, monkeypatch):
    from kdcache.losses.spec import LossSpec
    from kdcache.models import read_checkpoint

    compute, calls = LossSpec.compute, []

    def diverging(self, *args, **kwargs):  # a run that diverges at its 5th step: epoch 2's second (3 steps each)
        terms = compute(self, *args, **kwargs)
        calls.append(1)
        return {**terms, "total": terms["total"] * float("nan")} if len(calls) == 5 else terms

    monkeypatch.setattr(LossSpec, "compute", diverging)
    with pytest.raises(KdcacheError) as caught:
        run_distill(mixed_cache, folder, tmp_path / "run", epochs=2)
    message = one_line(caught)
    last = tmp_path / "run" / "resnet8-kd" / "last.pt"
    assert message.startswith("the loss of resnet8-kd became non-finite (nan) at epoch 2, step 2: ")
    assert message.endswith(f"{last} holds epoch 1") and "with another --out" in message
    state = read_checkpoint(last)
    assert state["epoch"] == 1 and all(torch.isfinite(value).all() for value in state["model"].values())


def partners_of_view_0(root):
    """Sample -> its partner under view 0 of a mixup dump of the folder (seed 0), as the dump draws them."""
    from kdcache.data.files import FileBatches

    files = load_dataset("imagefolder", root, "train", image_size=SIZE)
    policy = mixup_policy(files)
    params = FileBatches(files, policy)[(0, range(len(files.labels)))][2]
    return files, params[:, policy.partner_column].long().tolist()


def test_a_partner_file_replaced_during_the_dump_is_refused_naming_it(folder, teacher, tmp_path, monkeypatch):
    from kdcache.data import files as files_module

    root = tmp_path / "images"
    shutil.copytree(folder, root)
    files, partners = partners_of_view_0(root)
    partner = next(p for p in partners[:BLOCK] if p >= BLOCK)  # read by block 0 before its own block records it
    path, read = files.path(partner), files_module.read_image

    def replacing(name, *limit):  # the partner's file is replaced just after the dump first reads it
        found = read(name, *limit)
        if name == path and not replacing.done:
            Image.new("RGB", (60, 50), (5, 250, 5)).save(path)
            replacing.done = True
        return found

    replacing.done = False
    monkeypatch.setattr(files_module, "read_image", replacing)
    with pytest.raises(KdcacheError, match=rf"^{path} changed since this dump first read it") as caught:
        dump_command(root, teacher, tmp_path / "cache.zarr", mixup_policy)
    assert "restore the file and rerun the same command, or rerun it with --overwrite" in one_line(caught)


def test_a_resumed_dump_writes_again_a_finished_block_whose_partner_was_never_recorded(folder, teacher, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(folder, root)
    files, partners = partners_of_view_0(root)
    unrecorded = {p for p in partners[:BLOCK] if p >= BLOCK}
    bad = next(i for i in range(BLOCK, 2 * BLOCK) if i not in unrecorded and i not in partners[:2 * BLOCK])
    original = Path(files.path(bad)).read_bytes()
    Path(files.path(bad)).write_bytes(b"not an image")  # stops the dump in block 1, after block 0 was written
    with pytest.raises(KdcacheError, match="not a decodable image"):
        dump_command(root, teacher, tmp_path / "cache.zarr", mixup_policy)
    Path(files.path(bad)).write_bytes(original)
    for partner in unrecorded:  # block 0 mixed these in, and no run recorded their bytes: now they are others
        Image.new("RGB", (60, 50), (5, 250, 5)).save(files.path(partner))
    result = dump_command(root, teacher, tmp_path / "cache.zarr", mixup_policy)
    assert result.images == VIEWS * 15  # block 0 was written again, from the files as they are now
    fresh = dump_command(root, teacher, tmp_path / "fresh.zarr", mixup_policy)
    with open_cache(tmp_path / "cache.zarr") as resumed, open_cache(tmp_path / "fresh.zarr") as whole:
        np.testing.assert_array_equal(resumed.view(0), whole.view(0))
        np.testing.assert_array_equal(resumed.file_checksums(), whole.file_checksums())
    assert fresh.images == result.images


def test_a_partner_another_rank_recorded_with_other_bytes_returns_the_blocks_that_mixed_it_and_stops(
        folder, teacher, tmp_path, monkeypatch):
    # Under torchrun one rank reads a partner while the rank of the partner's own block records its bytes: the two
    # are compared once every rank is done. One process stands in for both: its first read of the partner is made
    # to differ from what the partner's own block recorded, as when the file changed between two ranks' reads.
    from kdcache.stages.dump import _StreamedTeacherBatches

    files, partners = partners_of_view_0(folder)
    partner = partners[0]
    check = _StreamedTeacherBatches.require_recorded_as_first_read

    def another_rank_read_other_bytes(self, blocks):
        self.first_reads[partner] ^= 1
        check(self, blocks)

    monkeypatch.setattr(_StreamedTeacherBatches, "require_recorded_as_first_read", another_rank_read_other_bytes)
    with pytest.raises(KdcacheError) as caught:
        dump_command(folder, teacher, tmp_path / "cache.zarr", mixup_policy)
    assert one_line(caught).startswith(f"{files.path(partner)} changed while the dump read it")
    assert "rerun the same command to write them again" in str(caught.value)
    with open_cache(tmp_path / "cache.zarr") as cache:
        undone = {tuple(pair) for pair in np.argwhere(cache.progress() == -1)}
        assert (0, 0) in undone  # sample 0's block mixed the partner in under view 0
        with pytest.raises(KdcacheError, match="incomplete"):
            cache.require_complete()
    monkeypatch.undo()
    # the advice, literally (the blocks made unfinished, and those that mixed in a file they own, are written again)
    result = dump_command(folder, teacher, tmp_path / "cache.zarr", mixup_policy)
    assert result.images >= BLOCK * len(undone) - 1
    fresh = dump_command(folder, teacher, tmp_path / "fresh.zarr", mixup_policy)
    with open_cache(tmp_path / "cache.zarr") as resumed, open_cache(tmp_path / "fresh.zarr") as whole:
        resumed.require_complete()
        for view in range(VIEWS):
            np.testing.assert_array_equal(resumed.view(view), whole.view(view))
    assert fresh.images == VIEWS * 15
