"""Every family from one cache (#18): the teacher's embedding, attention maps and hints cached beside its region
logits, equal to the live teacher's on the replayed views; students giving the same outputs through their own
stages; losses summed in one run; several teachers on the same views."""

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from small_runs import saved_teacher, synthetic_splits
from kdcache.cache import open_cache
from kdcache.cache.layout import WRITTEN_VERSION
from kdcache.config import DistillConfig, DumpConfig
from kdcache.data import get_policy, load_dataset, normalize
from kdcache.errors import KdcacheError
from kdcache.losses import at, attention_map, fitnet, get_loss, rkd_angle, rkd_distance, scaled_loss, sp
from kdcache.losses.spec import LossSum
from kdcache.models import LogitMap, create_model, file_sha256, read_checkpoint, save_checkpoint
from kdcache.models.outputs import (
    HintRegressor,
    ModelOutputs,
    feature_stages,
    paired_stage,
    parse_outputs,
)
from kdcache.stages import CacheDataset, CachedTargets, CachedViews, device_batches, distill
from kdcache.stages.dump import dump_from_config, dump_teacher
from kdcache.stages.targets import EnsembleTargets, ensemble_logits
from kdcache.runtime import epoch_generator

CLASSES, OUTPUTS = 4, ("regions", "embedding", "attention/layer1", "attention/layer2", "hint/layer2")


@pytest.fixture(scope="module")
def data():
    return synthetic_splits(32, CLASSES, seed=3)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return saved_teacher(tmp_path_factory.mktemp("teacher"), CLASSES, seed=2)


def dump(teacher, data, path, outputs=OUTPUTS, **options):
    model, checkpoint = teacher
    info = {"arch": "resnet8", "num_classes": CLASSES, "checkpoint": str(checkpoint),
            "checkpoint_sha256": file_sha256(checkpoint)}
    dump_teacher(model, info, data[0], get_policy("cifar"), path, views=2, scales=(1, 2), block_size=16,
                 outputs=outputs, show_progress=False, **options)
    return path


@pytest.fixture(scope="module")
def cache(teacher, data, tmp_path_factory):
    return dump(teacher, data, tmp_path_factory.mktemp("outputs") / "c.zarr")


# -- the model interface ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["resnet8", "wrn_16_2", "vgg8", "shufflev1", "mobilenetv2", "torchvision:resnet18",
                                  "torchvision:shufflenet_v2_x0_5", "timm:resnet10t"])
def test_every_family_names_stages_whose_outputs_are_feature_maps(spec):
    model = create_model(spec, num_classes=CLASSES).eval()
    stages = feature_stages(model)
    assert len(stages) >= 3
    outputs = ModelOutputs(model, (1,), parse_outputs("attention", model))
    with torch.no_grad():
        found = outputs(torch.randn(2, 3, 32, 32))
    assert [name.split("/", 1)[1] for name in found if name != "regions"] == stages
    assert all(value.dim() == 3 and len(value) == 2 for name, value in found.items() if name != "regions")


def test_outputs_are_their_definitions_computed_by_hand():
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=CLASSES).eval()
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        found = ModelOutputs(model, (1, 2), OUTPUTS)(images)
        stem = F.relu(model.bn1(model.conv1(images)))
        layer1 = model.layer1(stem)
        layer2 = model.layer2(layer1)
        features = model.layer3(layer2)
        assert torch.equal(found["regions"], LogitMap(model, (1, 2))(images))
    torch.testing.assert_close(found["embedding"], features.mean((2, 3)))
    torch.testing.assert_close(found["attention/layer1"], attention_map(layer1))
    torch.testing.assert_close(found["attention/layer2"], attention_map(layer2))
    torch.testing.assert_close(found["hint/layer2"], layer2)
    assert list(found) == list(OUTPUTS)


