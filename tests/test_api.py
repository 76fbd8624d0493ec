"""The public Python API: its names, CacheDataset under any DataLoader, losses on [B, C] or [B, R, C] logits, and
the README's example, run as written."""

import inspect
import multiprocessing
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

import kdcache
from kdcache.data import normalize
from kdcache.errors import KdcacheError

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = {"open_cache", "TeacherCache", "CacheDataset", "LogitMap", "create_model", "load_dataset", "get_policy",
          "get_loss", "load_checkpoint", "losses", "ModelOutputs", "__version__", "DistillLoss", "RegionStudent",
          "TeacherTargets", "collate"}
from conftest import SCALES, VIEWS  # the digits cache's


def test_every_public_name_is_there_documented_and_typed():
    assert PUBLIC <= set(kdcache.__all__)
    for name in PUBLIC - {"__version__"}:
        value = getattr(kdcache, name)
        assert inspect.getdoc(value), f"kdcache.{name} has no docstring"
        if inspect.isfunction(value):
            hints = inspect.signature(value)
            assert hints.return_annotation is not inspect.Signature.empty, f"kdcache.{name} has no return type"
    assert {"kd", "dkd", "sdd", "sdd_lskd", "sld", "standardize"} <= set(dir(kdcache.losses))
    table = (ROOT / "docs" / "api.md").read_text()
    undocumented = [name for name in set(kdcache.__all__) - {"__version__", "losses"} if f"| `{name}" not in table]
    assert not undocumented, f"docs/api.md's table has no row for {', '.join(sorted(undocumented))}"


def _replayed(dataset, epoch):
    """What items of `epoch` must be: the cache's view e mod K, images replayed from its parameters."""
    with kdcache.open_cache(dataset.path) as cache:
        view = epoch % cache.num_views
        params = torch.from_numpy(cache.aug_params(view)).long()
        targets = torch.from_numpy(cache.view(view)).float()
    images = normalize(dataset.policy.apply(dataset.data.images, params), dataset.data.mean, dataset.data.std)
    return images, targets


def _epoch_through(loader, dataset, epoch):
    dataset.set_epoch(epoch)
    order = []
    for batch_images, labels, targets in loader:
        order.append((batch_images, labels, targets["regions"]))
    return [torch.cat(parts) for parts in zip(*order)]


@pytest.mark.parametrize("context", ["spawn", "forkserver", "fork"])
def test_every_epoch_gives_the_caches_view_e_mod_k_in_workers_of_any_start_method(digits_cache, context):
    if context not in multiprocessing.get_all_start_methods():
        pytest.skip(f"{context} is not available here")
    dataset = kdcache.CacheDataset(digits_cache)  # digits need no data root
    dataset[0]  # the cache is open here now: the workers still get it by path
    persistent = context == "spawn"
    loader = DataLoader(dataset, batch_size=500, num_workers=1, multiprocessing_context=context,
                        persistent_workers=persistent)
    for epoch in (range(VIEWS + 1) if persistent else (1,)):
        images, labels, targets = _epoch_through(loader, dataset, epoch)
        expected_images, expected_targets = _replayed(dataset, epoch)
        torch.testing.assert_close(targets, expected_targets, rtol=0, atol=0)
        torch.testing.assert_close(images, expected_images, rtol=0, atol=0)
        assert torch.equal(labels, dataset.data.labels)


def test_the_dataset_pickles_by_path_and_reads_the_view_after_unpickling(digits_cache):
    dataset = kdcache.CacheDataset(digits_cache, transform=lambda x: x.flip(-1))
    dataset.set_epoch(3)
    image, label, targets = dataset[7]
    copy = pickle.loads(pickle.dumps(kdcache.CacheDataset(digits_cache)))
    copy.set_epoch(3)
    torch.testing.assert_close(copy[7][0].flip(-1), image)  # the transform follows normalisation
    torch.testing.assert_close(copy[7][2]["regions"], targets["regions"])
    assert copy.view == 3 % VIEWS and targets["regions"].shape == (5, 10) and targets["regions"].dtype == torch.float32
    assert int(label) == int(dataset.data.labels[7]) and dataset.scales == SCALES and dataset.num_classes == 10


def test_distributed_sampler_shares_the_samples(digits_cache):
    dataset = kdcache.CacheDataset(digits_cache)
    halves = [list(DistributedSampler(dataset, num_replicas=2, rank=rank, seed=0)) for rank in (0, 1)]
    assert sorted(halves[0] + halves[1]) == list(range(len(dataset)))
    _, labels, targets = next(iter(DataLoader(dataset, batch_size=8, sampler=halves[1])))
    with kdcache.open_cache(digits_cache) as cache:
        np.testing.assert_array_equal(targets["regions"].numpy(), cache.view(0)[halves[1][:8]].astype(np.float32))


