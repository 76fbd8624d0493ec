"""A student that gives region logits while it trains and its plain logits otherwise, and is its model to the
outside: the same parameters, names and state_dict, so checkpoints, EMAs and DDP see the model itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kdcache.errors import KdcacheError
from kdcache.models.logit_map import LogitMap


class RegionStudent(nn.Module):
    """`model` in training mode as `LogitMap(model, scales)`: region logits [B, R, C]; in eval mode `model(x)`,
    its logits [B, C].

    It holds the model's own parameters, buffers and submodules under the model's names (no "model." prefix):
    `state_dict()` is the model's, so a checkpoint of it loads into the plain model, timm's checkpoint saver and
    ModelEmaV3 keep working, and attributes it lacks (num_classes, no_weight_decay, pretrained_cfg, ...) are the
    model's. Its forward is the one forward: wrapped by DistributedDataParallel, every region's gradient goes
    through DDP's hooks (LogitMap around a DDP model would reach past them, to model.module).
    """

    def __init__(self, model: nn.Module, scales: Sequence[int] = (1, 2, 4)) -> None:
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            raise KdcacheError("RegionStudent(DistributedDataParallel(model)): the regions would be computed past "
                               "DDP's forward, so their gradients would not be averaged over the processes; wrap the "
                               "plain model and give DDP the student: DistributedDataParallel(RegionStudent(model, "
                               "scales))")
        logit_map = LogitMap(model, scales)  # refuses scales and models that give no regions, in one line
        # the model's own tables, shared rather than registered under a name: its names are this module's names
        self._parameters, self._buffers, self._modules = model._parameters, model._buffers, model._modules
        self._non_persistent_buffers_set = model._non_persistent_buffers_set
        self.__dict__.update(model=model, logit_map=logit_map)
        self.scales, self.num_regions = logit_map.scales, logit_map.num_regions
        self.train(model.training)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Region logits [B, R, C] in training mode; the model's logits [B, C] in eval mode."""
        return self.logit_map(images) if self.training else self.model(images)

    def train(self, mode: bool = True) -> RegionStudent:
        """Training (regions) or eval (plain logits) mode, for the model itself too (its forward may read it)."""
        super().train(mode)
        self.model.training = mode
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("model")
            if model is None:
                raise
            return getattr(model, name)

    def extra_repr(self) -> str:
        return f"scales={self.scales}, num_regions={self.num_regions}"
