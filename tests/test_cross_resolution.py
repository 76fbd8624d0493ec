"""Cross-resolution distillation: a student at a smaller --image-size than the teacher's cached views, on the same
views. A streamed file's student view is torchvision's resized crop of the same box of the original file at the
student's side; a view held in memory is the teacher's view resized with torchvision's resize. Training, the test
split and `kdcache eval` all run at the student's side; a larger side, CutMix boxes of files and a live teacher
are refused in one line.
"""

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import functional as TF

from kdcache import CacheDataset, open_cache
from kdcache.config import DistillConfig
from kdcache.data import get_policy, load_dataset, load_splits
from kdcache.data.files import FileResizedCropFlip
from kdcache.errors import KdcacheError
from kdcache.models import create_model, file_sha256, load_teacher, save_checkpoint
from kdcache.stages import distill
from kdcache.stages.dataset import check_loader_inputs, load_described_data
from kdcache.stages.dump import dump_teacher
from kdcache.stages.evaluate import evaluate_model

from image_folders import CLASSES, write_folder
from small_runs import saved_teacher, synthetic_splits

TEACHER_SIZE, STUDENT_SIZE = 64, 32  # the files' cache, and the student's views of it


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("crossres") / "images")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(path, create_model("resnet8", num_classes=len(CLASSES)).eval())
    model, info = load_teacher(path, "resnet8", len(CLASSES))
    return model.eval(), info, path


def files_cache(folder, teacher, out, **options):
    files = load_dataset("imagefolder", folder, "train", image_size=TEACHER_SIZE)
    policy = files.policy("imagenet", options.pop("mix", None))
    dump_teacher(teacher[0], teacher[1], files, policy, out, views=2, scales=(1, 2), block_size=5, workers=0,
                 show_progress=False, **options)
    return out


@pytest.fixture(scope="module")
def cache_path(folder, teacher, tmp_path_factory):
    return files_cache(folder, teacher, tmp_path_factory.mktemp("cache") / "files.zarr")


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    """40 synthetic 32 px images, a test split of 20, and a cache of 2 pad-and-crop views of a random resnet8."""
    folder = tmp_path_factory.mktemp("small")
    splits = synthetic_splits(40, 4, seed=0, image_size=32)
    model, path = saved_teacher(folder, 4, seed=0)
    info = {"arch": "resnet8", "checkpoint": str(path), "checkpoint_sha256": file_sha256(path)}
    dump_teacher(model, info, splits[0], get_policy("cifar"), folder / "c.zarr", views=2, scales=(1, 2),
                 block_size=20, show_progress=False)
    return folder / "c.zarr", splits


def test_a_files_student_view_is_torchvisions_resized_crop_of_the_same_box_of_the_original(cache_path, folder):
    student = CacheDataset(cache_path, folder, images="uint8", image_size=STUDENT_SIZE)
    teacher_views = CacheDataset(cache_path, folder, images="uint8")
    assert student.input_size == (3, STUDENT_SIZE, STUDENT_SIZE) and student.image_size == STUDENT_SIZE
    box = FileResizedCropFlip(TEACHER_SIZE)
    with open_cache(cache_path) as cache:
        params = torch.from_numpy(cache.aug_params(0))
    downsampled_differ = 0
    for index in range(len(student)):
        original = decode_image(student.data.path(index), ImageReadMode.RGB)
        top, left, height, width, flip = box.box(params[index], *original.shape[-2:])
        expected = TF.resized_crop(original, top, left, height, width, [STUDENT_SIZE] * 2, antialias=True)
        expected = TF.hflip(expected) if flip else expected
        assert torch.equal(student[index][0], expected), index
        # not the teacher's 64 px pixels downsampled: the box is cut from the original again
        downsampled = TF.resize(teacher_views[index][0], [STUDENT_SIZE] * 2, antialias=True)
        downsampled_differ += not torch.equal(downsampled, expected)
    assert downsampled_differ > 0


