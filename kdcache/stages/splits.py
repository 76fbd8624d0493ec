"""Where a training loop's batches come from: a split held whole on the device (the fast path), or image files
streamed through DataLoader workers. Both give the loop the same batches, in the order of one CPU generator."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from kdcache.data import AugmentPolicy, DataSource, FileBatches, FilePolicy, ImageData, ImageFiles, Policy, normalize
from kdcache.data.augment import resize_views
from kdcache.data.files import batch_on_device, stream
from kdcache.data.mixing import Mixed, mix_targets, replay
from kdcache.data.source import EVAL_BATCH, TestBatch
from kdcache.distributed import Shard
from kdcache.errors import KdcacheError
from kdcache.stages.targets import Targets

# images (normalised), labels, targets by name (regions [b, R, C], ...; Targets)
Batch = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]


class Split(Protocol):
    """What the loop asks of its data: each epoch's training batches and the test split's batches."""

    shard: Shard  # the samples this rank trains on (all of them in one process)

    def batches(self, epoch: int, params: torch.Tensor | None, targets: Targets | None, batch_size: int,
                generator: torch.Generator) -> Iterator[Batch]:
        """One epoch's full batches in the generator's order, under views `params` [N, P] (None: fresh draws)."""
        ...

    def test_batches(self, samples: range) -> Iterator[TestBatch]:
        """The un-augmented test samples of `samples` (a rank's share), in order."""
        ...

    @property
    def test_size(self) -> int:
        """How many samples the test split has."""
        ...


def global_batches(shard: Shard, batch_size: int, generator: torch.Generator,
                   device: torch.device = torch.device("cpu")) -> Iterator[torch.Tensor]:
    """Each full batch of the epoch's order over all samples, as this rank's members (global indices, any number).

    Under DDP the ranks together take exactly the steps of one process: the order is that of all samples and
    each rank keeps the members it holds. A whole shard's batches come on `device`, the epoch's order copied
    there once (a copy per step would wait for the GPU each time); a rank's members stay on the CPU.
    """
    order = torch.randperm(shard.total, generator=generator)
    batches = order[:shard.total // batch_size * batch_size].view(-1, batch_size)  # full: BatchNorm needs > 1
    if shard.is_whole:
        yield from batches.to(device)
        return
    for index in batches:
        yield index[(index >= shard.samples.start) & (index < shard.samples.stop)]


def device_batches(images: torch.Tensor, labels: torch.Tensor, params: torch.Tensor, policy: AugmentPolicy,
                   mean: tuple[float, ...], std: tuple[float, ...], targets: Targets | None, batch_size: int,
                   generator: torch.Generator, shard: Shard | None = None,
                   view_size: int | None = None) -> Iterator[Batch]:
    """The fast path: uint8 images, labels and parameters already on the device; each batch is indexed,
    augmented as one op (then resized to view_size × view_size where given: a student smaller than the teacher's
    views) and normalised there. The order comes from a CPU generator, so it is the same on any device.

    With a shard (one rank of DDP), images, labels, params and targets hold only the shard's samples.
    """
    shard = shard or Shard.whole(len(labels))
    for index in global_batches(shard, batch_size, generator, images.device):
        if not shard.is_whole:
            index = (index - shard.samples.start).to(images.device)
        x = normalize(resize_views(replay(policy, images, params, index), view_size), mean, std)
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        found = None if targets is None else targets(index, x)
        yield x, labels[index], with_mix_targets(found, mix_targets(policy, labels, params, index))


def with_mix_targets(found: dict[str, torch.Tensor] | None, mixed: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor] | None:
    """A batch's targets with a mixed view's label targets added (none: the targets as they are)."""
    return {**(found or {}), **mixed} if mixed else found


class EvalSplit:
    """A test split's un-augmented batches, as every evaluation reads them, from the source's `evaluation`: images
    held in memory normalised on the device (held there with `resident`, else each batch moved as it comes), or
    files through the evaluation crop read by DataLoader workers; `batch_size` images a batch."""

    def __init__(self, test: DataSource, device: torch.device, workers: int = 0,
                 resident: bool = True, batch_size: int = EVAL_BATCH) -> None:
        self.test, self.device = test, device
        self.reader = test.evaluation(device, workers, resident, batch_size)

    def batches(self, samples: range) -> Iterator[TestBatch]:
        """The test samples of `samples` (a rank's share), in order, normalised, with their labels on the device."""
        return self.reader.batches(samples)

    def __len__(self) -> int:
        return len(self.test.labels)


class DeviceSplit:
    """The split (a rank's share of it) and the test split on the device, augmented and normalised there."""

    def __init__(self, data: ImageData, test: ImageData, policy: AugmentPolicy, device: torch.device,
                 shard: Shard | None = None) -> None:
        self.data, self.test, self.policy, self.device = data, test, policy, device
        self.shard = shard or Shard.whole(len(data.labels))
        if isinstance(policy, Mixed) and not self.shard.is_whole:
            raise KdcacheError("a cache of mixed views (dump-teacher --mix) trains in one process: a rank holds only "
                               "its share of the images, and a mixing partner may lie in another's; run without "
                               "torchrun")
        self.held = slice(self.shard.samples.start, self.shard.samples.stop)
        self.images, self.labels = data.images[self.held].to(device), data.labels[self.held].to(device)
        self.testing = EvalSplit(test, device)

    def batches(self, epoch: int, params: torch.Tensor | None, targets: Targets | None, batch_size: int,
                generator: torch.Generator) -> Iterator[Batch]:
        """One epoch's batches, the held samples' views made on the device."""
        return device_batches(self.images, self.labels, params[self.held].to(self.device), self.policy,
                              self.data.mean, self.data.std, targets, batch_size, generator, self.shard,
                              self.data.view_size)

    def test_batches(self, samples: range) -> Iterator[TestBatch]:
        """The test samples of `samples`, normalised on the device."""
        return self.testing.batches(samples)

    @property
    def test_size(self) -> int:
        return len(self.testing)


class StreamedSplit:
    """Image files read, decoded, cropped and flipped by DataLoader workers; normalised on the GPU (uint8 crosses
    to it), or on the CPU by the workers themselves.

    checksums: the crc32c the teacher's dump recorded for each file [N]: every file read is checked against
    it. A rank reads only the files of its shard, and the partners' of a mixed view.
    """

    def __init__(self, data: ImageFiles, test: DataSource, policy: FilePolicy, device: torch.device,
                 workers: int, seed: int = 0, shard: Shard | None = None, checksums: np.ndarray | None = None) -> None:
        self.data, self.test, self.device, self.workers = data, test, device, workers
        self.shard = shard or Shard.whole(len(data.labels))
        self.policy = policy
        on_cpu = device.type == "cpu"  # then the workers normalise: the main process has the model to run
        self.train_files = FileBatches(data, policy, seed, "fresh", normalized=on_cpu, checksums=checksums)
        # a test split in memory beside streamed files moves a batch at a time: the device's memory is the training's
        self.testing = EvalSplit(test, device, workers, resident=False)

    def batches(self, epoch: int, params: torch.Tensor | None, targets: Targets | None, batch_size: int,
                generator: torch.Generator) -> Iterator[Batch]:
        """One epoch's batches: the cache's views of the files (params), or views drawn fresh for this epoch."""
        self.train_files.replay(params)  # before the loader starts its workers, which take the dataset as it is
        keys = [(epoch, index.tolist()) for index in global_batches(self.shard, batch_size, generator)]
        for images, labels, params, _, indices in stream(self.train_files, keys, self.workers, self.device):
            x = batch_on_device(images, self.data, self.device)
            if x.is_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            found = None if targets is None else targets(indices - self.shard.samples.start, x)
            mixed = {name: value.to(self.device) for name, value in
                     mix_targets(self.policy, self.data.labels, params, slice(None)).items()}
            yield x, labels.to(self.device, non_blocking=True), with_mix_targets(found, mixed)

    def test_batches(self, samples: range) -> Iterator[TestBatch]:
        """The test samples of `samples`: files through the evaluation crop, or a split held in memory."""
        return self.testing.batches(samples)

    @property
    def test_size(self) -> int:
        return len(self.testing)


def make_split(data: DataSource, test: DataSource, policy: Policy,
               device: torch.device, shard: Shard | None = None, workers: int = 0, seed: int = 0,
               checksums: np.ndarray | None = None) -> Split:
    """The device path for a split held in memory, the streamed path for files (the one choice of machinery a
    source leaves to the loop: it cannot hold the loop's batches)."""
    if data.streamed:
        return StreamedSplit(data, test, policy, device, workers, seed, shard, checksums)
    return DeviceSplit(data, test, policy, device, shard)
