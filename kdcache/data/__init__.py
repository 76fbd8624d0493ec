"""Data as whole uint8 tensors (sources) or as image files streamed from disk (files), and replayable augmentation
policies (augment, and files' per-file policies)."""

from kdcache.data import imagefolder  # noqa: F401  (importing it registers the `imagefolder` loader)
from kdcache.data import randaugment  # noqa: F401  (importing it registers the `randaugment` policy)
from kdcache.data import synthesized  # noqa: F401  (importing it registers the `synthesized` loader)
from kdcache.data.augment import (
                                  AugmentPolicy,
                                  CropFlip,
                                  Identity,
                                  get_policy,
                                  list_policies,
)
from kdcache.data.files import FileBatches, FilePolicy, ImageFiles, first_images, policy_for, stored_policy
from kdcache.data.sources import (
                                  ImageData,
                                  data_fingerprint,
                                  dataset_options,
                                  list_datasets,
                                  load_dataset,
                                  normalize,
                                  register_dataset,
)

__all__ = [
    "AugmentPolicy",
    "CropFlip",
    "FileBatches",
    "FilePolicy",
    "ImageFiles",
    "first_images",
    "policy_for",
    "stored_policy",
    "Identity",
    "ImageData",
    "data_fingerprint",
    "get_policy",
    "list_datasets",
    "list_policies",
    "dataset_options",
    "load_dataset",
    "normalize",
    "register_dataset",
]
