"""Inside the user's own training script (issue #31): a dataset whose images stay the cached views under any
loader, checks when the loader and loss are built, one loss module that computes what `kdcache distill` computes
on the same batch, and a region student that is its model to checkpoints and DDP."""

import multiprocessing
import os
import socket

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

import kdcache
from conftest import SCALES
from small_runs import saved_teacher, synthetic_splits
from kdcache.config import DistillConfig
from kdcache.data import normalize, policy_for
from kdcache.data.mixing import MIX_WEIGHT
from kdcache.errors import KdcacheError
from kdcache.losses import scaled_loss
from kdcache.models import file_sha256
from kdcache.stages.dataset import check_loader_inputs
from kdcache.stages.dump import dump_teacher
from kdcache.stages.loop import Run

CLASSES, SIZE = 4, 16


def one_line(error):
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A float32 mixup cache of 2 views over 48 synthetic 16-pixel images, scales 1,2, and its data."""
    data = synthetic_splits(48, CLASSES, seed=5, image_size=SIZE)[0]
    model, checkpoint = saved_teacher(tmp_path_factory.mktemp("teacher"), CLASSES, seed=1)
    info = {"arch": "resnet8", "num_classes": CLASSES, "checkpoint": str(checkpoint),
            "checkpoint_sha256": file_sha256(checkpoint)}
    path = tmp_path_factory.mktemp("mixup") / "c.zarr"
    dump_teacher(model, info, data, policy_for(data, "cifar", {"mode": "mixup", "alpha": 1.0, "prob": 0.75}), path,
                 views=2, scales=(1, 2), dtype="float32", block_size=24, show_progress=False)
    return path, data


# 1. a dataset that cannot be silently broken


def test_a_transform_assigned_after_construction_is_refused_in_one_line(digits_cache):
    dataset = kdcache.CacheDataset(digits_cache)
    with pytest.raises(KdcacheError) as refused:
        dataset.transform = lambda x: x.flip(-1)
    assert "the pixels the teacher's targets were made on" in one_line(refused)
    assert "use a plain DataLoader with collate_fn=kdcache.collate, or the timm integration" in one_line(refused)
    dataset.transform = None  # harmless: the view as it is
    assert dataset.transform is None
    flipped = kdcache.CacheDataset(digits_cache, transform=lambda x: x.flip(-1))  # the constructor's stays
    torch.testing.assert_close(flipped[3][0], dataset[3][0].flip(-1), rtol=0, atol=0)


def test_timms_create_loader_is_refused_and_inside_transforms_ignored_keeps_the_views(digits_cache):
    from timm.data import create_loader

    dataset = kdcache.CacheDataset(digits_cache, images="uint8", item="pair")
    # timm's prefetcher path on the CPU: uint8 batches normalised on the device with the cache's mean and std
    options = dict(input_size=dataset.input_size, batch_size=50, num_workers=0, persistent_workers=False,
                   use_prefetcher=True, device=torch.device("cpu"), mean=dataset.mean, std=dataset.std,
                   collate_fn=kdcache.collate)
    with pytest.raises(KdcacheError, match="as timm's create_loader assigns its own"):
        create_loader(dataset, **options)
    with dataset.transforms_ignored():
        loader = create_loader(dataset, is_training=False, **options)  # in order, to compare item by item
    assert dataset.transform is None
    with pytest.raises(KdcacheError, match=r"dropping the teacher's targets: build the dataset with item='pair' and "
                                           r"pass collate_fn=kdcache.collate$"):
        with kdcache.CacheDataset(digits_cache).transforms_ignored():
            pass
    images, targets = next(iter(loader))
    plain = kdcache.CacheDataset(digits_cache)
    torch.testing.assert_close(images, torch.stack([plain[i][0] for i in range(50)]), rtol=1e-5, atol=1e-5)
    assert isinstance(targets, kdcache.TeacherTargets) and torch.equal(targets["label"], plain.data.labels[:50])
    torch.testing.assert_close(targets["regions"], torch.stack([plain[i][2]["regions"] for i in range(50)]))


def test_uint8_images_normalised_with_the_exposed_mean_and_std_are_the_normalised_items(digits_cache):
    normalised, raw = kdcache.CacheDataset(digits_cache), kdcache.CacheDataset(digits_cache, images="uint8")
    for dataset in (normalised, raw):
        dataset.set_epoch(1)
    image, label, targets = raw[5]
    assert image.dtype == torch.uint8 and image.shape == raw.input_size == (3, raw.image_size, raw.image_size)
    expected = normalised[5]
    torch.testing.assert_close(normalize(image[None], raw.mean, raw.std)[0], expected[0], rtol=0, atol=0)
    assert int(label) == int(expected[1]) and torch.equal(targets["regions"], expected[2]["regions"])
    # timm's PrefetchLoader's arithmetic on the device, x.float().sub_(255 * mean).div_(255 * std)
    mean, std = (torch.tensor(values).view(3, 1, 1) * 255 for values in (raw.mean, raw.std))
    torch.testing.assert_close(image.float().sub_(mean).div_(std), expected[0], rtol=1e-5, atol=1e-5)
    assert all(0 < value < 1 for value in raw.mean + raw.std)  # 0-1 units, timm's convention


def test_pair_items_collate_into_teacher_targets_that_move_with_to(digits_cache):
    dataset = kdcache.CacheDataset(digits_cache, item="pair")
    image, targets = dataset[2]
    assert isinstance(targets, kdcache.TeacherTargets) and int(targets["label"]) == int(dataset.data.labels[2])
    for collate in (default_collate, kdcache.collate):
        images, batch = collate([dataset[i] for i in range(4)])
        assert isinstance(batch, kdcache.TeacherTargets), collate
        assert batch["label"].dtype == torch.int64 and batch["regions"].shape == (4, 5, 10)
        moved = batch.to("cpu", non_blocking=True)
        assert isinstance(moved, kdcache.TeacherTargets) and torch.equal(moved["regions"], batch["regions"])
        assert batch.to(torch.float64)["regions"].dtype == torch.float64
        torch.testing.assert_close(images, torch.stack([dataset[i][0] for i in range(4)]), rtol=0, atol=0)
    triple = kdcache.CacheDataset(digits_cache)
    images, labels, targets = kdcache.collate([triple[i] for i in range(4)])  # the triple form too
    assert isinstance(targets, kdcache.TeacherTargets) and torch.equal(labels, batch["label"])
    torch.testing.assert_close(targets["regions"], batch["regions"], rtol=0, atol=0)


def test_kdcache_collate_pickles_into_spawned_workers_and_keeps_uint8_pixels(digits_cache):
    dataset = kdcache.CacheDataset(digits_cache, images="uint8", item="pair")
    loader = DataLoader(dataset, batch_size=16, num_workers=1, multiprocessing_context="spawn",
                        collate_fn=kdcache.collate)
    images, targets = next(iter(loader))
    assert images.dtype == torch.uint8 and torch.equal(images[3], dataset[3][0])
    assert isinstance(targets, kdcache.TeacherTargets) and torch.equal(targets["regions"][3],
                                                                      dataset[3][1]["regions"])


def test_timms_fast_collate_is_refused_in_one_line_that_names_kdcache_collate(digits_cache):
    from timm.data.loader import fast_collate

    dataset = kdcache.CacheDataset(digits_cache, images="uint8", item="pair")
    with pytest.raises(KdcacheError) as refused:
        fast_collate([dataset[i] for i in range(4)])
    assert "timm's fast_collate" in one_line(refused) and one_line(refused).endswith(
        "pass collate_fn=kdcache.collate, which keeps the images as they are and the targets whole")
    assert not hasattr(dataset[0][1], "ndim")  # still an AttributeError to code that only asks


def test_unknown_image_modes_and_item_forms_are_refused_in_one_line(digits_cache):
    with pytest.raises(KdcacheError, match=r"CacheDataset\(images='float16'\): expected one of 'normalized', 'uint8'"):
        kdcache.CacheDataset(digits_cache, images="float16")
    with pytest.raises(KdcacheError, match=r"CacheDataset\(item='dict'\): expected one of 'triple', 'pair'"):
        kdcache.CacheDataset(digits_cache, item="dict")


# 2. checks at the door


def test_the_loaders_size_mean_std_and_classes_are_compared_with_the_caches(digits_cache):
    dataset = kdcache.CacheDataset(digits_cache)
    size = dataset.image_size
    check_loader_inputs(dataset, image_size=(3, size, size), mean=dataset.mean, std=dataset.std, num_classes=10)
    with pytest.raises(KdcacheError) as refused:
        check_loader_inputs(dataset, image_size=224)
    assert one_line(refused) == (f"the loader's image size is 224x224 but the cache {digits_cache} was made at "
                                 f"{size}x{size}: give the loader the cache's image size")
    with pytest.raises(KdcacheError, match=r"the loader's mean is \(0.485, 0.456, 0.406\) but the cache .* was "
                                           r"made at \("):
        check_loader_inputs(dataset, mean=(0.485, 0.456, 0.406))
    with pytest.raises(KdcacheError, match="the loader's class count is 100 but the cache .* was made at 10"):
        check_loader_inputs(dataset, num_classes=100)


def test_distill_loss_checks_the_students_head_and_regions_against_the_cache_when_built(digits_cache):
    dataset = kdcache.CacheDataset(digits_cache)
    with pytest.raises(KdcacheError) as refused:
        kdcache.DistillLoss("kd", epochs=10, dataset=dataset, model=kdcache.create_model("resnet8", 100))
    assert one_line(refused) == (f"the student's head's class count is 100 but the cache {digits_cache} was made at "
                                 f"10: give the student's head the cache's class count")
    model = kdcache.create_model("resnet8", 10)
    kdcache.DistillLoss("kd", epochs=10, dataset=dataset, model=model)
    with pytest.raises(KdcacheError, match=r"loss 'sdd-lskd' distils every region but the student gives logits "
                                           r"\[B, C\]: wrap the student in kdcache.RegionStudent\(model, scales\)"):
        kdcache.DistillLoss("sdd-lskd", epochs=10, dataset=dataset, model=model)
    with pytest.raises(KdcacheError, match=r"the student's scales are 1,4 but the dataset's are 1,2: give "
                                           r"RegionStudent scales=\(1, 2\), or CacheDataset scales=\(1, 4\)"):
        kdcache.DistillLoss("sdd-lskd", epochs=10, dataset=dataset, model=kdcache.RegionStudent(model, (1, 4)))
    kdcache.DistillLoss("sdd-lskd", epochs=10, dataset=dataset, model=kdcache.RegionStudent(model, SCALES))
    with pytest.raises(KdcacheError, match="loss 'rkd' reads the teacher's embedding but the cache .* holds regions"):
        kdcache.DistillLoss("rkd", epochs=10, dataset=dataset)
    with pytest.raises(KdcacheError, match="epochs must be the run's number of epochs, a positive integer"):
        kdcache.DistillLoss("kd", epochs=0)


# 3. one loss module for any loop


def distill_terms(loss_name, epochs, epoch, model, batch, tmp_path):
    """The terms a `kdcache distill` run's step computes on `batch` at 0-based `epoch` (Run.update, as fit calls it)."""
    loss = scaled_loss(loss_name, {}, epochs)
    config = DistillConfig(epochs=epochs, batch_size=len(batch[1]))
    scales = SCALES if loss.uses_regions else (1,)
    run = Run("student", model, loss, scales, config, tmp_path, torch.device("cpu"), {})
    views = (batch,)
    return run.update(run.forward(views), views, epoch, share=1.0)


