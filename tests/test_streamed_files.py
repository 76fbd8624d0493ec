"""Image folders streamed from their files: the listing, views drawn and replayed relative to each original image,
evaluation's crop, the files' checksums, both stages through the same loader, shards, workers, and bad files.

The folder is made on the fly (image_folders.py): JPEG and PNG, grey and RGB, sizes and aspect ratios from tall
to wide.
"""

import csv
import multiprocessing
import pickle
import shutil
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as TF

from kdcache import CacheDataset, open_cache
from kdcache.cache import verify
from kdcache.cache.layout import WRITTEN_VERSION
from kdcache.config import DistillConfig
from kdcache.data import ImageFiles, load_dataset, normalize
from kdcache.data import files as files_module
from kdcache.data.files import FileBatches, FileCenterCrop, FileResizedCropFlip, crop_box, default_workers, stream
from kdcache.errors import KdcacheError
from kdcache.models import LogitMap, create_model, load_teacher, save_checkpoint
from kdcache.stages import distill
from kdcache.stages.dump import dump_teacher

from image_folders import CLASSES, write_folder

SIZE, SCALES, VIEWS = 32, (1, 2), 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("streamed") / "images")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=len(CLASSES)).eval()
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(path, model)
    model, info = load_teacher(path, "resnet8", len(CLASSES))
    return model.eval(), info, path


def dump(files, teacher, out, workers=0, **options):
    model, info, _ = teacher
    policy = FileResizedCropFlip(SIZE)
    return dump_teacher(model, info, files, policy, out, views=VIEWS, scales=SCALES, block_size=4, batch_size=3,
                        workers=workers, show_progress=False, **options)


@pytest.fixture(scope="module")
def cache_path(folder, teacher, tmp_path_factory):
    files = load_dataset("imagefolder", folder, "train", image_size=SIZE)
    out = tmp_path_factory.mktemp("cache") / "files.zarr"
    dump(files, teacher, out, workers=2)
    return out


def test_opening_a_folder_lists_its_files_in_imagefolders_order_and_decodes_none(folder, monkeypatch):
    monkeypatch.setattr(files_module, "decode_image_bytes", None)  # any decode would fail
    files = load_dataset("imagefolder", folder, "train", image_size=SIZE)
    reference = torchvision.datasets.ImageFolder(str(folder / "train"))
    assert isinstance(files, ImageFiles) and files.labels.tolist() == reference.targets
    assert [files.path(i) for i in range(len(files.labels))] == [path for path, _ in reference.samples]
    assert files.describe()["image_shape"] == [3, SIZE, SIZE] and files.describe()["source"] == "files"
    assert 1 <= default_workers() <= 16


def test_pickled_files_are_a_list_not_pixels(folder):
    files = load_dataset("imagefolder", folder, "train", image_size=224)
    assert len(pickle.dumps(FileBatches(files, FileResizedCropFlip(224)))) < 4000


@pytest.mark.parametrize("height, width", [(375, 500), (500, 375), (64, 64), (20, 300), (300, 20), (1, 1)])
def test_boxes_are_drawn_as_random_resized_crop_draws_them(height, width):
    for seed in range(40):
        torch.manual_seed(seed)
        expected = RandomResizedCrop.get_params(torch.empty(3, height, width), (0.08, 1.0), (3 / 4, 4 / 3))
        assert crop_box(torch.Generator().manual_seed(seed), height, width, (0.08, 1.0), (3 / 4, 4 / 3)) == expected


def test_fractions_in_float32_give_back_every_pixel_index():
    for side in (1, 7, 224, 500, 4000, 65535):
        pixels = np.arange(side + 1)
        fractions = (pixels / side).astype(np.float32)
        assert (np.round(fractions.astype(np.float64) * side) == pixels).all()


def test_a_view_replays_as_torchvisions_resized_crop_of_the_original_file(folder):
    files = load_dataset("imagefolder", folder, "train", image_size=SIZE)
    policy = FileResizedCropFlip(SIZE)
    flips = set()
    for index in range(len(files.labels)):
        original = decode_image(files.path(index), ImageReadMode.RGB)
        for seed in range(3):
            params = policy.draw(torch.Generator().manual_seed(seed), *original.shape[-2:])
            top, left, height, width, flip = policy.box(params, *original.shape[-2:])
            expected = TF.resized_crop(original, top, left, height, width, [SIZE, SIZE], antialias=True)
            expected = TF.hflip(expected) if flip else expected
            assert torch.equal(policy.apply(files_module.read_image(files.path(index))[0], params), expected)
            flips.add(flip)
    assert flips == {True, False}


