"""The 240-epoch projection of benchmarks/gpu.sh: distillation from the cache against the live teacher, CIFAR-100-shaped.

    python benchmarks/gpu_projection.py --device cuda --json projection.json       # what gpu.sh runs
    python benchmarks/gpu_projection.py --device cpu --samples 512 --test-samples 128 --json /tmp/p.json   # a CPU try

Synthetic data of CIFAR-100's shapes (50,000 train and 10,000 test images 3x32x32, 100 classes), a resnet32x4
teacher with random weights (speed does not depend on them), a resnet8x4 student trained with SDD-LSKD at batch 64,
through kdcache's own code: `dump_teacher` writes a cache of --views views, then `distill` trains the student for
--epochs epochs from that cache and again from the live teacher (`--live-teacher`, fresh views each epoch).

An epoch is timed on the wall clock from the end of the previous one (the first from the start of the training loop)
to the end of its own, so it holds the view read, the training steps, the test pass and the checkpoint write. The
projection of a 240-epoch run is setup + first epoch + 239 x the median of the later epochs + finish; for the cache
it is also given with the dump of the recipe's 16 views added (the dump's measured seconds per view x 16), which a
sweep of students shares. The JSON is rewritten after every stage, so a run stopped by its time limit keeps what it
measured.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from kdcache.config import DistillConfig
from kdcache.data import ImageData, get_policy, load_dataset
from kdcache.models import create_model, load_teacher
from kdcache.models.checkpoint import save_checkpoint
from kdcache.runtime import pick_device, precision
from kdcache.stages.distill import distill
from kdcache.stages.dump import dump_teacher
from kdcache.stages.loop import Run

distill_stage = importlib.import_module("kdcache.stages.distill")  # the module: its `fit` is timed

TEACHER, STUDENT, LOSS, CLASSES, SCALES, IMAGE_SIZE = "resnet32x4", "resnet8x4", "sdd-lskd", 100, (1, 2, 4), 32
RECIPE_EPOCHS, RECIPE_VIEWS, RECIPE_BATCH = 240, 16, 64  # the papers' CIFAR-100 schedule; README's --views 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="where to run (default cuda; cpu for a try)")
    parser.add_argument("--samples", type=int, default=50_000, help="training images (default 50000, CIFAR-100's)")
    parser.add_argument("--test-samples", type=int, default=10_000, help="test images (default 10000, CIFAR-100's)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed per target source (default 2: the "
                        "first, with its warm-up, and one steady epoch); at least 1")
    parser.add_argument("--views", type=int, default=2, help="views the cache holds (default 2, so that every "
                        "epoch reads another view, as with the recipe's 16)")
    parser.add_argument("--batch-size", type=int, default=RECIPE_BATCH, help="images per SGD step (default 64)")
    parser.add_argument("--projected-epochs", type=int, default=RECIPE_EPOCHS, help="epochs of the projected run "
                        "(default 240)")
    parser.add_argument("--work", type=Path, help="folder for the teacher, the cache and the runs (default: a "
                        "temporary folder, removed at the end)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the teacher and the runs")
    parser.add_argument("--json", type=Path, help="write settings, measurements and the projection here")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.views < 1 or args.samples < args.batch_size or args.test_samples < 1:
        parser.error("--epochs and --views need at least 1, --samples at least one batch, --test-samples at least 1")
    return args


def make_data(args: argparse.Namespace) -> tuple[ImageData, ImageData]:
    """The train and test splits of CIFAR-100's shapes, synthetic and seeded."""
    options = {"num_classes": CLASSES, "image_size": IMAGE_SIZE, "seed": args.seed}
    return (load_dataset("synthetic", split="train", num_samples=args.samples, **options),
            load_dataset("synthetic", split="test", num_samples=args.test_samples, **options))


def random_teacher(folder: Path, seed: int) -> Path:
    """A resnet32x4 checkpoint with seeded random weights, loadable by every kdcache command."""
    torch.manual_seed(seed)
    path = folder / "teacher.pt"
    save_checkpoint(path, create_model(TEACHER, num_classes=CLASSES))
    return path


def time_dump(checkpoint: Path, data: ImageData, out: Path, args: argparse.Namespace,
              device: torch.device) -> dict[str, Any]:
    """Dump the teacher's region logits over --views views; seconds as dump_teacher measures them and whole."""
    teacher, info = load_teacher(checkpoint, TEACHER, CLASSES)
    policy = get_policy("cifar", image_size=(IMAGE_SIZE, IMAGE_SIZE))
    started = time.perf_counter()
    result = dump_teacher(teacher, info, data, policy, out, views=args.views, scales=SCALES, device=device,
                          seed=args.seed, show_progress=False)
    whole = time.perf_counter() - started
    return {"views": args.views, "images": result.images, "seconds": round(result.seconds, 3),
            "seconds_whole": round(whole, 3), "img_per_s": round(result.images_per_second, 1),
            "seconds_per_view": round(whole / args.views, 3), "bytes_on_disk": result.bytes_on_disk}


