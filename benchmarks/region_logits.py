"""What region logits cost on top of the plain forward: `LogitMap(model, scales)(x)` against `model(x)`.

For each model (timm's resnet50 and vit_small_patch16_224 by default, random weights, eval mode, 224 px), the
plain forward and the region forward run side by side, alternating, `--repeats` times after one warm-up each;
a figure is the median img/s, and the overhead the median of the per-repeat ratios minus one. On CUDA both run
as kdcache runs a teacher: bf16 autocast, channels_last. Goal (issue 15): overhead at most 10 %.

    python benchmarks/region_logits.py --device cpu                  # resnet50, vit_small at 224 px, batch 64
    python benchmarks/region_logits.py --device cuda --repeats 20 --json cuda.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from kdcache.models import LogitMap, create_model, describe_outputs, parse_scales
from kdcache.runtime import autocast, pick_device, prepare_model
from kdcache.report import cpu_model, source_commit

MODELS = ("timm:resnet50", "timm:vit_small_patch16_224")


def _timed(forward: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Seconds of one forward, the device synchronised."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    forward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def measure(spec: str, scales: tuple[int, ...], batch: int, side: int, repeats: int, device: torch.device) -> dict:
    """Plain and region img/s of one model, side by side, and the region forward's overhead."""
    torch.manual_seed(0)
    model = prepare_model(create_model(spec, num_classes=1000), device).eval()
    logit_map = LogitMap(model, scales)
    images = torch.randn(batch, 3, side, side, device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    variants = {"plain": lambda: model(images), "regions": lambda: logit_map(images)}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad(), autocast(device):
        for repeat in range(repeats + 1):  # repeat 0 warms up
            order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
            for name in order:
                elapsed = _timed(variants[name], device)
                if repeat:
                    seconds[name].append(elapsed)
        outputs = describe_outputs(logit_map, images[:2])
    ratios = [regions / plain for plain, regions in zip(seconds["plain"], seconds["regions"])]
    return {"model": spec, "head": outputs["head"], "feature_map": outputs["feature_map"],
            "plain_img_s": batch / statistics.median(seconds["plain"]),
            "regions_img_s": batch / statistics.median(seconds["regions"]),
            "overhead": statistics.median(ratios) - 1, "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model specs")
    parser.add_argument("--scales", default="1,2,4")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    device = pick_device(args.device)
    scales = parse_scales(args.scales)
    print(f"device {device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{cpu_model()}, commit {source_commit()}; "
          f"batch {args.batch_size}, {args.image_size} px, scales {','.join(map(str, scales))}, "
          f"median of {args.repeats} repeats after 1 warm-up", flush=True)
    print(f"{'model':34} {'head':>9} {'map':>7} {'plain img/s':>12} {'regions img/s':>14} {'overhead':>9}")
    results = []
    for spec in args.models.split(","):
        row = measure(spec, scales, args.batch_size, args.image_size, args.repeats, device)
        results.append(row)
        grid = "x".join(map(str, row["feature_map"]))
        print(f"{spec:34} {row['head']:>9} {grid:>7} {row['plain_img_s']:>12.1f} {row['regions_img_s']:>14.1f} "
              f"{100 * row['overhead']:>8.1f}%", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"commit": source_commit(), "device": str(device), "cpu": cpu_model(),
                       "torch": torch.__version__, "batch": args.batch_size, "image_size": args.image_size,
                       "scales": scales, "results": results}, file, indent=2)


if __name__ == "__main__":
    main()
