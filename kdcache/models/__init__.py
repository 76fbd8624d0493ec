"""Models: the registry, the CIFAR family of the KD literature, region logits and checkpoints."""

# Importing the architecture modules registers their constructors.
from kdcache.models import imagenet, mobilenetv2, resnet, shufflenet, vgg, wrn  # noqa: F401
from kdcache.models._registry import create_model, list_models, register_model
from kdcache.models.checkpoint import file_sha256, load_checkpoint, load_teacher, read_checkpoint, save_checkpoint
from kdcache.models.logit_map import LogitMap, num_regions, parse_scales, region_indices

__all__ = [
    "LogitMap",
    "create_model",
    "file_sha256",
    "list_models",
    "load_checkpoint",
    "load_teacher",
    "read_checkpoint",
    "num_regions",
    "parse_scales",
    "region_indices",
    "register_model",
    "save_checkpoint",
]
