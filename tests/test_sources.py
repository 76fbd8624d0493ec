"""One data source interface (issue 30, point 2): in-memory and streamed splits answer the same questions, one
policy registry holds every policy in both forms, and a cache's fit is checked on plain descriptions."""

import inspect

import pytest
import torch

from image_folders import write_folder
from small_runs import saved_teacher
from kdcache.cache import fit, open_cache
from kdcache.data import DataSource, get_policy, list_policies, load_dataset, policy_for
from kdcache.data import files as files_module
from kdcache.errors import KdcacheError

SIZE = 24


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    folder = write_folder(tmp_path_factory.mktemp("sources") / "pets")
    return (load_dataset("imagefolder", folder, "train", image_size=SIZE),
            load_dataset("imagefolder", folder, "train", image_size=SIZE, preload=True))


def test_both_kinds_answer_every_question_of_the_interface(splits):
    questions = [name for name in dir(DataSource) if not name.startswith("_")] + \
        list(inspect.get_annotations(DataSource))
    for source in splits:
        assert all(hasattr(source, name) for name in questions), type(source).__name__
    streamed, held = splits
    assert (streamed.streamed, held.streamed) == (True, False)
    assert streamed.first_images(3).shape == held.first_images(3).shape == (3, 3, SIZE, SIZE)
    for source in splits:  # the evaluation batches: normalised, in order, whatever the storage
        batches = list(source.evaluation(torch.device("cpu"), batch_size=4).batches(range(0, 6)))
        assert [len(labels) for _, labels in batches] == [4, 2]
        assert torch.equal(torch.cat([labels for _, labels in batches]), source.labels[:6])


def test_one_registry_holds_each_policy_once_and_the_source_picks_its_form(splits):
    streamed, held = splits
    assert list_policies() == ["cifar", "imagenet", "none", "randaugment"]
    assert not hasattr(files_module, "FILE_POLICIES")
    for name in ("imagenet", "none", "randaugment"):  # the registry's entry, in the form each source reads
        assert policy_for(streamed, name) == get_policy(name, (SIZE, SIZE), on_files=True)
        assert policy_for(held, name) == get_policy(name, (SIZE, SIZE))
    assert policy_for(streamed, "imagenet") != policy_for(held, "imagenet")
    assert policy_for(streamed, "randaugment", num_ops=3).describe()["randaugment"]["num_ops"] == 3
    assert policy_for(streamed, None).sample(torch.Generator(), 4) is None  # each view drawn where its file is read
    assert policy_for(held, None).sample(torch.Generator(), 4).shape == (4, 3)
    with pytest.raises(KdcacheError, match="--aug cifar: works on images held in memory.*use imagenet, none, "
                                           "randaugment .*--preload"):
        get_policy("cifar", (SIZE, SIZE), on_files=True)


def test_a_caches_fit_is_checked_on_plain_descriptions(splits, tmp_path):
    from kdcache.models import file_sha256
    from kdcache.stages import dump_teacher

    streamed, _ = splits
    policy = policy_for(streamed, "imagenet")
    model, checkpoint = saved_teacher(tmp_path, streamed.num_classes, seed=0)
    info = {"arch": "resnet8", "checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint)}
    dump_teacher(model, info, streamed, policy, tmp_path / "c.zarr", views=1, scales=(1,), block_size=4, workers=0,
                 show_progress=False)
    described, listed = streamed.describe(), streamed.listed_files()
    with open_cache(tmp_path / "c.zarr") as cache:
        fit.require_fits(cache, described, policy.describe(), (1,), "resnet8", listed)  # plain dicts and bytes
        with pytest.raises(KdcacheError, match="dataset.mean"):
            fit.require_fits(cache, {**described, "mean": [0.5, 0.5, 0.5]}, policy.describe(), (1,))
        root, paths = listed
        with pytest.raises(KdcacheError, match=f"{root} lists other files.*sample 1 is .* in the cache but "
                                               f"'renamed.png' in the folder"):
            fit.require_fits(cache, described, policy.describe(), (1,), files=(root, [paths[0], b"renamed.png",
                                                                                     *paths[2:]]))