def test_outputs_parse_every_form_and_refuse_what_the_model_lacks():
    model = create_model("resnet8", num_classes=CLASSES)
    assert parse_outputs("embedding,attention,hint", model) == (
        "regions", "embedding", "attention/layer1", "attention/layer2", "attention/layer3", "hint/layer2")
    assert parse_outputs("attention:layer3,hint:layer1", model) == ("regions", "attention/layer3", "hint/layer1")
    with pytest.raises(KdcacheError, match="no stage 'layer9'; its stages are layer1, layer2, layer3"):
        parse_outputs("hint:layer9", model)
    with pytest.raises(KdcacheError, match="unknown output 'logits'"):
        parse_outputs("logits", model)
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, CLASSES))
    with pytest.raises(KdcacheError, match="names no stages.*feature_info"):
        parse_outputs("attention", plain)


def test_a_student_stage_pairs_with_the_teacher_stage_at_the_same_place_from_the_last():
    teacher = ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert paired_stage(["a", "b", "c"], teacher, "layer4") == "c"
    assert paired_stage(["a", "b", "c"], teacher, "layer2") == "a"
    with pytest.raises(KdcacheError, match="3 stages .*too few to pair with the teacher's stage 'layer1', number 4"):
        paired_stage(["a", "b", "c"], teacher, "layer1")


@pytest.mark.parametrize("size", [4, 8, 16])
def test_the_hint_regressor_maps_any_student_stage_to_the_hints_channels_and_size(size):
    regressor = HintRegressor(16, (32, 8, 8))
    assert regressor(torch.randn(2, 16, size, size)).shape == (2, 32, 8, 8)


# -- the cache -------------------------------------------------------------------------------------------------------
def test_cached_outputs_equal_the_live_teachers_on_the_replayed_views(cache, teacher, data):
    live = ModelOutputs(teacher[0], (1, 2), OUTPUTS).eval()
    with open_cache(cache) as opened:
        assert opened.spec.format_version == WRITTEN_VERSION and list(opened.spec.outputs) == list(OUTPUTS[1:])
        assert opened.spec.outputs["hint/layer2"] == [32, 8, 8] and opened.spec.teacher["stages"][0] == "layer1"
        targets = CachedTargets(opened, outputs=OUTPUTS[1:])
        for view in range(2):
            params = torch.from_numpy(opened.aug_params(view)).long()
            x = normalize(get_policy("cifar").apply(data[0].images, params), data[0].mean, data[0].std)
            with torch.no_grad():
                expected = live(x)
            targets.begin_epoch(view)
            given = targets(torch.arange(32), x)
            assert set(given) == set(OUTPUTS)
            for name, value in expected.items():
                torch.testing.assert_close(given[name], value.half().float(), rtol=2e-3, atol=2e-3, msg=name)


@pytest.mark.parametrize("epoch", [0, 1])
def test_the_device_path_and_the_dataset_give_the_same_outputs(cache, data, epoch):
    train, policy = data[0], get_policy("cifar")
    with open_cache(cache) as opened:
        dataset = CacheDataset(opened, data=train)
        dataset.set_epoch(epoch)
        views = CachedViews(opened, policy)
        targets = CachedTargets(opened, outputs=OUTPUTS[1:])
        targets.begin_epoch(views.view_of(epoch))
        order = torch.randperm(32, generator=epoch_generator(0, epoch))
        batches = device_batches(train.images, train.labels, views.params(epoch), policy, train.mean, train.std,
                                 targets, 8, epoch_generator(0, epoch))
        for number, (x, _, t) in enumerate(batches):
            items = [dataset[int(i)] for i in order[number * 8:(number + 1) * 8]]
            assert torch.equal(x, torch.stack([item[0] for item in items]))
            for name in OUTPUTS:
                assert torch.equal(t[name], torch.stack([item[2][name] for item in items])), name


