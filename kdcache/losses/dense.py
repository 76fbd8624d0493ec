"""Dense-prediction distillation losses as pure functions on tensors: pixel-wise KD and channel-wise distillation,
for a student that predicts a map of class scores (semantic segmentation) in the caller's own training loop.

Shapes. Student and teacher maps are `[B, C, H, W]` (C classes, or channels of a dense head). A student map of
another spatial size is resized to the teacher's first (bilinear, `align_corners=False`), so that both compare
the same positions; the channels and the batch must already agree. Precision as in `functions.py`: fp16/bf16
inputs are computed in float32; float32 and float64 keep their dtype. Both are `kd()` (Hinton et al.'s
T² · KL(teacher ‖ student), computed in log space) over another axis: pixel-wise KD over the classes at each
position, CWD over the positions of each channel. The teacher's side is not detached: a cached teacher map
needs no gradient, and an online one is the caller's to detach.

Sources (the formulas were checked against these; no code was copied):
  pixel-wise KD  Liu, Chen, Liu, Qin, Luo, Wang, "Structured Knowledge Distillation for Semantic Segmentation",
         CVPR 2019 (and TPAMI 2020): the pixel-wise term, the KL divergence of the class distributions at each
         pixel, averaged over the pixels, with no temperature; hence kdcache's default T 1 (T > 1 softens both
         sides as in KD, and T² keeps the gradient's scale). The authors' released `CriterionPixelWise`
         (irfanICMLL/structure_knowledge_distillation `utils/criterion.py`) computes the cross-entropy
         −Σ p_t log p_s instead of the KL (the same gradient: they differ by the teacher's entropy) and divides
         the sum over the whole batch by H·W only; kdcache takes the mean over the samples too, so the value
         does not grow with the batch.
  CWD    Shu, Liu, Gao, Yan, Shen, "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021: each
         channel's map softmax-normalised over the H·W positions at temperature T, KL(teacher ‖ student) summed
         over the positions, T²; T 4 here. Its implementation in open-mmlab/mmrazor
         `mmrazor/models/losses/cwd.py` (`ChannelWiseDivergence`) divides that sum over every sample and
         channel by C·N, the mean over samples and channels that kdcache takes too (same value); mmrazor's
         PSPNet config on Cityscapes (`configs/distill/mmseg/cwd/`) sets tau 1 and loss_weight 5.
"""

import torch.nn.functional as F
from torch import Tensor

from kdcache.errors import KdcacheError
from kdcache.losses.functions import kd
from kdcache.tensors import upcast


def _teacher_sized(student: Tensor, teacher: Tensor, call: str) -> tuple[Tensor, Tensor]:
    """Both maps checked to be [B, C, H, W] of the same batch and channels, the student's resized to the teacher's
    H×W (bilinear, align_corners=False) where it differs."""
    student, teacher = upcast(student), upcast(teacher)
    if student.dim() != 4 or teacher.dim() != 4:
        raise KdcacheError(f"{call}: needs student and teacher maps [B, C, H, W], found {tuple(student.shape)} and "
                           f"{tuple(teacher.shape)}; pass the dense head's output, not the pooled logits")
    if student.shape[:2] != teacher.shape[:2]:
        raise KdcacheError(f"{call}: the student's maps {tuple(student.shape)} and the teacher's "
                           f"{tuple(teacher.shape)} differ in batch or channels (expected the same [B, C]); give "
                           f"the student's head the teacher's {teacher.shape[1]} channels")
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
    return student, teacher


def _check_softened(temperature: float, size: int, what: str, call: str) -> None:
    """A softmax at a positive temperature over at least 2 entries: over one, every KL is 0 and nothing trains."""
    if not temperature > 0:
        raise KdcacheError(f"{call}: needs a temperature > 0, found {temperature}")
    if size < 2:
        raise KdcacheError(f"{call}: needs at least 2 {what} to soften, found {size}")


def pixel_kd(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Pixel-wise KD (Liu et al. 2019): T² · KL(softmax(t/T) ‖ softmax(s/T)) over the C classes at each pixel,
    the mean over the pixels and samples. Maps [B, C, H, W]; a student map of another H×W is resized to the
    teacher's first (bilinear, align_corners=False)."""
    student, teacher = _teacher_sized(student, teacher, "pixel_kd()")
    _check_softened(temperature, teacher.shape[1], "classes (C)", "pixel_kd()")
    return kd(student.movedim(1, -1), teacher.movedim(1, -1), temperature)


def cwd(student: Tensor, teacher: Tensor, temperature: float = 4.0) -> Tensor:
    """Channel-wise distillation (Shu et al. 2021): for each sample and channel, T² · KL of the softmax over the
    H·W positions at T, teacher ‖ student, summed over the positions; the mean over samples and channels. Maps
    [B, C, H, W]; a student map of another H×W is resized to the teacher's first (bilinear,
    align_corners=False)."""
    student, teacher = _teacher_sized(student, teacher, "cwd()")
    _check_softened(temperature, teacher.shape[-2] * teacher.shape[-1], "positions (H·W)", "cwd()")
    return kd(student.flatten(2), teacher.flatten(2), temperature)
