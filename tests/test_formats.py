"""Formats last: every cache format version kdcache ever wrote is still read, verified and replayed exactly.

Each fixture (tests/fixtures/formats/README.md) was written by the kdcache of its version; its logits must equal
the teacher's on the views replayed from its stored parameters.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.cache import open_cache, verify
from kdcache.cache.layout import DENSE_SINCE, FORMAT_VERSIONS, TOKENS_SINCE, WRITTEN_VERSION
from kdcache.data import get_policy, load_dataset, normalize, policy_for
from kdcache.errors import KdcacheError
from kdcache.models import LogitMap, load_teacher
from kdcache.models.outputs import ModelOutputs
from kdcache.report import describe_cache
from kdcache.stages.dump import dump_teacher
from kdcache.stages.targets import CachedTargets
from kdcache.stages.topk import rebuild_topk
from kdcache.stages.views import require_fits

FIXTURES_DIR = Path(__file__).parent / "fixtures" / "formats"
# file -> (format version, top-k k, progress chunked per view)
FIXTURES = {
    "v1-progress-per-view.zarr": (1, 0, True),
    "v1-progress-per-view.h5": (1, 0, True),
    "v1-progress-per-block.zarr": (1, 0, False),
    "v2-topk.zarr": (2, 2, False),
    "v3.zarr": (3, 0, False),
    "v3-topk.h5": (3, 2, False),
    "v4.zarr": (4, 0, False),
    "v5-outputs.zarr": (5, 0, False),
    "v5-topk-outputs.h5": (5, 2, False),
    "v6.zarr": (6, 0, False),
    "v7.zarr": (7, 0, False),
}
# token caches (format 6 on): file -> (format version, k, log-probabilities' width, their largest decoding error)
TOKEN_FIXTURES = {"v6-tokens.zarr": (6, 4, "q8", 0.05), "v6-tokens-fp16.h5": (6, 4, "fp16", 2e-3),
                  "v7-tokens.zarr": (7, 4, "q8", 0.05)}
# dense caches (format 7 on): file -> (format version, k, output stride)
DENSE_FIXTURES = {"v7-dense.zarr": (7, 0, 4), "v7-dense-topk.h5": (7, 2, 8)}
TEXT_TEACHER = "gpt:layers=1,width=16,heads=2"
STREAMED_FIXTURE = "v4-files.zarr"  # format 4 over the image folder images/, streamed
SCALES = (1, 2)


@pytest.fixture(scope="module")
def teacher_and_data():
    model, info = load_teacher(FIXTURES_DIR / "teacher.pt", "resnet8", 4)
    return model, info, load_dataset("synthetic", num_samples=24, num_classes=4, image_size=16)


def test_every_format_version_has_a_fixture():
    assert {version for version, _, _ in FIXTURES.values()} == set(FORMAT_VERSIONS)
    assert {version for version, *_ in TOKEN_FIXTURES.values()} == {v for v in FORMAT_VERSIONS if v >= TOKENS_SINCE}
    assert {version for version, *_ in DENSE_FIXTURES.values()} == {v for v in FORMAT_VERSIONS if v >= DENSE_SINCE}
    assert max(FORMAT_VERSIONS) == WRITTEN_VERSION


@pytest.mark.parametrize("name", FIXTURES)
def test_a_cache_of_every_version_reads_verifies_and_equals_the_live_teacher(name, teacher_and_data):
    version, topk, per_view = FIXTURES[name]
    model, info, data = teacher_and_data
    with open_cache(FIXTURES_DIR / name) as cache:
        outputs = tuple(cache.spec.outputs)
        logit_map = ModelOutputs(model, SCALES, outputs).eval()
        assert cache.spec.format_version == version and cache.spec.topk == topk
        assert (cache.store.array_info("progress").chunks[0] == 1) == per_view
        assert cache.is_complete() and verify(cache) == []
        assert cache.spec.dataset["fingerprint"] == data.fingerprint
        assert cache.spec.teacher["checkpoint_sha256"] == info["checkpoint_sha256"]
        assert (cache.labels() == data.labels.numpy()).all()
        targets = CachedTargets(cache, SCALES, outputs=outputs)
        for view in range(cache.num_views):
            params = torch.from_numpy(cache.aug_params(view)).long()
            with torch.no_grad():
                live = logit_map(normalize(get_policy("cifar").apply(data.images, params), data.mean, data.std))
            regions = live.pop("regions")
            expected = rebuild_topk(regions, topk, torch.float16) if topk else regions.half().float()
            stored = torch.from_numpy(cache.view(view)).float()
            torch.testing.assert_close(stored, expected, rtol=2e-3, atol=2e-3)
            targets.begin_epoch(view)  # the training path reads the same values
            given = targets(torch.arange(24), None)
            assert torch.equal(given.pop("regions"), stored) and set(given) == set(live) == set(outputs)
            for output, value in live.items():  # the embedding, attention maps and hints (format 5)
                torch.testing.assert_close(given[output], value.half().float(), rtol=2e-3, atol=2e-3)


def test_a_streamed_cache_of_format_4_reads_verifies_and_equals_the_live_teacher_on_the_files(teacher_and_data):
    from kdcache.data.files import read_image

    model, info, _ = teacher_and_data
    logit_map = LogitMap(model, SCALES).eval()
    files = load_dataset("imagefolder", FIXTURES_DIR / "images", "train", image_size=16)
    policy = policy_for(files, "imagenet")
    with open_cache(FIXTURES_DIR / STREAMED_FIXTURE) as cache:
        assert cache.spec.format_version == 4 and cache.spec.streamed and verify(cache) == []
        require_fits(cache, files, policy, SCALES, teacher="resnet8")
        assert "streamed from its files at 16 px" in describe_cache(FIXTURES_DIR / STREAMED_FIXTURE)["text"]
        for view in range(cache.num_views):
            params = torch.from_numpy(cache.aug_params(view))
            images = torch.stack([policy.apply(read_image(files.path(i))[0], params[i]) for i in range(8)])
            with torch.no_grad():
                live = logit_map(normalize(images, files.mean, files.std))
            torch.testing.assert_close(torch.from_numpy(cache.view(view)).float(), live.half().float(), rtol=2e-3,
                                       atol=2e-3)


@pytest.mark.parametrize("name", TOKEN_FIXTURES)
def test_a_token_cache_of_every_version_reads_verifies_and_equals_the_live_teachers_top_k(name):
    from kdcache.stages.text_train import cache_text

    version, k, width, tolerance = TOKEN_FIXTURES[name]
    with open_cache(FIXTURES_DIR / name) as cache:
        assert cache.spec.format_version == version and cache.spec.kind == "tokens" and verify(cache) == []
        assert (cache.spec.codec.k, cache.spec.codec.width) == (k, width)
        data, _ = cache_text(cache.spec, str(FIXTURES_DIR / "corpus.txt"), str(FIXTURES_DIR / "text-tokenizer.json"))
        model, info = load_teacher(FIXTURES_DIR / "text-teacher.pt", TEXT_TEACHER, data.num_classes)
        assert cache.spec.teacher["checkpoint_sha256"] == info["checkpoint_sha256"]
        assert (cache.labels() == data.next_tokens().numpy()).all()
        ids, logprobs = cache.spec.codec.decode(cache.view_arrays(0))
    with torch.no_grad():
        live = torch.log_softmax(model(data.tokens[:, :-1]).float(), -1).topk(k, dim=-1)
    assert (ids == live.indices.numpy()).all()
    torch.testing.assert_close(torch.from_numpy(logprobs), live.values, rtol=0, atol=tolerance)
    assert "a token cache" in describe_cache(FIXTURES_DIR / name)["text"]


@pytest.mark.parametrize("name", DENSE_FIXTURES)
def test_a_dense_cache_of_every_version_reads_verifies_and_equals_the_live_teacher_on_the_replayed_views(name):
    from kdcache.data.dense import DIGIT_NAMES, DenseData, compose_scenes
    from kdcache.data.sources import _channel_stats, _digits_images
    from kdcache.stages.dense_targets import at_stride, open_dense_targets
    from kdcache.stages.topk import rebuild_topk

    version, k, stride = DENSE_FIXTURES[name]
    digits, labels = _digits_images()  # the fixture's data, as make_fixtures.py composes it
    images, masks = compose_scenes(digits, labels, 12, np.random.RandomState(0))
    data = DenseData("digits-scenes", "train", images, masks, ("background", *DIGIT_NAMES), *_channel_stats(images))
    model, info = load_teacher(FIXTURES_DIR / "dense-teacher.pt", "fcn_resnet8", data.num_classes)
    with open_dense_targets(FIXTURES_DIR / name, data, torch.device("cpu")) as targets:
        spec = targets.cache.spec
        assert (spec.format_version, spec.topk, spec.stride) == (version, k, stride) and verify(targets.cache) == []
        assert spec.teacher["checkpoint_sha256"] == info["checkpoint_sha256"]
        for view in range(targets.num_views):
            views, _ = data.views(targets.policy, targets.params(view), torch.arange(12), torch.device("cpu"))
            with torch.no_grad():
                live = at_stride(model(views), stride).half().float()
            if k:  # the top k per position, and one logit for the rest, rebuilt as the cache rebuilds them
                live = rebuild_topk(live.movedim(1, -1), k, torch.float16).movedim(-1, 1)
            torch.testing.assert_close(targets.maps(view, torch.arange(12), None), live, rtol=2e-3, atol=2e-3)
    assert "a dense cache" in describe_cache(FIXTURES_DIR / name)["text"]


@pytest.mark.parametrize("name", [name for name, (version, _, _) in FIXTURES.items() if version < WRITTEN_VERSION])
def test_a_dump_does_not_resume_an_older_format_and_says_how_to_go_on(name, teacher_and_data, tmp_path):
    model, info, data = teacher_and_data
    copy = tmp_path / name
    (shutil.copytree if (FIXTURES_DIR / name).is_dir() else shutil.copy)(FIXTURES_DIR / name, copy)
    with pytest.raises(KdcacheError, match=rf"format-{FIXTURES[name][0]} cache started by an older kdcache; this "
                                           rf"kdcache writes format {WRITTEN_VERSION}.*--overwrite"):
        dump_teacher(model, info, data, get_policy("cifar"), copy, views=2, scales=SCALES, block_size=8,
                     topk=FIXTURES[name][1], show_progress=False)
    with open_cache(copy) as cache:  # left as it was
        assert cache.spec.format_version == FIXTURES[name][0] and verify(cache) == []