def test_evaluation_resizes_the_shorter_side_to_eight_sevenths_then_crops_the_centre(folder):
    path = str(folder / "val" / "cat" / "a.jpg")
    original = decode_image(path, ImageReadMode.RGB)
    assert FileCenterCrop(224).resize_size == 256
    expected = TF.center_crop(TF.resize(original, [256], antialias=True), [224, 224])
    assert torch.equal(FileCenterCrop(224).apply(original, torch.zeros(0)), expected)


def test_the_dump_stores_fractions_checksums_and_the_listing_and_the_cache_is_the_live_teacher(cache_path, folder,
                                                                                               teacher):
    files = load_dataset("imagefolder", folder, "train", image_size=SIZE)
    policy = FileResizedCropFlip(SIZE)
    live = LogitMap(teacher[0], SCALES).eval()
    with open_cache(cache_path) as cache:
        assert cache.spec.format_version == WRITTEN_VERSION and cache.spec.streamed and verify(cache) == []
        assert cache.spec.augmentation["param_names"] == ["top", "left", "height", "width", "flip"]
        assert cache.file_listing() == files.paths.tolist()
        crcs = [google_crc32c.value(Path(files.path(i)).read_bytes()) for i in range(len(files.labels))]
        assert cache.file_checksums().tolist() == crcs
        for view in range(VIEWS):
            params = torch.from_numpy(cache.aug_params(view))
            assert params.dtype == torch.float32 and not policy.out_of_range(params).any()
            images = torch.stack([policy.apply(files_module.read_image(files.path(i))[0], params[i])
                                  for i in range(len(files.labels))])
            with torch.no_grad():
                expected = live(normalize(images, files.mean, files.std)).half().float()
            torch.testing.assert_close(torch.from_numpy(cache.view(view)).float(), expected, rtol=2e-3, atol=2e-3)
        assert not torch.equal(torch.from_numpy(cache.aug_params(0)), torch.from_numpy(cache.aug_params(1)))


def test_the_draws_do_not_depend_on_workers_or_batches(cache_path, folder, teacher, tmp_path):
    files = load_dataset("imagefolder", folder, "train", image_size=SIZE)
    dump(files, teacher, tmp_path / "one.zarr", workers=0)
    with open_cache(cache_path) as two_workers, open_cache(tmp_path / "one.zarr") as in_process:
        for name in ("aug", "logits", "file_crc32c", "files", "progress"):
            np.testing.assert_array_equal(two_workers.store.read(name), in_process.store.read(name), err_msg=name)


def run_distill(cache_path, folder, out, epochs=2, **options):
    config = DistillConfig(cache=str(cache_path), data_root=str(folder), students=("resnet8",), losses=("kd",),
                           epochs=epochs, batch_size=5, out=str(out), device="cpu", **options)
    return distill(config, show_progress=False)


def _losses(run):
    return [float(line.split(",")[1]) for line in (run.folder / "metrics.csv").read_text().splitlines()[1:]]


def test_distill_trains_from_the_cache_and_the_live_teacher_on_the_same_pixels(cache_path, folder, teacher, tmp_path):
    cached = run_distill(cache_path, folder, tmp_path / "cached", workers=2)[0]
    dataset_path = run_distill(cache_path, folder, tmp_path / "dataset", workers=0, batch_path="dataset")[0]
    live = run_distill(cache_path, folder, tmp_path / "live", workers=1, live_teacher=str(teacher[2]),
                       teacher="resnet8")[0]
    np.testing.assert_allclose(_losses(dataset_path), _losses(cached), rtol=1e-5)
    np.testing.assert_allclose(_losses(live), _losses(cached), rtol=2e-3)  # the cache holds fp16 logits
    assert 0 <= cached.test_acc <= 1


@pytest.mark.parametrize("batch_path", ["streamed", "dataset"])
def test_a_changed_file_is_refused_naming_it_in_one_line(cache_path, folder, tmp_path, batch_path):
    copy = tmp_path / "images"
    shutil.copytree(folder, copy)
    changed = copy / "train" / "dog" / "c.jpeg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(changed)
    options = {"batch_path": batch_path} if batch_path == "dataset" else {}
    with pytest.raises(KdcacheError, match=rf"^{changed} changed since the teacher's dump read it") as caught:
        run_distill(cache_path, copy, tmp_path / "runs", workers=1, **options)
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)


