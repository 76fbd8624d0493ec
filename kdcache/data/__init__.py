"""Data sources behind one interface (source.DataSource): whole uint8 tensors (sources) or image files streamed from
disk (files); and replayable augmentation policies in one registry (augment, policies), each in the form its source
reads."""

from kdcache.data import imagefolder  # noqa: F401  (importing it registers the `imagefolder` loader)
from kdcache.data import policies  # noqa: F401  (importing it registers the policies: cifar, imagenet, none, ...)
from kdcache.data import synthesized  # noqa: F401  (importing it registers the `synthesized` loader)
from kdcache.data import text  # noqa: F401  (importing it registers the `text` loader)
from kdcache.data import dense  # noqa: F401  (importing it registers the `digits-scenes` loader)
from kdcache.data import dense_folders  # noqa: F401  (importing it registers `voc` and `cityscapes`)
from kdcache.data.augment import (
                                  AugmentPolicy,
                                  CropFlip,
                                  Identity,
                                  get_policy,
                                  list_policies,
)
from kdcache.data.files import FileBatches, FilePolicy, ImageFiles
from kdcache.data.source import DataSource, Policy, class_names, policy_for, stored_policy, student_views
from kdcache.data.sources import (
                                  ImageData,
                                  data_fingerprint,
                                  dataset_options,
                                  list_datasets,
                                  load_at_size,
                                  load_dataset,
                                  load_splits,
                                  normalize,
                                  only_classes,
                                  parse_classes,
                                  register_dataset,
)

__all__ = [
    "AugmentPolicy",
    "CropFlip",
    "DataSource",
    "FileBatches",
    "FilePolicy",
    "ImageFiles",
    "Policy",
    "policy_for",
    "class_names",
    "stored_policy",
    "student_views",
    "Identity",
    "ImageData",
    "data_fingerprint",
    "get_policy",
    "list_datasets",
    "list_policies",
    "dataset_options",
    "load_at_size",
    "load_dataset",
    "load_splits",
    "normalize",
    "only_classes",
    "parse_classes",
    "register_dataset",
]
