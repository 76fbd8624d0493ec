"""Distil into your own model, in your own loop: kdcache gives the teacher's targets and the loss.

    kdcache quickstart                      # once: writes caches/quickstart-digits.zarr (the teacher's cache)
    python examples/plain_loop.py           # your model, AdamW, a cosine schedule; KD from the cache
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader

import kdcache

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--cache", default="caches/quickstart-digits.zarr")
parser.add_argument("--epochs", type=int, default=10)
args = parser.parse_args()

dataset = kdcache.CacheDataset(args.cache)  # digits need no data root; other datasets take data_root=
loader = DataLoader(dataset, batch_size=64, shuffle=True, drop_last=True, num_workers=2, persistent_workers=True)
test = kdcache.load_dataset("digits", split="test")

model = nn.Sequential(  # your own model: anything that maps images to [B, C] logits
    nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, dataset.num_classes),
)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(loader))
kd = kdcache.get_loss("kd")  # Hinton's KD with its paper's defaults; it takes [B, C] logits

for epoch in range(args.epochs):
    dataset.set_epoch(epoch)  # the view the teacher saw for this epoch (its workers follow, persistent too)
    model.train()
    for images, labels, targets in loader:
        loss = kd(model(images), targets["regions"][:, 0], labels, epoch=epoch + 1)  # region 0: the global logit
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test.normalized()).argmax(1) == test.labels).float().mean().item()
    print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {accuracy:.3f}", flush=True)
