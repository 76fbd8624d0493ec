"""The general path: a torch Dataset pairing each replayed view with its cached targets."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from kdcache.cache import TeacherCache
from kdcache.data import AugmentPolicy, ImageData, normalize
from kdcache.models import region_indices
from kdcache.stages.views import CachedViews, require_fits


class CachedViewDataset(Dataset):
    """Item i: (sample i under the current view, normalised; its label; its region targets [R, C]).

    `set_epoch(e)` selects the view of epoch e, as a DistributedSampler's set_epoch selects its order.
    """

    def __init__(self, cache: TeacherCache, data: ImageData, policy: AugmentPolicy, scales: tuple[int, ...] | None = None,
                 view_order: str = "cycle", seed: int = 0) -> None:
        require_fits(cache, data, policy, scales or cache.scales)
        self.cache, self.data, self.policy = cache, data, policy
        self.views = CachedViews(cache, policy, view_order, seed)
        self.regions = None if scales is None else region_indices(cache.scales, scales)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Load the view (parameters and targets) that epoch replays."""
        self.view = self.views.view_of(epoch)
        self.params = self.views.params(epoch)
        logits = torch.from_numpy(self.cache.view(self.view))
        self.targets = logits if self.regions is None else logits[:, self.regions]

    def __len__(self) -> int:
        return len(self.data.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = self.policy.apply(self.data.images[index:index + 1], self.params[index:index + 1])
        x = normalize(image, self.data.mean, self.data.std)[0]
        return x, self.data.labels[index], self.targets[index].float()
