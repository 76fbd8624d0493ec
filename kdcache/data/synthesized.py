"""The `synthesized` dataset: the images `kdcache synthesize` wrote (uint8, labels = the target classes, the
teacher's normalisation) as its train split, and the real test split of the teacher's dataset as its test split."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcache.data.sources import ImageData, load_dataset, register_dataset
from kdcache.errors import KdcacheError, missing_root

DESCRIPTION, IMAGES, LABELS = "dataset.json", "images.npy", "labels.npy"


@register_dataset
def synthesized(root: str | Path | None, split: str) -> ImageData:
    """Images `kdcache synthesize` wrote to `root` (train), or the real test split of the teacher's dataset (test)."""
    if root is None or not (Path(root) / DESCRIPTION).is_file():
        raise missing_root("synthesized", f"the folder `kdcache synthesize --out DIR` wrote (with its {DESCRIPTION}); "
                                          f"found {root or 'none'}")
    description = json.loads((Path(root) / DESCRIPTION).read_text())
    if split == "test":  # students are evaluated on real images
        source = description["source"]
        try:
            return load_dataset(source["name"], source["root"], "test", **source["options"])
        except KdcacheError as error:
            raise KdcacheError(f"synthesized ({root}): students are tested on the teacher's real test split, "
                               f"{source['name']} from {source['root'] or 'its built-in copy'}, which is not "
                               f"available here: {error}") from None
    images = torch.from_numpy(np.load(Path(root) / IMAGES, allow_pickle=False))
    labels = torch.from_numpy(np.load(Path(root) / LABELS, allow_pickle=False)).long()
    return SynthesizedData("synthesized", split, images.contiguous(), labels, description["num_classes"],
                           tuple(description["mean"]), tuple(description["std"]), root=str(Path(root).resolve()))


@dataclass(frozen=True)
class SynthesizedData(ImageData):
    """A synthesised split; its description names its folder, so a cache of it finds it again."""

    root: str = ""

    def describe(self) -> dict:
        """ImageData's description and the folder it was read from."""
        return {**super().describe(), "root": self.root}
