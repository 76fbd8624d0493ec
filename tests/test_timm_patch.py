"""timm's train.py patched (examples/timm/train.patch) to train from a cache: the patch's size, what
kdcache.timm_train refuses, the batch and loss through timm's loader equal to `kdcache distill`'s, and, where
KDCACHE_TIMM_TRAIN names timm's train.py at aa4b5850 (not committed here), the patched script trained end to end."""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdcache
from conftest import SCALES
from test_imagenet_flow import write_imagefolder
from test_user_loop_api import distill_terms
from kdcache import timm_train
from kdcache.cli import main
from kdcache.errors import KdcacheError

ROOT = Path(__file__).resolve().parents[1]
PATCH = ROOT / "examples" / "timm" / "train.patch"
SIZE, IMAGENET = 32, ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def folder_cache(tmp_path_factory):
    """A colour-per-class image folder (train 3x10, val 3x4) and a cache of a resnet8 teacher trained on it:
    imagenet policy at 32 pixels, 2 views, scales 1,2; beside it cutmix.zarr, the same with CutMix views."""
    root = tmp_path_factory.mktemp("timm")
    write_imagefolder(root / "data")
    common = ["--dataset", "imagefolder", "--data-root", root / "data", "--image-size", SIZE, "--preload",
              "--device", "cpu"]
    for argv in (["train-teacher", "--model", "resnet8", "--aug", "imagenet", "--epochs", 3, "--batch-size", 10,
                  "--out", root / "teacher", *common],
                 *(["dump-teacher", "--checkpoint", root / "teacher" / "model.pt", "--aug", "imagenet", "--views", 2,
                    "--scales", ",".join(map(str, SCALES)), "--out", root / name, *mixing, *common]
                   for name, mixing in (("c.zarr", []), ("cutmix.zarr", ["--mix", "cutmix", "--mix-prob", 0.75])))):
        try:
            main([str(arg) for arg in argv])
        except SystemExit as exited:
            assert not exited.code, exited.code
    return root / "c.zarr", root / "data"


