"""The loop asks every target provider alike: a provider of the user's own plugs into a run's step as the EMA
teacher and the peers do, and the loop's source names none of them."""

import ast
import copy
from pathlib import Path

import torch

from kdcache.config import TrainConfig
from kdcache.losses import get_loss
from kdcache.models import LogitMap, create_model
from kdcache.stages import loop
from kdcache.stages.loop import Run

CLASSES, CPU = 3, torch.device("cpu")
PROVIDERS = {"CachedTargets", "LiveTeacher", "EnsembleTargets", "EMATeacher", "Peers", "PEERS", "WeightEMA"}


class UniformTeacher:
    """A provider of the user's: a teacher that knows nothing (equal logits), recording what it is asked."""

    def __init__(self) -> None:
        self.asked = []

    def begin_epoch(self, view, next_view=None):
        pass

    def __call__(self, indices, images, step=()):
        self.asked.append((indices, images, [found["regions"].detach().clone() for found in step]))
        return {"regions": torch.zeros(len(images), 1, CLASSES)}


def test_a_providers_own_class_gives_a_runs_targets_in_its_step(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % CLASSES
    teacher, loss = UniformTeacher(), get_loss("kd")
    run = Run("r", create_model("resnet8", num_classes=CLASSES), loss, (1,), TrainConfig(batch_size=8), tmp_path,
              CPU, {}, targets=[teacher])
    student = LogitMap(copy.deepcopy(run.model).train(), (1,))(x)  # the outputs the step computes its loss on
    expected = loss.compute({"regions": student}, {"regions": torch.zeros(8, 1, CLASSES)}, y, 1)
    metrics = run.train_epoch(0, iter([(x, y, None)]), 1, show_progress=False)
    [(indices, images, step)] = teacher.asked
    assert indices is None and torch.equal(images, x)
    torch.testing.assert_close(step, [student.detach()])  # the step's outputs of the runs trained together
    assert metrics["loss_kd"] == float(expected["kd"].detach()) > 0


def test_the_loop_names_no_provider_and_its_step_has_no_branch():
    tree = ast.parse(Path(loop.__file__).read_text())
    named = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    named |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert not named & PROVIDERS
    step = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
            and node.name in ("train_together", "update")]
    assert len(step) == 2
    assert not [node for function in step for node in ast.walk(function) if isinstance(node, ast.If)]
