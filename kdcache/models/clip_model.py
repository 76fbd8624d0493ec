"""A CLIP teacher in timm's interface: open_clip's CLIP, its image tower split into features and head, its text
tower run once per class to make a zero-shot classifier (imported only for a clip: spec; see kdcache.models.clip).

- `forward_features(x)`: the image tower's tokens after its transformer `[B, 1 + patches, width]` (the class token
  first, `num_prefix_tokens` = 1), as open_clip's VisionTransformer computes them;
- `forward_head(features, pre_logits=True)`: the L2-normalised image embedding `[B, embed_dim]` (the tower's pool,
  its final norm and projection, as open_clip applies them), the `embedding` output a cache stores;
- `forward_head(features)`: the zero-shot logits `[B, C]`, logit_scale.exp() · image embedding · text_embeddingᵀ
  (plus logit_bias where the architecture has one), as open_clip's `get_logits` scores an image against texts.

`text_embedding` `[C, embed_dim]` holds the L2-normalised text embeddings of one prompt per class, PROMPT with the
class name (underscores read as spaces: "a photo of a maple tree."), computed once by `zero_shot` after the weights
are loaded, never per image. Region logits (SDD's cells) pass each cell's mean token through the same head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer

from kdcache.errors import KdcacheError

PROMPT = "a photo of a {}."  # CLIP's zero-shot template for class names (Radford et al. 2021)
TEXT_EMBEDDING = "text_embedding"  # the buffer, and the cache array that stores it


class ClipTeacher(CLIP):
    """open_clip's CLIP (its state dict's names unchanged, so open_clip's weight files load strictly) as a
    zero-shot classifier over `num_classes` class-name prompts."""

    num_prefix_tokens = 1  # the class token precedes the patch tokens

    def __init__(self, config: dict[str, Any], num_classes: int) -> None:
        super().__init__(**config)
        self.num_classes = num_classes
        text = config["text_cfg"]
        self.tokenizer_options = {"context_length": text.get("context_length", 77), **text.get("tokenizer_kwargs", {})}
        # not in the state dict: made from the weights and the class names, not loaded
        self.register_buffer(TEXT_EMBEDDING, torch.empty(0, config["embed_dim"]), persistent=False)

    def zero_shot(self, class_names: Sequence[str]) -> dict[str, Any]:
        """Embed one prompt per class with the text tower, once, as `text_embedding`; what a cache's metadata
        records of it (the template and the class names)."""
        names = tuple(class_names)
        if len(names) != self.num_classes:
            given = f"{len(names)} class names were" if names else "no class names were"
            raise KdcacheError(f"{getattr(self, 'arch', 'clip')}: zero-shot logits need a name per class, and "
                               f"{given} given for the data's {self.num_classes} classes; pass --class-names FILE (one "
                               f"name per line, in label order), or use a dataset whose classes are named (digits, "
                               f"cifar10, cifar100, an imagefolder's folders)")
        prompts = [PROMPT.format(name.replace("_", " ")) for name in names]
        training = self.training
        self.eval()
        with torch.no_grad():
            tokens = SimpleTokenizer(**self.tokenizer_options)(prompts).to(self.logit_scale.device)
            self.text_embedding = self.encode_text(tokens, normalize=True).float()
        self.train(training)
        return {"template": PROMPT, "class_names": list(names), "dim": int(self.text_embedding.shape[1])}

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's tokens after its transformer, [B, 1 + patches, width]."""
        size = tuple(self.visual.image_size)
        if tuple(images.shape[-2:]) != size:  # its positional embedding has one entry per patch of that size
            raise KdcacheError(f"{getattr(self, 'arch', 'clip')} takes {size[0]}x{size[1]} images (its positional "
                               f"embedding's), and these views are {images.shape[-2]}x{images.shape[-1]}: make the "
                               f"views at its size (--image-size {size[0]} for an imagefolder), or name the "
                               f"architecture at theirs (clip:NAME,image_size={images.shape[-1]}) with weights of "
                               f"that size")
        return self.visual.transformer(self.visual._embeds(images))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The normalised image embedding (pre_logits), else the zero-shot logits against the class prompts."""
        pooled, _ = self.visual._pool(features)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        embedding = F.normalize(pooled, dim=-1)
        if pre_logits:
            return embedding
        if not len(self.text_embedding):
            raise KdcacheError(f"{getattr(self, 'arch', 'clip')} has no class prompts embedded yet: a CLIP model is a "
                               f"teacher whose logits are its zero-shot scores against its dataset's class names "
                               f"(dump-teacher, eval and distill --live-teacher embed them); it is not trained as a "
                               f"student")
        logits = self.logit_scale.exp() * embedding @ self.text_embedding.to(embedding.dtype).T
        return logits if self.logit_bias is None else logits + self.logit_bias

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits [B, C]."""
        return self.forward_head(self.forward_features(images))
