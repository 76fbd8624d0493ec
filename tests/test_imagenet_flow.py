"""ImageNet-style end to end on a tiny ImageFolder: torchvision models, the imagenet policy and a top-k cache
through the CLI, and the cache equal to the live teacher on the replayed RandomResizedCrop views."""

import numpy as np
import torch
from console import run_cli
from torchvision.io import write_png

from kdcache.cache import open_cache, verify
from kdcache.data import get_policy, load_dataset, normalize
from kdcache.models import LogitMap, create_model, load_checkpoint, save_checkpoint
from kdcache.stages.topk import rebuild_topk

CLASSES = ("ant", "bee", "cow")
SIZE = 32


def write_imagefolder(root):
    """Each class a colour with noise, at several sizes, PNG: learnable, and decoded the same on every machine."""
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 10), ("val", 4)):
        for label, name in enumerate(CLASSES):
            for index in range(count):
                height, width = 36 + 4 * index, 44 - 2 * index
                colour = torch.zeros(3, 1, 1)
                colour[label] = 180
                noise = torch.randint(0, 60, (3, height, width), generator=generator)
                folder = root / split / name
                folder.mkdir(parents=True, exist_ok=True)
                write_png((colour + noise).clamp(0, 255).to(torch.uint8), str(folder / f"{index}.png"))


def test_imagefolder_teacher_topk_cache_and_student_through_the_cli(tmp_path, capsys):
    write_imagefolder(tmp_path / "data")
    common = ["--dataset", "imagefolder", "--data-root", tmp_path / "data", "--image-size", SIZE, "--preload",
              "--device", "cpu"]  # held in memory: tests/test_streamed_files.py streams the files
    code, _, err = run_cli(["train-teacher", "--model", "resnet18", "--aug", "imagenet", "--epochs", 2,
                            "--batch-size", 10, "--out", tmp_path / "teacher", *common], capsys)
    assert code == 0, err
    code, out, err = run_cli(["dump-teacher", "--checkpoint", tmp_path / "teacher" / "model.pt", "--aug", "imagenet",
                              "--views", 2, "--topk", 2, "--scales", "1,2", "--out", tmp_path / "c.zarr", *common],
                             capsys)
    assert code == 0, err

    data = load_dataset("imagefolder", tmp_path / "data", "train", image_size=SIZE, preload=True)
    teacher = create_model("resnet18", num_classes=3)
    load_checkpoint(tmp_path / "teacher" / "model.pt", teacher)
    live, policy = LogitMap(teacher.eval(), (1, 2)), get_policy("imagenet", image_size=(SIZE, SIZE))
    with open_cache(tmp_path / "c.zarr") as cache:
        assert cache.spec.augmentation["name"] == "imagenet" and cache.spec.topk == 2
        assert verify(cache) == []
        for view in range(2):
            params = torch.from_numpy(cache.aug_params(view)).long()
            assert not (params[:, 2:4] == SIZE).all()  # crops, not the whole image
            with torch.no_grad():
                logits = live(normalize(policy.apply(data.images, params), data.mean, data.std))
            expected = rebuild_topk(logits.to(torch.float16), 2, torch.float16).numpy().astype(np.float16)
            np.testing.assert_array_equal(cache.view(view), expected)

    # the student's data are loaded at the cache's image size without --image-size
    code, out, err = run_cli(["distill", "--cache", tmp_path / "c.zarr", "--data-root", tmp_path / "data",
                              "--student", "mobilenet_v2", "--loss", "kd", "--epochs", 1, "--batch-size", 10,
                              "--out", tmp_path / "students", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "mobilenet_v2-kd" in out and (tmp_path / "students" / "mobilenet_v2-kd" / "model.pt").exists()


def test_exhaustive_views_of_an_infinite_policy_are_refused(tmp_path, capsys):
    write_imagefolder(tmp_path / "data")
    save_checkpoint(tmp_path / "t.pt", create_model("resnet18", num_classes=3))
    code, _, err = run_cli(["dump-teacher", "--checkpoint", tmp_path / "t.pt", "--teacher", "resnet18",
                            "--dataset", "imagefolder", "--data-root", tmp_path / "data", "--aug", "imagenet",
                            "--exhaustive", "--out", tmp_path / "c.zarr", "--device", "cpu"], capsys)
    assert code == 2 and "no finite list of views" in err and "Traceback" not in err
    assert not (tmp_path / "c.zarr").exists()
