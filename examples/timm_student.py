"""A timm student distilled from the cache with SDD-LSKD: any timm model, region logits through its own head.

    pip install -e ".[timm]" && kdcache quickstart      # once: timm, and caches/quickstart-digits.zarr
    python examples/timm_student.py --student timm:mobilenetv3_small_050
"""

import argparse

import torch
from torch.utils.data import DataLoader

import kdcache

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--cache", default="caches/quickstart-digits.zarr")
parser.add_argument("--student", default="timm:mobilenetv3_small_050", help="any model spec (kdcache models)")
parser.add_argument("--epochs", type=int, default=10)
args = parser.parse_args()

dataset = kdcache.CacheDataset(args.cache)
loader = DataLoader(dataset, batch_size=64, shuffle=True, drop_last=True)
test = kdcache.load_dataset("digits", split="test")
model = kdcache.create_model(args.student, num_classes=dataset.num_classes)  # fresh weights, never downloaded
student = kdcache.LogitMap(model, dataset.scales)
optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
sdd_lskd = kdcache.get_loss("sdd-lskd", warmup_epochs=1)

for epoch in range(args.epochs):
    dataset.set_epoch(epoch)
    model.train()
    for images, labels, targets in loader:
        loss = sdd_lskd(student(images), targets["regions"], labels, epoch=epoch + 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test.normalized()).argmax(1) == test.labels).float().mean().item()
    print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {accuracy:.3f}", flush=True)
