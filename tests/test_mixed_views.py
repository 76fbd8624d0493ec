"""Mixup, CutMix and RandAugment as views: drawn once, stored, replayed to the pixels torchvision gives; the cache
holds the teacher on the mixed image, and both batch paths give the student the same pixels and labels."""

import numpy as np
import pytest
import torch
from console import run_cli
from torchvision.transforms import RandAugment

from small_runs import saved_teacher, synthetic_splits
from kdcache.cache import open_cache
from kdcache.config import DistillConfig, DumpConfig
from kdcache.data import (
    Identity,
    get_policy,
    normalize,
    policy_for,
    stored_policy,
)
from kdcache.data.mixing import (
    LAMBDA_UNITS,
    MIX_LABEL,
    MIX_WEIGHT,
    Mixed,
    mix_targets,
    replay,
    soft_labels,
)
from kdcache.data.randaugment import OPS, SIGNED, RandAugmented, RandAugmentOps
from kdcache.errors import KdcacheError
from kdcache.losses import get_loss
from kdcache.models import file_sha256
from kdcache.runtime import epoch_generator
from kdcache.stages import (
    CacheDataset,
    CachedTargets,
    CachedViews,
    LiveTeacher,
    device_batches,
    distill,
)
from kdcache.stages.dump import dump_from_config, dump_teacher

CLASSES, SIZE = 4, 16
MIXES = [{"mode": "mixup", "alpha": 1.0, "prob": 0.75}, {"mode": "cutmix", "alpha": 1.0, "prob": 0.75}]


@pytest.fixture(scope="module")
def data():
    return synthetic_splits(48, CLASSES, seed=5, image_size=SIZE)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return saved_teacher(tmp_path_factory.mktemp("teacher"), CLASSES, seed=1)


@pytest.fixture(scope="module", params=["mixup", "cutmix", "randaugment"])
def cache(request, data, teacher, tmp_path_factory):
    """A float32 cache of 2 views: RandAugment views mixed (mixup, CutMix), or RandAugment alone."""
    model, checkpoint = teacher
    mix = next((mix for mix in MIXES if mix["mode"] == request.param), None)
    policy = policy_for(data[0], "randaugment", mix)
    info = {"arch": "resnet8", "num_classes": CLASSES, "checkpoint": str(checkpoint),
            "checkpoint_sha256": file_sha256(checkpoint)}
    path = tmp_path_factory.mktemp(request.param) / "c.zarr"
    dump_teacher(model, info, data[0], policy, path, views=2, scales=(1, 2), dtype="float32", block_size=20,
                 show_progress=False)
    return path