@pytest.mark.parametrize("loss_name,epoch", [("kd", 0), ("sdd-lskd", 1), ("sdd-lskd", 9), ("dkd", 2)])
@pytest.mark.parametrize("source", ["digits", "mixup"])
def test_distill_loss_equals_distills_step_on_the_same_batch(loss_name, epoch, source, digits_cache, mixed,
                                                              tmp_path):
    path, data = (digits_cache, None) if source == "digits" else mixed
    dataset = kdcache.CacheDataset(path, data=data, item="pair")
    dataset.set_epoch(epoch)
    images, targets = kdcache.collate([dataset[i] for i in range(16)])
    assert (MIX_WEIGHT in targets) == (source == "mixup") and (source == "digits" or (targets[MIX_WEIGHT] < 1).any())
    torch.manual_seed(0)
    model = kdcache.create_model("resnet8", dataset.num_classes)
    student = kdcache.RegionStudent(model, dataset.scales) if "sdd" in loss_name else model.train()
    criterion = kdcache.DistillLoss(loss_name, epochs=48, dataset=dataset, model=student)  # warm-up 20/240 of 48
    criterion.set_epoch(epoch)
    output = student(images)
    found = criterion.terms(output, targets)
    rest = {name: value for name, value in targets.items() if name != "label"}
    expected = distill_terms(loss_name, 48, epoch, model, (images, targets["label"], rest), tmp_path)
    assert found.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)
    warm = {"kd": 1.0, "dkd": min((epoch + 1) / 4, 1), "sdd-lskd": min((epoch + 1) / 4, 1)}[loss_name]
    criterion.set_epoch(47)  # past the warm-up: the distillation term at full weight
    full = criterion.terms(output, targets)
    own = [name for name in found if name not in ("ce", "total")]
    assert all(float(found[name].detach() / full[name].detach()) == pytest.approx(warm, rel=1e-5) for name in own), warm


