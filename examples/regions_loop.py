"""SDD-LSKD in your own loop: LogitMap gives your student region logits, the cache gives the teacher's.

    kdcache quickstart                      # once: writes caches/quickstart-digits.zarr (scales 1,2,4)
    python examples/regions_loop.py
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader

import kdcache


class SmallNet(nn.Module):
    """Your model, with the two methods region logits are made from (timm's interface)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.fc = nn.Linear(64, num_classes)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)  # the final feature map [B, F, h, w]

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = features.mean((2, 3))
        return pooled if pre_logits else self.fc(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--cache", default="caches/quickstart-digits.zarr")
parser.add_argument("--epochs", type=int, default=10)
args = parser.parse_args()

dataset = kdcache.CacheDataset(args.cache)
loader = DataLoader(dataset, batch_size=64, shuffle=True, drop_last=True, num_workers=2, persistent_workers=True)
test = kdcache.load_dataset("digits", split="test")
model = SmallNet(dataset.num_classes)
student = kdcache.LogitMap(model, dataset.scales)  # the regions of the targets, in their order
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
sdd_lskd = kdcache.get_loss("sdd-lskd", warmup_epochs=1)  # the paper's 20-epoch warm-up, shortened here

for epoch in range(args.epochs):
    dataset.set_epoch(epoch)
    model.train()
    for images, labels, targets in loader:
        loss = sdd_lskd(student(images), targets["regions"], labels, epoch=epoch + 1)  # [B, R, C] both
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test.normalized()).argmax(1) == test.labels).float().mean().item()
    print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {accuracy:.3f}", flush=True)
