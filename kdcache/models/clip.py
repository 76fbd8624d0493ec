"""CLIP teachers by spec: `clip:NAME[,key=value,...]`, open_clip's architecture NAME built with fresh weights.

NAME is one of open_clip's built-in architectures (`kdcache models --source clip`) whose image tower is its
VisionTransformer and whose text tower and tokenizer are its own (ViT-B-32, ViT-B-16, ViT-L-14, their -quickgelu
forms, ...): the tokenizer is open_clip's SimpleTokenizer, whose BPE vocabulary ships inside the package, so nothing
is downloaded. Architectures with a Hugging Face text model or tokenizer, a ResNet or timm image tower, or an
attention pooler (CoCa) are refused in one line. `key=value` items change the architecture's config (numbers and
true/false only): `embed_dim`, `quick_gelu`, the image tower's fields (`image_size`, `patch_size`, `width`, `layers`,
`head_width`, ...) and the text tower's with a `text_` prefix (`text_width`, `text_layers`, `text_heads`,
`text_context_length`); a CLIP at 32 px for tests:
`clip:ViT-B-32,image_size=32,patch_size=8,width=64,layers=2,head_width=32,embed_dim=32,text_width=32,text_layers=1,
text_heads=2`.

Weights come only from a local file, open_clip's state dict (`open_clip_model.safetensors`, or a weights-only
`open_clip_pytorch_model.bin`), loaded as every teacher's is (`load_teacher`: strict, weights-only); open_clip's
`pretrained=` is never used. The model itself is `kdcache.models.clip_model.ClipTeacher`, imported only when a clip:
spec is built.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

from torch import nn

from kdcache.errors import KdcacheError
from kdcache.models.specs import SOURCES, Source, spec_arguments

CLIP_FORM = ("clip:NAME or clip:NAME,key=value,... (numbers, true or false), such as "
             "clip:ViT-B-32,image_size=32,patch_size=8")
TEXT_PREFIX = "text_"  # of a key that sets a field of the text tower's config


def open_clip_module() -> Any:
    """open_clip, or one line saying how to install it."""
    try:
        import open_clip
    except ImportError:
        raise KdcacheError('clip: models named clip:NAME need open-clip-torch; install it with pip install '
                           '"kdcache[clip]" (or pip install open-clip-torch)') from None
    return open_clip


def clip_config(body: str) -> dict[str, Any]:
    """open_clip's config of the architecture a clip spec's body names, with the spec's key=value items applied;
    an architecture kdcache cannot build without a download, or does not give timm's interface, is refused."""
    open_clip = open_clip_module()
    name, arguments = spec_arguments("clip", body, CLIP_FORM)
    spec = f"clip:{body}"
    config = _builtin_config(name)
    if config is None:
        raise KdcacheError(f"model spec {spec!r}: open_clip has no architecture {name!r} (`kdcache models --source "
                           f"clip` lists them)")
    vision_fields = {field.name for field in dataclasses.fields(open_clip.model.CLIPVisionCfg)}
    text_fields = {field.name for field in dataclasses.fields(open_clip.model.CLIPTextCfg)}
    for key, value in arguments.items():
        if key in ("embed_dim", "quick_gelu"):
            config[key] = value
        elif key in vision_fields:
            config["vision_cfg"][key] = value
        elif key.startswith(TEXT_PREFIX) and key[len(TEXT_PREFIX):] in text_fields:
            config["text_cfg"][key[len(TEXT_PREFIX):]] = value
        else:
            raise KdcacheError(f"model spec {spec!r}: {key!r} is no field of open_clip's CLIP config; give embed_dim, "
                               f"quick_gelu, an image tower field ({', '.join(sorted(vision_fields)[:6])}, ...) or a "
                               f"text tower field prefixed {TEXT_PREFIX} ({TEXT_PREFIX}width, {TEXT_PREFIX}layers, ...)")
    refusal = _unsupported(config)
    if refusal:
        raise KdcacheError(f"model spec {spec!r}: {name} {refusal}; kdcache's CLIP teachers are open_clip "
                           f"architectures with its ViT image tower and its own text tower, such as ViT-B-32, ViT-B-16 "
                           f"or ViT-L-14")
    return config


def _builtin_config(name: str) -> dict[str, Any] | None:
    """A copy of open_clip's built-in config of an architecture, or None: never one of its `hf-hub:` names (which
    download) or `local-dir:` ones (which read a folder's JSON)."""
    open_clip = open_clip_module()
    return open_clip.get_model_config(name) if name in open_clip.list_models() else None


def _unsupported(config: dict[str, Any]) -> str | None:
    """Why kdcache cannot build this CLIP config as a teacher, or None."""
    vision, text = config["vision_cfg"], config["text_cfg"]
    if text.get("hf_model_name") or text.get("hf_tokenizer_name"):
        return ("uses a Hugging Face text model or tokenizer, which would be downloaded (kdcache takes only open_clip's "
                "own tokenizer, which ships in the package)")
    if config.get("custom_text") or "multimodal_cfg" in config:
        return "has a custom text tower (CustomTextCLIP or CoCa), which kdcache does not wrap"
    if vision.get("timm_model_name") or not isinstance(vision.get("layers"), int):
        return "has a timm or ResNet image tower, not open_clip's VisionTransformer"
    if vision.get("attentional_pool") or vision.get("pool_type", "tok") not in ("tok", "avg"):
        return "pools its image tokens with an attention pooler or not at all, which region logits cannot apply per cell"
    return None


def _build(body: str, num_classes: int) -> nn.Module:
    from kdcache.models.clip_model import ClipTeacher  # imports open_clip: only for a clip: spec

    return ClipTeacher(clip_config(body), num_classes)


def _names(pattern: str) -> list[str]:
    """The architectures kdcache builds as teachers (not the ones `_unsupported` refuses) that match a pattern."""
    return [name for name in open_clip_module().list_models()
            if fnmatch.fnmatchcase(name, pattern) and _unsupported(_builtin_config(name)) is None]


def _exists(body: str) -> bool:
    return body.split(",")[0] in open_clip_module().list_models()


SOURCES.register(Source(_build, _names, _exists, "open_clip"), "clip")
