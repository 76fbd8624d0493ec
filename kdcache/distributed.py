"""torchrun support: which rank this process is, the process group, and the collectives kdcache needs.

Under `torchrun --nproc-per-node G -m kdcache ...` every process runs the same command; torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) says which part of the work is its own.
Without torchrun there is one rank and every collective is a no-op, so single-process code paths
stay exactly as they are.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kdcache.errors import KdcacheError


@dataclass(frozen=True)
class World:
    """This process's place among torchrun's processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's rank, the number of processes and its rank on its node, from torchrun's environment."""
    try:
        found = World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                      int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise KdcacheError("RANK, WORLD_SIZE and LOCAL_RANK should be integers (torchrun sets them); found "
                           f"{os.environ.get('RANK')!r}, {os.environ.get('WORLD_SIZE')!r}, "
                           f"{os.environ.get('LOCAL_RANK')!r}") from None
    return found


def init(device: torch.device) -> World:
    """Join torchrun's process group (NCCL on CUDA, gloo on the CPU) once; a single process joins nothing."""
    here = world()
    if here.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=here.rank, world_size=here.size,
                                device_id=device if device.type == "cuda" else None)
        # a group left to the interpreter's teardown can abort a rank whose peer already exited (gloo)
        atexit.register(_leave)
    return here


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op for one process)."""
    if dist.is_initialized():
        dist.barrier()


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `values` over all ranks (the tensor itself for one process)."""
    if not dist.is_initialized():
        return values
    # NCCL reduces GPU tensors only
    here = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    summed = values.to(here, copy=True)
    dist.all_reduce(summed)
    return summed.to(values.device)


def from_main(compute: Any) -> Any:
    """Run `compute()` on rank 0 and give every rank its result; a KdcacheError there is raised on every rank.

    Used where one rank must act alone (create a store, take the lock) and the others must not hang
    at the next barrier when it fails.
    """
    here = world()
    result, error = None, None
    if here.is_main:
        try:
            result = compute()
        except KdcacheError as raised:
            error = raised
            if not dist.is_initialized():
                raise
    if not dist.is_initialized():
        return result
    message = [None if error is None else str(error)]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise KdcacheError(message[0])
    return result


def shared(value: Any) -> Any:
    """Rank 0's `value` (picklable) on every rank: what rank 0 alone decided, such as the runs' folders."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass(frozen=True)
class Shard:
    """The contiguous samples one rank holds, out of how many in all."""

    samples: range
    total: int

    @classmethod
    def whole(cls, total: int) -> Shard:
        """Every sample: the shard of a single process."""
        return cls(range(total), total)

    @property
    def is_whole(self) -> bool:
        return len(self.samples) == self.total


def shard(num_blocks: int, block_size: int, num_samples: int, here: World) -> tuple[range, Shard]:
    """This rank's contiguous range of blocks and the samples they hold: blocks split as evenly as they go."""
    first, last = num_blocks * here.rank // here.size, num_blocks * (here.rank + 1) // here.size
    return range(first, last), Shard(range(min(first * block_size, num_samples), min(last * block_size, num_samples)),
                                     num_samples)


def even_share(num_samples: int, here: World) -> Shard:
    """This rank's contiguous share of samples split as evenly as they go (blocks of one sample)."""
    return shard(num_samples, 1, num_samples, here)[1]


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over ranks, differentiable: each rank's gradient is the sum of every rank's."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor) -> torch.Tensor:
        return all_sum(values)

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> torch.Tensor:
        return all_sum(gradient)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch, summed over ranks (for gloo on CPU,
    where torch's SyncBatchNorm does not run): the same mean, variance and running statistics as one process."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        count = x.new_tensor([x.shape[0] * x.shape[2] * x.shape[3]], dtype=torch.float32)
        sums = _SumOverRanks.apply(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count]))
        channels = x.shape[1]
        total = sums[-1]
        mean = sums[:channels] / total
        variance = (sums[channels:2 * channels] / total - mean * mean).clamp_min(0)  # biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                # momentum None is BatchNorm's cumulative average
                factor = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(variance.detach() * total / (total - 1).clamp_min(1), factor)
        shape = (1, channels, 1, 1)
        normalised = (x - mean.view(shape)) * torch.rsqrt(variance.view(shape) + self.eps)
        return normalised * self.weight.view(shape) + self.bias.view(shape) if self.affine else normalised


def synchronise_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d normalised with global-batch statistics: torch's SyncBatchNorm on CUDA, GlobalBatchNorm2d
    elsewhere. Parameters and buffers keep their names, so checkpoints load into the plain model."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats).to(child.weight.device)
            synced.load_state_dict(child.state_dict())
            setattr(model, name, synced)
        else:
            synchronise_batchnorm(child, device)
    return model