def test_a_global_loss_takes_b_c_or_b_r_c_and_a_region_loss_refuses_b_c(digits_cache):
    dataset = kdcache.CacheDataset(digits_cache, item="pair")
    images, targets = kdcache.collate([dataset[i] for i in range(8)])
    torch.manual_seed(0)
    student = kdcache.RegionStudent(kdcache.create_model("resnet8", 10), SCALES)
    regions = student(images)
    kd = kdcache.DistillLoss("kd", epochs=240)
    torch.testing.assert_close(kd(regions[:, 0], targets), kd(regions, targets), rtol=0, atol=0)
    torch.testing.assert_close(kd({"regions": regions}, targets), kd(regions, targets), rtol=0, atol=0)
    label, rest = targets["label"], {k: v for k, v in targets.items() if k != "label"}
    torch.testing.assert_close(kd(regions, (label, rest)), kd(regions, targets), rtol=0, atol=0)  # the triple form
    with pytest.raises(KdcacheError) as refused:
        kdcache.DistillLoss("sdd-lskd", epochs=240)(regions[:, 0], targets)
    assert one_line(refused) == ("DistillLoss('sdd-lskd'): the loss distils every region, so it needs the student's "
                                 "region logits [B, R, C], got logits (8, 10): wrap the student in "
                                 "kdcache.RegionStudent(model, scales), which gives region logits while it trains")
    with pytest.raises(KdcacheError, match="target must be the batch's TeacherTargets"):
        kd(regions, label)


