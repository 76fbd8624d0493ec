"""A cache never changes under a reader: every store has a cache_id, written once when it is created, and every
reopening by path (a dataset's workers, a view read per epoch) refuses a store rewritten since, naming both ids."""

import pickle
import re
import uuid

import pytest
import torch
from test_formats import FIXTURES, FIXTURES_DIR
from torch.utils.data import DataLoader

from kdcache import CacheDataset
from kdcache.cache import Store, open_cache, open_store
from kdcache.cache.layout import CACHE_ID, CACHE_ID_SHOWN, DIGEST_ARRAY, metadata_digest
from kdcache.cache.location import remove_store
from kdcache.data import get_policy, load_dataset
from kdcache.errors import CorruptCacheError, KdcacheError
from kdcache.models import create_model
from kdcache.stages.dump import dump_teacher
from kdcache.stages.targets import CachedTargets

SUFFIX = {"zarr": ".zarr", "hdf5": ".h5"}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", num_samples=24, num_classes=4, image_size=16, seed=5)


def teacher(seed):
    """A resnet8 with the random weights of `seed`: another seed is another teacher."""
    torch.manual_seed(seed)
    return create_model("resnet8", num_classes=4).eval()


def dump(data, path, seed=0, **options):
    info = {"arch": "resnet8", "num_classes": 4, "checkpoint": f"t{seed}.pt", "checkpoint_sha256": f"{seed:02d}" * 32}
    settings = {"views": 2, "scales": (1,), "block_size": 8, "show_progress": False, **options}
    return dump_teacher(teacher(seed), info, data, get_policy("cifar"), path, **settings)


def cache_id_of(path):
    with open_cache(path) as cache:
        return cache.cache_id


def refusal(path, then, now):
    """The one line a reader of a rewritten cache is refused with."""
    return (f"cache {path} changed since this run opened it ({CACHE_ID} {then[:CACHE_ID_SHOWN]} then, "
            f"{now[:CACHE_ID_SHOWN]} now: it was rewritten, e.g. by `kdcache dump-teacher --overwrite`); restart "
            f"the run to train from the new cache")


def test_a_dataset_refuses_a_cache_rewritten_by_another_teacher_between_epochs_in_spawned_workers(data, tmp_path):
    path = tmp_path / "c.zarr"
    dump(data, path, seed=0)
    dataset = CacheDataset(path, data=data)
    loader = DataLoader(dataset, batch_size=24, num_workers=1, multiprocessing_context="spawn")
    dataset.set_epoch(0)
    (_, _, targets), = list(loader)
    with open_cache(path) as cache:
        first = cache.cache_id
        assert torch.equal(targets["regions"], torch.from_numpy(cache.view(0)).float())
    dump(data, path, seed=1, overwrite=True)  # no reader holds it between epochs: the rewrite succeeds
    second = cache_id_of(path)
    assert dataset.cache_id == first != second
    dataset.set_epoch(1)
    with pytest.raises(KdcacheError) as refused:
        list(loader)  # epoch 2's worker reopens the cache by path
    assert refusal(path, first, second) in str(refused.value)  # the worker's one line, within torch's report


@pytest.mark.parametrize("fmt", SUFFIX)
def test_a_worker_given_the_dataset_by_pickle_refuses_the_rewritten_cache_in_one_line(data, tmp_path, fmt):
    path = tmp_path / f"c{SUFFIX[fmt]}"
    dump(data, path, seed=0)
    dataset = CacheDataset(path, data=data)
    dataset.set_epoch(1)
    worker = pickle.loads(pickle.dumps(dataset))  # as a worker gets it: by path
    with open_cache(path) as cache:
        assert torch.equal(worker[3][2]["regions"], torch.from_numpy(cache.view(1)[3]).float())
    worker._cache.close()  # as the worker's end would: it held the cache open, and kept a rewrite out
    dump(data, path, seed=1, overwrite=True)
    worker = pickle.loads(pickle.dumps(dataset))
    with pytest.raises(KdcacheError) as refused:
        worker[3]
    assert str(refused.value) == refusal(path, dataset.cache_id, cache_id_of(path))
    remove_store(path)
    with pytest.raises(KdcacheError, match=re.escape(f"then, no cache there now: it was removed, or is being "
                                                     f"rewritten); restart the run")):
        pickle.loads(pickle.dumps(dataset))[3]


