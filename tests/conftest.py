import sys
from pathlib import Path

import pytest
import torch

# test helpers (fake_cifar, cache_faults, model_fixtures, small_runs) import as top-level modules
sys.path.insert(0, str(Path(__file__).parent))


VIEWS, SCALES = 2, (1, 2)


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """A cache of a random resnet8 on digits, 2 views, scales 1,2: for the API tests and the examples."""
    import kdcache
    from kdcache.models import file_sha256, save_checkpoint
    from kdcache.stages import dump_teacher

    folder = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    teacher = kdcache.create_model("resnet8", num_classes=10).eval()
    save_checkpoint(folder / "teacher.pt", teacher)
    info = {"arch": "resnet8", "checkpoint": str(folder / "teacher.pt"),
            "checkpoint_sha256": file_sha256(folder / "teacher.pt")}
    dump_teacher(teacher, info, kdcache.load_dataset("digits"), kdcache.get_policy("cifar"), folder / "c.zarr",
                 views=VIEWS, scales=SCALES, block_size=500, show_progress=False)
    return folder / "c.zarr"
