"""The discriminator of `--loss adversarial`: a loss with its own parameters and optimiser, carried by the run.

Each training step, before the student's loss: one Adam step of the discriminator on this step's teacher and
(detached) student predictions, every view of the step together; then its scores of the student's predictions,
computed with its weights detached (the student's backward reaches the student alone), join the student's outputs
for the adversarial term to read. So the student always plays against the discriminator of its own step. The run
keeps the discriminator and its optimiser in last.pt (`discriminator`, `discriminator_optimizer`), so --resume
continues the game exactly, and logs the discriminator's loss per epoch (metrics.csv `loss_discriminator`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn
from torch.func import functional_call

from kdcache.distributed import World
from kdcache.errors import KdcacheError
from kdcache.losses import LossSpec, LossSum
from kdcache.losses.adversarial import VERDICT, Discriminator, discriminator_inputs, discriminator_loss
from kdcache.models.outputs import REGIONS

Outputs = dict[str, torch.Tensor]
ADAM_BETAS = (0.5, 0.999)  # the GAN discriminators' Adam (Radford, Metz, Chintala 2016, DCGAN)


class Critic(Protocol):
    """A model a loss trains beside the student, with its own optimiser: the run calls judge in each step, before
    the student's loss, and keeps `model` and `optimizer` in last.pt under `key` (and `key`_optimizer)."""

    key: str
    model: nn.Module
    optimizer: torch.optim.Optimizer

    def judge(self, outputs: list[Outputs], targets: Sequence[Outputs | None]) -> tuple[list[Outputs], Outputs]:
        """Step on this step's views (the student's outputs and its targets, per view); return each view's outputs
        with what the student's loss reads of the critic added, and the critic's own terms for metrics.csv."""
        ...


class AdversarialGame:
    """The discriminator of an adversarial loss (kdcache.losses.adversarial), its Adam optimiser (the loss's
    discriminator_lr, betas 0.5, 0.999), and its step. A Critic."""

    key = "discriminator"

    def __init__(self, spec: LossSpec, num_classes: int, device: torch.device, seed: int = 0) -> None:
        self.temperature = spec.temperature
        with torch.random.fork_rng(devices=[]):  # its initial weights depend on the seed alone, not on draws before
            torch.manual_seed(seed)
            self.model = Discriminator(num_classes, spec.discriminator_width).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=spec.discriminator_lr, betas=ADAM_BETAS)

    def judge(self, outputs: list[Outputs], targets: Sequence[Outputs | None]) -> tuple[list[Outputs], Outputs]:
        """One discriminator step on every view's detached student predictions and the teacher's, then its scores of
        the student's predictions (`discriminator` [B], the student's graph kept) added to each view's outputs."""
        if any(found is None or REGIONS not in found for found in targets):
            return outputs, {}  # no teacher: the adversarial term refuses the step in its own words
        student = [discriminator_inputs(found[REGIONS][:, 0], self.temperature) for found in outputs]
        teacher = torch.cat([discriminator_inputs(found[REGIONS][:, 0], self.temperature) for found in targets])
        scores = self.model(torch.cat([teacher, *(p.detach() for p in student)]))
        loss = discriminator_loss(scores[:len(teacher)], scores[len(teacher):])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        frozen = {name: value.detach() for name, value in self.model.named_parameters()}
        judged = [found | {VERDICT: functional_call(self.model, frozen, (p,))} for found, p in zip(outputs, student)]
        return judged, {"discriminator": loss.detach()}


def loss_critics(loss: LossSpec | LossSum, num_classes: int, device: torch.device, here: World = World(),
                 seed: int = 0) -> list[Critic]:
    """The critics a loss trains beside the student: a discriminator per adversarial part (refused under torchrun,
    whose ranks would each train their own; distill asks before it takes a run folder, so a refusal writes nothing)."""
    parts = loss.parts if isinstance(loss, LossSum) else (loss,)
    adversarial = [part for part in parts if part.function == "adversarial"]
    if adversarial and here.distributed:
        raise KdcacheError(f"--loss {loss.name}: the discriminator of an adversarial loss trains in one process (its "
                           f"gradients are not averaged over torchrun's {here.size} ranks); run this loss without "
                           f"torchrun")
    return [AdversarialGame(part, num_classes, device, seed) for part in adversarial]