def torchvision_draws(seed, num_ops, magnitude):
    """The (op, signed magnitude) parameters torchvision's RandAugment draws after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    row = []
    for _ in range(num_ops):
        op = int(torch.randint(len(OPS), (1,)).item())
        negative = OPS[op] in SIGNED and bool(torch.randint(2, (1,)))
        row += [op, -magnitude if negative else magnitude]
    return torch.tensor([row])


@pytest.mark.parametrize("num_ops,magnitude", [(2, 9), (3, 30), (1, 0)])
def test_randaugment_replay_equals_torchvisions_randaugment_for_the_same_draws(data, num_ops, magnitude):
    policy = RandAugmented(Identity(), RandAugmentOps(num_ops, magnitude))
    images = data[0].images
    for seed in range(40):
        params = torchvision_draws(seed, num_ops, magnitude)
        torch.manual_seed(seed)
        expected = RandAugment(num_ops, magnitude)(images[seed])
        assert torch.equal(policy.apply(images[seed:seed + 1], params)[0], expected), (seed, params)


def test_randaugment_applies_every_op_of_a_batch_as_one_image_at_a_time_would(data):
    policy = get_policy("randaugment")
    params = policy.sample(torch.Generator().manual_seed(0), 48)
    batch = policy.apply(data[0].images, params)
    alone = torch.cat([policy.apply(data[0].images[i:i + 1], params[i:i + 1]) for i in range(48)])
    assert torch.equal(batch, alone)
    assert set(params[:, 3::2].flatten().tolist()) > {0, 13}  # ops drawn across the whole set


def test_randaugment_draws_stay_in_range_and_altered_ones_are_flagged():
    policy = get_policy("randaugment", num_ops=2, magnitude=9)
    params = policy.sample(torch.Generator().manual_seed(0), 2000)
    assert not policy.out_of_range(params).any()
    unsigned = ~torch.tensor([op in SIGNED for op in OPS])[params[:, 3]]
    assert (params[unsigned, 4] == 9).all() and (params[~unsigned, 4] == -9).any()
    for column, value in ((3, 14), (4, 8), (0, 9)):
        altered = params[:5].clone()
        altered[2, column] = value
        assert policy.out_of_range(altered).tolist() == [False, False, True, False, False]


def constant_images(count):
    """Sample i is the constant image 5·i + 1, so every mixed pixel tells which samples and weights made it."""
    return (torch.arange(count, dtype=torch.uint8) * 5 + 1).view(count, 1, 1, 1).expand(count, 3, SIZE, SIZE).clone()


def test_mixup_pixels_are_the_rounded_weighted_sum_of_the_two_base_views(data):
    policy = Mixed(get_policy("cifar"), "mixup", (SIZE, SIZE), alpha=0.4, prob=0.5)
    images, params = data[0].images, policy.sample(torch.Generator().manual_seed(3), 48)
    mixed = replay(policy, images, params, torch.arange(48))
    partner, units = params[:, 3], params[:, 4]
    base = get_policy("cifar").apply(images, params[:, :3])
    lam = (units.double() / LAMBDA_UNITS).view(-1, 1, 1, 1)
    expected = torch.floor(lam * base.double() + (1 - lam) * base[partner].double() + 0.5).to(torch.uint8)
    assert torch.equal(mixed, expected)
    unmixed = units == LAMBDA_UNITS
    assert torch.equal(partner[unmixed], torch.arange(48)[unmixed]) and 0 < int(unmixed.sum()) < 48
    torch.testing.assert_close(policy.label_weight(params), (units / LAMBDA_UNITS).float())


def test_cutmix_pastes_the_partners_box_and_its_weight_is_the_uncovered_share():
    policy = Mixed(Identity(), "cutmix", (SIZE, SIZE), alpha=1.0, prob=1.0)
    images = constant_images(40)
    params = policy.sample(torch.Generator().manual_seed(4), 40)
    mixed = replay(policy, images, params, torch.arange(40))
    partner, (top, left, box_h, box_w) = params[:, 0], params[:, 1:].unbind(dim=1)
    for i in range(40):
        expected = images[i].clone()
        expected[:, top[i]:top[i] + box_h[i], left[i]:left[i] + box_w[i]] = images[partner[i], 0, 0, 0]
        assert torch.equal(mixed[i], expected), i
    own = (mixed == images).flatten(1).float().mean(dim=1)
    differs = partner != torch.arange(40)
    torch.testing.assert_close(policy.label_weight(params)[differs], own[differs])
    assert not policy.out_of_range(params).any() and (box_h * box_w).float().mean() > 0
    for column, value in ((0, 40), (0, -1), (3, SIZE + 1)):  # a partner past the view's rows, a box past the image
        altered = params.clone()
        altered[5, column] = value
        assert torch.nonzero(policy.out_of_range(altered)).flatten().tolist() == [5]


def test_mixing_draws_are_a_function_of_the_seed_and_mix_the_share_prob_asks():
    policy = Mixed(get_policy("cifar"), "mixup", (SIZE, SIZE), alpha=1.0, prob=0.3)
    first, again = (policy.sample(torch.Generator().manual_seed(9), 4000) for _ in range(2))
    assert torch.equal(first, again)
    mixed = (first[:, 4] != LAMBDA_UNITS).float().mean()
    assert abs(float(mixed) - 0.3) < 0.03
    assert abs(float(first[first[:, 4] != LAMBDA_UNITS, 4].float().mean()) / LAMBDA_UNITS - 0.5) < 0.03  # Beta(1, 1)


def test_the_cross_entropy_of_mixed_labels_is_the_lambda_weighted_sum_of_both_labels():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    labels, partner = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([1, 1, 0, 4, 2, 3])
    lam = torch.tensor([0.2, 1.0, 0.7, 0.5, 0.0, 0.9], dtype=torch.float64)
    soft, rest = soft_labels(labels, {MIX_LABEL: partner, MIX_WEIGHT: lam}, 5)
    clear = lam != 0.5
    assert rest is None and torch.equal(soft.argmax(1)[clear], torch.where(lam > 0.5, labels, partner)[clear])
    loss = get_loss("ce", label_smoothing=0.1)
    got = loss.ce_term(logits[:, None].float(), soft)
    log_p = torch.log_softmax(logits, dim=1)
    smoothed = lambda y: -(0.9 * log_p.gather(1, y[:, None])[:, 0] + 0.1 * log_p.mean(dim=1))
    expected = (lam * smoothed(labels) + (1 - lam) * smoothed(partner)).mean()
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_cached_logits_equal_the_live_teacher_on_the_replayed_views(cache, data, teacher):
    with open_cache(cache) as opened:
        policy = stored_policy(data[0], opened.spec.augmentation)
        for view in range(2):
            params = CachedViews(opened, policy).params(view)
            x = replay(policy, data[0].images, params, torch.arange(48))
            live = LiveTeacher(teacher[0], (1, 2))(torch.arange(48), normalize(x, data[0].mean, data[0].std))
            torch.testing.assert_close(torch.from_numpy(opened.view(view)), live["regions"], rtol=1e-5, atol=1e-5)


def test_the_device_path_and_the_dataset_give_the_same_pixels_labels_and_targets(cache, data):
    train = data[0]
    with open_cache(cache) as opened:
        policy = stored_policy(train, opened.spec.augmentation)
        dataset = CacheDataset(opened, data=train)
        for epoch in (0, 1):
            dataset.set_epoch(epoch)
            views, targets = CachedViews(opened, policy), CachedTargets(opened)
            targets.begin_epoch(views.view_of(epoch))
            batches = device_batches(train.images, train.labels, views.params(epoch), policy, train.mean, train.std,
                                     targets, 8, epoch_generator(0, epoch))
            order = torch.randperm(48, generator=epoch_generator(0, epoch))
            for number, (x, y, t) in enumerate(batches):
                items = [dataset[int(i)] for i in order[number * 8:(number + 1) * 8]]
                assert torch.equal(x, torch.stack([item[0] for item in items]))
                assert torch.equal(y, torch.stack([item[1] for item in items]))
                assert set(t) == set(items[0][2])
                for name in t:
                    assert torch.equal(t[name], torch.stack([item[2][name] for item in items])), name
        mixing = isinstance(policy, Mixed)
        assert (MIX_WEIGHT in t) == mixing and (not mixing or (t[MIX_WEIGHT] < 1).any())


def test_a_mixed_cache_trains_students_on_both_labels_and_inspect_says_what_accuracy_counts(cache, data, tmp_path,
                                                                                            capsys):
    config = DistillConfig(cache=str(cache), students=("resnet8",), losses=("ce", "sdd-lskd"), epochs=1, batch_size=8,
                           out=str(tmp_path / "runs"), device="cpu")
    runs = distill(config, show_progress=False, data=data)
    assert all(0 <= run.test_acc <= 1 for run in runs)
    code, out, err = run_cli(["inspect", cache], capsys)
    assert code == 0, err
    assert "RandAugment 2 ops at magnitude 9 of 31" in out
    with open_cache(cache) as opened:
        mixed = "mix" in opened.spec.augmentation
    assert ("against the sample's own label" in out) == mixed


def test_mix_targets_of_an_unmixed_policy_are_none_and_labels_pass_through(data):
    policy = get_policy("cifar")
    params = policy.sample(torch.Generator().manual_seed(0), 48)
    assert mix_targets(policy, data[0].labels, params, torch.arange(4)) == {}
    labels = torch.tensor([1, 2])
    assert soft_labels(labels, {"regions": torch.zeros(2)}, 4)[0] is labels


def test_dump_from_config_stores_the_options_and_views_from_replays_them(data, teacher, tmp_path, monkeypatch):
    import kdcache.stages.dump as dump_module

    monkeypatch.setattr(dump_module, "load_dataset", lambda *args, **kwargs: data[0])
    common = dict(checkpoint=str(teacher[1]), teacher="resnet8", dataset="synthetic", views=2, scales=(1,),
                  device="cpu", block_size=20)
    dump_from_config(DumpConfig(**common, augmentation="randaugment", ra_ops=3, ra_magnitude=12, mix="cutmix",
                                mix_alpha=0.5, mix_prob=0.6, out=str(tmp_path / "a.zarr")), show_progress=False)
    second = {**common, "views": None, "views_from": str(tmp_path / "a.zarr"), "out": str(tmp_path / "b.zarr")}
    dump_from_config(DumpConfig(**second), show_progress=False)  # it checks every stored view parameter is equal
    with open_cache(tmp_path / "a.zarr") as a, open_cache(tmp_path / "b.zarr") as b:
        assert a.spec.augmentation == b.spec.augmentation
        assert a.spec.augmentation["randaugment"]["num_ops"] == 3 and a.spec.augmentation["mix"]["prob"] == 0.6
        np.testing.assert_array_equal(a.aug_params(1), b.aug_params(1))


def test_options_that_cannot_apply_are_refused_in_one_line(data):
    with pytest.raises(KdcacheError, match="takes no option num_ops"):
        get_policy("cifar", num_ops=2)
    with pytest.raises(KdcacheError, match="--ra-magnitude < 31"):
        get_policy("randaugment", magnitude=31)
    with pytest.raises(KdcacheError, match="unknown mode 'mixmatch'"):
        policy_for(data[0], "cifar", {"mode": "mixmatch"})
    with pytest.raises(KdcacheError, match="--mix-alpha > 0"):
        policy_for(data[0], "cifar", {"mode": "mixup", "alpha": 0.0})
    with pytest.raises(KdcacheError, match="--views instead of --exhaustive"):
        policy_for(data[0], "cifar", MIXES[0]).enumerate()
    with pytest.raises(KdcacheError, match="partner's image"):
        policy_for(data[0], "cifar", MIXES[1]).apply(data[0].images[:2], torch.zeros(2, 8, dtype=torch.long))




@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_views_replay_to_the_same_pixels_on_cuda_as_on_the_cpu(data):
    images = data[0].images
    for mix in MIXES:
        policy = policy_for(data[0], "cifar", mix)
        params = policy.sample(torch.Generator().manual_seed(0), 48)
        cpu = replay(policy, images, params, torch.arange(48))
        assert torch.equal(replay(policy, images.cuda(), params.cuda(), torch.arange(48).cuda()).cpu(), cpu)
    policy = get_policy("randaugment")
    params = policy.sample(torch.Generator().manual_seed(0), 48)
    cpu, cuda = policy.apply(images, params), policy.apply(images.cuda(), params.cuda()).cpu()
    # the colour ops blend in float32 and the geometric ops sample a float grid: within one grey level almost
    # everywhere
    assert (cpu.int() - cuda.int()).abs().le(1).float().mean() > 0.99