def test_a_loss_needing_an_output_the_cache_lacks_is_refused_before_training(teacher, data, tmp_path):
    plain = dump(teacher, data, tmp_path / "plain.zarr", outputs=("regions",))
    with pytest.raises(KdcacheError, match=r"loss at reads the teacher's attention outputs, but cache .* holds "
                                           r"regions: .*dump-teacher --views-from .*--outputs regions,attention"):
        distill(DistillConfig(cache=str(plain), students=("resnet8",), losses=("at",), epochs=1, batch_size=8,
                              out=str(tmp_path / "runs"), device="cpu"), show_progress=False, data=data)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(KdcacheError, match="holds regions, not embedding"):
        CacheDataset(plain, data=data[0], outputs=("embedding",))
    with open_cache(plain) as opened, pytest.raises(KdcacheError, match="holds regions, not embedding: .*--outputs "
                                                                         "regions,embedding"):
        CachedTargets(opened, outputs=("embedding",))


def test_the_dump_prints_each_outputs_bytes_per_view_first(teacher, data, tmp_path, capsys):
    model, checkpoint = teacher
    info = {"arch": "resnet8", "num_classes": CLASSES, "checkpoint_sha256": file_sha256(checkpoint)}
    dump_teacher(model, info, data[0], get_policy("cifar"), tmp_path / "d.zarr", views=2, scales=(1, 2),
                 outputs=("regions", "hint/layer2"), show_progress=True)
    # 32 samples of float16: 5 regions x 4 classes of logits (1.3 kB), a 32 x 8 x 8 hint (131 kB)
    assert capsys.readouterr().out.splitlines()[0] == (
        "each view holds 0.1 MB before compression (32 samples: region logits 0.0 MB, hint/layer2 0.1 MB); 2 views")


# -- losses ----------------------------------------------------------------------------------------------------------
def test_a_sum_of_losses_adds_each_losses_terms_and_cross_entropy_once():
    torch.manual_seed(0)
    student = {"regions": torch.randn(6, 5, CLASSES), "embedding": torch.randn(6, 8)}
    teacher = {"regions": torch.randn(6, 5, CLASSES), "embedding": torch.randn(6, 12)}
    labels = torch.randint(0, CLASSES, (6,))
    total = scaled_loss("sdd-lskd,rkd=2", {}, 240)
    assert isinstance(total, LossSum) and total.term_names == ("ce", "sdd", "rkd_distance", "rkd_angle", "total")
    terms = total.compute(student, teacher, labels, 30)
    alone = get_loss("sdd-lskd").compute(student, teacher, labels, 30)
    assert torch.equal(terms["ce"], alone["ce"]) and torch.equal(terms["sdd"], alone["sdd"])
    torch.testing.assert_close(terms["rkd_distance"], 2 * 25 * rkd_distance(student["embedding"], teacher["embedding"]))
    torch.testing.assert_close(terms["rkd_angle"], 2 * 50 * rkd_angle(student["embedding"], teacher["embedding"]))
    torch.testing.assert_close(terms["total"], sum(value for name, value in terms.items() if name != "total"))
    with pytest.raises(KdcacheError, match="kd would be counted twice"):
        scaled_loss("kd,kd+ls", {}, 240)
    with pytest.raises(KdcacheError, match="no number after '='"):
        scaled_loss("kd,rkd=x", {}, 240)
    with pytest.raises(KdcacheError, match="--alpha applies to none of the losses"):
        scaled_loss("kd,rkd", {"alpha": 2.0}, 240)


