"""Models: specs (kdcache's registry, timm, torchvision, GPT, Hugging Face folders, open_clip's CLIP, your own), the CIFAR family, region logits, checkpoints."""

# Importing the architecture modules registers their constructors.
from kdcache.models import imagenet, mobilenetv2, resnet, segmentation, shufflenet, vgg, wrn  # noqa: F401
from kdcache.models import clip  # noqa: F401  (registers the clip: spec source; open_clip is imported when used)
from kdcache.models._registry import register_model
from kdcache.models.checkpoint import (
    file_sha256,
    head_parameters,
    load_checkpoint,
    load_student_weights,
    load_teacher,
    read_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from kdcache.models.logit_map import (
    HEAD_KINDS,
    LogitMap,
    describe_outputs,
    num_regions,
    parse_scales,
    region_indices,
)
from kdcache.models.lm import GPT
from kdcache.models.specs import check_model_spec, count_parameters, create_model, list_models, pretrained_tag

__all__ = [
    "GPT",
    "HEAD_KINDS",
    "LogitMap",
    "check_model_spec",
    "count_parameters",
    "create_model",
    "describe_outputs",
    "file_sha256",
    "head_parameters",
    "list_models",
    "load_checkpoint",
    "load_student_weights",
    "load_teacher",
    "num_regions",
    "parse_scales",
    "pretrained_tag",
    "read_checkpoint",
    "region_indices",
    "register_model",
    "resolve_checkpoint",
    "save_checkpoint",
]
