"""Image folders streamed from their files (issue 16), on a generated folder of JPEGs of ImageNet-like sizes.

- loader: img/s of kdcache's file loader as it runs on the CPU (read, crc32c, decode, crop, resize, flip and
  normalise in DataLoader workers), drawing views as the dump does and replaying them as distill does,
  against torchvision's `ImageFolder` + `RandomResizedCrop(224)` + `RandomHorizontalFlip` + `ToTensor` +
  `Normalize` at the same worker count and batch size; side by side, the order rotating per repeat; a figure
  is the median img/s, a ratio the median of per-repeat ratios. Goal: kdcache / torchvision >= 1.0.
- dump: img/s of `dump_teacher` (one view, scales 1,2,4, written to Zarr) against pure inference (`model(x)`)
  fed by the same loader, side by side. Goal: >= 0.85.
- memory: peak RSS (the largest process) of `kdcache dump-teacher` and `kdcache distill` at N and 10 N files
  (10 N: hard links to the N files under other names), each in a fresh process, at 64 px with a resnet8
  teacher and student (the memory a split costs, not a big model's activations); and `dump-teacher --preload`
  at N and 10 N for comparison. Goal: streaming flat within 100 MB.

    python benchmarks/streaming.py                         # 2000 files, 2 workers, CPU: 7 minutes here
    python benchmarks/streaming.py --files 500 --repeats 1 --rss-files 200 --json out.json   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdcache.data import FileBatches, ImageFiles, load_dataset
from kdcache.data.files import FileResizedCropFlip, batch_on_device, draw_generator, read_image, stream
from kdcache.models import create_model, load_teacher, save_checkpoint
from kdcache.stages.dump import dump_teacher
from kdcache.report import cpu_model, source_commit

CLASSES = 10
SIZE = 224


def make_folder(root: Path, count: int, seed: int = 0, test: int = 0) -> Path:
    """root/train/class_k/*.jpg: `count` JPEGs (quality 90) of ImageNet-like sizes (sides 250-500 px, landscape
    and portrait), smooth colour fields plus noise so that they compress as photos do (tens of kB); `test` more
    in root/val/."""
    generator = np.random.default_rng(seed)
    for index in range(count + test):
        split = "train" if index < count else "val"
        folder = root / split / f"class_{index % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        long, short = int(generator.integers(330, 501)), int(generator.integers(250, 376))
        height, width = (short, long) if generator.random() < 0.75 else (long, short)
        cells = generator.integers(0, 256, (6, 8, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(cells).resize((width, height), Image.BILINEAR), dtype=np.int16)
        noise = generator.integers(-12, 13, field.shape)
        pixels = np.clip(field + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:06d}.jpg", quality=90)
    return root


def linked_copies(source: Path, target: Path, copies: int) -> Path:
    """target/train/...: `copies` hard links of every training file of source under other names (10 N files, N on
    disk); target/val/ links source's once."""
    for path in sorted(source.rglob("*.jpg")):
        split = path.parent.parent.name
        folder = target / split / path.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        for copy in range(copies if split == "train" else 1):
            os.link(path, folder / f"{copy}_{path.name}")
    return target


def kdcache_loader(root: Path, replay: bool) -> tuple[ImageFiles, FileBatches]:
    """kdcache's loader as StreamedSplit makes it on the CPU (the workers normalise); `replay`: with every file's
    view-0 parameters as the dump draws them (drawn here, outside the timed pass), as distill replays them."""
    files = load_dataset("imagefolder", root, "train", image_size=SIZE)
    dataset = FileBatches(files, FileResizedCropFlip(SIZE), normalized=True)
    if replay:
        rows = []
        for index in range(len(files.labels)):
            width, height = Image.open(files.path(index)).size
            rows.append(dataset.policy.draw(draw_generator(0, "views", 0, index), height, width))
        dataset.replay(torch.stack(rows))
    return files, dataset


def kdcache_batches(files: ImageFiles, dataset: FileBatches, workers: int, batch: int) -> int:
    """One pass of kdcache's loader over the folder in a random order; the number of images."""
    order = torch.randperm(len(files.labels), generator=torch.Generator().manual_seed(0))
    keys = [(0, part.tolist()) for part in order.split(batch)]
    seen = 0
    for images, _, _, _, _ in stream(dataset, keys, workers, torch.device("cpu")):
        seen += len(batch_on_device(images, files, torch.device("cpu")))
    return seen


def torchvision_batches(root: Path, workers: int, batch: int) -> int:
    """One pass of torchvision's ImageFolder pipeline; the number of images."""
    from torchvision import datasets, transforms

    pipeline = transforms.Compose([transforms.RandomResizedCrop(SIZE), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(),
                                   transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(root / "train"), pipeline), batch_size=batch,
                                         shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0),
                                         prefetch_factor=4 if workers else None)
    return sum(len(x) for x, _ in loader)


def side_by_side(variants: dict, repeats: int) -> dict[str, list[float]]:
    """img/s of each variant per repeat, the order rotating from repeat to repeat."""
    rates: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            started = time.perf_counter()
            images = variants[name]()
            rates[name].append(images / (time.perf_counter() - started))
            print(f"  {name}: {rates[name][-1]:.1f} img/s", flush=True)
    return rates


def summary(rates: dict[str, list[float]], reference: str) -> dict:
    """Median img/s per variant and the median per-repeat ratio to the reference."""
    return {name: {"img_s": statistics.median(values),
                   f"ratio_to_{reference}": statistics.median(v / r for v, r in zip(values, rates[reference]))}
            for name, values in rates.items()}


def dump_against_inference(root: Path, work: Path, workers: int, batch: int, repeats: int) -> dict:
    """dump_teacher (1 view, scales 1,2,4, Zarr) against model(x) on the same loader, torchvision resnet18."""
    torch.manual_seed(0)
    save_checkpoint(work / "resnet18.pt", create_model("resnet18", num_classes=CLASSES))
    teacher, info = load_teacher(work / "resnet18.pt", "resnet18", CLASSES)
    teacher.eval()
    files = load_dataset("imagefolder", root, "train", image_size=SIZE)
    policy = FileResizedCropFlip(SIZE)

    def dump() -> int:
        return dump_teacher(teacher, info, files, policy, work / "dump.zarr", views=1, scales=(1, 2, 4),
                            batch_size=batch, workers=workers, overwrite=True, show_progress=False).images

    def inference() -> int:
        keys = [(0, range(start, min(start + batch, len(files.labels))))
                for start in range(0, len(files.labels), batch)]
        seen = 0
        with torch.no_grad():
            dataset = FileBatches(files, policy, normalized=True)  # as the dump makes it on the CPU
            for images, _, _, _, _ in stream(dataset, keys, workers, torch.device("cpu")):
                teacher(batch_on_device(images, files, torch.device("cpu")))
                seen += len(images)
        return seen

    return summary(side_by_side({"inference": inference, "dump": dump}, repeats), "inference")


def peak_rss_mb(command: list[str], cwd: Path) -> float:
    """Peak RSS in MB of the largest process of a command run to its end in a fresh process tree."""
    wrapper = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "sys.stderr.write(done.stderr[-2000:] if done.returncode else ''); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if done.returncode == 0 else -1)")
    done = subprocess.run([sys.executable, "-c", wrapper, *command], cwd=cwd, capture_output=True, text=True)
    kilobytes = int(done.stdout.strip().splitlines()[-1])
    if kilobytes < 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr}")
    return kilobytes / 1024


def memory(small: Path, large: Path, work: Path, workers: int, batch: int) -> dict:
    """Peak RSS of dump-teacher and distill at N and 10 N files, and of a preloaded dump at N."""
    torch.manual_seed(0)
    save_checkpoint(work / "resnet8.pt", create_model("resnet8", num_classes=CLASSES))
    kdcache = [sys.executable, "-m", "kdcache"]
    common = ["--image-size", "64", "--workers", str(workers), "--device", "cpu"]
    results = {}
    dump = ["dump-teacher", "--teacher", "resnet8", "--checkpoint", str(work / "resnet8.pt"), "--dataset",
            "imagefolder", "--aug", "imagenet", "--views", "1", "--scales", "1", "--overwrite"]
    for name, root in (("N", small), ("10N", large)):
        cache = work / f"rss-{name}.zarr"
        results[f"dump {name}"] = peak_rss_mb(kdcache + dump + ["--data-root", str(root), "--out", str(cache),
                                                                *common], work)
        results[f"distill {name}"] = peak_rss_mb(kdcache + [
            "distill", "--cache", str(cache), "--data-root", str(root), "--student", "resnet8", "--loss", "kd",
            "--epochs", "1", "--batch-size", str(batch), "--out", str(work / f"runs-{name}"), *common], work)
        results[f"dump {name} --preload"] = peak_rss_mb(kdcache + dump + [
            "--data-root", str(root), "--preload", "--out", str(work / f"rss-preload-{name}.zarr"), *common], work)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000, help="JPEGs in the loader folder")
    parser.add_argument("--dump-files", type=int, default=256, help="of them, how many the dump section reads")
    parser.add_argument("--rss-files", type=int, default=1000, help="N of the memory section (10 N are linked)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - args.workers))
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        started = time.perf_counter()
        folder = make_folder(work / "images", args.files)
        sizes = [path.stat().st_size for path in (folder / "train").rglob("*.jpg")]
        print(f"{args.files} JPEGs, mean {np.mean(sizes) / 1e3:.0f} kB, made in {time.perf_counter() - started:.0f} s")
        read_image(str(next((folder / "train").rglob("*.jpg"))))  # imports torchvision's decoders once
        print("loader")
        drawn, replayed = kdcache_loader(folder, replay=False), kdcache_loader(folder, replay=True)
        loader = summary(side_by_side({
            "torchvision": lambda: torchvision_batches(folder, args.workers, args.batch),
            "kdcache draw (dump)": lambda: kdcache_batches(*drawn, args.workers, args.batch),
            "kdcache replay (distill)": lambda: kdcache_batches(*replayed, args.workers, args.batch),
        }, args.repeats), "torchvision")
        print("dump")
        dump_folder = make_folder(work / "dump-images", args.dump_files, seed=1)
        dump = dump_against_inference(dump_folder, work, args.workers, args.batch, args.repeats)
        print("memory")
        small = make_folder(work / "rss-N", args.rss_files, seed=2, test=CLASSES * 5)
        large = linked_copies(small, work / "rss-10N", 10)
        rss = memory(small, large, work, args.workers, args.batch)
    results = {"commit": source_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "device": f"cpu ({cpu_model()}, {os.cpu_count()} cores)",
               "torch": torch.__version__, "files": args.files, "workers": args.workers, "batch": args.batch,
               "repeats": args.repeats, "loader": loader, "dump": dump, "peak_rss_mb": rss}
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