def test_feature_and_relation_terms_sum_over_every_teachers_outputs():
    torch.manual_seed(0)
    maps = {name: F.normalize(torch.rand(4, 8, 8).flatten(1), dim=1).view(4, 8, 8)
            for name in ("attention/layer1", "attention/layer1#1")}
    student = {"regions": torch.randn(4, 1, CLASSES), "embedding": torch.randn(4, 6), "embedding#1": None,
               "attention/layer1": attention_map(torch.randn(4, 3, 4, 4)),
               "attention/layer1#1": attention_map(torch.randn(4, 3, 8, 8)),
               "hint/layer2": torch.randn(4, 5, 2, 2), "hint/layer2#1": torch.randn(4, 7, 2, 2)}
    student["embedding#1"] = student["embedding"]
    teacher = {"regions": torch.randn(4, 1, CLASSES), "embedding": torch.randn(4, 9), "embedding#1": torch.randn(4, 3),
               **maps, "hint/layer2": torch.randn(4, 5, 2, 2), "hint/layer2#1": torch.randn(4, 7, 2, 2)}
    labels = torch.arange(4) % CLASSES
    terms = {name: get_loss(name, distill_weight=1.0).compute(student, teacher, labels, 1)
             for name in ("at", "sp", "fitnet")}
    pairs = ("", "#1")
    torch.testing.assert_close(terms["at"]["at"], at([student[f"attention/layer1{s}"] for s in pairs],
                                                     [teacher[f"attention/layer1{s}"] for s in pairs]))
    torch.testing.assert_close(terms["sp"]["sp"], sum(sp(student[f"embedding{s}"], teacher[f"embedding{s}"])
                                                      for s in pairs))
    torch.testing.assert_close(terms["fitnet"]["fitnet"], sum(fitnet(student[f"hint/layer2{s}"],
                                                                     teacher[f"hint/layer2{s}"]) for s in pairs))


def test_the_ensemble_is_the_log_of_the_weighted_mean_probability():
    torch.manual_seed(0)
    logits = [torch.randn(5, 3, 7) * 4 for _ in range(3)]
    weights = [0.2, 0.5, 0.3]
    expected = sum(w * torch.softmax(z.double(), -1) for w, z in zip(weights, logits)).log()
    torch.testing.assert_close(ensemble_logits(logits, torch.tensor(weights).log().tolist()).double(), expected,
                               rtol=1e-5, atol=1e-5)

    class Fixed:
        def __init__(self, found):
            self.found = found

        def begin_epoch(self, view, next_view=None):
            pass

        def __call__(self, indices, images):
            return self.found

    ensemble = EnsembleTargets([Fixed({"regions": logits[0], "embedding": torch.ones(5, 2)}),
                                Fixed({"regions": logits[1], "embedding": torch.zeros(5, 4)})], [1.0, 3.0])
    given = ensemble(torch.arange(5), None)
    assert list(given) == ["regions", "embedding", "embedding#1"] and given["embedding#1"].shape == (5, 4)
    torch.testing.assert_close(given["regions"].exp(), 0.25 * logits[0].softmax(-1) + 0.75 * logits[1].softmax(-1))


# -- runs ------------------------------------------------------------------------------------------------------------
def config(tmp_path, name, **fields):
    return DistillConfig(**{"students": ("resnet8",), "epochs": 2, "batch_size": 8, "out": str(tmp_path / name),
                            "device": "cpu", **fields})


