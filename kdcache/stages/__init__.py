"""The two stages: dump-teacher (stage 1), distill (stage 2) through the shared loop, and train-teacher."""

from kdcache.stages.dataset import CacheDataset, load_cache_data
from kdcache.stages.distill import RunSummary, distill
from kdcache.stages.dump import DumpResult, dump_from_config, dump_teacher
from kdcache.stages.loop import Run, fit, loader_batches
from kdcache.stages.splits import DeviceSplit, StreamedSplit, device_batches, make_split
from kdcache.stages.targets import CachedTargets, LiveTeacher, Targets
from kdcache.stages.teacher import train_teacher
from kdcache.stages.views import CachedViews, FreshViews, Views, require_fits

__all__ = ["CacheDataset", "CachedTargets", "CachedViews", "DeviceSplit", "DumpResult", "FreshViews", "LiveTeacher",
           "Run", "RunSummary", "StreamedSplit", "Targets", "Views", "device_batches", "distill", "dump_from_config",
           "dump_teacher", "fit", "load_cache_data", "loader_batches", "make_split", "require_fits", "train_teacher"]