@pytest.mark.parametrize("change", ["added", "removed", "renamed"])
def test_a_listing_that_differs_is_refused_before_training_naming_the_first_difference(cache_path, folder, tmp_path,
                                                                                       change):
    copy = tmp_path / "images"
    shutil.copytree(folder, copy)
    dog = copy / "train" / "dog"
    if change == "added":
        shutil.copy(dog / "a.jpg", dog / "aa.jpg")
        first = "'dog/b.png' in the cache but 'dog/aa.jpg' in the folder"
    elif change == "removed":
        (dog / "b.png").unlink()
        first = "'dog/b.png' in the cache but 'dog/c.jpeg' in the folder"
    else:
        (dog / "e.jpg").rename(dog / "z.jpg")
        first = "'dog/e.jpg' in the cache but 'dog/z.jpg' in the folder"
    with pytest.raises(KdcacheError, match="lists other files than the teacher's dump") as caught:
        run_distill(cache_path, copy, tmp_path / "runs")
    assert first in str(caught.value) and not (tmp_path / "runs").exists()


def test_a_truncated_file_stops_the_dump_with_one_line_naming_it(folder, teacher, tmp_path):
    copy = tmp_path / "images"
    shutil.copytree(folder, copy)
    bad = copy / "train" / "owl" / "a.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    files = load_dataset("imagefolder", copy, "train", image_size=SIZE)
    with pytest.raises(KdcacheError) as caught:
        dump(files, teacher, tmp_path / "bad.zarr", workers=1)
    message = str(caught.value)
    assert message.startswith(f"{bad}: not a decodable image") and "\n" not in message
    assert "put a readable image under the same name and rerun the same command" in message and "Traceback" not in message


@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_cache_dataset_reads_files_in_spawned_workers_and_persistent_ones_follow_the_epoch(cache_path, folder,
                                                                                          context):
    dataset = CacheDataset(cache_path, folder)
    loader = DataLoader(dataset, batch_size=15, num_workers=1, multiprocessing_context=context,
                        persistent_workers=True)
    with open_cache(cache_path) as cache:
        for epoch in range(3):
            dataset.set_epoch(epoch)
            x, y, targets = next(iter(loader))
            view = epoch % VIEWS
            assert torch.equal(targets["regions"], torch.from_numpy(cache.view(view)).float())
            policy = FileResizedCropFlip(SIZE)
            params = torch.from_numpy(cache.aug_params(view))
            files = dataset.data
            expected = torch.stack([policy.apply(files_module.read_image(files.path(i))[0], params[i])
                                    for i in range(len(y))])
            assert torch.equal(x, normalize(expected, files.mean, files.std))


def test_the_stream_names_a_workers_error_in_one_line(folder):
    files = load_dataset("imagefolder", folder, "train", image_size=SIZE)
    broken = ImageFiles(files.name, files.split, files.root, np.array([b"cat/missing.jpg"]), files.labels[:1],
                        files.num_classes, files.mean, files.std, SIZE)
    before = set(multiprocessing.active_children())
    with pytest.raises(KdcacheError) as caught:
        list(stream(FileBatches(broken, FileCenterCrop(SIZE)), [(0, [0])], 1, torch.device("cpu")))
    assert str(caught.value).startswith(f"{broken.path(0)}: cannot be read") and "\n" not in str(caught.value)
    assert not set(multiprocessing.active_children()) - before  # the worker was stopped, not left to the collector


def test_train_teacher_and_policies_that_need_memory(folder, tmp_path):
    from kdcache.config import TeacherConfig
    from kdcache.stages import train_teacher

    config = TeacherConfig(model="resnet8", dataset="imagefolder", data_root=str(folder), image_size=SIZE,
                           augmentation="imagenet", epochs=1, batch_size=5, workers=0, out=str(tmp_path / "t"),
                           device="cpu")
    assert 0 <= train_teacher(config, show_progress=False).test_acc <= 1
    with pytest.raises(KdcacheError, match="--aug cifar: works on images held in memory.*--preload"):
        train_teacher(TeacherConfig(**{**config.__dict__, "augmentation": "cifar"}), show_progress=False)