def test_a_summed_run_has_a_metrics_column_per_term_and_fitnet_saves_its_regressor(cache, data, tmp_path):
    runs = distill(config(tmp_path, "runs", cache=str(cache), losses=("sdd-lskd,fitnet",)), show_progress=False,
                   data=data)
    folder = runs[0].folder
    assert folder.name == "resnet8-sdd-lskd+fitnet"
    with open(folder / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert {"loss_ce", "loss_sdd", "loss_fitnet", "loss_total"} <= set(rows[0]) and len(rows) == 2
    assert all(float(row["loss_fitnet"]) > 0 for row in rows)
    saved = read_checkpoint(folder / "regressors.pt")
    assert saved["outputs"] == ["hint/layer2"] and saved["model"]["0.conv.weight"].shape == (32, 32, 1, 1)
    last = read_checkpoint(folder / "last.pt")
    assert all(torch.equal(last["regressors"][key], value) for key, value in saved["model"].items())


def test_a_fitnet_run_resumed_after_its_first_epoch_ends_with_the_weights_of_an_uninterrupted_one(
        cache, data, tmp_path, monkeypatch):
    from interrupt import interrupted_after_first_epoch

    whole = distill(config(tmp_path, "whole", cache=str(cache), losses=("fitnet",)), show_progress=False, data=data)
    interrupted_after_first_epoch(monkeypatch, lambda: distill(config(tmp_path, "part", cache=str(cache),
                                                                      losses=("fitnet",)), show_progress=False,
                                                               data=data))
    resumed = distill(config(tmp_path, "part", cache=str(cache), losses=("fitnet",), resume=True),
                      show_progress=False, data=data)
    for name in ("model.pt", "regressors.pt"):  # the regressor's weights and momentum came back with the model's
        a, b = (read_checkpoint(run[0].folder / name)["model"] for run in (whole, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name


def test_a_second_teacher_on_the_same_views_trains_the_ensemble_and_other_views_are_refused(cache, teacher, data,
                                                                                            tmp_path):
    torch.manual_seed(7)
    other = (create_model("resnet8", num_classes=CLASSES).eval(), tmp_path / "other.pt")
    save_checkpoint(other[1], other[0])
    second = dump(other, data, tmp_path / "b.zarr", outputs=("regions", "embedding"))
    runs = distill(config(tmp_path, "ens", cache=str(cache), extra_caches=(str(second),), teacher_weights=(1.0, 3.0),
                          losses=("kd,rkd",), epochs=1), show_progress=False, data=data)
    record = json.loads((runs[0].folder / "model.json").read_text())
    assert record["teacher_weights"] == [1.0, 3.0] and len(record["ensemble"]) == 2
    with open(runs[0].folder / "metrics.csv") as file:
        assert {"loss_kd", "loss_rkd_distance", "loss_rkd_angle"} <= set(next(csv.DictReader(file)))
    with open_cache(cache) as first, open_cache(second) as opened:
        ensemble = EnsembleTargets([CachedTargets(first), CachedTargets(opened)], [1.0, 3.0])
        ensemble.begin_epoch(1)
        expected = 0.25 * torch.from_numpy(first.view(1)).float().softmax(-1) + \
            0.75 * torch.from_numpy(opened.view(1)).float().softmax(-1)
        torch.testing.assert_close(ensemble(torch.arange(32), None)["regions"].exp(), expected)
    dump(teacher, data, tmp_path / "seed1.zarr", outputs=("regions",), seed=1)
    with pytest.raises(KdcacheError, match=r"differ in views.seed \(0 and 1\).*--views-from"):
        distill(config(tmp_path, "bad", cache=str(cache), extra_caches=(str(tmp_path / "seed1.zarr"),),
                       losses=("kd",), epochs=1), show_progress=False, data=data)
    with pytest.raises(KdcacheError, match="expected 2 non-negative weights"):
        distill(config(tmp_path, "bad", cache=str(cache), extra_caches=(str(second),), teacher_weights=(1.0,)),
                show_progress=False, data=data)


def test_dump_teacher_views_from_runs_another_teacher_on_exactly_the_caches_views(tmp_path):
    torch.manual_seed(3)
    checkpoint = tmp_path / "t.pt"
    save_checkpoint(checkpoint, create_model("resnet8", num_classes=10))
    first = dump_from_config(DumpConfig(teacher="resnet8", checkpoint=str(checkpoint), views=2, seed=5, split="test",
                                        out=str(tmp_path / "a.zarr"), device="cpu"), show_progress=False)
    second = dump_from_config(DumpConfig(teacher="resnet8", checkpoint=str(checkpoint), views_from=str(first.path),
                                         outputs="embedding", out=str(tmp_path / "b.zarr"), device="cpu"),
                              show_progress=False)
    with open_cache(first.path) as a, open_cache(second.path) as b:
        assert b.spec.seed == 5 and b.spec.dataset == a.spec.dataset and list(b.spec.outputs) == ["embedding"]
        assert all((a.aug_params(view) == b.aug_params(view)).all() for view in range(2))
        assert (a.view(1) == b.view(1)).all()  # the same teacher on the same views
    with pytest.raises(KdcacheError, match="--views-from takes the views .* drop --views"):
        dump_from_config(DumpConfig(teacher="resnet8", checkpoint=str(checkpoint), views_from=str(first.path),
                                    views=3, out=str(tmp_path / "c.zarr"), device="cpu"), show_progress=False)


def test_a_streamed_splits_cached_outputs_equal_the_live_teachers_on_the_replayed_files(teacher, tmp_path):
    from image_folders import CLASSES as FOLDER_CLASSES, write_folder

    from kdcache.data import policy_for
    from kdcache.data.files import read_image

    files = load_dataset("imagefolder", write_folder(tmp_path / "images"), "train", image_size=24)
    model = create_model("resnet8", num_classes=len(FOLDER_CLASSES)).eval()
    outputs = ("regions", "embedding", "attention/layer3", "hint/layer1")
    info = {"arch": "resnet8", "num_classes": len(FOLDER_CLASSES), "checkpoint_sha256": "0" * 64}
    policy = policy_for(files, "imagenet")
    dump_teacher(model, info, files, policy, tmp_path / "c.zarr", views=2, scales=(1, 2), block_size=4,
                 outputs=outputs, workers=0, show_progress=False)
    live = ModelOutputs(model, (1, 2), outputs).eval()
    with open_cache(tmp_path / "c.zarr") as opened:
        assert opened.spec.streamed and list(opened.spec.outputs) == list(outputs[1:])
        targets = CachedTargets(opened, outputs=outputs[1:], on_host=True)
        for view in range(2):
            params = torch.from_numpy(opened.aug_params(view))
            images = torch.stack([policy.apply(read_image(files.path(i))[0], params[i]) for i in range(len(params))])
            with torch.no_grad():
                expected = live(normalize(images, files.mean, files.std))
            targets.begin_epoch(view)
            given = targets(torch.arange(len(params)), None)
            for name, value in expected.items():
                torch.testing.assert_close(given[name], value.half().float(), rtol=2e-3, atol=2e-3, msg=name)


def test_an_interrupted_dump_of_outputs_resumes_to_the_same_cache_and_verify_finds_a_damaged_output(
        teacher, data, tmp_path, monkeypatch):
    from cache_faults import flip_chunk_byte

    from kdcache.cache import verify
    from kdcache.cache.writer import CacheWriter

    whole = dump(teacher, data, tmp_path / "whole.zarr")
    write_block = CacheWriter.write_block

    def stop_at_the_third(self, view, block, arrays, correct):
        stop_at_the_third.calls += 1
        if stop_at_the_third.calls == 3:
            raise KeyboardInterrupt
        write_block(self, view, block, arrays, correct)

    stop_at_the_third.calls = 0
    monkeypatch.setattr(CacheWriter, "write_block", stop_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        dump(teacher, data, tmp_path / "resumed.zarr")
    monkeypatch.setattr(CacheWriter, "write_block", write_block)
    dump(teacher, data, tmp_path / "resumed.zarr")
    with open_cache(whole) as a, open_cache(tmp_path / "resumed.zarr") as b:
        assert verify(b) == []
        for view in range(2):
            first, second = a.view_arrays(view), b.view_arrays(view)
            assert first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)
    flip_chunk_byte(tmp_path / "resumed.zarr", "attention.layer2", (1, 0, 0, 0))
    with open_cache(tmp_path / "resumed.zarr") as damaged:
        assert [(p.array, p.view, p.block) for p in verify(damaged)] == [("attention.layer2", 1, 0)]
