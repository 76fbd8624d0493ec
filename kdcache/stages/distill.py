"""Stage 2, orchestration only: train any number of students from one cache (or from the live teacher, the online
baseline), through the loop of `loop.py`; `kdcache.report` writes and prints what they did."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kdcache import distributed
from kdcache.cache import TeacherCache, open_cache
from kdcache.cache.fit import outputs_of_kinds, require_same_views
from kdcache.cache.location import Location
from kdcache.config import DistillConfig, loader_options, parse_kd_classes, recorded_config, save_config
from kdcache.data import DataSource, Policy, class_names, load_splits, normalize, policy_for, stored_policy, \
    student_views
from kdcache.data.dense import is_dense
from kdcache.data.files import default_workers
from kdcache.distributed import Shard, World
from kdcache.errors import KdcacheError
from kdcache.losses import LossSpec, LossSum, scaled_loss
from kdcache.models import check_model_spec, create_model, load_student_weights, load_teacher, pretrained_tag
from kdcache.models.outputs import DISTILLATION, TeacherOutputs, feature_stages, parse_outputs, \
    probe_output_shapes, require_distillation_token, student_outputs
from kdcache.models.quantised import QuantisedStudent, check_qat_scheme
from kdcache.runtime import pick_device
from kdcache.stages.adversarial import Critic, loss_critics
from kdcache.stages.dataset import CacheDataset, load_cache_data
from kdcache.stages.dense_train import SegmentationRun, distill_dense, refuse_dense_losses, require_task
from kdcache.stages.folders import FINISHED, NEW, RunFolder, hold_run_folder, run_name
from kdcache.stages.loop import Run, fit, loader_batches
from kdcache.stages.splits import Batch, make_split
from kdcache.stages.text_train import LM_LOSSES, distill_from_token_cache
from kdcache.stages.targets import CachedTargets, EnsembleTargets, LiveTeacher, Peers, Targets, require_target_memory
from kdcache.stages.views import CachedViews, FreshViews, require_fits

log = logging.getLogger(__name__)
BATCH_PATHS = ("device", "dataset")


@dataclass(frozen=True)
class RunSummary:
    """How one student did."""

    name: str
    student: str
    loss: str
    test_acc: float
    best_test_acc: float
    best_epoch: int
    seconds: float
    img_per_s: float
    folder: Path
    kept: bool = False  # finished by an earlier call and kept as it was (--resume): summary.csv has its row
    test_top5: float | None = None  # the last epoch's; None for 5 classes or fewer (kdcache.stages.evaluate)
    test_acc_int8: float | None = None  # a --qat run's int8 model's, the last epoch's; None without --qat


def distill(config: DistillConfig, show_progress: bool = True,
            data: tuple[DataSource, DataSource] | None = None) -> list[RunSummary] | list[SegmentationRun]:
    """Train every (student, loss) pair of the config from one target source; each run writes its own folder,
    held for the run's life (see `kdcache.stages.folders`).

    data: (train, test) already loaded, instead of the dataset the cache or config names.
    """
    _check_sources(config)
    if config.batch_path not in BATCH_PATHS:
        raise KdcacheError(f"--batch-path: unknown path {config.batch_path!r}; known: {', '.join(BATCH_PATHS)}")
    if config.views_per_step < 1 or (config.views_per_step > 1 and config.batch_path != "device"):
        raise KdcacheError(f"--views-per-step: expected 1, or more on --batch-path device, got "
                           f"{config.views_per_step} on --batch-path {config.batch_path}")
    check_qat_scheme(config.qat)
    for student, loss in config.runs():  # names are checked before any work
        check_model_spec(student)
        if loss not in LM_LOSSES:  # a language model's (on a token cache) are checked with it
            scaled_loss(loss, config.loss_overrides(), config.epochs)  # names, weights and --kd-classes
    if config.student_checkpoint and len({student for student, _ in config.runs()}) > 1:
        raise KdcacheError("--student-checkpoint: one file starts one student spec, and this run trains "
                           f"{', '.join(sorted({student for student, _ in config.runs()}))}: train each student with "
                           "its own weights in a run of its own")
    locations = [Location.of(path) for path in (config.cache, *config.extra_caches) if path]  # made once, here
    _check_teachers(config, locations)
    _check_name(config)
    device = pick_device(config.device)
    distributed.init(device)
    with ExitStack() as held:  # the run folders let go, then the caches closed, however it ends
        caches = [held.enter_context(open_cache(location)) for location in locations]
        if caches and caches[0].spec.kind == "tokens":  # a causal LM's: student LMs on its corpus
            return distill_from_token_cache(config, caches[0], device, show_progress)
        data, test = data or _load_data(config, caches[0] if caches else None)
        if is_dense(data):  # labels per pixel: segmentation students (kdcache.stages.dense_train)
            return distill_dense(config, locations[0] if locations else None, data, test, device, show_progress, held)
        if config.kd_classes:  # within the data's classes, before any work
            parse_kd_classes(config.kd_classes, data.num_classes)
        return _distill(config, caches, data, test, device, show_progress, held)


def _run_folders(config: DistillConfig, held: ExitStack, show_progress: bool) -> list[RunFolder]:
    """Each run's folder, taken and held by rank 0 until `held` closes (every rank gets the same folders); what
    --resume chose is said."""
    bases = [run_name(student, loss) + (f"-{k}" if config.mutual else "")
             for k, (student, loss) in enumerate(config.runs())]
    folders = distributed.shared(distributed.from_main(
        lambda: [hold_run_folder(Path(config.out), base, config.name, config.resume, held) for base in bases]))
    if show_progress and distributed.world().is_main:
        for folder in folders:
            if folder.note:
                print(folder.note, flush=True)
    return folders


def _check_name(config: DistillConfig) -> None:
    """Refuse a --name that is no folder name, or one given to a sweep of several runs."""
    if config.name is not None and (config.name in ("", ".", "..") or Path(config.name).name != config.name):
        raise KdcacheError(f"--name: expected a folder name such as resnet8-kd-lr0.1 (made under --out), got "
                           f"{config.name!r}")
    if config.name is not None and len(config.runs()) > 1:
        raise KdcacheError(f"--name {config.name}: names one run's folder, and this sweep has {len(config.runs())} "
                           f"runs; give one --student and one --loss (not --mutual), or leave --name out")


def _check_sources(config: DistillConfig) -> None:
    """Refuse a run without a source of targets, and --mutual or --ema-teacher as they cannot run."""
    if not (config.has_teacher or config.mutual or config.ema_teacher is not None):
        raise KdcacheError("distill: give --cache CACHE (train from a teacher cache), --live-teacher CHECKPOINT (the "
                           "online baseline), --mutual (students teaching each other) or --ema-teacher DECAY (the "
                           "student's own weight average as teacher)")
    if config.ema_teacher is not None and not 0 < config.ema_teacher < 1:
        raise KdcacheError(f"--ema-teacher: expected a decay in (0, 1) such as 0.999, got {config.ema_teacher}")
    if config.ema_teacher is not None and (config.has_teacher or config.mutual):
        raise KdcacheError("--ema-teacher: the student's weight average is the teacher; drop --cache, --live-teacher "
                           "and --mutual")
    if config.mutual and (len(config.students) < 2 or len(config.losses) > 1 or config.pairs):
        raise KdcacheError(f"--mutual: trains two or more students together under one loss; got "
                           f"{len(config.students)} --student and {len(config.losses)} --loss"
                           + (" and --pair" if config.pairs else "") + ": give --student A --student B (and at most "
                           "one --loss, with --cache)")
    if config.mutual and config.batch_path != "device":
        raise KdcacheError("--mutual: the students step together on the device path; drop --batch-path dataset")
    if config.generations_ensemble and config.generations < 2:
        raise KdcacheError(f"--generations-ensemble: the last generation learns from the ensemble of the earlier "
                           f"ones; give --generations 2 or more (got {config.generations})")
    if config.generations > 1:  # each generation is one call here, its cache dumped in between
        raise KdcacheError("distill(): --generations trains generation after generation through "
                           "kdcache.stages.generations.distill_generations (the command calls it)")


def _check_teachers(config: DistillConfig, locations: list[Location]) -> None:
    """Refuse a run folder inside a cache, and teacher weights that do not fit the caches."""
    for path in locations:
        if _inside(Path(config.out), path):
            raise KdcacheError(f"distill: --out {config.out} is the cache {path} or lies inside it; runs are written "
                               f"to --out, and a cache is never written to: choose another --out")
    count = len(config.extra_caches) + 1
    if config.extra_caches and (config.cache is None or config.live_teacher is not None):
        raise KdcacheError("distill: several teachers are several --cache; --live-teacher runs one teacher")
    if config.teacher_weights and (len(config.teacher_weights) != count or min(config.teacher_weights) < 0
                                   or sum(config.teacher_weights) <= 0):
        raise KdcacheError(f"--teacher-weights: expected {count} non-negative weights, one per --cache, not all 0; "
                           f"got {','.join(map(str, config.teacher_weights))}")


def _distill(config: DistillConfig, caches: list[TeacherCache], data: DataSource,
             test: DataSource, device: torch.device, show_progress: bool,
             held: ExitStack) -> list[RunSummary]:
    """Check the caches against the run, make the target provider and the students, then the runs, each in a folder
    held until `held` closes (taken once nothing is left to refuse: a refused run writes nothing), and train them
    all in one loop."""
    cache = caches[0] if caches else None
    stored = cache.spec if cache is not None else None
    if config.views_per_step > 1 and data.streamed:
        raise KdcacheError("--views-per-step: several views per step need the split in memory, and this one is "
                           "streamed from its files; load it with --preload, or train on one view per step")
    if stored is None:  # fresh views: the run records the policy it draws them from, the source's by default
        config = replace(config, augmentation=config.augmentation or data.default_policy)
    scales = tuple(config.scales or (stored.scales if stored else (1, 2, 4)))
    losses = {name: scaled_loss(name, config.loss_overrides(), config.epochs) for _, name in config.runs()}
    refuse_dense_losses(losses, data)
    _check_qat(config, losses)
    student_data, test, policy = _student_data(config, caches, data, test, scales, losses)
    here, shard = _shard(cache, len(data.labels), config)
    # a student's stage shapes are found on these, at its own size
    images = normalize(student_data.first_images(), data.mean, data.std)
    targets, source, teachers = _targets(config, caches, data, scales, device, shard, losses, images, show_progress)
    # one provider per view of a step: each holds its own view (the live teacher computes any)
    providers = None if targets is None else [targets] + [
        _targets(config, caches, data, scales, device, shard, losses, images, False)[0] if caches else targets
        for _ in range(config.views_per_step - 1)]
    # with a cache, its views are replayed (also by a live teacher: the online baseline on the same pixels)
    views = CachedViews(cache, policy, config.view_order, config.seed) if cache is not None else \
        FreshViews(policy, len(data.labels), config.seed)
    students = _students(config, losses, data, teachers, images, device, here)
    runs, folders = [], _run_folders(config, held, show_progress)
    for (student, loss_name), (model, outputs, critics), folder in zip(config.runs(), students, folders):
        record = {"arch": student, "num_classes": data.num_classes, "loss": loss_name,
                  "dataset": student_data.describe(), "config": recorded_config(config), **source}
        loss = losses[loss_name]
        # mutual students learn from their peers' outputs of each step, the others' of those trained together
        run = Run(folder.path.name, model, loss, scales if loss.uses_regions else (1,), config, folder.path, device,
                  record, here, *outputs, ema_teacher=config.ema_teacher,
                  targets=[Peers(len(runs))] if config.mutual else [], critics=critics)
        if folder.state != NEW:  # held by --resume (or --name with --resume): continued, or kept when finished
            run.resume()
        elif here.is_main:
            save_config(config.one_run(student, loss_name), folder.path)
        runs.append(run)
    workers = default_workers(config.workers)
    checksums = cache.file_checksums() if cache is not None and stored.streamed else None
    split = make_split(student_data, test, policy, device, shard, workers, config.seed, checksums)
    batch_path = _dataset_batches(config, caches, data, scales, device, workers,
                                  tuple(name for teacher in teachers for name in teacher.outputs))
    fit(runs, split, views, providers, config, device, batch_path, show_progress and here.is_main,
        together=config.mutual)
    return [_summary(run, folder.state == FINISHED) for run, folder in zip(runs, folders)]


def _student_data(config: DistillConfig, caches: list[TeacherCache], data: DataSource, test: DataSource,
                  scales: tuple[int, ...], losses: dict[str, LossSpec | LossSum]
                  ) -> tuple[DataSource, DataSource, Policy]:
    """Check every cache against the data it was made from (at the teacher's view size); then the student's train
    split, test split and policy: the cache's views at --image-size where it is smaller than theirs (cross-resolution
    distillation), else as they are; fresh views of the data as loaded without a cache."""
    cache = caches[0] if caches else None
    if cache is None:
        return data, test, policy_for(data, config.augmentation)
    policy = stored_policy(data, cache.spec.augmentation)
    for other in caches:
        _check_cache(other, data, policy, scales, config.teacher if other is cache else None, losses)
        require_same_views(cache, other)
    student_data, student_policy = student_views(data, cache.spec.augmentation, config.image_size)
    if student_data is data:
        return data, test, policy
    if config.live_teacher is not None:
        raise KdcacheError(f"--image-size {config.image_size} with --live-teacher: the live teacher would see the "
                           f"student's {config.image_size} px views, not the cache's views it replays; drop "
                           f"--image-size, or train from the cache alone (drop --live-teacher)")
    return student_data, test.at_size(config.image_size), student_policy


def _students(config: DistillConfig, losses: dict[str, LossSpec | LossSum], data: DataSource,
              teachers: list[TeacherOutputs], images: torch.Tensor, device: torch.device, here: World
              ) -> list[tuple[torch.nn.Module, tuple[tuple[str, ...], dict[str, str], dict[str, torch.nn.Module]],
                              list[Critic]]]:
    """Each run's student, the outputs it gives for its loss (names, their stages, FitNet's regressors) and the
    critics its loss trains beside it (an adversarial loss's discriminator): the outputs are the teachers' kinds its
    loss reads, paired with its stages, and those only a student gives (DeiT's distillation head, refused here for a
    student without a distillation token)."""
    students = []
    for k, (student, loss_name) in enumerate(config.runs()):
        # every run of a student starts from the same weights; mutual students from their own, as DML's do
        torch.manual_seed(config.seed + (k if config.mutual else 0))
        model = _student_model(config, student, data.num_classes, images, data)
        loss = losses[loss_name]
        if DISTILLATION in loss.student_outputs:
            require_distillation_token(model, f"--loss {loss_name} (student {student})")
        outputs, sources, regressors = student_outputs(model, loss.needs, teachers, images, student, loss.heads) \
            if loss.needs else ((), {}, {})
        students.append((model, (outputs + loss.student_outputs, sources, regressors),
                         loss_critics(loss, data.num_classes, device, here, config.seed)))
    return students


def _student_model(config: DistillConfig, student: str, num_classes: int, images: torch.Tensor,
                   data: DataSource | None = None) -> torch.nn.Module:
    """A student with the run's class count: fresh weights, or --student-checkpoint's (a head for another class count
    replaced by a fresh one); a head that gives another class count, or a model of another task than `data`'s
    (a segmentation model for images labelled whole), is refused here, before any training."""
    model = create_model(student, num_classes=num_classes)
    if data is not None:
        require_task(model, student, data, "--student")
    if config.student_checkpoint:
        replaced = load_student_weights(config.student_checkpoint, model, num_classes)
        if replaced and distributed.world().is_main:
            log.warning("%s: started from %s, its head (%s) replaced by a fresh one for %d classes", student,
                        config.student_checkpoint, ", ".join(replaced), num_classes)
    elif pretrained_tag(student) and distributed.world().is_main:
        log.warning("%s names pretrained weights, which kdcache never downloads: the student starts from fresh "
                    "weights; to start from the tag's weights, fetch its model.safetensors and pass it with "
                    "--student-checkpoint", student)
    training = model.training
    with torch.no_grad():
        classes = model.eval()(images[:1]).shape[-1]
    model.train(training)
    if classes != num_classes:
        raise KdcacheError(f"student {student} predicts {classes} classes but this run's data has {num_classes}: "
                           f"a factory should take num_classes= (kdcache passes it), or choose a student with "
                           f"{num_classes} outputs")
    return QuantisedStudent(model, images) if config.qat else model


def _check_qat(config: DistillConfig, losses: dict[str, LossSpec | LossSum]) -> None:
    """Refuse what a fake-quantised student cannot give (stages, embedding, DeiT's distillation head) or compute in
    (bf16, fp16)."""
    if config.qat is None:
        return
    reading = {name: (*loss.needs, *loss.student_outputs) for name, loss in losses.items()
               if loss.needs or loss.student_outputs}
    if reading:
        name, needs = next(iter(reading.items()))
        raise KdcacheError(f"--qat {config.qat}: loss {name} reads the student's {', '.join(needs)}, which its "
                           f"quantised graphs (forward_features, forward_head) do not give; use a logit loss (kd, "
                           f"dkd, sdd-lskd, ...) or drop --qat")
    if config.precision in ("bf16", "fp16"):
        raise KdcacheError(f"--precision {config.precision}: --qat {config.qat} computes its fake quantisation in "
                           f"float32; drop --precision (or give fp32)")


def _load_data(config: DistillConfig, cache: TeacherCache | None
               ) -> tuple[DataSource, DataSource]:
    """The train split the cache was made from (or the config names) and its test split."""
    options = loader_options(config)
    if cache is not None and config.dataset in (None, cache.spec.dataset["name"]):
        # at the size it was made at: --image-size is the student's (_student_data)
        options.pop("image_size", None)
        return tuple(load_cache_data(cache.spec, config.data_root, split, **options)
                     for split in (cache.spec.dataset["split"], "test"))
    return load_splits(config.dataset or "digits", config.data_root, **options)


def _check_cache(cache: TeacherCache, data: DataSource, policy: Policy,
                 scales: tuple[int, ...], teacher: str | None, losses: dict[str, LossSpec | LossSum]) -> None:
    """Refuse a cache that does not fit the run or is incomplete; warn when a top-k cache meets standardisation."""
    require_fits(cache, data, policy, scales, teacher=teacher)
    for name, loss in losses.items():
        outputs_of_kinds(cache, loss.needs, name)
    cache.require_complete()
    standardising = sorted(name for name, loss in losses.items() if loss.standardizes)
    if cache.spec.topk and standardising:
        log.warning("%s stores the top %d logits per region: rebuilt logits have a smaller spread than the "
                    "teacher's, so logit standardisation (%s) sharpens the teacher; benchmarks/TOPK.md measures "
                    "it. Prefer a full cache, or a loss without standardisation, for these runs",
                    cache.path, cache.spec.topk, ", ".join(standardising))


def _negatives(config: DistillConfig, losses: dict[str, LossSpec | LossSum]) -> int:
    """The most negatives a contrastive loss of the runs draws per sample (0: none), refused where no cache view is
    held to draw them from."""
    negatives = max((loss.negatives or 0 for loss in losses.values()), default=0)
    if negatives and (config.live_teacher is not None or config.batch_path != "device" or not config.cache):
        raise KdcacheError(f"--loss {','.join(config.losses)}: CRD draws each sample's negatives from the teacher's "
                           f"cached embeddings of the view held for training; train from --cache on the default "
                           f"--batch-path device (a live teacher keeps no embeddings of other samples, and the "
                           f"dataset path holds no view)")
    return negatives


def _targets(config: DistillConfig, caches: list[TeacherCache], data: DataSource,
             scales: tuple[int, ...], device: torch.device, shard: Shard, losses: dict[str, LossSpec | LossSum],
             images: torch.Tensor, show_progress: bool) -> tuple[Targets | None, dict, list[TeacherOutputs]]:
    """The target provider (the cache, the caches' ensemble, the live teacher, or None when the students teach
    themselves), how the runs' records name it, and what each teacher gives besides region logits (of the kinds
    the losses read); each cache draws the negatives a contrastive loss reads (CRD).

    A streamed split's targets stay in host memory, each batch's gathered there: an ImageNet view is gigabytes.
    """
    kinds = tuple(dict.fromkeys(kind for loss in losses.values() for kind in loss.needs))
    negatives = _negatives(config, losses)
    if not config.has_teacher:  # the students' own: their peers (--mutual) or their weight average (--ema-teacher)
        return None, {"mutual": list(config.students)} if config.mutual else {"ema_teacher": config.ema_teacher}, []
    if config.live_teacher is None:
        providers, teachers = [], []
        for cache in caches:
            stored, samples = cache.spec, None if shard.is_whole else shard.samples
            outputs = outputs_of_kinds(cache, kinds, ",".join(config.losses))
            statement = require_target_memory(cache, samples, device, on_host=stored.streamed, outputs=outputs)
            if show_progress and distributed.world().is_main:
                print(statement, flush=True)
            providers.append(CachedTargets(cache, scales, device, samples, on_host=stored.streamed, outputs=outputs,
                                           negatives=negatives, seed=config.seed))
            teachers.append(TeacherOutputs({name: stored.outputs[name] for name in outputs},
                                           stored.teacher.get("stages", [])))
        first = caches[0].spec
        source = {"cache": str(caches[0].path), "cache_identity": first.identity_digest(), "teacher": first.teacher,
                  "cache_views": first.num_views}
        if len(caches) == 1:
            return providers[0], source, teachers
        weights = list(config.teacher_weights or [1.0] * len(caches))
        source |= {"extra_caches": [str(cache.path) for cache in caches[1:]], "teacher_weights": weights,
                   "ensemble": [{"cache_identity": c.spec.identity_digest(), "teacher": c.spec.teacher} for c in caches]}
        return EnsembleTargets(providers, weights), source, teachers
    teacher, teacher_info = load_teacher(config.live_teacher, config.teacher, data.num_classes,
                                         class_names(data, config.class_names))
    require_task(teacher, teacher_info["arch"], data, "--live-teacher")
    if caches:  # replaying the cache's views live is the equivalence baseline: same teacher (and prompts) only
        caches[0].require({f"teacher.{field}": teacher_info[field]
                           for field in ("arch", "checkpoint_sha256", "zero_shot") if field in teacher_info})
    outputs = parse_outputs(",".join(kinds), teacher)[1:]
    shapes = probe_output_shapes(teacher, outputs, images)
    return (LiveTeacher(teacher, scales, device, outputs), {"live_teacher": teacher_info},
            [TeacherOutputs(shapes, feature_stages(teacher))])


def _dataset_batches(config: DistillConfig, caches: list[TeacherCache], data: DataSource,
                     scales: tuple[int, ...], device: torch.device, workers: int, outputs: tuple[str, ...]
                     ) -> Callable[[int, torch.Generator], Iterator[Batch]] | None:
    """With --batch-path dataset, each epoch's batches from CacheDataset through a DataLoader (the teacher's
    `outputs` besides its logits among the targets); else None."""
    if config.batch_path != "dataset":
        return None
    if len(caches) != 1 or config.live_teacher is not None:
        raise KdcacheError("--batch-path dataset reads targets from one cache: use it with one --cache and without "
                           "--live-teacher")
    dataset_of_views = CacheDataset(caches[0], data=data, scales=scales, view_order=config.view_order,
                                    seed=config.seed, outputs=outputs, image_size=config.image_size)

    def batches(epoch: int, generator: torch.Generator) -> Iterator[Batch]:
        dataset_of_views.set_epoch(epoch)
        # files are read by worker processes; a split in memory is cropped faster in this one
        return loader_batches(dataset_of_views, config.batch_size, generator, device,
                              workers if data.streamed else 0)
    return batches


def _shard(cache: TeacherCache | None, num_samples: int, config: DistillConfig) -> tuple[World, Shard]:
    """This rank's samples: whole for one process; under torchrun a contiguous range of the cache's blocks
    (so each rank reads only its slice of every view), or an even split without a cache."""
    here = distributed.world()
    if not here.distributed:
        return here, Shard.whole(num_samples)
    if config.batch_path != "device":
        raise KdcacheError(f"--batch-path {config.batch_path} runs in one process; under torchrun use the default "
                           f"--batch-path device")
    if cache is None:
        return here, distributed.even_share(num_samples, here)
    if cache.spec.num_blocks < here.size:  # refused by every rank alike, before any of them waits on another
        raise KdcacheError(f"cache {cache.path} has {cache.spec.num_blocks} blocks of {cache.spec.block_size} samples, "
                           f"fewer than the {here.size} processes: each rank needs at least one, so it can feed at "
                           f"most {cache.spec.num_blocks}; start at most {cache.spec.num_blocks} "
                           f"(--nproc-per-node), or rebuild the cache with a smaller --block-size")
    return here, distributed.shard(cache.spec.num_blocks, cache.spec.block_size, num_samples, here)[1]


def _summary(run: Run, kept: bool) -> RunSummary:
    """Write the run's final weights, unless it was finished before and is kept as it was, and say how it did."""
    if not kept:
        run.finish()
    best = max(run.history, key=lambda row: row["test_acc"])
    return RunSummary(run.name, run.record["arch"], run.record["loss"], run.history[-1]["test_acc"],
                      best["test_acc"], int(best["epoch"]), sum(row["seconds"] for row in run.history),
                      sum(row["img_per_s"] for row in run.history) / len(run.history), run.folder, kept,
                      run.history[-1].get("test_top5"), run.history[-1].get("test_acc_int8"))


def _inside(folder: Path, cache: Location) -> bool:
    """Whether a local folder is the cache or lies inside it (a cache at a URL holds no local folder)."""
    if cache.is_url:
        return False
    folder, cache_path = folder.resolve(), cache.path.resolve()
    return folder == cache_path or cache_path in folder.parents