LOGITS = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
TEACHER = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
LABELS = torch.arange(6) % 10


@pytest.mark.parametrize("name", ["ce", "kd", "dkd", "kd+ls", "dkd+ls", "sld"])
def test_losses_on_the_global_logit_take_b_c_logits_as_one_region(name):
    loss = kdcache.get_loss(name)
    flat = loss(LOGITS, TEACHER, LABELS, epoch=200)
    torch.testing.assert_close(flat, loss(LOGITS[:, None], TEACHER[:, None], LABELS, epoch=200), rtol=0, atol=0)
    torch.testing.assert_close(flat, loss.compute(LOGITS, TEACHER, LABELS, 200)["total"], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["sdd-kd", "sdd-dkd", "sdd-lskd"])
def test_region_losses_say_they_need_regions_and_how_to_get_them(name):
    with pytest.raises(KdcacheError, match=rf"loss '{name}' distils every region, so it needs region logits "
                                           r"\[B, R, C\], got student logits \(6, 10\): wrap the student in "
                                           r"kdcache.LogitMap\(model, scales\)"):
        kdcache.get_loss(name)(LOGITS, TEACHER, LABELS, epoch=1)


def test_the_pure_functions_take_b_c_and_b_r_c_alike():
    losses = kdcache.losses
    one_region = losses.sdd(LOGITS[:, None], TEACHER[:, None], LABELS, losses.dkd, alpha=1.0, beta=8.0,
                            temperature=4.0)
    torch.testing.assert_close(losses.sdd(LOGITS, TEACHER, LABELS, losses.dkd, alpha=1.0, beta=8.0, temperature=4.0),
                               one_region)
    torch.testing.assert_close(one_region, losses.dkd(LOGITS, TEACHER, LABELS, 1.0, 8.0, 4.0))
    regions = torch.stack([LOGITS, TEACHER.flip(0)], dim=1)  # [B, 2, C]: labels [B] serve every region
    per_region = losses.dkd(regions, regions.flip(1), LABELS, 1.0, 8.0, 4.0, reduction="none")
    torch.testing.assert_close(per_region[:, 1], losses.dkd(TEACHER.flip(0), LOGITS, LABELS, 1.0, 8.0, 4.0,
                                                            reduction="none"))


def test_the_readmes_python_example_runs_as_written(digits_cache, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Use kdcache from Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 15
    monkeypatch.chdir(digits_cache.parent.parent)
    (digits_cache.parent.parent / "caches").mkdir(exist_ok=True)
    link = digits_cache.parent.parent / "caches" / "quickstart-digits.zarr"
    if not link.exists():
        link.symlink_to(digits_cache)
    exec(compile(code, "README.md", "exec"), {})
    assert "loss" in capsys.readouterr().out


def test_distill_states_what_a_view_needs_and_refuses_what_the_machine_lacks(digits_cache, monkeypatch):
    from kdcache.stages.targets import require_target_memory

    with kdcache.open_cache(digits_cache) as cache:
        view = len(cache.labels()) * 5 * 10 * 2  # samples x regions x classes x fp16
        statement = require_target_memory(cache, None, torch.device("cpu"), host_available=3 * view)
        assert statement == (f"each view of {digits_cache} takes {view / 1e6:.1f} MB ({len(cache.labels())} samples "
                             f"of all 5 x 10 logits); training holds {3 * view / 1e6:.1f} MB of it in host memory")
        with pytest.raises(KdcacheError) as refused:  # a DDP rank's 500 samples
            require_target_memory(cache, range(0, 500), torch.device("cpu"), host_available=20_000)
        assert "training holds 0.1 MB of it in host memory: it needs 0.1 MB of host memory but 0.0 MB is " \
               "available. Dump a smaller cache (--topk, fewer --scales)" in str(refused.value)
        monkeypatch.setattr("kdcache.stages.targets.SUGGESTED_TOPK", 4)  # below digits' 10 classes
        with pytest.raises(KdcacheError, match=r"a cache dumped with --topk 4 takes 0\.1 MB per view$"):
            require_target_memory(cache, None, torch.device("cpu"), host_available=1)  # 5 x (4 x 4 + 2) B/sample
        with pytest.raises(KdcacheError, match="on cuda:0 but"):
            require_target_memory(cache, None, torch.device("cuda:0"), host_available=10 * view, device_available=1)