@contextmanager
def epoch_clock(marks: list[float], epochs: list[dict[str, float]]) -> Iterator[None]:
    """Record the wall clock when the training loop starts and after each epoch's end (and the epoch's metrics)."""
    fit, end_epoch = distill_stage.fit, Run.end_epoch

    def timed_fit(*args: Any, **kwargs: Any) -> None:
        """The training loop, its start marked."""
        marks.append(time.perf_counter())
        fit(*args, **kwargs)

    def timed_end_epoch(run: Run, metrics: dict[str, float]) -> None:
        """The epoch's bookkeeping (metrics.csv, checkpoint), then its end marked."""
        end_epoch(run, metrics)
        marks.append(time.perf_counter())
        epochs.append({key: metrics[key] for key in ("epoch", "seconds", "img_per_s", "test_acc") if key in metrics})

    with mock.patch.object(distill_stage, "fit", timed_fit), mock.patch.object(Run, "end_epoch", timed_end_epoch):
        yield


def time_distill(config: DistillConfig, data: tuple[ImageData, ImageData], projected: int) -> dict[str, Any]:
    """Train the student for config.epochs epochs; each epoch's wall-clock seconds and the projected run."""
    marks: list[float] = []
    epochs: list[dict[str, float]] = []
    started = time.perf_counter()
    with epoch_clock(marks, epochs):
        distill(config, show_progress=False, data=data)
    finished = time.perf_counter()
    wall = [later - earlier for earlier, later in zip(marks, marks[1:])]
    steady = statistics.median(wall[1:]) if len(wall) > 1 else wall[0]
    setup, finish = marks[0] - started, finished - marks[-1]
    return {"epochs": config.epochs, "setup_seconds": round(setup, 3), "first_epoch_seconds": round(wall[0], 3),
            "steady_epoch_seconds": round(steady, 3), "epoch_seconds": [round(value, 3) for value in wall],
            "finish_seconds": round(finish, 3), "per_epoch": epochs,
            "steady_is_measured": len(wall) > 1,  # False: one epoch only, so the first (with warm-up) stands in
            f"projected_{projected}_epochs_seconds": round(setup + wall[0] + (projected - 1) * steady + finish, 1)}


def projection(document: dict[str, Any], projected: int) -> dict[str, Any]:
    """Both projected runs, the dump of the recipe's views, and their ratios."""
    key = f"projected_{projected}_epochs_seconds"
    cache, live = document["cache"][key], document["live"][key]
    dump16 = document["dump"]["seconds_per_view"] * RECIPE_VIEWS
    return {"epochs": projected, "cache_seconds": cache, "live_seconds": live,
            "live_over_cache": round(live / cache, 3),
            f"dump_{RECIPE_VIEWS}_views_seconds": round(dump16, 1),
            f"cache_with_dump_{RECIPE_VIEWS}_views_seconds": round(cache + dump16, 1),
            f"live_over_cache_with_dump_{RECIPE_VIEWS}_views": round(live / (cache + dump16), 3),
            "cache_hours": round(cache / 3600, 3), "live_hours": round(live / 3600, 3)}


def settings(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """What the figures come from: the command, the device, the sizes and the versions."""
    return {"command": " ".join(["python", "benchmarks/gpu_projection.py", *sys.argv[1:]]),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": precision(device), "teacher": TEACHER, "student": STUDENT, "loss": LOSS,
            "scales": list(SCALES), "samples": args.samples, "test_samples": args.test_samples,
            "classes": CLASSES, "image_size": IMAGE_SIZE, "batch_size": args.batch_size, "views": args.views,
            "timed_epochs": args.epochs, "versions": {"python": platform.python_version(), "torch": torch.__version__}}


def run_stages(args: argparse.Namespace, device: torch.device, work: Path,
               save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Data, teacher, dump, distillation from the cache, then from the live teacher; saved after each stage."""
    document: dict[str, Any] = {"settings": settings(args, device)}
    data = make_data(args)
    checkpoint = random_teacher(work, args.seed)
    cache = work / "cache.zarr"
    document["dump"] = time_dump(checkpoint, data[0], cache, args, device)
    save(document)
    common = dict(students=(STUDENT,), losses=(LOSS,), epochs=args.epochs, batch_size=args.batch_size,
                  device=str(device), seed=args.seed)
    document["cache"] = time_distill(DistillConfig(cache=str(cache), out=str(work / "from-cache"), **common), data,
                                     args.projected_epochs)
    save(document)
    document["live"] = time_distill(DistillConfig(live_teacher=str(checkpoint), teacher=TEACHER,
                                                  out=str(work / "live-teacher"), **common),
                                    data, args.projected_epochs)
    document["projection"] = projection(document, args.projected_epochs)
    save(document)
    return document


def main(argv: list[str] | None = None) -> int:
    """Run every stage, print the projection, write --json."""
    args = parse_args(argv)
    device = pick_device(args.device)

    def save(document: dict[str, Any]) -> None:
        """Write what was measured so far to --json."""
        if args.json is not None:
            args.json.write_text(json.dumps(document, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="kdcache-projection-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        document = run_stages(args, device, work, save)
    print(json.dumps({key: document[key] for key in ("dump", "projection")}, indent=2))
    for source in ("cache", "live"):
        print(f"{source:>5}: epochs {document[source]['epoch_seconds']} s -> {args.projected_epochs} epochs "
              f"{document['projection'][f'{source}_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
