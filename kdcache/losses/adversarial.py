"""Adversarial distillation: a discriminator that tells the teacher's predictions from the student's, and the
student's term for fooling it, the seed's L = L_task + α L_KD + β L_adv (`--loss kd,adversarial`).

Sources: Xu, Hsu, Huang 2018, "Training Shallow and Thin Networks for Acceleration via Knowledge Distillation with
Conditional Adversarial Networks" (ICLR workshop; a discriminator on the networks' outputs, trained against the
student with a distillation term beside it); Wang, Zhang, Yang, Yu, NeurIPS 2018, "KDGAN" (a discriminator on
label distributions); Goodfellow et al. 2014 for the non-saturating generator loss.

What the discriminator D reads: the global logit z [B, C] softened at the loss's temperature T, p = softmax(z / T),
probabilities rather than raw logits (a cached teacher's logits have their own scale, which would tell the two
apart without saying anything about what they predict). Its score s = D(p) [B] is the logit of "a teacher's".

  D's loss:         L_D   = ½ (mean_b −log σ(s_teacher) + mean_b −log(1 − σ(s_student)))   (ln 2 when D cannot tell)
  student's term:   L_adv = mean_b −log σ(s_student)   (non-saturating: it pushes D's verdict on the student to 1)
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdcache.tensors import upcast

VERDICT = "discriminator"  # the student-side output the adversarial term reads: D's scores s_student [B]


def discriminator_inputs(logits: Tensor, temperature: float) -> Tensor:
    """What the discriminator reads of logits [B, C]: the softened prediction softmax(z / T) [B, C]."""
    return F.softmax(upcast(logits) / temperature, dim=-1)


def discriminator_loss(teacher_scores: Tensor, student_scores: Tensor) -> Tensor:
    """L_D: binary cross-entropy of D's scores [B] with the teacher's labelled 1 and the student's 0, each side's
    mean, halved (ln 2 ≈ 0.693 when D tells nothing, 0 when it tells them apart with certainty)."""
    # −log σ(s) = softplus(−s) and −log(1 − σ(s)) = softplus(s): finite for any finite score
    return 0.5 * (F.softplus(-upcast(teacher_scores)).mean() + F.softplus(upcast(student_scores)).mean())


def adversarial_loss(student_scores: Tensor) -> Tensor:
    """L_adv: the non-saturating generator loss mean −log σ(s_student) of D's scores [B] on the student's
    predictions; its gradient stays large while D rejects the student (log(1 − σ) would vanish there)."""
    return F.softplus(-upcast(student_scores)).mean()


class Discriminator(nn.Module):
    """D: an MLP from a softened prediction [B, C] to a score [B] (C → width → width → 1, LeakyReLU 0.2 between,
    the GAN discriminators' activation)."""

    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(num_classes, width), nn.LeakyReLU(0.2), nn.Linear(width, width),
                                    nn.LeakyReLU(0.2), nn.Linear(width, 1))

    def forward(self, predictions: Tensor) -> Tensor:
        """The scores [B]: the logit that each prediction is a teacher's."""
        return self.layers(predictions).squeeze(-1)