# the region student


def test_region_student_gives_regions_in_training_and_plain_logits_in_eval_under_the_models_names():
    torch.manual_seed(0)
    model = kdcache.create_model("resnet8", 10)
    student = kdcache.RegionStudent(model, (1, 2))
    images = torch.randn(4, 3, 32, 32)
    assert student.train()(images).shape == (4, 5, 10) and model.training
    plain = student.eval()(images)
    assert plain.shape == (4, 10) and not model.training
    torch.testing.assert_close(plain, model(images), rtol=0, atol=0)
    assert list(student.state_dict()) == list(model.state_dict())
    assert [name for name, _ in student.named_parameters()] == [name for name, _ in model.named_parameters()]
    fresh = kdcache.create_model("resnet8", 10).eval()
    fresh.load_state_dict(student.state_dict())  # a checkpoint of the student loads into the plain model
    torch.testing.assert_close(fresh(images), plain, rtol=0, atol=0)


def test_region_student_speaks_for_a_timm_model_and_survives_deepcopy():
    import copy

    import timm

    model = timm.create_model("resnet18", num_classes=7, pretrained=False)
    student = kdcache.RegionStudent(model, (1, 2))
    assert student.num_classes == 7 and student.pretrained_cfg == model.pretrained_cfg  # the model's attributes
    copied = copy.deepcopy(student)  # as ModelEmaV3 copies it
    assert copied.model is not model and copied.state_dict().keys() == model.state_dict().keys()
    copied.eval()
    assert copied(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def _ddp_rank(rank, port, queue):
    """Rank `rank` of 2: DDP(RegionStudent) on its half of a batch of 32; rank 0 reports gradients and shapes."""
    from kdcache.distributed import synchronise_batchnorm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        student, images, labels = _region_student_and_batch()
        ddp = torch.nn.parallel.DistributedDataParallel(synchronise_batchnorm(student, torch.device("cpu")))
        half = slice(16 * rank, 16 * rank + 16)
        regions = ddp(images[half])
        _region_loss(regions, labels[half]).backward()
        ddp.eval()
        plain = ddp(images[half]).shape
        if rank == 0:
            queue.put(({name: p.grad.numpy().copy() for name, p in student.named_parameters()}, tuple(regions.shape),
                       tuple(plain)))
    finally:
        torch.distributed.destroy_process_group()


def _region_student_and_batch():
    torch.manual_seed(0)
    student = kdcache.RegionStudent(kdcache.create_model("resnet8", 10), (1, 2))
    generator = torch.Generator().manual_seed(1)
    return student, torch.randn(32, 3, 32, 32, generator=generator), torch.randint(0, 10, (32,), generator=generator)


def _region_loss(regions, labels):
    return torch.nn.functional.cross_entropy(regions.flatten(0, 1), labels.repeat_interleave(regions.shape[1]))


def test_ddp_around_a_region_student_gives_one_process_gradients_regions_in_training_and_plain_in_eval():
    student, images, labels = _region_student_and_batch()
    _region_loss(student(images), labels).backward()
    expected = {name: p.grad for name, p in student.named_parameters()}
    context = multiprocessing.get_context("spawn")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    queue = context.Queue()
    workers = [context.Process(target=_ddp_rank, args=(rank, port, queue)) for rank in range(2)]
    for worker in workers:
        worker.start()
    grads, regions, plain = queue.get(timeout=120)
    for worker in workers:
        worker.join(timeout=60)
    assert regions == (16, 5, 10) and plain == (16, 10)
    with pytest.raises(KdcacheError, match=r"wrap the plain model and give DDP the student: "
                                           r"DistributedDataParallel\(RegionStudent\(model, scales\)\)$"):
        kdcache.RegionStudent(torch.nn.parallel.DistributedDataParallel.__new__(
            torch.nn.parallel.DistributedDataParallel))  # the type is what counts; no process group needed
    assert grads.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(grads[name], expected[name].numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
