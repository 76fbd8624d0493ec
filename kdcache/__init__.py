"""kdcache: run the teacher once, cache its multi-scale logits, train many students from the cache.

The public API, for your own training loop (docs/api.md):

    cache = kdcache.open_cache("caches/teacher.zarr")           # what a dump wrote: kdcache inspect shows it
    dataset = kdcache.CacheDataset("caches/teacher.zarr", item="pair")  # (image, TeacherTargets) per item
    student = kdcache.RegionStudent(kdcache.create_model("timm:resnet18", 10), scales=dataset.scales)
    criterion = kdcache.DistillLoss("sdd-lskd", epochs=240, dataset=dataset, model=student)
    loader = DataLoader(dataset, batch_size=64, collate_fn=kdcache.collate)  # or torch's default collate
    criterion.set_epoch(epoch); dataset.set_epoch(epoch)        # epochs from 0, as samplers count
    loss = criterion(student(images), targets.to(device))       # region logits in train(), plain in eval()

`CacheDataset(..., images="uint8")` gives the cached views' pixels for loaders that normalise on the device
(`dataset.mean`, `dataset.std`); a transform assigned to it is refused (`transforms_ignored()` drops them), so
the images are always the views the teacher saw. `kdcache.stages.dataset.check_loader_inputs` compares a
loader's image size, mean, std and classes with the cache's. `get_loss(name)` gives the loss's pure spec
(`loss(student, teacher, labels, epoch)`, epochs from 1); `LogitMap` a model's region logits in any mode.

`kdcache.losses` holds the pure loss functions (kd, dkd, sdd, sdd_lskd, sld, standardize, fitnet, at, sp, rkd,
...); `ModelOutputs` gives a student's embedding, attention maps and hints as a cache holds the teacher's.
"""

import importlib.metadata

from kdcache import losses
from kdcache.cache import TeacherCache, open_cache
from kdcache.data import get_policy, load_dataset
from kdcache.losses import get_loss
from kdcache.models import LogitMap, create_model, load_checkpoint
from kdcache.models.outputs import ModelOutputs
from kdcache.models.region_student import RegionStudent
from kdcache.stages.criterion import DistillLoss
from kdcache.stages.dataset import CacheDataset, TeacherTargets, collate

__version__ = importlib.metadata.version("kdcache")  # one source: pyproject.toml

__all__ = [
    "CacheDataset",
    "DistillLoss",
    "LogitMap",
    "ModelOutputs",
    "RegionStudent",
    "TeacherCache",
    "TeacherTargets",
    "__version__",
    "collate",
    "create_model",
    "get_loss",
    "get_policy",
    "load_checkpoint",
    "load_dataset",
    "losses",
    "open_cache",
]
