"""Your own loop, on one process or many under torchrun: kdcache's Dataset, loss and region student, DDP's own
sampler and wrapper.

    kdcache quickstart                                      # once: caches/quickstart-digits.zarr
    python examples/ddp_loop.py                             # one process
    torchrun --nproc-per-node 2 examples/ddp_loop.py        # DDP: gloo on the CPU, nccl on GPUs
"""

import argparse
import os

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import kdcache

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--cache", default="caches/quickstart-digits.zarr")
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--loss", default="sdd-lskd", help="a `kdcache losses` name; sdd-lskd distils every region")
parser.add_argument("--seed", type=int, default=0, help="the student's initial weights (the same in every process)")
args = parser.parse_args()
torch.manual_seed(args.seed)  # a run is repeatable: its weights start the same every time

distributed = "WORLD_SIZE" in os.environ  # set by torchrun
device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
if distributed:
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
primary = not distributed or torch.distributed.get_rank() == 0

# the images are the views the teacher saw (no transform of yours); the targets come with them as TeacherTargets
dataset = kdcache.CacheDataset(args.cache, item="pair")  # digits need no data root; others take data_root=
sampler = DistributedSampler(dataset) if distributed else None  # each process its share of every epoch
loader = DataLoader(dataset, batch_size=64, sampler=sampler, shuffle=sampler is None, drop_last=True,
                    num_workers=1, persistent_workers=True, collate_fn=kdcache.collate)
test = kdcache.load_dataset("digits", split="test")  # your own test set

# RegionStudent: region logits [B, R, C] in train(), plain logits in eval(); DDP wraps it, never the other way
student = kdcache.RegionStudent(kdcache.create_model("resnet8", dataset.num_classes), dataset.scales).to(device)
criterion = kdcache.DistillLoss(args.loss, epochs=args.epochs, dataset=dataset, model=student)  # checked here
model = DistributedDataParallel(student) if distributed else student
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(loader))

for epoch in range(args.epochs):
    for each in (sampler, dataset, criterion):  # the shuffle, the view the teacher saw, the loss's warm-up
        if each is not None:
            each.set_epoch(epoch)  # from 0, in every process
    model.train()
    for images, targets in loader:
        loss = criterion(model(images.to(device)), targets.to(device))
        optimizer.zero_grad()
        loss.backward()  # DDP averages the gradients over the processes
        optimizer.step()
        schedule.step()
    if primary:  # the plain model, outside DDP: eval needs no other process
        student.eval()
        with torch.no_grad():
            logits = student(test.normalized().to(device))
        accuracy = (logits.argmax(1).cpu() == test.labels).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {accuracy:.3f}", flush=True)
    if distributed:
        torch.distributed.barrier()  # the others wait while the first evaluates
if distributed:
    torch.distributed.destroy_process_group()