@pytest.fixture
def url():
    """A cache at a URL, where no readers lock keeps a rewrite out while a run reads it."""
    url = f"memory://kdcache-test-{uuid.uuid4().hex}/cache.zarr"
    yield url
    remove_store(url)


def test_cached_targets_refuse_a_cache_rewritten_between_epochs(data, url):
    dump(data, url, seed=0)
    with open_cache(url) as cache:
        targets = CachedTargets(cache)
        targets.begin_epoch(0)
        before = targets(torch.arange(24), None)["regions"]
        assert torch.equal(before, torch.from_numpy(cache.view(0)).float())
        dump(data, url, seed=1, overwrite=True)
        expected = refusal(url, cache.cache_id, cache_id_of(url))
        with pytest.raises(KdcacheError) as refused:
            targets.begin_epoch(1)
        assert str(refused.value) == expected
        with pytest.raises(KdcacheError) as refused:  # the epoch's augmentation parameters likewise
            cache.aug_params(1)
        assert str(refused.value) == expected
        assert torch.equal(targets(torch.arange(24), None)["regions"], before)  # what it holds stays the old view


@pytest.mark.parametrize("fmt", SUFFIX)
def test_the_cache_id_is_written_once_a_resume_keeps_it_and_an_overwrite_makes_another(data, tmp_path, fmt,
                                                                                        monkeypatch):
    path = tmp_path / f"c{SUFFIX[fmt]}"
    store_write, writes = Store.write, []

    def disk_full_at_third_block(self, name, selection, values):
        if name == "logits" and len(writes.append(selection) or writes) == 3:
            raise OSError(28, "No space left on device")
        return store_write(self, name, selection, values)

    monkeypatch.setattr(Store, "write", disk_full_at_third_block)
    with pytest.raises(KdcacheError, match="rerun the same command"):
        dump(data, path)
    monkeypatch.setattr(Store, "write", store_write)
    with open_cache(path) as cache:
        started = cache.cache_id
        assert not cache.is_complete() and re.fullmatch("[0-9a-f]{32}", started)
        assert cache.metadata[CACHE_ID] == started
    assert dump(data, path).resumed
    assert cache_id_of(path) == started  # finish() rewrote the metadata: the id stayed
    dump(data, path, overwrite=True)  # the very same arguments: another store all the same
    assert cache_id_of(path) != started


@pytest.mark.parametrize("name", [name for name, (version, *_) in FIXTURES.items() if version < 6])
def test_a_cache_written_before_cache_ids_is_named_by_its_metadata_digest(name):
    with open_cache(FIXTURES_DIR / name) as cache:
        assert CACHE_ID not in cache.metadata
        assert cache.cache_id == metadata_digest(cache.metadata).tobytes().hex()
    assert cache_id_of(FIXTURES_DIR / name) == cache.cache_id  # the same at every opening


def test_a_cache_id_edited_with_its_digest_is_named(data, tmp_path):
    path = tmp_path / "c.zarr"
    dump(data, path)
    with open_cache(path) as cache:
        metadata = {**cache.metadata, CACHE_ID: "not an id"}
    with open_store(path, read_only=False) as store:  # the digest beside it rewritten to match: only the field tells
        store.set_metadata(metadata)
        store.write(DIGEST_ARRAY, (), metadata_digest(metadata))
    with pytest.raises(CorruptCacheError, match=f"metadata field '{CACHE_ID}' should be 32 hex digits, found not an "
                                                f"id; the metadata was edited"):
        open_cache(path)