def test_a_rank_reads_only_its_shards_files_and_the_ranks_together_take_one_process_batches(folder, monkeypatch):
    from kdcache.distributed import Shard
    from kdcache.runtime import epoch_generator
    from kdcache.stages.splits import StreamedSplit

    files = load_dataset("imagefolder", folder, "train", image_size=SIZE)
    test = load_dataset("imagefolder", folder, "test", image_size=SIZE)
    read, original = [], files_module.read_image
    monkeypatch.setattr(files_module, "read_image", lambda path, *limit: (read.append(path), original(path, *limit))[1])

    def samples_per_step(shard):  # the targets' indices count from the shard's start: they name the samples
        split = StreamedSplit(files, test, FileResizedCropFlip(SIZE), torch.device("cpu"), 0, shard=shard)
        return [held + shard.samples.start for _, _, held in
                split.batches(0, None, lambda held, images: held, 4, epoch_generator(0, 0))]

    whole = samples_per_step(Shard.whole(15))
    read.clear()
    first = samples_per_step(Shard(range(0, 8), 15))
    assert sorted(set(read)) == sorted({files.path(int(i)) for step in first for i in step})
    assert all(int(i) < 8 for step in first for i in step)
    second = samples_per_step(Shard(range(8, 15), 15))
    assert len(whole) == len(first) == len(second) == 3  # 15 // 4 steps on every rank, some of them empty
    for step, expected in enumerate(whole):
        assert sorted(torch.cat([first[step], second[step]]).tolist()) == sorted(expected.tolist())


def test_a_streamed_splits_targets_stay_on_the_host_and_each_batch_is_gathered(cache_path):
    from kdcache.stages.targets import CachedTargets, require_target_memory

    with open_cache(cache_path) as cache:
        resident, on_host = CachedTargets(cache, SCALES), CachedTargets(cache, (1,), on_host=True)
        resident.begin_epoch(1)
        on_host.begin_epoch(1)
        indices = torch.tensor([14, 0, 7])
        assert torch.equal(on_host(indices, None)["regions"], resident(indices, None)["regions"][:, :1])
        assert all(tensor.device.type == "cpu" for tensor in on_host._arrays.values())
        view = 15 * 5 * 3 * 2  # samples x regions x classes x fp16
        statement = require_target_memory(cache, None, torch.device("cuda:0"), host_available=2 * view,
                                          device_available=0, on_host=True)
        assert statement.endswith(f"training holds {2 * view / 1e6:.1f} MB of it in host memory")  # none on the GPU
        with pytest.raises(KdcacheError, match="needs 0.0 MB of host memory but 0.0 MB is available"):
            require_target_memory(cache, None, torch.device("cuda:0"), host_available=view, on_host=True)


def test_a_run_resumes_with_another_number_of_workers(cache_path, folder, tmp_path):
    first = run_distill(cache_path, folder, tmp_path / "runs", workers=0)[0]
    (first.folder / "model.pt").unlink()
    resumed = run_distill(cache_path, folder, tmp_path / "runs", workers=1, resume=True)[0]  # not "other settings"
    with open(resumed.folder / "metrics.csv") as file:
        assert [row["epoch"] for row in csv.DictReader(file)] == ["1", "2"]  # both epochs kept, none trained again
    assert (resumed.folder / "model.pt").exists() and resumed.test_acc == first.test_acc


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_workers_send_uint8_and_the_batches_equal_the_cpu_paths(cache_path, folder):
    from kdcache.runtime import epoch_generator
    from kdcache.stages.splits import StreamedSplit
    from kdcache.stages.targets import CachedTargets

    files = load_dataset("imagefolder", folder, "train", image_size=SIZE)
    test = load_dataset("imagefolder", folder, "test", image_size=SIZE)
    with open_cache(cache_path) as cache:
        params = torch.from_numpy(cache.aug_params(1))
        batches = {}
        for device in (torch.device("cpu"), torch.device("cuda")):
            split = StreamedSplit(files, test, FileResizedCropFlip(SIZE), device, 1, checksums=cache.file_checksums())
            assert split.train_files.normalized == (device.type == "cpu")  # CUDA: uint8 across, normalised there
            targets = CachedTargets(cache, SCALES, device, on_host=True)
            targets.begin_epoch(1)
            batches[device.type] = [(x.cpu(), y.cpu(), t.cpu()) for x, y, t in
                                    split.batches(1, params, targets, 4, epoch_generator(0, 1))]
            batches[device.type + " test"] = [(x.cpu(), y.cpu()) for x, y in split.test_batches(range(6))]
    for key in ("cpu", "cpu test"):
        for expected, found in zip(batches[key], batches[key.replace("cpu", "cuda")]):
            for a, b in zip(expected, found):
                torch.testing.assert_close(b, a, rtol=0, atol=1e-6)  # normalize's division on another device


