"""Training: the shared loop, teacher training, distillation from a cache or a live teacher."""

from kdcache.train.dataset import CachedViewDataset
from kdcache.train.distill import distill
from kdcache.train.loop import Run, device_batches, fit, loader_batches
from kdcache.train.targets import CachedTargets, LiveTeacher
from kdcache.train.teacher import load_teacher, train_teacher
from kdcache.train.views import CachedViews, FreshViews

__all__ = ["CachedTargets", "CachedViewDataset", "CachedViews", "FreshViews", "LiveTeacher", "Run", "device_batches",
           "distill", "fit", "load_teacher", "loader_batches", "train_teacher"]
