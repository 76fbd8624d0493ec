"""Several views per step (SLD's official two-view step): each step trains on the same samples under views e·S to
e·S + S - 1, their losses summed, exactly as a hand-written two-forward step does."""

import pytest
import torch

from small_runs import saved_teacher, synthetic_splits
from kdcache.cache import open_cache
from kdcache.config import DistillConfig, TrainConfig
from kdcache.data import get_policy, normalize
from kdcache.errors import KdcacheError
from kdcache.losses import get_loss
from kdcache.models import LogitMap, create_model, file_sha256
from kdcache.runtime import epoch_generator
from kdcache.stages import distill
from kdcache.stages.dump import dump_teacher
from kdcache.stages.loop import Run

CLASSES, CPU = 4, torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    return synthetic_splits(32, CLASSES, seed=2)


@pytest.fixture(scope="module")
def cache(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    teacher, path = saved_teacher(folder, CLASSES, seed=1)
    info = {"arch": "resnet8", "num_classes": CLASSES, "checkpoint": str(path), "checkpoint_sha256": file_sha256(path)}
    dump_teacher(teacher, info, data[0], get_policy("cifar"), folder / "c.zarr", views=4, scales=(1,),
                 dtype="float32", block_size=16, show_progress=False)
    return folder / "c.zarr"


def test_a_two_view_step_sums_both_views_losses_as_a_hand_written_step_does(tmp_path):
    torch.manual_seed(0)
    labels = torch.arange(8) % CLASSES
    views = [(torch.randn(8, 3, 16, 16), labels, {"regions": torch.randn(8, 1, CLASSES)}) for _ in range(2)]
    loss = get_loss("sld")
    config = TrainConfig(batch_size=8, lr=0.1, momentum=0.9, weight_decay=5e-4, lr_decay_at=())
    torch.manual_seed(1)
    run = Run("r", create_model("resnet8", num_classes=CLASSES), loss, (1,), config, tmp_path, CPU, {})
    before = {name: value.clone() for name, value in run.model.state_dict().items()}
    terms = run.train_epoch(199, iter([tuple(views)]), 1, show_progress=False)  # epoch 200: the student swap is on
    torch.manual_seed(1)
    model = create_model("resnet8", num_classes=CLASSES).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    by_view = [loss.compute(LogitMap(model, (1,))(x), t, y, 200) for x, y, t in views]
    optimizer.zero_grad()
    (by_view[0]["total"] + by_view[1]["total"]).backward()
    optimizer.step()
    for (name, ours), theirs in zip(run.model.state_dict().items(), model.state_dict().values()):
        if ours.is_floating_point():  # the updates, so a step on one view alone cannot pass
            torch.testing.assert_close(ours - before[name], theirs - before[name], rtol=1e-4, atol=1e-7, msg=name)
    summed = float(by_view[0]["student_swap"].detach() + by_view[1]["student_swap"].detach())
    assert terms["loss_student_swap"] == pytest.approx(summed, rel=1e-5) and summed > 0
    assert terms["train_acc"] * 16 == pytest.approx(round(terms["train_acc"] * 16))  # counted over both views


def test_epoch_e_trains_on_views_2e_and_2e_plus_1_of_the_same_samples(cache, data, tmp_path, monkeypatch):
    seen = []
    update = Run.update

    def recording_update(self, outputs, views, epoch, share, peers=()):
        if len(seen) <= epoch:
            seen.append([(x.clone(), t["regions"].clone()) for x, _, t in views])
        return update(self, outputs, views, epoch, share, peers)

    monkeypatch.setattr(Run, "update", recording_update)
    distill(DistillConfig(cache=str(cache), students=("resnet8",), losses=("sld",), epochs=2, batch_size=8,
                          views_per_step=2, out=str(tmp_path / "runs"), device="cpu"), show_progress=False, data=data)
    train, policy = data[0], get_policy("cifar")
    with open_cache(cache) as opened:
        for epoch, views in enumerate(seen):
            first = torch.randperm(32, generator=epoch_generator(0, epoch))[:8]
            for place, (x, regions) in enumerate(views):
                view = 2 * epoch + place
                params = torch.from_numpy(opened.aug_params(view)).long()[first]
                expected = normalize(policy.apply(train.images[first], params), train.mean, train.std)
                assert torch.equal(x, expected), (epoch, place)
                assert torch.equal(regions, torch.from_numpy(opened.view(view))[first]), (epoch, place)


def test_several_views_per_step_are_refused_off_the_device_path(cache, data, tmp_path):
    with pytest.raises(KdcacheError, match="--views-per-step: expected 1, or more on --batch-path device"):
        distill(DistillConfig(cache=str(cache), epochs=1, batch_size=8, views_per_step=2, batch_path="dataset",
                              out=str(tmp_path / "r"), device="cpu"), show_progress=False, data=data)