def test_an_in_memory_student_view_is_the_teachers_view_resized_with_torchvision(small_cache):
    cache, (train, _) = small_cache
    student = CacheDataset(cache, data=train, images="uint8", image_size=16)
    teacher_views = CacheDataset(cache, data=train, images="uint8")
    assert student.input_size == (3, 16, 16)
    for epoch in (0, 1):  # both cached views
        student.set_epoch(epoch)
        teacher_views.set_epoch(epoch)
        for index in (0, 7, 39):
            expected = TF.resize(teacher_views[index][0], [16, 16], antialias=True)
            assert torch.equal(student[index][0], expected)
            torch.testing.assert_close(student[index][2]["regions"], teacher_views[index][2]["regions"])


def test_mixed_views_held_in_memory_are_the_teachers_mixed_views_resized(small_cache, tmp_path):
    _, (train, _) = small_cache
    model, path = saved_teacher(tmp_path, 4, seed=0)
    info = {"arch": "resnet8", "checkpoint": str(path), "checkpoint_sha256": file_sha256(path)}
    dump_teacher(model, info, train, train.policy("cifar", {"mode": "cutmix"}), tmp_path / "cutmix.zarr", views=1,
                 scales=(1,), block_size=20, show_progress=False)
    student = CacheDataset(tmp_path / "cutmix.zarr", data=train, images="uint8", image_size=16)
    teacher_views = CacheDataset(tmp_path / "cutmix.zarr", data=train, images="uint8")
    for index in range(len(train.labels)):
        image, _, targets = student[index]
        assert torch.equal(image, TF.resize(teacher_views[index][0], [16, 16], antialias=True))
        assert targets["mix.weight"] == teacher_views[index][2]["mix.weight"]


def test_a_loader_is_compared_with_the_size_the_dataset_serves(small_cache):
    cache, (train, _) = small_cache
    dataset = CacheDataset(cache, data=train, image_size=16)
    check_loader_inputs(dataset, image_size=16)
    with pytest.raises(KdcacheError) as refused:
        check_loader_inputs(dataset, image_size=32)
    assert str(refused.value) == (f"the loader's image size is 32x32 but the dataset serves the cache {cache}'s "
                                  f"views at 16x16: give the loader the dataset's image size")


def recorded_inputs(monkeypatch, module: str = "kdcache.stages.distill", maker: str = "create_model"
                    ) -> list[tuple[int, ...]]:
    """The shapes of every input the models that `maker` of `module` makes see (training and evaluation)."""
    shapes, make = [], getattr(importlib.import_module(module), maker)

    def recording(*args, **kwargs):
        made = make(*args, **kwargs)
        model = made[0] if isinstance(made, tuple) else made  # load_teacher's (model, info)
        stem = next(layer for layer in model.modules() if isinstance(layer, torch.nn.Conv2d))  # every path's first
        stem.register_forward_pre_hook(lambda _, inputs: shapes.append(tuple(inputs[0].shape[1:])))
        return made
    # the module by name: kdcache.stages' `distill` function hides the module of that name
    monkeypatch.setattr(importlib.import_module(module), maker, recording)
    return shapes


def run(out, data=None, **options):
    config = DistillConfig(students=("resnet8",), epochs=1, batch_size=5, out=str(out), device="cpu", workers=0,
                           **options)
    return distill(config, show_progress=False, data=data)[0]



@pytest.mark.parametrize("batch_path", ["device", "dataset"])
def test_distill_from_files_trains_and_evaluates_at_the_students_size(cache_path, folder, tmp_path, monkeypatch,
                                                                      batch_path):
    shapes = recorded_inputs(monkeypatch)
    summary = run(tmp_path / "runs", cache=str(cache_path), data_root=str(folder), losses=("kd",),
                  image_size=STUDENT_SIZE, batch_path=batch_path)
    assert set(shapes) == {(3, STUDENT_SIZE, STUDENT_SIZE)} and len(shapes) > 3  # the train steps and the test split
    evaluated = evaluate_model(summary.folder, workers=0)  # the run's record reads the test files at its side
    assert evaluated.top1 == pytest.approx(summary.test_acc)


