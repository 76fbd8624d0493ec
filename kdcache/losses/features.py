"""Feature- and relation-based distillation losses as pure functions on tensors: FitNet, attention transfer,
similarity-preserving and relational KD.

Shapes. Feature maps are `[B, C, H, W]`; attention maps `[B, H, W]`; embeddings `[B, D]` (any `[B, ...]` is
flattened per sample). Precision as in `functions.py`: fp16/bf16 inputs are computed in float32; float32 and
float64 keep their dtype. The teacher's side is not detached: a cached teacher output needs no gradient, and an
online one is the caller's to detach.

Sources (the formulas and the defaults of each `--loss` weight were checked against these; no code was copied):
  FitNet Romero et al., ICLR 2015; HobbitLong/RepDistiller `distiller_zoo/FitNet.py` (mean squared error of the
         regressed student feature and the teacher's hint; weight 100 in `train_student.py`).
  AT     Zagoruyko & Komodakis, ICLR 2017; RepDistiller `distiller_zoo/AT.py` (the map: the channel mean of
         F^p, flattened and L2-normalised; the loss: the mean squared difference per stage pair, summed over
         the pairs; weight 1000).
  SP     Tung & Mori, ICCV 2019; RepDistiller `distiller_zoo/SP.py` (batch Gram matrices, rows L2-normalised,
         squared Frobenius distance over b²; weight 3000).
  RKD    Park et al., CVPR 2019; RepDistiller `distiller_zoo/RKD.py` (distances over their mean over distinct
         pairs, angles at every vertex of every triplet, both through the Huber loss; weights 25 and 50).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcache.errors import KdcacheError
from kdcache.tensors import NORMALIZE_EPS, upcast
DISTANCE_EPS = 1e-12  # squared distances are clamped here before the square root: finite gradients at 0


def fitnet(regressed_student: Tensor, teacher_hint: Tensor) -> Tensor:
    """FitNet's hint loss (Romero et al. 2015): mean squared error of the regressed student feature and the hint."""
    student, teacher = upcast(regressed_student), upcast(teacher_hint)
    if student.shape != teacher.shape:
        raise KdcacheError(f"fitnet(): the regressed student feature {tuple(student.shape)} and the teacher's hint "
                           f"{tuple(teacher.shape)} differ in shape; pass the student's feature through a regressor "
                           f"(a 1x1 conv to the teacher's channels) at the teacher's spatial size")
    return (student - teacher).pow(2).mean()


def at(student_maps: Tensor | Sequence[Tensor], teacher_maps: Tensor | Sequence[Tensor]) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017): over the stage pairs, the sum of the mean squared
    differences of the attention maps [B, H, W]. A student map of another size is resized to the teacher's
    (bilinear) and normalised again, so that both are unit vectors over the same positions."""
    students = [student_maps] if isinstance(student_maps, Tensor) else list(student_maps)
    teachers = [teacher_maps] if isinstance(teacher_maps, Tensor) else list(teacher_maps)
    if len(students) != len(teachers) or not students:
        raise KdcacheError(f"at(): needs one student map per teacher map, found {len(students)} and {len(teachers)}")
    total = 0
    for student, teacher in zip(students, teachers):
        student, teacher = upcast(student), upcast(teacher)
        if student.dim() != 3 or teacher.dim() != 3 or len(student) != len(teacher):
            raise KdcacheError(f"at(): needs attention maps [B, H, W] of the same batch, found "
                               f"{tuple(student.shape)} and {tuple(teacher.shape)}")
        if student.shape != teacher.shape:
            resized = F.interpolate(student[:, None], size=teacher.shape[-2:], mode="bilinear", align_corners=False)
            student = F.normalize(resized.flatten(1), dim=1, eps=NORMALIZE_EPS).view_as(teacher)
        total = total + (student - teacher).pow(2).mean()
    return total


def _gram(features: Tensor) -> Tensor:
    """The batch's similarity matrix [B, B] of flattened features, each row L2-normalised."""
    flat = features.flatten(1)
    return F.normalize(flat @ flat.T, dim=1, eps=NORMALIZE_EPS)


def sp(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Similarity-preserving KD (Tung & Mori 2019): ‖G_s − G_t‖_F² / b², G the row-normalised batch Gram matrix."""
    student, teacher = upcast(student_features), upcast(teacher_features)
    if len(student) != len(teacher):
        raise KdcacheError(f"sp(): needs the same batch on both sides, found {len(student)} and {len(teacher)}")
    return (_gram(student) - _gram(teacher)).pow(2).sum() / len(student) ** 2


def _distances(embedding: Tensor) -> Tensor:
    """Euclidean distances [B, B] between the rows, 0 on the diagonal, over their mean over distinct pairs."""
    squared = embedding.pow(2).sum(dim=1)
    gram = (squared[:, None] + squared[None, :] - 2 * embedding @ embedding.T).clamp_min(DISTANCE_EPS)
    distinct = ~torch.eye(len(embedding), dtype=torch.bool, device=embedding.device)
    distances = torch.where(distinct, gram.sqrt(), 0)
    return distances / distances[distinct].mean()


def _angles(embedding: Tensor) -> Tensor:
    """cos ∠(e_j − e_i, e_k − e_i) for every triplet [B, B, B], vertex i first (0 where a side is 0)."""
    sides = F.normalize(embedding[None, :, :] - embedding[:, None, :], dim=2, eps=NORMALIZE_EPS)
    return sides @ sides.transpose(1, 2)


def rkd_distance(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    """RKD's distance term: Huber loss of the mean-normalised pairwise distances, averaged over all b² pairs."""
    student, teacher = _embeddings(student_embedding, teacher_embedding, "rkd_distance()")
    return F.smooth_l1_loss(_distances(student), _distances(teacher))


def rkd_angle(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    """RKD's angle term: Huber loss of the cosines of the angles of every triplet, averaged over all b³."""
    student, teacher = _embeddings(student_embedding, teacher_embedding, "rkd_angle()")
    return F.smooth_l1_loss(_angles(student), _angles(teacher))


def rkd(student_embedding: Tensor, teacher_embedding: Tensor, distance_weight: float = 25,
        angle_weight: float = 50) -> Tensor:
    """Relational KD (Park et al. 2019): distance_weight · rkd_distance + angle_weight · rkd_angle."""
    return distance_weight * rkd_distance(student_embedding, teacher_embedding) + \
        angle_weight * rkd_angle(student_embedding, teacher_embedding)


def _embeddings(student: Tensor, teacher: Tensor, call: str) -> tuple[Tensor, Tensor]:
    """Both sides flattened to [B, D]; a batch of fewer than 2 has no pairs."""
    student, teacher = upcast(student).flatten(1), upcast(teacher).flatten(1)
    if len(student) != len(teacher) or len(student) < 2:
        raise KdcacheError(f"{call}: needs the same batch of at least 2 samples on both sides, found "
                           f"{len(student)} and {len(teacher)}")
    return student, teacher
