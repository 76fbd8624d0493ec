"""Target providers, the seam between the stages: the cache and the live teacher give the same outputs (region
logits, and the embedding, attention maps and hints a feature or relation loss reads), several caches their
ensemble; a student's own weight average (the EMA teacher) and its peers (deep mutual learning) are providers
too. The loop cannot tell them apart."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Protocol

import torch
from torch import nn

from kdcache.cache import TeacherCache
from kdcache.cache.sizes import byte_size
from kdcache.cache.topk import topk_bytes
from kdcache.errors import KdcacheError
from kdcache.losses import PEERS
from kdcache.models import region_indices
from kdcache.models.outputs import EMBEDDING, REGIONS, ModelOutputs, output_kind, with_teacher
from kdcache.runtime import autocast, prepare_model
from kdcache.stages.recipe_options import WeightEMA, step_autocast
from kdcache.stages.topk import decode_topk
from kdcache.stages.views import require_outputs
from kdcache.tensors import negatives_output


Outputs = dict[str, torch.Tensor]  # a model's outputs by name (ModelOutputs): regions [b, R, C], ...


class Targets(Protocol):
    """A target provider: what the loop asks of the cache, the live teacher, or any other source of targets.

    The split asks the providers given to `fit` for every batch it makes (by the samples' indices); a run asks its
    own (Run(targets=...)) in each step, by the images alone (indices None), with every outputs of that step of the
    runs trained together (peers read them). A provider that follows the student's weights is a StepHook too."""

    def begin_epoch(self, view: int | None, next_view: int | None = None) -> None:
        """Get ready to give the targets of `view` (None: fresh views); `next_view` is the following epoch's. Runs
        trained one after another on an epoch each call it before their batches, with the same views."""
        ...

    def __call__(self, indices: torch.Tensor | None, images: torch.Tensor, step: Sequence[Outputs] = ()) -> Outputs:
        """The outputs of these samples (their indices, and their augmented, normalised images): `regions`
        [b, R, C] float32 region logits, and any further output by name. step: in a run's step, the outputs every
        run trained together made of these images, in their order."""
        ...


class CachedTargets:
    """Outputs from a cache: the epoch's whole view resident on the device (or, `on_host`, in host memory,
    each batch's rows gathered and moved), the next one read meanwhile.

    A top-k cache stays compact (values, classes, rest); each batch's logits are rebuilt on the device.
    outputs: the further outputs to give besides the region logits (their arrays alone are read).
    negatives: K, for a contrastive loss (CRD): each sample's `negatives/embedding` [b, K, D] beside its
    `embedding`, the rows of K other samples of the resident view (the cache is the memory bank; at most N - 1 of
    the N held, drawn uniformly with replacement, never the sample itself), drawn each batch from a generator
    seeded with `seed` and the view, so a run repeats them.
    """

    def __init__(self, cache: TeacherCache, scales: tuple[int, ...] | None = None,
                 device: torch.device = torch.device("cpu"), samples: range | None = None,
                 on_host: bool = False, outputs: tuple[str, ...] = (), negatives: int = 0, seed: int = 0) -> None:
        self.cache, self.device, self.on_host = cache, device, on_host
        self.negatives, self.seed = negatives, seed
        self._draws: torch.Generator | None = None
        # array -> output name; an output the cache lacks is refused with the command that caches it
        self.outputs = {cache.spec.output_arrays[name]: name for name in require_outputs(cache, outputs)}
        self.names = (*cache.spec.logit_arrays, *self.outputs)
        self.samples = samples  # a DDP rank's shard: only its blocks are read, and indices count from its start
        # a subset of the cache's scales is a subset of its regions, selected once per view
        self.regions = None if scales is None or tuple(scales) == cache.scales else region_indices(cache.scales, scales)
        self._view: int | None = None
        self._arrays: dict[str, torch.Tensor] = {}
        self._next: tuple[int, Future] | None = None
        # two sets of host buffers, reused: the view in use reads from one while the next is read into the other
        self._buffers = [cache.view_buffers(samples, self.names) for _ in range(2)]
        self._in_use = 0

    def begin_epoch(self, view: int | None, next_view: int | None = None) -> None:
        """Make `view` resident; start reading `next_view` in the background. Called again with the same views (a
        further run trained on the epoch), it keeps both and starts the negatives' draws over."""
        if view != self._view:
            self._load(view)
        if self._next is not None and self._next[0] != next_view:
            self._next[1].exception()  # a read of another view must end before the next one fills its buffers
            self._next = None
        if self._next is None and next_view is not None and next_view != view:
            self._next = (next_view, self.cache.prefetch(next_view, self.samples, self._buffers[1 - self._in_use],
                                                         self.names))
        if self.negatives:  # the same draws for each run trained on the view, and on any resume
            device = self.device if not self.on_host else torch.device("cpu")
            self._draws = torch.Generator(device).manual_seed(self.seed * 1_000_003 + view)

    def _load(self, view: int) -> None:
        """Make `view` resident: the read started for it, or a read now."""
        if self._next is not None and self._next[0] == view:
            arrays = self._next[1].result()
            self._in_use = 1 - self._in_use
        else:
            if self._next is not None:  # a read of another view may still be filling the other buffers
                self._next[1].exception()  # waits; its error, if any, is that view's, raised when it is read
            arrays = self.cache.view_arrays(view, self.samples, self._buffers[self._in_use], self.names)
        self._next = None
        # logits, or values, indices, rest; then the outputs
        tensors = {name: torch.from_numpy(values) for name, values in arrays.items()}
        if self.regions is not None:
            tensors |= {name: tensors[name][:, self.regions] for name in self.cache.spec.logit_arrays}
        self._arrays = {name: tensor if self.on_host else tensor.to(self.device) for name, tensor in tensors.items()}
        self._view = view

    def __call__(self, indices: torch.Tensor, images: torch.Tensor, step: Sequence[Outputs] = ()) -> Outputs:
        """The float32 outputs of these samples under the current view: regions [b, R, C], and the others'."""
        rows = {name: tensor[indices.to(tensor.device)].to(self.device, non_blocking=True)
                for name, tensor in self._arrays.items()}
        logits = [rows[name] for name in self.cache.spec.logit_arrays]
        regions = logits[0].float() if len(logits) == 1 else decode_topk(*logits, self.cache.spec.num_classes)
        found = {REGIONS: regions, **{self.outputs[array]: rows[array].float() for array in self.outputs}}
        if self.negatives:
            found |= {negatives_output(self.outputs[array]): self._negatives(self._arrays[array], indices).float()
                      for array in self.outputs if output_kind(self.outputs[array]) == EMBEDDING}
        return found

    def _negatives(self, bank: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """For each sample, the rows [b, K, D] of K others of the view held (`bank`, [N, D]), on the device."""
        held = len(bank)
        if held < 2:
            raise KdcacheError(f"a contrastive loss draws each sample's negatives from the other samples held, and "
                               f"{self.cache.path} holds {held} here: train on a split of two or more samples")
        count = min(self.negatives, held - 1)
        others = torch.randint(0, held - 1, (len(indices), count), generator=self._draws, device=self._draws.device)
        own = indices.to(others.device)[:, None]
        return bank[others + (others >= own)].to(self.device, non_blocking=True)  # skips the sample's own row


# CachedTargets holds a view three times: the view in use and the next one in host buffers, and one on the device
HOST_COPIES, DEVICE_COPIES = 2, 1
SUGGESTED_TOPK = 20


def available_host_memory() -> int | None:
    """Bytes of memory the system can still give (Linux's MemAvailable), or None where it does not say."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def require_target_memory(cache: TeacherCache, samples: range | None, device: torch.device,
                          host_available: int | None = None, device_available: int | None = None,
                          on_host: bool = False, outputs: tuple[str, ...] = ()) -> str:
    """What a view of targets needs; refuse, suggesting --topk, where the host or the device has less to give.

    on_host: the view in use stays in host memory (CachedTargets(on_host=True)), none of it on the device.
    outputs: the further outputs read besides the logits (CachedTargets(outputs=))."""
    spec = cache.spec
    count = spec.num_samples if samples is None else len(samples)
    names = (*spec.logit_arrays, *(spec.output_arrays[name] for name in outputs))
    view = spec.view_bytes(names, count)
    on_device = view if device.type == "cuda" and not on_host else 0
    host_bytes = view * (HOST_COPIES + (DEVICE_COPIES if device.type == "cpu" and not on_host else 0))
    host_available = available_host_memory() if host_available is None else host_available
    if on_device and device_available is None:
        device_available = torch.cuda.mem_get_info(device)[0]
    statement = (f"each view of {cache.path} takes {byte_size(view)} ({count} samples of "
                 f"{'top-' + str(spec.topk) if spec.topk else 'all'} {spec.num_regions} x {spec.num_classes} logits"
                 + "".join(f", {name}" for name in outputs) + "); "
                 f"training holds {byte_size(host_bytes)} of it in host memory"
                 + (f" and {byte_size(view)} on {device}" if on_device else ""))
    short = []
    if host_available is not None and host_bytes > host_available:
        short.append(f"{byte_size(host_bytes)} of host memory but {byte_size(host_available)} is available")
    if on_device and device_available is not None and view > device_available:
        short.append(f"{byte_size(view)} on {device} but {byte_size(device_available)} is available")
    if short:
        smaller = "" if spec.topk or SUGGESTED_TOPK >= spec.num_classes else (
            f"; a cache dumped with --topk {SUGGESTED_TOPK} takes "
            f"{byte_size(count * topk_bytes(spec.num_regions, spec.num_classes, SUGGESTED_TOPK).topk)} per view")
        raise KdcacheError(f"{statement}: it needs {' and '.join(short)}. Dump a smaller cache (--topk, fewer "
                           f"--scales) or train with fewer --scales, or on a machine with more memory{smaller}")
    return statement


class LiveTeacher:
    """Outputs from running the teacher on the batch: the online baseline."""

    def __init__(self, teacher: nn.Module, scales: tuple[int, ...], device: torch.device = torch.device("cpu"),
                 outputs: tuple[str, ...] = ()) -> None:
        self.device = device
        self.outputs = prepare_model(ModelOutputs(teacher, scales, outputs), device).eval()

    def begin_epoch(self, view: int | None, next_view: int | None = None) -> None:
        """Nothing to load: the teacher computes every batch."""

    def __call__(self, indices: torch.Tensor | None, images: torch.Tensor, step: Sequence[Outputs] = ()) -> Outputs:
        """The teacher's float32 outputs of these (augmented, normalised) images."""
        with torch.no_grad(), autocast(self.device):
            return {name: value.float() for name, value in self.outputs(images).items()}


class EnsembleTargets:
    """Several teachers' targets on the same views: the region logits of their ensemble, the log of the
    weighted mean of their probabilities (so every logit loss applies unchanged), and each teacher's further
    outputs, teacher k's named with the suffix #k (`embedding#1`), for the feature and relation terms to sum."""

    def __init__(self, teachers: list[Targets], weights: list[float]) -> None:
        self.teachers = teachers
        self.log_weights = torch.tensor(weights, dtype=torch.float64).div(sum(weights)).log().tolist()

    def begin_epoch(self, view: int | None, next_view: int | None = None) -> None:
        """Every teacher gets ready for the view."""
        for teacher in self.teachers:
            teacher.begin_epoch(view, next_view)

    def __call__(self, indices: torch.Tensor | None, images: torch.Tensor, step: Sequence[Outputs] = ()) -> Outputs:
        """The ensemble's region logits and every teacher's further outputs."""
        # a step's outputs only where there are some: a provider written to the two-argument protocol still joins
        outputs = [teacher(indices, images, *([step] if step else [])) for teacher in self.teachers]
        result = {REGIONS: ensemble_logits([found[REGIONS] for found in outputs], self.log_weights)}
        for k, found in enumerate(outputs):
            result |= {with_teacher(name, k): value for name, value in found.items() if name != REGIONS}
        return result


def ensemble_logits(logits: list[torch.Tensor], log_weights: list[float]) -> torch.Tensor:
    """log Σ_k w_k softmax(z_k): the log-probabilities of the teachers' weighted mean prediction."""
    weighted = [torch.log_softmax(z.float(), dim=-1) + log_w for z, log_w in zip(logits, log_weights)]
    return torch.logsumexp(torch.stack(weighted), dim=0)


class EMATeacher:
    """The mean teacher: the exponential moving average of the student's weights (a StepHook, updated after each
    of the student's steps, kept in last.pt as `ema_teacher`) gives the region logits, in eval mode."""

    key, report = "ema_teacher", None

    def __init__(self, student: nn.Module, decay: float, scales: tuple[int, ...], device: torch.device,
                 dtype: torch.dtype | None) -> None:
        self.average = WeightEMA(student, decay, "--ema-teacher")
        self.outputs = ModelOutputs(self.average.model, scales, ())
        self.device, self.dtype = device, dtype  # the student's precision

    @property
    def model(self) -> nn.Module:
        """The averaged weights."""
        return self.average.model

    def begin_epoch(self, view: int | None, next_view: int | None = None) -> None:
        """Nothing to load: the average computes every batch."""

    def __call__(self, indices: torch.Tensor | None, images: torch.Tensor, step: Sequence[Outputs] = ()) -> Outputs:
        """The average's float32 region logits of these images."""
        with torch.no_grad(), step_autocast(self.device, self.dtype):
            return {REGIONS: self.outputs(images)[REGIONS].float()}

    def after_step(self, model: nn.Module) -> None:
        """Move the average towards the student's weights of this step."""
        self.average.update(model)


class Peers:
    """Deep mutual learning's teachers: the global logits the other students trained together made of the same
    images in the same step, detached, as `peers` [P, b, C]."""

    def __init__(self, index: int) -> None:
        self.index = index  # this student's place among the students trained together

    def begin_epoch(self, view: int | None, next_view: int | None = None) -> None:
        """Nothing to load: the peers compute every batch."""

    def __call__(self, indices: torch.Tensor | None, images: torch.Tensor, step: Sequence[Outputs] = ()) -> Outputs:
        """The other students' detached global logits of this step."""
        return {PEERS: torch.stack([found[REGIONS][:, 0].detach() for k, found in enumerate(step) if k != self.index])}


def own_targets(student: nn.Module, scales: tuple[int, ...], device: torch.device, dtype: torch.dtype | None,
                ema_teacher: float | None) -> list[EMATeacher]:
    """A student's own providers of what it is asked: the mean teacher of --ema-teacher's decay where given."""
    return [] if ema_teacher is None else [EMATeacher(student, ema_teacher, scales, device, dtype)]
