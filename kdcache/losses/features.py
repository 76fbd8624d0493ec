"""Feature- and relation-based distillation losses as pure functions on tensors: FitNet, attention transfer,
similarity-preserving and relational KD, contrastive representation distillation, the instance relationship
graph and CLIP distillation's cosine embedding term.

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
  CRD    Tian, Krishnan, Isola, ICLR 2020; RepDistiller `crd/criterion.py` (Embed: a linear head to 128 dimensions
         and L2 normalisation on each side; τ 0.07, K 16384, weight 0.8). Here the InfoNCE (softmax) form of
         the paper's objective, with the student as anchor and the teacher's embeddings of other samples, drawn
         from the cache, as negatives; RepDistiller's code uses the NCE (binary) form against two momentum memory
         banks, both directions.
  IRG    Liu, Cao, Li, Yuan, Hu, Li, Duan, CVPR 2019; the reference PyTorch transcription of the authors' Caffe
         code, AberHu/Knowledge-Distillation-Zoo `kd_losses/irg.py` (vertex: mean squared error; edge: squared
         Euclidean distance matrices, diagonal 0, each over its largest entry, mean squared error; weights 0.1
         and 5.0 in `train_kd.py`). The transformation term (between two layers' graphs) is not implemented: a
         cache holds one embedding per sample, not two layers.
  CLIP   Radford et al., ICML 2021 (the zero-shot logits a CLIP teacher gives); the embedding term after Yang et
         al., CVPR 2024, CLIP-KD (its feature distillation, an MSE between the student's embedding, through a
         linear projection where the dimensions differ, and the teacher's): here 1 − cos, which on the normalised
         embeddings is that MSE up to scale, and a linear head on the student's side always.
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


def _squared_distances(embedding: Tensor) -> tuple[Tensor, Tensor]:
    """Squared Euclidean distances [B, B] between the rows (clamped at DISTANCE_EPS, the diagonal too), and the
    mask of distinct pairs."""
    squared = embedding.pow(2).sum(dim=1)
    gram = (squared[:, None] + squared[None, :] - 2 * embedding @ embedding.T).clamp_min(DISTANCE_EPS)
    return gram, ~torch.eye(len(embedding), dtype=torch.bool, device=embedding.device)


def _distances(embedding: Tensor) -> Tensor:
    """Euclidean distances [B, B] between the rows, 0 on the diagonal, over their mean over distinct pairs."""
    gram, distinct = _squared_distances(embedding)
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


def crd(student_embedding: Tensor, teacher_embedding: Tensor, negatives: Tensor, temperature: float = 0.07) -> Tensor:
    """Contrastive representation distillation (Tian et al. 2020), InfoNCE form, mean over the batch of
    −log[exp(sᵀt/τ) / (exp(sᵀt/τ) + Σ_k exp(sᵀt_k⁻/τ))], every vector L2-normalised first.

    student_embedding, teacher_embedding: [B, D] (each side through its projection head, to a common D);
    negatives: [B, K, D], for each sample the teacher's embeddings of K other samples.
    """
    student, teacher, negatives = upcast(student_embedding), upcast(teacher_embedding), upcast(negatives)
    if student.dim() != 2 or student.shape != teacher.shape or negatives.dim() != 3 or \
            negatives.shape[0] != len(student) or negatives.shape[2] != student.shape[1]:
        raise KdcacheError(f"crd(): needs embeddings [B, D] on both sides and negatives [B, K, D] of the same B and "
                           f"D, found {tuple(student.shape)}, {tuple(teacher.shape)} and {tuple(negatives.shape)}; "
                           f"project both sides to a common dimension first (CRD's linear heads)")
    student, teacher, negatives = (F.normalize(x, dim=-1, eps=NORMALIZE_EPS) for x in (student, teacher, negatives))
    positive = (student * teacher).sum(dim=1, keepdim=True)  # [B, 1]
    against = torch.einsum("bd,bkd->bk", student, negatives)  # [B, K]
    logits = torch.cat([positive, against], dim=1) / temperature
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def irg_vertex(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    """IRG's vertex term: the mean squared error of the instances' embeddings (the mean over instances of
    ‖s_i − t_i‖² / D); the student's projected to the teacher's dimension first where they differ."""
    student, teacher = _embeddings(student_embedding, teacher_embedding, "irg_vertex()")
    if student.shape != teacher.shape:
        raise KdcacheError(f"irg_vertex(): the student's embedding {tuple(student.shape)} and the teacher's "
                           f"{tuple(teacher.shape)} differ in dimension; project the student's to the teacher's first")
    return (student - teacher).pow(2).mean()


def _irg_edges(embedding: Tensor) -> Tensor:
    """IRG's edge matrix [B, B]: squared Euclidean distances, 0 on the diagonal, over the largest of them."""
    gram, distinct = _squared_distances(embedding)
    edges = torch.where(distinct, gram, 0)
    return edges / edges.max()


def irg_edge(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    """IRG's edge term: the mean squared difference of the two edge matrices [B, B] (any dimensions)."""
    student, teacher = _embeddings(student_embedding, teacher_embedding, "irg_edge()")
    return (_irg_edges(student) - _irg_edges(teacher)).pow(2).mean()


def irg(student_embedding: Tensor, teacher_embedding: Tensor, vertex_weight: float = 0.1,
        edge_weight: float = 5.0, projected_student: Tensor | None = None) -> Tensor:
    """Instance relationship graph (Liu et al. 2019) of one layer: vertex_weight · irg_vertex + edge_weight ·
    irg_edge; the vertex term reads `projected_student` (the student's embedding through a head to the teacher's
    dimension) where given, the edge term the student's own embedding."""
    vertex_student = student_embedding if projected_student is None else projected_student
    return vertex_weight * irg_vertex(vertex_student, teacher_embedding) + \
        edge_weight * irg_edge(student_embedding, teacher_embedding)


def embedding_cosine(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    """The cosine embedding term of CLIP distillation: the mean over the batch of 1 − cos(s_i, t_i), the student's
    embedding (through its linear head to the teacher's dimension) against the teacher's image embedding [B, D].
    On unit vectors it is half the squared distance, so it is CLIP-KD's feature distillation (an MSE of the
    embeddings) on L2-normalised embeddings, up to scale."""
    student, teacher = upcast(student_embedding).flatten(1), upcast(teacher_embedding).flatten(1)
    if student.shape != teacher.shape:
        raise KdcacheError(f"embedding_cosine(): the student's embedding {tuple(student.shape)} and the teacher's "
                           f"{tuple(teacher.shape)} differ in shape; project the student's to the teacher's dimension "
                           f"first (a linear head)")
    cosine = (F.normalize(student, dim=1, eps=NORMALIZE_EPS) * F.normalize(teacher, dim=1, eps=NORMALIZE_EPS)).sum(1)
    return (1 - cosine).mean()


def _embeddings(student: Tensor, teacher: Tensor, call: str) -> tuple[Tensor, Tensor]:
    """Both sides flattened to [B, D]; a batch of fewer than 2 has no pairs."""
    student, teacher = upcast(student).flatten(1), upcast(teacher).flatten(1)
    if len(student) != len(teacher) or len(student) < 2:
        raise KdcacheError(f"{call}: needs the same batch of at least 2 samples on both sides, found "
                           f"{len(student)} and {len(teacher)}")
    return student, teacher
