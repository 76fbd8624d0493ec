"""Small synthetic splits and random teachers saved as weights: what the stage tests start from."""

from pathlib import Path

import torch

from kdcache.data import ImageData, load_dataset
from kdcache.models import create_model, save_checkpoint


def synthetic_splits(num_samples: int, num_classes: int, seed: int,
                     image_size: int = 16) -> tuple[ImageData, ImageData]:
    """The train and test splits of one seeded synthetic dataset."""
    options = {"num_samples": num_samples, "num_classes": num_classes, "image_size": image_size, "seed": seed}
    return load_dataset("synthetic", split="train", **options), load_dataset("synthetic", split="test", **options)


def saved_teacher(folder: Path, num_classes: int, seed: int) -> tuple[torch.nn.Module, Path]:
    """A resnet8 with the random weights of `seed`, in eval mode, and those weights saved as folder/teacher.pt."""
    torch.manual_seed(seed)
    model = create_model("resnet8", num_classes=num_classes).eval()
    path = Path(folder) / "teacher.pt"
    save_checkpoint(path, model)
    return model, path