def test_the_device_and_dataset_paths_train_on_the_same_smaller_pixels(small_cache, tmp_path, monkeypatch):
    cache, splits = small_cache
    shapes = recorded_inputs(monkeypatch)
    losses = []
    for batch_path in ("device", "dataset"):
        summary = run(tmp_path / batch_path, cache=str(cache), losses=("kd",), image_size=16, batch_path=batch_path,
                      data=splits)
        lines = (summary.folder / "metrics.csv").read_text().splitlines()[1:]
        losses.append([float(line.split(",")[1]) for line in lines])
        recorded = json.loads((summary.folder / "model.json").read_text())["dataset"]
        assert recorded["view_size"] == 16  # what `kdcache eval` reads the test split at
        assert load_described_data(recorded, split="test", num_samples=20).first_images().shape[-2:] == (16, 16)
    assert set(shapes) == {(3, 16, 16)} and len(shapes) > 10  # the training steps and the test split
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_digits_without_a_cache_make_views_at_32_px_resized_to_the_image_size(tmp_path, monkeypatch):
    train, test = load_splits("digits", image_size=16)  # what distill without a cache and train-teacher load
    assert train.view_size == test.view_size == 16 and train.images.shape[-1] == 32
    assert torch.equal(test.first_images(3), TF.resize(test.images[:3], [16, 16], antialias=True))
    _, weights = saved_teacher(tmp_path, 10, seed=0)
    shapes = recorded_inputs(monkeypatch, "kdcache.stages.evaluate", "load_teacher")
    assert evaluate_model(weights, "resnet8", "digits", image_size=16).samples == len(test.labels)
    assert set(shapes) == {(3, 16, 16)}
    with pytest.raises(KdcacheError, match=r"^--image-size 40: digits's images are held at 32x32, and their views "
                                           r"can be made smaller"):
        load_splits("digits", image_size=40)


def test_a_student_larger_than_the_cached_views_is_refused_in_one_line(cache_path, folder, small_cache, tmp_path):
    with pytest.raises(KdcacheError) as refused:
        run(tmp_path, cache=str(cache_path), data_root=str(folder), losses=("kd",), image_size=96)
    assert str(refused.value) == (
        "--image-size 96: the teacher's cached views are 64x64, and a student sees them at that size or smaller (the "
        "same crops, fewer pixels), never larger, where it would see detail the teacher never saw; give --image-size "
        "64 or less (image_size= in CacheDataset), or dump the teacher at 96 px")
    with pytest.raises(KdcacheError, match=r"^--image-size 48: the teacher's cached views are 32x32"):
        CacheDataset(small_cache[0], data=small_cache[1][0], image_size=48)
    assert not (tmp_path / "resnet8-kd").exists()


def test_cutmix_boxes_of_files_and_a_live_teacher_are_refused_at_another_size(folder, teacher, cache_path, tmp_path):
    cutmix = files_cache(folder, teacher, tmp_path / "cutmix.zarr", mix={"mode": "cutmix"})
    with pytest.raises(KdcacheError, match=r"^--image-size 32: the cache's CutMix boxes are whole pixels of the "
                                           r"teacher's 64x64 views of files, with no exact box at 32 px"):
        run(tmp_path, cache=str(cutmix), data_root=str(folder), losses=("kd",), image_size=STUDENT_SIZE)
    with pytest.raises(KdcacheError, match=r"^--image-size 32 with --live-teacher: the live teacher would see"):
        run(tmp_path, cache=str(cache_path), data_root=str(folder), losses=("kd",), image_size=STUDENT_SIZE,
            live_teacher=str(teacher[2]), teacher="resnet8")
