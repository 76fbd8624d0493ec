"""kdcache: run the teacher once, cache its multi-scale logits, train many students from the cache.

The public API, for your own training loop (docs/api.md):

    cache = kdcache.open_cache("caches/teacher.zarr")           # what a dump wrote: kdcache inspect shows it
    dataset = kdcache.CacheDataset("caches/teacher.zarr")       # (image, label, {"regions": [R, C]}) per item
    student = kdcache.LogitMap(kdcache.create_model("timm:resnet18", 10), scales=(1, 2, 4))
    loss = kdcache.get_loss("sdd-lskd")(student(images), targets["regions"], labels, epoch)

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
from kdcache.stages.dataset import CacheDataset

__version__ = importlib.metadata.version("kdcache")  # one source: pyproject.toml

__all__ = [
    "CacheDataset",
    "LogitMap",
    "ModelOutputs",
    "TeacherCache",
    "__version__",
    "create_model",
    "get_loss",
    "get_policy",
    "load_checkpoint",
    "load_dataset",
    "losses",
    "open_cache",
]