def test_randaugment_views_of_files_replay_torchvisions_ops_and_the_cache_is_the_live_teacher(folder, teacher,
                                                                                              tmp_path):
    from kdcache.data import Identity, policy_for
    from kdcache.data.randaugment import RandAugmented, RandAugmentOps

    files = load_dataset("imagefolder", folder, "train", image_size=SIZE)
    policy = policy_for(files, "randaugment", num_ops=2, magnitude=9)
    model, info, _ = teacher
    dump_teacher(model, info, files, policy, tmp_path / "ra.zarr", views=VIEWS, scales=SCALES, block_size=4,
                 batch_size=3, workers=0, show_progress=False)
    live, ops_alone = LogitMap(model, SCALES).eval(), RandAugmented(Identity(), RandAugmentOps(2, 9))
    with open_cache(tmp_path / "ra.zarr") as cache:
        assert cache.spec.augmentation["randaugment"]["num_ops"] == 2 and cache.spec.streamed
        for view in range(VIEWS):
            params = torch.from_numpy(cache.aug_params(view))
            assert not policy.out_of_range(params).any() and len(set(params[:, 5].tolist())) > 3
            originals = [files_module.read_image(files.path(i))[0] for i in range(len(files.labels))]
            images = torch.stack([policy.apply(image, params[i]) for i, image in enumerate(originals)])
            crops = torch.stack([FileResizedCropFlip(SIZE).apply(image, params[i, :5])
                                 for i, image in enumerate(originals)])
            assert torch.equal(images, ops_alone.apply(crops, params[:, 5:].long()))  # torchvision's ops, batched
            with torch.no_grad():
                expected = live(normalize(images, files.mean, files.std)).half().float()
            torch.testing.assert_close(torch.from_numpy(cache.view(view)).float(), expected, rtol=2e-3, atol=2e-3)
    streamed = run_distill(tmp_path / "ra.zarr", folder, tmp_path / "streamed", epochs=1, workers=0)[0]
    dataset_path = run_distill(tmp_path / "ra.zarr", folder, tmp_path / "dataset", epochs=1, workers=0,
                               batch_path="dataset")[0]
    np.testing.assert_allclose(_losses(dataset_path), _losses(streamed), rtol=1e-5)


def mixed_by_hand(own, partner, mixing, mode):
    """The mixed image, transcribed from the definitions: λ·a + (1-λ)·b rounded half up, or b's box pasted into a."""
    if mode == "mixup":
        lam = float(mixing[0]) / 1024
        return torch.floor(own.double() * lam + partner.double() * (1 - lam) + 0.5).to(torch.uint8)
    top, left, height, width = (int(value) for value in mixing)
    pasted = own.clone()
    pasted[:, top:top + height, left:left + width] = partner[:, top:top + height, left:left + width]
    return pasted


