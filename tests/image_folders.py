"""Small image folders made on the fly for the streamed-file tests: JPEG and PNG, grey and RGB, sizes and aspect
ratios from tall to wide."""

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog", "owl")
# per class: (name, height, width, grey); tall, wide, square, smaller and larger than SIZE
SHAPES = [("a.jpg", 40, 90, False), ("b.png", 120, 50, True), ("c.jpeg", 64, 64, False), ("d.PNG", 30, 200, False),
          ("e.jpg", 77, 41, True)]


def write_folder(root: Path, seed: int = 0) -> Path:
    """root/train/<class>/<5 images> and root/val/<class>/<2 images>: smooth random images, JPEG and PNG."""
    generator = np.random.default_rng(seed)
    for split, shapes in (("train", SHAPES), ("val", SHAPES[:2])):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for file_name, height, width, grey in shapes:
                cells = generator.integers(0, 256, (4, 4, 3)).astype(np.uint8)  # smooth: JPEG keeps it
                image = Image.fromarray(cells).resize((width, height), Image.BILINEAR)
                (image.convert("L") if grey else image).save(folder / file_name, quality=90)
    return root
