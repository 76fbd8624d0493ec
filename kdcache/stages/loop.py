"""The training loop shared by teachers and students: whole-batch data on the device, the loop on one screen."""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from kdcache import distributed
from kdcache.config import DistillConfig, TrainConfig, config_dict
from kdcache.data.files import worker_batches
from kdcache.data.mixing import soft_labels
from kdcache.distributed import World, all_sum, synchronise_batchnorm
from kdcache.errors import KdcacheError
from kdcache.losses import LossSpec, LossSum
from kdcache.models import file_sha256, read_checkpoint, save_checkpoint
from kdcache.models.outputs import REGIONS, ModelOutputs
from kdcache.models.quantised import INT8_FILE, TORCHSCRIPT_FILE, Int8Network, QuantisedStudent, convert_int8, \
    int8_record, save_int8
from kdcache.runtime import epoch_generator, prepare_model
from kdcache.stages.adversarial import Critic
from kdcache.stages.recipe_options import StepHook, learning_rate, make_optimizer, recipe_hooks, step_autocast, \
    training_dtype
from kdcache.stages.evaluate import evaluate_batches
from kdcache.stages.splits import Batch, Split
from kdcache.stages.targets import Outputs, Targets, own_targets
from kdcache.stages.views import Views

RUN_STATE = {"model", "optimizer", "epoch", "record", "history"}  # what last.pt holds
# config options that runs of earlier versions did not record, with their defaults (as recorded), which compute
# what those runs did
NEWER_OPTIONS = {name: value for name, value in config_dict(DistillConfig()).items()
                 if name in ("optimizer", "schedule", "lr_warmup_epochs", "label_smoothing", "ema_decay", "precision",
                             "clip_grad", "teacher_weights", "views_per_step", "mutual", "ema_teacher",
                             "student_checkpoint", "qat", "negatives")}
# where things are and how they are read, not what they are: a run resumes after its cache, data or run folder
# moved, or with another number of loader workers
LOCATIONS = {"cache": None, "extra_caches": None,
             "config": ("cache", "extra_caches", "out", "data_root", "live_teacher", "workers", "max_image_pixels"),
             "live_teacher": ("checkpoint",)}


def loader_batches(dataset: Dataset, batch_size: int, generator: torch.Generator, device: torch.device,
                   num_workers: int = 0) -> Iterator[Batch]:
    """The general path: a Dataset of (image, label, {"regions": targets}) through a DataLoader, in the device path's
    order."""
    order = torch.randperm(len(dataset), generator=generator).tolist()
    # the loader draws its workers' base seed from `generator`: give it its own, so the order above stands
    loader = DataLoader(dataset, batch_size=batch_size, sampler=order, drop_last=True, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0), pin_memory=device.type == "cuda")
    for x, y, targets in worker_batches(loader):
        yield (x.to(device, non_blocking=True), y.to(device, non_blocking=True),
               {name: values.to(device, non_blocking=True) for name, values in targets.items()})