@pytest.mark.parametrize("mode,base,workers", [("mixup", "imagenet", 1), ("cutmix", "randaugment", 0)])
def test_mixed_views_of_files_read_the_partners_file_and_the_cache_is_the_live_teacher(folder, teacher, tmp_path,
                                                                                       mode, base, workers):
    from kdcache.data import policy_for
    from kdcache.data.mixing import MIX_LABEL, MIX_WEIGHT

    files = load_dataset("imagefolder", folder, "train", image_size=SIZE)
    policy = policy_for(files, base, {"mode": mode, "alpha": 1.0, "prob": 0.7})
    model, info, _ = teacher
    out = tmp_path / "mixed.zarr"
    dump_teacher(model, info, files, policy, out, views=VIEWS, scales=SCALES, block_size=4, batch_size=3,
                 workers=workers, show_progress=False)  # draws each view, partners' included, in the workers
    live, count = LogitMap(model, SCALES).eval(), policy.partner_column
    originals = [files_module.read_image(files.path(i))[0] for i in range(len(files.labels))]
    dataset = CacheDataset(out, folder)
    with open_cache(out) as cache:
        assert cache.spec.augmentation["mix"]["mode"] == mode and cache.spec.streamed
        for view in range(VIEWS):
            params = torch.from_numpy(cache.aug_params(view))
            partners, weights = params[:, count].long(), policy.label_weight(params)
            assert not policy.out_of_range(params).any() and 0 < int((weights < 1).sum()) < len(params)
            views = [policy.base.apply(image, params[i, :count]) for i, image in enumerate(originals)]
            images = torch.stack([mixed_by_hand(views[i], views[p], params[i, count + 1:], mode) if weights[i] < 1
                                  else views[i] for i, p in enumerate(partners.tolist())])
            with torch.no_grad():
                expected = live(normalize(images, files.mean, files.std)).half().float()
            torch.testing.assert_close(torch.from_numpy(cache.view(view)).float(), expected, rtol=2e-3, atol=2e-3)
            dataset.set_epoch(view)
            x, label, targets = dataset[3]
            assert torch.equal(x, normalize(images[3:4], files.mean, files.std)[0]) and label == files.labels[3]
            assert targets[MIX_LABEL] == files.labels[partners[3]] and targets[MIX_WEIGHT] == weights[3]
    streamed = run_distill(out, folder, tmp_path / "streamed", epochs=1, workers=workers)[0]
    dataset_path = run_distill(out, folder, tmp_path / "dataset", epochs=1, workers=0, batch_path="dataset")[0]
    np.testing.assert_allclose(_losses(dataset_path), _losses(streamed), rtol=1e-5)


def test_a_changed_partner_file_is_refused_naming_it(folder, tmp_path):
    from kdcache.data import policy_for

    files = load_dataset("imagefolder", folder, "train", image_size=SIZE)
    policy = policy_for(files, "imagenet", {"mode": "cutmix", "prob": 1.0})
    checksums = np.array([files_module.read_image(files.path(i))[1] for i in range(len(files.labels))])
    params = FileBatches(files, policy, checksums=checksums)[(0, range(len(files.labels)))][2]
    sample = next(i for i, row in enumerate(params) if policy.label_weight(row[None]) < 1 and
                  row[policy.partner_column] != i)
    partner = int(params[sample, policy.partner_column])
    checksums[partner] ^= 1
    with pytest.raises(KdcacheError, match=rf"{files.path(partner)} changed since the teacher's dump read it"):
        FileBatches(files, policy, checksums=checksums).sample_view(0, sample)
    with pytest.raises(KdcacheError, match=r"needs its partner's file too: call .*sample_view"):
        policy.apply(torch.zeros(3, SIZE, SIZE, dtype=torch.uint8), params[sample])


def test_a_rank_mixes_its_samples_with_partners_in_other_ranks_shards_as_one_process_does(folder):
    from kdcache.data import policy_for
    from kdcache.data.mixing import MIX_LABEL, MIX_WEIGHT
    from kdcache.distributed import Shard
    from kdcache.runtime import epoch_generator
    from kdcache.stages.splits import StreamedSplit

    files = load_dataset("imagefolder", folder, "train", image_size=SIZE)
    test = load_dataset("imagefolder", folder, "test", image_size=SIZE)
    policy = policy_for(files, "imagenet", {"mode": "mixup"})
    params = FileBatches(files, policy)[(0, range(len(files.labels)))][2]

    def per_sample(shard):  # sample -> (pixels, partner's label, λ) over one epoch's batches
        split = StreamedSplit(files, test, policy, torch.device("cpu"), 0, shard=shard)
        found = {}
        for x, _, targets in split.batches(0, params, lambda held, images: {"held": held}, 4, epoch_generator(0, 0)):
            for row, held in enumerate(targets["held"].tolist()):
                found[held + shard.samples.start] = (x[row], targets[MIX_LABEL][row], targets[MIX_WEIGHT][row])
        return found

    whole, first = per_sample(Shard.whole(15)), per_sample(Shard(range(0, 8), 15))
    assert any(int(params[sample, policy.partner_column]) >= 8 for sample in first)  # partners on the other rank
    found = {**first, **per_sample(Shard(range(8, 15), 15))}
    assert sorted(found) == sorted(whole)
    for sample, (x, label, weight) in whole.items():
        assert torch.equal(found[sample][0], x) and found[sample][1:] == (label, weight)