def test_the_patch_is_a_git_diff_of_train_py_of_at_most_30_lines():
    lines = PATCH.read_text().splitlines()
    assert lines[0] == "diff --git a/train.py b/train.py" and "--- a/train.py" in lines and "+++ b/train.py" in lines
    changed = [line for line in lines if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert len(changed) <= 30
    assert "+kdcache_timm.add_arguments(parser)  # --kdcache CACHE, --kd-loss NAME" in lines


def train_py_parser():
    """The options of train.py kdcache_timm judges, with train.py's defaults, and the patch's own."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--aa", default=None)
    parser.add_argument("--hflip", type=float, default=0.5)
    parser.add_argument("--scale", type=float, nargs="+", default=[0.08, 1.0])
    parser.add_argument("--mixup", type=float, default=0.0)
    parser.add_argument("--smoothing", type=float, default=0.1)
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--kd-model-name", default=None)
    timm_train.add_arguments(parser)
    return parser


@pytest.mark.parametrize("given,refused", [
    (["--aa", "rand-m9-mstd0.5", "--scale", "0.5", "1"],
     "--aa rand-m9-mstd0.5 with --kdcache c.zarr: the images are the cache's views, the pixels the teacher's targets "
     "were made on, and timm's train transforms are not applied to them; leave --aa at train.py's default (None) "
     "(also given: --scale)"),
    (["--mixup", "0.8"], "a mixup/CutMix cache (dump-teacher --mix) trains with its own mixing; leave --mixup at "
                         "train.py's default (0.0)"),
    (["--smoothing", "0"], "--smoothing 0.0 with --kdcache c.zarr: the loss is --kd-loss's (kdcache distill's, label "
                           "smoothing included), not timm's"),
    (["--train-split", "other"], "the train split is the one the cache was made from, read from --data-dir"),
    (["--kd-model-name", "resnet50"], "--kdcache and --kd-model-name resnet50: --kd-model-name runs timm's own teacher "
                                      "online, --kdcache trains from the cached teacher's logits; drop one of them"),
])
def test_options_that_change_the_teachers_pixels_or_loss_are_refused_in_one_line(given, refused, capsys):
    parser = train_py_parser()
    with pytest.raises(SystemExit) as exited:
        timm_train.check_args(parser.parse_args(["--kdcache", "c.zarr", *given]), parser)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("kdcache: error: ") and err.count("\n") == 1 and refused in err
    timm_train.check_args(parser.parse_args(given), parser)  # without --kdcache, train.py's own business


def test_defaults_given_again_pass_and_a_config_files_defaults_are_judged_by_train_pys(capsys):
    parser = train_py_parser()
    timm_train.check_args(parser.parse_args(["--kdcache", "c.zarr", "--hflip", "0.5", "--scale", "0.08", "1"]), parser)
    parser.set_defaults(aa="rand-m9")  # what train.py's _parse_args does with a --config file's values
    with pytest.raises(SystemExit):
        timm_train.check_args(parser.parse_args(["--kdcache", "c.zarr"]), parser)
    assert "--aa rand-m9 with --kdcache c.zarr" in capsys.readouterr().err


def timm_args(cache, data, **options):
    """train.py's parsed options that kdcache_timm reads."""
    return argparse.Namespace(**{"kdcache": str(cache), "data_dir": str(data), "prefetcher": True, "num_classes": 3,
                                 "kd_loss": "kd", "epochs": 12, **options})


def data_config(size=SIZE, mean=IMAGENET[0], std=IMAGENET[1]):
    """timm's resolve_data_config for the run."""
    return {"input_size": (3, size, size), "mean": mean, "std": std}


def timm_loader(train, **options):
    """train.py's create_loader call, with its train transforms' defaults, on the CPU with the prefetcher."""
    settings = dict(input_size=train.input_size, batch_size=12, is_training=True, use_prefetcher=True,
                    device=torch.device("cpu"), mean=IMAGENET[0], std=IMAGENET[1], num_workers=0, re_prob=0.0,
                    scale=[0.08, 1.0], hflip=0.5, color_jitter=0.4, interpolation="random", collate_fn=None)
    return timm_train.create_loader(train, **{**settings, **options})


@pytest.mark.parametrize("loss_name,epoch,cache_name", [("kd", 0, "c.zarr"), ("sdd-lskd", 1, "c.zarr"),
                                                        ("dkd", 5, "c.zarr"), ("kd", 1, "cutmix.zarr"),
                                                        ("sdd-lskd", 0, "cutmix.zarr")])
def test_a_batch_through_timms_loader_has_kdcaches_pixels_and_distills_loss(loss_name, epoch, cache_name, folder_cache,
                                                                         tmp_path, caplog):
    cache, data = folder_cache
    cache = cache.parent / cache_name  # a CutMix cache's targets carry the partner's label and λ through timm
    args = timm_args(cache, data, kd_loss=loss_name)
    train = timm_train.dataset(args, data_config())
    assert train.images == "uint8" and train.item == "pair"
    train.set_epoch(epoch)  # as train.py's _set_loader_epoch reaches it through the loader
    with caplog.at_level("INFO", logger="kdcache.timm_train"):
        images, targets = next(iter(timm_loader(train)))
    assert "timm's train transforms are not applied" in caplog.text
    assert ("mix.weight" in targets) == (cache_name == "cutmix.zarr")
    reference = kdcache.CacheDataset(cache, data)  # normalised, as kdcache distill's batches
    reference.set_epoch(epoch)
    items = [reference[i] for i in range(len(reference))]
    every = torch.stack([item[0] for item in items])
    # timm's loader shuffles: each image of its batch is one of the epoch's views, pixel for pixel
    nearest = [int((every - image).flatten(1).abs().amax(1).argmin()) for image in images]
    assert len(set(nearest)) == 12
    expected = [items[i] for i in nearest]
    torch.testing.assert_close(images, torch.stack([item[0] for item in expected]), rtol=1e-5, atol=1e-5)
    assert torch.equal(targets["label"], torch.stack([item[1] for item in expected]))
    torch.manual_seed(0)
    model = kdcache.create_model("resnet8", 3)
    student, criterion = timm_train.student_and_loss(args, model, train)
    assert isinstance(student, kdcache.RegionStudent) == (loss_name == "sdd-lskd")
    assert list(student.state_dict()) == list(model.state_dict())  # timm's checkpoints and EMA see the model
    criterion.set_epoch(epoch)  # as the patched train.py does before each epoch
    found = criterion(student.train()(images), targets)
    rest = {name: torch.stack([item[2][name] for item in expected]) for name in expected[0][2]}
    batch = (torch.stack([item[0] for item in expected]), torch.stack([item[1] for item in expected]), rest)
    torch.testing.assert_close(found, distill_terms(loss_name, 12, epoch, model, batch, tmp_path)["total"],
                               rtol=1e-5, atol=1e-6)


def test_without_the_prefetcher_the_images_come_normalised(folder_cache):
    cache, data = folder_cache
    train = timm_train.dataset(timm_args(cache, data, prefetcher=False), data_config())
    reference = kdcache.CacheDataset(cache, data)
    torch.testing.assert_close(train[4][0], reference[4][0], rtol=0, atol=0)


@pytest.mark.parametrize("change,refused", [
    (dict(size=64), "--img-size (or --input-size)'s image size is 64x64 but the cache {cache} was made at 32x32: give "
                    "--img-size (or --input-size) the cache's image size"),
    (dict(mean=(0.5, 0.5, 0.5)), "--mean's mean is (0.5, 0.5, 0.5) but the cache {cache} was made at "
                                 "(0.485, 0.456, 0.406): give --mean the cache's mean"),
    (dict(classes=5), "--num-classes's class count is 5 but the cache {cache} was made at 3: give --num-classes the "
                      "cache's class count"),
])
def test_image_size_mean_std_and_classes_are_checked_against_the_cache(change, refused, folder_cache, capsys):
    cache, data = folder_cache
    args = timm_args(cache, data, num_classes=change.pop("classes", 3))
    with pytest.raises(SystemExit) as exited:
        timm_train.dataset(args, data_config(**change))
    assert exited.value.code == 2 and capsys.readouterr().err == f"kdcache: error: {refused.format(cache=cache)}\n"


def test_the_loader_refuses_random_erasing_and_a_mixing_collate_and_the_loss_a_feature_loss(folder_cache, capsys):
    cache, data = folder_cache
    train = timm_train.dataset(timm_args(cache, data), data_config())
    for options in (dict(re_prob=0.25), dict(collate_fn=lambda batch: batch)):
        with pytest.raises(SystemExit):
            timm_loader(train, **options)
        assert "would change the pixels the teacher saw; leave them unset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        timm_train.student_and_loss(timm_args(cache, data, kd_loss="rkd"), kdcache.create_model("resnet8", 3), train)
    assert "--kd-loss rkd reads the student's embedding, which timm's train.py does not give" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # DeiT's distillation head: timm's train.py gives its loss no dict of outputs
        timm_train.student_and_loss(timm_args(cache, data, kd_loss="deit-hard"), kdcache.create_model("resnet8", 3),
                                    train)
    assert "--kd-loss deit-hard reads the student's distillation, which timm's" in capsys.readouterr().err


TIMM_TRAIN = os.environ.get("KDCACHE_TIMM_TRAIN")


@pytest.mark.skipif(not TIMM_TRAIN, reason="KDCACHE_TIMM_TRAIN names no copy of timm's train.py at aa4b5850 "
                                           "(README: In your own training script)")
def test_the_patched_train_py_learns_from_the_cache_and_refuses_timms_augmentations(folder_cache, tmp_path):
    import timm

    cache, data = folder_cache
    shutil.copy(TIMM_TRAIN, tmp_path / "train.py")
    subprocess.run(["git", "apply", str(PATCH)], cwd=tmp_path, check=True)
    command = [sys.executable, str(tmp_path / "train.py"), "--data-dir", str(data), "--val-split", "val",
               "--kdcache", str(cache), "--model", "resnet10t", "--img-size", str(SIZE), "--num-classes", "3",
               "--batch-size", "10", "--workers", "0", "--device", "cpu", "--opt", "adamw", "--lr", "0.003",
               "--warmup-epochs", "0", "--output", str(tmp_path), "--experiment", "run"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    refused = subprocess.run([*command, "--epochs", "3", "--aa", "rand-m9-mstd0.5", "--mixup", "0.8"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.splitlines()[-1].startswith("kdcache: error: --aa rand-m9")
    run = subprocess.run([*command, "--epochs", "3", "--model-ema", "--model-ema-decay", "0.5"], env=env,
                         capture_output=True, text=True, timeout=300)  # the EMA's accuracy is the one reported
    assert run.returncode == 0, run.stderr[-3000:]
    assert "timm's train transforms are not applied" in run.stderr
    results = json.loads(run.stdout.split("--result\n")[-1])
    assert max(result["validation"]["top1"] for result in results) >= 80  # 3 classes: chance is 33 %
    student = timm.create_model("resnet10t", num_classes=3)  # the checkpoint is the plain model's
    with torch.serialization.safe_globals([argparse.Namespace]):  # timm saves its args with the weights
        checkpoint = torch.load(tmp_path / "run" / "last.pth.tar", map_location="cpu", weights_only=True)
    student.load_state_dict(checkpoint["state_dict"])


def test_class_folders_timm_would_number_otherwise_are_refused_until_a_class_map_gives_the_caches_order(tmp_path):
    for name in ("class10", "class2", ".hidden"):
        (tmp_path / "train" / name).mkdir(parents=True)
    with pytest.raises(KdcacheError) as refused:
        timm_train.check_class_order(tmp_path / "train")
    assert str(refused.value) == (
        f"timm's val loader (class folders in natural order) numbers class 0 class2 but the cache's labels number it "
        f"class10 (the folders of {tmp_path / 'train'} sorted, as torchvision's ImageFolder does): write those names "
        f"sorted, one a line, to a .txt file and pass --class-map FILE")
    (tmp_path / "sorted.txt").write_text("class10\nclass2\n")
    timm_train.check_class_order(tmp_path / "train", str(tmp_path / "sorted.txt"))
    (tmp_path / "natural.txt").write_text("class2\nclass10\n")
    with pytest.raises(KdcacheError, match=r"^--class-map .*natural.txt numbers class 0 class2 but the cache's"):
        timm_train.check_class_order(tmp_path / "train", str(tmp_path / "natural.txt"))
    (tmp_path / "a" / "b").mkdir(parents=True)
    timm_train.check_class_order(tmp_path / "a")  # one class: one order