class Run:
    """One model being trained: the model, its loss, optimiser, folder and history.

    Three views of the model: `model`, the network itself (what checkpoints hold); `logit_map`, its outputs
    (ModelOutputs: region logits, and those `outputs` a feature or relation loss reads, FitNet's `regressors`
    and the embedding heads of CRD and IRG included) on the device; `step_module`, what a training step calls (the
    ModelOutputs, DDP-wrapped under torchrun). The regressors train with the model and are saved beside it
    (regressors.pt). `critics`: the models the loss trains beside the student with their own optimisers (an
    adversarial loss's discriminator), each stepped in every step before the student's loss and kept in last.pt.
    """

    def __init__(self, name: str, model: nn.Module, loss: LossSpec | LossSum, scales: tuple[int, ...],
                 config: TrainConfig, folder: Path, device: torch.device, record: dict[str, Any],
                 here: World = World(), outputs: tuple[str, ...] = (), sources: dict[str, str] | None = None,
                 regressors: dict[str, nn.Module] | None = None, ema_teacher: float | None = None,
                 targets: Sequence[Targets] = (), critics: Sequence[Critic] = ()) -> None:
        self.name, self.loss, self.config, self.folder, self.device = name, loss, config, Path(folder), device
        self.record = record  # what the run is (config, teacher, cache): saved with every checkpoint
        self.here = here
        self.logit_map = prepare_model(ModelOutputs(model, scales, outputs, sources, regressors), device)
        self.model = self.logit_map.model
        # under DDP: BatchNorm over the global batch and gradients averaged over ranks, as one process computes them
        self.step_module = self.logit_map if not here.distributed else DistributedDataParallel(
            synchronise_batchnorm(self.logit_map, device), device_ids=[device.index] if device.type == "cuda" else None)
        # the run's regions are a prefix of the targets' (region 0 alone for a loss on the global logit)
        self.num_regions = self.logit_map.num_regions
        self.optimizer = make_optimizer(self.logit_map.parameters(), config)
        self.dtype = training_dtype(config.precision, device)  # refused here when the device cannot run it
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        # the run's own providers (asked in its step, beside the batch's targets), those of them that follow the
        # student's weights, and the recipe's hooks (--ema-decay): each moved after every optimiser step
        own = own_targets(self.model, scales, device, self.dtype, ema_teacher)
        self.targets: list[Targets] = [*own, *targets]
        self.hooks: list[StepHook] = [*recipe_hooks(self.model, config), *own]
        # the weight average of --ema-decay and the mean teacher of --ema-teacher (None without), for callers
        self.ema, self.ema_teacher = (next((hook for hook in self.hooks if hook.key == key), None)
                                      for key in ("ema", "ema_teacher"))
        self.critics = list(critics)
        self.start_epoch = 0
        self.history: list[dict[str, float]] = []
        self.int8: Int8Network | None = None  # a --qat student converted at its last epoch

    def train_epoch(self, epoch: int, batches: Iterator[Batch | tuple[Batch, ...]], steps: int,
                    show_progress: bool) -> dict[str, float]:
        """One pass over the epoch's steps, each a batch, or a tuple of batches of the same samples under several
        views; returns the epoch's mean loss terms, train accuracy (over every view) and the last step's learning
        rate."""
        return train_together([self], epoch, batches, steps, show_progress)[0]

    def forward(self, views: tuple[Batch, ...]) -> list[Outputs]:
        """The student's float32 outputs on each view's images, in the run's precision (the graph kept)."""
        outputs = []
        for x, _, _ in views:
            with step_autocast(self.device, self.dtype):
                outputs.append({name: value.float() for name, value in self.step_module(x).items()})
        return outputs

    def update(self, outputs: list[Outputs], views: tuple[Batch, ...], epoch: int, share: float,
               step_outputs: Sequence[list[Outputs]] = ()) -> dict[str, torch.Tensor]:
        """One update from the outputs `forward` gave: each view's targets (the batch's, and the run's own
        providers', which see `step_outputs`, every run's of this step, per view), the critics' steps, the loss,
        backward, the optimiser's step, the hooks. Returns the loss terms, summed over the views, and the critics'."""
        targets = [self.targets_of(batch, [found[v] for found in step_outputs]) for v, batch in enumerate(views)]
        critiques = {}
        for critic in self.critics:
            outputs, found = critic.judge(outputs, targets)
            critiques |= found
        terms = self.loss_terms(outputs, views, targets, epoch)
        self.backward_and_step(terms, share)
        return terms | critiques

    def targets_of(self, batch: Batch, step: Sequence[Outputs]) -> Outputs | None:
        """A view's targets: the batch's, their regions cut to the run's, and the run's own providers' on its images
        (`step`: every outputs of the runs trained together on them, in their order); then those of the run's learned
        teacher-side heads (CRD's projections) added."""
        x, _, found = batch
        found = dict(found or {})
        if REGIONS in found:
            found[REGIONS] = found[REGIONS][:, :self.num_regions]
        for provider in self.targets:
            found |= provider(None, x, step)
        return self.logit_map.project_targets(found) if found else None

    def loss_terms(self, outputs: list[Outputs], views: tuple[Batch, ...], targets: list[Outputs | None],
                   epoch: int) -> dict[str, torch.Tensor]:
        """Per view the loss against its targets (a mixed view's against its two labels and λ), the views' terms
        summed (as SLD's official code sums its two views')."""
        terms = {}
        for s, (_, y, _), t in zip(outputs, views, targets):
            labels, t = soft_labels(y, t, s[REGIONS].shape[-1])
            found = self.loss.compute(s, t, labels, epoch + 1) if len(y) else self._no_terms(s)  # epochs from 1
            terms = {key: terms[key] + value for key, value in found.items()} if terms else found
        return terms

    def backward_and_step(self, terms: dict[str, torch.Tensor], share: float) -> None:
        """Backward (scaled under fp16) on this rank's `share` of the global batch, clipping, the optimiser's step,
        then every hook."""
        self.optimizer.zero_grad(set_to_none=True)
        # DDP divides the summed gradients by the size
        self.scaler.scale(terms["total"] * (share * self.here.size)).backward()
        if self.config.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.logit_map.parameters(), self.config.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        for hook in self.hooks:
            hook.after_step(self.model)

    def _extra_parts(self) -> dict[str, Any]:
        """What last.pt keeps besides the model and optimiser: FitNet's regressors, the hooks' weights, the critics'
        weights and optimisers, fp16's scaler."""
        parts = {"regressors": self.logit_map.regressors if self.logit_map.regressors else None,
                 **{hook.key: hook.model for hook in self.hooks},
                 **{name: part for critic in self.critics
                    for name, part in ((critic.key, critic.model), (f"{critic.key}_optimizer", critic.optimizer))},
                 "scaler": self.scaler if self.scaler.is_enabled() else None}
        return {name: part for name, part in parts.items() if part is not None}

    def _extra_state(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self._extra_parts().items()}

    def _no_terms(self, student: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Zero loss terms for a rank that holds none of a global batch (it still joins the step's collectives)."""
        return dict.fromkeys(self.loss.term_names, sum(value.sum() for value in student.values()) * 0)

    def evaluate(self, split: Split) -> dict[str, float]:
        """The global logit on the un-augmented test split: test_acc (top-1), test_top5 (more than 5 classes) and
        test_loss, and the same of each reported hook's weights (the weight EMA's test_acc_ema, ...); at the last
        epoch of a --qat student, also its int8 conversion's, on the CPU (test_acc_int8, ...)."""
        part = distributed.even_share(split.test_size, self.here)  # each rank evaluates its share
        found = {}
        for suffix, model in self._reported().items():
            found |= evaluate_batches(model, split.test_batches(part.samples), split.test_size).metrics(suffix)
        last = len(self.history) + 1 == self.config.epochs  # the epoch being evaluated is recorded after this
        if last and isinstance(self.model, QuantisedStudent):
            self.int8 = convert_int8(self.model)
            on_cpu = ((x.cpu(), y.cpu()) for x, y in split.test_batches(part.samples))
            found |= evaluate_batches(self.int8, on_cpu, split.test_size).metrics("_int8")
        return found

    def _reported(self) -> dict[str, nn.Module]:
        """The weights evaluated and saved, by their metrics' suffix: the model's (""), and the reported hooks'."""
        return {"": self.model, **{hook.report: hook.model for hook in self.hooks if hook.report is not None}}

    def end_epoch(self, metrics: dict[str, float]) -> None:
        """Record the epoch: history, metrics.csv, TensorBoard when installed, and the resumable checkpoint (rank 0)."""
        self.history.append(metrics)
        if not self.here.is_main:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        columns = list(dict.fromkeys(k for row in self.history for k in row))
        with open(self.folder / "metrics.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.history)
        _tensorboard(self.folder, metrics)
        save_checkpoint(self.folder / "last.pt", self.model, optimizer=self.optimizer.state_dict(),
                        epoch=int(metrics["epoch"]), record=json.dumps(self.record), history=json.dumps(self.history),
                        **self._extra_state())

    def resume(self) -> None:
        """Continue from the folder's last checkpoint, which must come from the same configuration."""
        path = self.folder / "last.pt"
        if not path.exists():
            return
        state = read_checkpoint(path)  # weights only; a truncated or tampered file is one line, not a traceback
        if not (isinstance(state, dict) and RUN_STATE <= set(state)):
            raise KdcacheError(f"--resume: {path} is not a kdcache run checkpoint (expected {', '.join(sorted(RUN_STATE))})"
                               f"; delete it to start the run over, or use another --out")
        stored, wanted = _what_it_computes(json.loads(state["record"])), _what_it_computes(self.record)
        if stored != wanted:
            changed = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
            raise KdcacheError(f"--resume: {path} was written by a run with other settings ({', '.join(changed)}); "
                               f"resume with the same settings, or use another --out")
        self.model.load_state_dict(state["model"])
        for name, part in self._extra_parts().items():
            if name not in state:
                raise KdcacheError(f"--resume: {path} holds no {name} state but this run keeps one; resume with the "
                                   f"settings it was started with, or use another --out")
            part.load_state_dict(state[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch = int(state["epoch"])
        self.history = json.loads(state["history"])

    def finish(self) -> Path:
        """Write the final weights (a checkpoint any kdcache command loads) and their JSON sidecar (rank 0)."""
        path = self.folder / "model.pt"
        if not self.here.is_main:
            return path
        for suffix, model in self._reported().items():  # model.pt, model_ema.pt: checkpoints any command loads
            # a --qat student's: its float network's weights, under that network's own names
            save_checkpoint(self.folder / f"model{suffix}.pt",
                            model.float_state() if isinstance(model, QuantisedStudent) else model)
        if self.logit_map.regressors:  # FitNet's: a further run can start from them, as the paper's stage 2 does
            save_checkpoint(self.folder / "regressors.pt", self.logit_map.regressors,
                            outputs=list(self.logit_map.output_names))
        best = max(self.history, key=lambda row: row["test_acc"])
        sidecar = {**self.record, "test_acc": self.history[-1]["test_acc"], "best_test_acc": best["test_acc"],
                   **{f"test_acc{suffix}": self.history[-1][f"test_acc{suffix}"] for suffix in self._reported() if suffix},
                   "best_epoch": best["epoch"], "epochs": len(self.history), "sha256": file_sha256(path)}
        if isinstance(self.model, QuantisedStudent):  # its int8 model, converted now if the last epoch ran before
            sidecar["test_acc_int8"] = self.history[-1].get("test_acc_int8")
            record = int8_record(self.model)
            save_int8(self.int8 or convert_int8(self.model), record, self.folder)
            # what `kdcache eval` rebuilds the int8 model from, with the student's spec (arch) and the weights
            int8_sidecar = {**sidecar, "format": "int8 state dict, weights only", "int8": record,
                            "torchscript": TORCHSCRIPT_FILE, "sha256": file_sha256(self.folder / INT8_FILE)}
            self.folder.joinpath(INT8_FILE).with_suffix(".json").write_text(json.dumps(int8_sidecar, indent=2) + "\n")
        (self.folder / "model.json").write_text(json.dumps(sidecar, indent=2) + "\n")
        return path


class EpochMeter:
    """One run's running sums over an epoch: loss terms (weighted by each step's share), correct and seen samples."""

    def __init__(self, device: torch.device) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.correct, self.seen = torch.zeros((), device=device), torch.zeros((), dtype=torch.long)
        # the first step whose loss was NaN or Inf (-1: none), kept on the device: the step costs no sync for it
        self.first_non_finite = torch.full((), -1, dtype=torch.long, device=device)

    def add(self, terms: dict[str, torch.Tensor], outputs: list[dict[str, torch.Tensor]], views: tuple[Batch, ...],
            share: float, step: int) -> None:
        """Count one step: its terms, whether its loss is finite, and the global logit's hits on every view."""
        self.first_non_finite = torch.where((self.first_non_finite < 0) & ~torch.isfinite(terms["total"].detach()),
                                            step, self.first_non_finite)
        for key, value in terms.items():
            self.sums[key] = self.sums.get(key, 0) + value.detach() * share
        for s, (_, y, _) in zip(outputs, views):
            self.correct += (s[REGIONS][:, 0].argmax(-1) == y).sum()
            self.seen += len(y)

    def metrics(self, run: Run, epoch: int, steps: int, lr: float, seconds: float) -> dict[str, float]:
        """The epoch's mean terms over `steps` steps, train accuracy, last learning rate, speed (all ranks), and the
        loss's temperature and weights at the epoch."""
        seen = int(all_sum(self.seen))
        if seen == 0:
            raise KdcacheError(f"--batch-size {run.config.batch_size} is larger than the {run.name} training set; "
                               f"use a smaller batch")
        sums = dict(zip(self.sums, all_sum(torch.stack(list(self.sums.values()))).unbind()))
        metrics = {f"loss_{k}": float(v) / steps for k, v in sums.items()}  # the float() syncs once per epoch
        if not math.isfinite(metrics["loss_total"]):
            raise self.non_finite(run, epoch, metrics["loss_total"])
        metrics.update(epoch=epoch + 1, lr=lr, train_acc=float(all_sum(self.correct)) / seen,
                       img_per_s=seen / seconds, seconds=seconds)
        return metrics | run.loss.settings(epoch + 1)  # the epoch's temperature and weights, scheduled or not

    def non_finite(self, run: Run, epoch: int, loss: float) -> KdcacheError:
        """The error that stops a run whose loss became NaN or Inf this epoch, before its weights are saved."""
        step = int(self.first_non_finite)
        where = f"step {step + 1}" if step >= 0 else "a step of another rank's share"
        kept = (f"{run.folder / 'last.pt'} holds epoch {int(run.history[-1]['epoch'])}" if run.history else
                "no epoch finished, so no last.pt was written")
        return KdcacheError(f"the loss of {run.name} became non-finite ({loss}) at epoch {epoch + 1}, {where}: the "
                            f"run stopped before saving the weights it made; lower --lr or add --clip-grad (or check "
                            f"the cache with `kdcache verify`), then start the run again with another --out; {kept}")


def train_together(runs: list[Run], epoch: int, batches: Iterator[Batch | tuple[Batch, ...]], steps: int,
                   show_progress: bool) -> list[dict[str, float]]:
    """One pass of every run over the same steps: each step, every run's forward pass, then each run's update
    (its targets may read the others' outputs of that step: deep mutual learning's peers). Returns each run's
    epoch metrics."""
    for run in runs:
        run.logit_map.train()
    meters = [EpochMeter(run.device) for run in runs]
    config, started = runs[0].config, time.perf_counter()
    step, lr = -1, learning_rate(config, epoch, 0, steps)  # an epoch without steps is refused by metrics()
    label = runs[0].name if len(runs) == 1 else f"{len(runs)} students"
    for step, views in enumerate(tqdm(batches, total=steps, desc=f"{label} {epoch + 1}/{config.epochs}",
                                      unit="batch", leave=False, disable=not show_progress)):
        views = (views,) if isinstance(views[0], torch.Tensor) else views  # one batch: one view
        lr = learning_rate(config, epoch, step, steps)
        # this rank's share of the global batch: the ranks' weighted means add up to the global batch's mean
        share = len(views[0][1]) / config.batch_size
        outputs = [run.forward(views) for run in runs]  # every run's, before any of them steps: peers see them
        for run, own, meter in zip(runs, outputs, meters):
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            meter.add(run.update(own, views, epoch, share, outputs), own, views, share, step)
    seconds = time.perf_counter() - started
    return [meter.metrics(run, epoch, step + 1, lr, seconds) for run, meter in zip(runs, meters)]


def fit(runs: list[Run], split: Split, views: Views, targets: Sequence[Targets] | None, config: TrainConfig,
        device: torch.device, batch_path: Callable[[int, torch.Generator], Iterator[Batch]] | None = None,
        show_progress: bool = True, together: bool = False) -> None:
    """Train every run for config.epochs; each epoch's views are loaded once and shared by all runs.

    split gives the batches (DeviceSplit, StreamedSplit) and the test batches; views gives the augmentation
    parameters (CachedViews or FreshViews): step views e·S … e·S + S - 1 of epoch e, S = views_per_step, each
    seen by every step (the same samples under each); targets gives the targets per batch, one provider per step
    view (CachedTargets, LiveTeacher), or None for plain cross-entropy (a run's own providers add theirs in its
    step); batch_path, when given, replaces the split's batches with another source (the Dataset path, one view
    per step). Runs train one after another, or, `together`, step by step, each run's providers given the others'
    outputs of the step (deep mutual learning). Under DDP split and targets hold one rank's share.
    """
    if together and len({run.start_epoch for run in runs}) > 1:
        raise KdcacheError(f"--resume: the mutual students stopped at different epochs "
                           f"({', '.join(f'{run.name}: {run.start_epoch}' for run in runs)}); they learn from each "
                           f"other step by step, so they resume together: start them over with another --out")
    steps, per_step = split.shard.total // config.batch_size, config.views_per_step
    for epoch in range(min(run.start_epoch for run in runs), config.epochs):
        slots = range(epoch * per_step, (epoch + 1) * per_step)
        params = [views.params(slot) for slot in slots]
        active = [run for run in runs if epoch >= run.start_epoch]
        for group in [active] if together else [[run] for run in active]:
            for provider, slot in zip(targets or (), slots):  # each run's epoch from the same start (CRD's draws)
                next_view = views.view_of(slot + per_step) if epoch + 1 < config.epochs else None
                provider.begin_epoch(views.view_of(slot), next_view)
            if batch_path is not None:
                batches = zip(batch_path(epoch, epoch_generator(config.seed, epoch)))
            else:  # every view's batches from a generator of the same seed: the same samples, step by step
                batches = zip(*(split.batches(epoch, view_params, provider, config.batch_size,
                                              epoch_generator(config.seed, epoch))
                                for view_params, provider in zip(params, targets or [None] * per_step)))
            for run, metrics in zip(group, train_together(group, epoch, batches, steps, show_progress)):
                metrics.update(run.evaluate(split))
                run.end_epoch(metrics)
                if show_progress:
                    tqdm.write(epoch_line(run.name, epoch, config.epochs, metrics))


def epoch_line(name: str, epoch: int, epochs: int, metrics: dict[str, float]) -> str:
    """The line printed after each epoch: loss, train and test top-1 (top-5 beside it where recorded), the EMA's,
    the int8 model's (a --qat run's last epoch)."""
    shown = [("test", "test_acc"), ("top5", "test_top5"), ("ema", "test_acc_ema"), ("ema top5", "test_top5_ema"),
             ("int8", "test_acc_int8")]
    return (f"{name:>28} epoch {epoch + 1:>3}/{epochs}  loss {metrics['loss_total']:.4f}  train "
            f"{metrics['train_acc']:.4f}  " + "".join(f"{label} {metrics[key]:.4f}  " for label, key in shown
                                                      if key in metrics)
            + f"{metrics['img_per_s']:.0f} img/s")


def _tensorboard(folder: Path, metrics: dict[str, float]) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional: metrics.csv has everything
        return
    with SummaryWriter(str(folder / "tensorboard")) as writer:
        for key, value in metrics.items():
            if key != "epoch":
                writer.add_scalar(key, value, int(metrics["epoch"]))


def _what_it_computes(record: dict[str, Any]) -> dict[str, Any]:
    """A run's record less the locations in it (LOCATIONS) and the options added since runs were first recorded,
    where they keep their default (a run started before them computes what they compute then): what --resume
    compares."""
    # a cache's runs replay its views, which the record names by the cache's identity: the policy option is unused
    unused = {"augmentation"} if "cache" in record else set()
    record = {**record, "config": {key: value for key, value in record.get("config", {}).items()
                                   if NEWER_OPTIONS.get(key, object()) != value and key not in unused}}
    kept = {}
    for key, value in record.items():
        if key in LOCATIONS and (LOCATIONS[key] is None or not isinstance(value, dict)):
            continue
        kept[key] = {k: v for k, v in value.items() if k not in LOCATIONS[key]} if key in LOCATIONS else value
    return kept
