"""Distillation losses as pure functions on tensors.

Shapes. Logits are `[..., C]`, classes last. Region logits are `[B, R, C]`: region 0 is the global
logit, then each scale's cells row-major (R = sum of s² over the scales, e.g. 1 + 4 + 16 = 21 for
scales 1, 2, 4). Labels are integer class indices shaped like the logits without the class axis.

Precision. fp16/bf16 inputs (the cache stores fp16; training runs under bf16 autocast) are computed
in float32 and the result is float32; float32 and float64 inputs keep their dtype. Every quantity is
computed in log space, so finite logits (±1e4 included) give finite losses and gradients.

Sources (the numbers and the formulas were checked against these; no code was copied):
  KD   Hinton, Vinyals, Dean 2015; megvii-research/mdistiller@a08d46f `mdistiller/distillers/KD.py`.
  DKD  Zhao et al., CVPR 2022; mdistiller `mdistiller/distillers/DKD.py`.
  LS   Sun et al., CVPR 2024; sunshangquan/logit-standardization-KD `mdistiller/distillers/KD.py`,
       `DKD.py` (z-score with the unbiased std, eps 1e-7 added to the std), `tools/train.py`.
  SDD  Wei et al., CVPR 2024; shicaiwei123/SDD-CVPR2024@e412036 `mdistiller/distillers/KD.py`
       (`sdd_kd_loss`), `SDD_DKD.py` (`multi_dkd`), `mdistiller/models/cifar/utils.py` (`SPP`:
       regions ordered 1x1, 2x2, 4x4, row-major, the same layout as kdcache's).
  SLD  Limantoro et al. 2025 (arXiv 2504.20108, Multimedia Systems);
       StephenEkaputra/Swapped-Logit-Distillation@e2d0d1d `mdistiller/distillers/SLD.py`.
  DeiT Touvron et al., ICML 2021 (hard-label and soft distillation through a distillation token);
       facebookresearch/deit `losses.py` (DistillationLoss), `main.py` (--distillation-alpha 0.5, --distillation-tau 1).

Where kdcache computes the same quantity differently from the released code, it says so at the
function. The defaults of each `--loss` name live in `configs/losses.yaml` (see `kdcache.losses.spec`).
"""

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcache.errors import KdcacheError
from kdcache.tensors import upcast

# ---------------------------------------------------------------------------------------------
# helpers


def _reduce(per_sample: Tensor, reduction: str, call: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise KdcacheError(f"{call}: reduction must be 'mean' or 'none'; got {reduction!r}")


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ p (log p − log q) over the last axis, from log-probabilities (0·finite = 0)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _split_target(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The target logit `[...]` and the C − 1 non-target logits `[..., C-1]` (original order kept)."""
    labels = labels.unsqueeze(-1)
    j = torch.arange(logits.shape[-1] - 1, device=logits.device)
    others = logits.gather(-1, j + (j >= labels))  # class j for j < label, j + 1 after it; no host sync
    return logits.gather(-1, labels).squeeze(-1), others


def _prepare(student: Tensor, teacher: Tensor, standardize_logits: bool, call: str) -> tuple[Tensor, Tensor]:
    student, teacher = upcast(student), upcast(teacher)
    if student.shape != teacher.shape:
        raise KdcacheError(
            f"{call}: student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ in shape"
        )
    if student.shape[-1] < 2:
        raise KdcacheError(f"{call}: needs at least 2 classes; logits have shape {tuple(student.shape)}")
    if standardize_logits:
        student, teacher = standardize(student), standardize(teacher)
    return student, teacher


def _check_labels(labels: Tensor, logits: Tensor, call: str) -> Tensor:
    """Labels as long, one per row of logits: [B] labels serve every region of [B, R, C] logits."""
    if logits.dim() == 3 and labels.shape == logits.shape[:1]:
        labels = labels.unsqueeze(1).expand(logits.shape[:2])
    if labels.shape != logits.shape[:-1]:
        raise KdcacheError(
            f"{call}: labels {tuple(labels.shape)} must have the logits' shape without classes, "
            f"{tuple(logits.shape[:-1])}"
        )
    return labels.long()


# ---------------------------------------------------------------------------------------------
# the losses


def standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score over classes: (z − mean(z)) / (std(z) + eps), as in logit standardisation (Sun et al. 2024).

    Follows the LS released code: the std is the unbiased one (divides by C − 1, torch's default) and
    eps is added to the std, not to the variance. The std is taken as sqrt(max(var, tiny)) so that a
    constant row (std 0) has a finite gradient; in float32 this changes no value (tiny ≈ 1e-38).
    The gradient at a constant row is of order 1/eps, by the formula: finite in float32/bfloat16,
    beyond float16's range, so logits that need gradients should not be float16 here.
    """
    z = upcast(logits)
    mean = z.mean(dim=-1, keepdim=True)
    var = z.var(dim=-1, keepdim=True, correction=1)
    std = var.clamp_min(torch.finfo(z.dtype).tiny).sqrt()
    return (z - mean) / (std + eps)


def kd(
    student: Tensor, teacher: Tensor, temperature: float, standardize: bool = False, reduction: str = "mean"
) -> Tensor:
    """Hinton et al. 2015: T² · KL(softmax(t/T) ‖ softmax(s/T)), summed over classes, mean over samples.

    `standardize=True` z-scores both logits first (KD+LS, Sun et al. 2024; T is then their "base
    temperature"). `reduction="none"` returns the per-sample loss, shaped like the logits without classes.
    """
    s, t = _prepare(student, teacher, standardize, "kd()")
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    return _reduce(temperature**2 * _kl(log_p_t, log_p_s), reduction, "kd()")


def tckd(student: Tensor, teacher: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """DKD's target-class term, per sample: T² · KL(b_t ‖ b_s), b = [p_target, 1 − p_target] at temperature T.

    Computed in log space (log(1 − p_target) = logsumexp of the non-target logits − logsumexp of all),
    where the DKD code takes log of the summed probabilities; same value, and no log(0) for large logits.
    """
    s, t = upcast(student) / temperature, upcast(teacher) / temperature
    log_b_s = _binary_log_probs(s, labels)
    log_b_t = _binary_log_probs(t, labels)
    return temperature**2 * _kl(log_b_t, log_b_s)


def _binary_log_probs(z: Tensor, labels: Tensor) -> Tensor:
    """[log p_target, log(1 − p_target)] of softmax(z), `[..., 2]`."""
    target, others = _split_target(z, labels)
    log_total = z.logsumexp(dim=-1)
    return torch.stack([target - log_total, others.logsumexp(dim=-1) - log_total], dim=-1)


def nckd(student: Tensor, teacher: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """DKD's non-target-class term, per sample: T² · KL(p̂_t ‖ p̂_s), p̂ the softmax over the non-target classes.

    The DKD code gets p̂ by subtracting 1000 from the target logit/T before a softmax over all classes;
    kdcache drops the target column instead: the same value for ordinary logits, and still exact for
    logits whose spread/T is beyond 1000 (±1e4 logits, where the DKD code's loss is NaN).
    """
    _, s_others = _split_target(upcast(student) / temperature, labels)
    _, t_others = _split_target(upcast(teacher) / temperature, labels)
    return temperature**2 * _kl(F.log_softmax(t_others, dim=-1), F.log_softmax(s_others, dim=-1))


def dkd(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor,
    alpha: float,
    beta: float,
    temperature: float,
    standardize: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): α · TCKD + β · NCKD, mean over samples.

    With `standardize=True` both logits are z-scored before the target masks (DKD+LS, as the LS code
    does). The DKD warm-up min(epoch / warmup, 1) is not part of the loss: the caller applies it
    (`LossSpec.compute` does), as the DKD code does in its distiller.
    """
    s, t = _prepare(student, teacher, standardize, "dkd()")
    labels = _check_labels(labels, s, "dkd()")
    per_sample = alpha * tckd(s, t, labels, temperature) + beta * nckd(s, t, labels, temperature)
    return _reduce(per_sample, reduction, "dkd()")


def sdd_region_weights(teacher_regions: Tensor, labels: Tensor, complementary_weight: float = 2.0) -> Tensor:
    """SDD's weight of each region, `[B, R]`: 1 where consistent, `complementary_weight` where complementary.

    A region is consistent when the teacher's local prediction (argmax of the region) and its global
    prediction (region 0) are both right or both wrong about the label; complementary when one is right
    and the other wrong (global right/local wrong, global wrong/local right). Region 0 is consistent.
    Predictions come from the raw teacher logits (standardising does not move the argmax).
    """
    with torch.no_grad():
        right = upcast(teacher_regions).argmax(dim=-1) == labels.long().unsqueeze(-1)  # [B, R]
        consistent = right == right[:, :1]
        ones = torch.ones(right.shape, dtype=upcast(teacher_regions).dtype, device=right.device)
        return torch.where(consistent, ones, complementary_weight * ones)


def sdd(
    student_regions: Tensor,
    teacher_regions: Tensor,
    labels: Tensor,
    base: Callable[..., Tensor],
    complementary_weight: float = 2.0,
    **base_args,
) -> Tensor:
    """Scale Decoupled Distillation (Wei et al., CVPR 2024): the base loss on every region, SDD-weighted.

    L = Σ_b Σ_r w_br · base(s_br, t_br, y_b) / (R · B), with w from `sdd_region_weights` and `base`
    `kd` or `dkd` (its arguments in `base_args`, e.g. temperature, alpha, beta, standardize).
    This is the normalisation of the SDD code (`sdd_kd_loss`, `multi_dkd`): every region of every sample
    counts once, complementary ones `complementary_weight` times. With one region (scale 1 only) it is
    the base loss. The SDD code replaces NaN terms by 0; kdcache's terms are finite by construction.
    """
    call = "sdd()"
    if student_regions.dim() == 2 and teacher_regions.dim() == 2:  # [B, C]: the global logit, one region
        student_regions, teacher_regions = student_regions[:, None], teacher_regions[:, None]
    if student_regions.dim() != 3:
        raise KdcacheError(f"{call}: logits must be [B, C] or region logits [B, R, C]; got shape "
                           f"{tuple(student_regions.shape)}")
    batch, regions, _ = student_regions.shape
    if labels.shape != (batch,):
        raise KdcacheError(f"{call}: labels must be [B] = ({batch},); got {tuple(labels.shape)}")
    if base is kd:
        per_region = kd(student_regions, teacher_regions, reduction="none", **base_args)
    elif base is dkd:
        per_region = dkd(student_regions, teacher_regions, labels, reduction="none", **base_args)
    else:
        raise KdcacheError(f"{call}: base must be kdcache.losses.kd or kdcache.losses.dkd; got {base!r}")
    weights = sdd_region_weights(teacher_regions, labels, complementary_weight)
    return (weights * per_region).sum() / (regions * batch)


def sdd_lskd(
    student_regions: Tensor,
    teacher_regions: Tensor,
    labels: Tensor,
    base: Callable[..., Tensor] = dkd,
    complementary_weight: float = 2.0,
    **base_args,
) -> Tensor:
    """SDD-LSKD, the fusion kdcache is named for: SDD with every region's logits z-scored before the base loss.

    Both the student's and the teacher's logits of every region are standardised (LS), then the base
    loss runs at one base temperature for all scales, then SDD weights and normalises the regions
    (see `sdd`). The recipe (SDD-LSKD README) is DKD-based: α 1, β 8, T 4, warm-up 20 epochs, scales
    1, 2, 4, complementary weight 2, CE weight 1 (`configs/losses.yaml`, `sdd-lskd`).
    Provenance: that README is Shardzzi/SDD-LSKD-Fusion@33f72c1; the normalisation is SDD's. The fusion's
    own code differs by version (T applied twice, no T², or α 9, β 72, T 2 summed with no 1/(R·B)); the
    comment above `sdd-lskd` in `configs/losses.yaml` lists each with its commits.
    """
    return sdd(student_regions, teacher_regions, labels, base, complementary_weight, standardize=True, **base_args)


def swap_target_max(logits: Tensor, labels: Tensor) -> Tensor:
    """SLD's swap: where the largest logit is not the label's, exchange the two values; other rows unchanged."""
    labels = labels.long().unsqueeze(-1)
    top = logits.argmax(dim=-1, keepdim=True)
    target_value, top_value = logits.gather(-1, labels), logits.gather(-1, top)
    # where top == label both writes hit the same cell with the same value: the row is unchanged
    return logits.scatter(-1, labels, top_value).scatter(-1, top, target_value)


def sld_teacher_term(student: Tensor, teacher: Tensor, labels: Tensor, temperatures: Sequence[float]) -> Tensor:
    """SLD's first term: Σ_T KD_T(s, swap(t)), KD from the teacher with its label and top logits swapped."""
    s, t = upcast(student), upcast(teacher)
    swapped = swap_target_max(t, _check_labels(labels, s, "sld_teacher_term()"))
    return sum(kd(s, swapped, temperature) for temperature in temperatures)


def sld_student_term(student: Tensor, labels: Tensor, temperatures: Sequence[float], detach: bool = False) -> Tensor:
    """SLD's second term: Σ_T KD_T(s, swap(s)), KD from the student's own swapped logits (a fixed target if detach)."""
    s = upcast(student)
    swapped = swap_target_max(s.detach() if detach else s, _check_labels(labels, s, "sld_student_term()"))
    return sum(kd(s, swapped, temperature) for temperature in temperatures)


def sld_switched(epoch: float, switch_epoch: float) -> bool:
    """Whether SLD's second teacher (the swapped student) is on: from epoch ⌊epoch⌋ > γ, epochs counted from 1."""
    return math.floor(epoch) > switch_epoch


def sld(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor,
    temperatures: Sequence[float],
    epoch: float,
    switch_epoch: float,
    detach_student_teacher: bool = False,
) -> Tensor:
    """Swapped Logit Distillation (Limantoro et al. 2025): KD from swapped teachers, summed over temperatures.

    L = Σ_T KD_T(s, swap(t))  +  [⌊epoch⌋ > switch_epoch] · Σ_T KD_T(s, swap(s)),
    swap() exchanging the label's logit with the largest one where they differ (`swap_target_max`),
    KD_T the Hinton loss at temperature T (`kd`). Followed: the official code (SLD.py, `swap`, `kd_loss`:
    temperatures 1..6, second teacher from epoch > γ = 150 with the epoch counted from 1, CE 0.1 and KD
    0.9 from its cfg.py) and the README/abstract (two teachers, loss scheduling). A fractional epoch
    e + step/steps (e counted from 1) switches like the integer e, as in the official code.
    Differences: the official trainer distils two augmented views (weak and strong) per step, kdcache the
    one view it is given. As the official code, the swapped student logits are not detached (gradient flows
    through both sides of the second KL); `detach_student_teacher=True` treats them as a fixed target
    instead, as a teacher is (the same value, another gradient: 65 % apart after the switch).
    """
    loss = sld_teacher_term(student, teacher, labels, temperatures)
    if sld_switched(epoch, switch_epoch):
        loss = loss + sld_student_term(student, labels, temperatures, detach_student_teacher)
    return loss


def dml(student: Tensor, peers: Tensor, temperature: float) -> Tensor:
    """Deep mutual learning's term per sample [B]: T²·KL(p̄ ‖ softmax(student/T)), p̄ the mean of the peers'
    softened predictions softmax(peers[k]/T) (peers [P, B, C], detached by the caller; Zhang et al., CVPR 2018)."""
    target = torch.softmax(peers / temperature, dim=-1).mean(dim=0)
    log_student = F.log_softmax(student / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_student, target, reduction="none").sum(dim=-1)


def deit_hard_distillation(distillation: Tensor, teacher: Tensor) -> Tensor:
    """DeiT's hard-label term: CE(ψ(Z_dist), y_t), y_t = argmax_c Z_t(c) the teacher's decision, mean over samples
    (the distillation head's logits against the teacher's logits [B, C]; Touvron et al., ICML 2021)."""
    distillation, teacher = _prepare(distillation, teacher, False, "deit_hard_distillation()")
    return F.cross_entropy(distillation, teacher.argmax(dim=-1))


def deit_hard(student: Tensor, distillation: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
    """DeiT's hard-label distillation: ½ CE(ψ(Z_s), y) + ½ CE(ψ(Z_dist), y_t), y_t = argmax Z_t.

    student: the class head's logits [B, C]; distillation: the distillation head's [B, C]; teacher: [B, C];
    labels: [B]. Each cross-entropy is a mean over samples, as the released code's (losses.py, alpha 0.5).
    """
    return 0.5 * F.cross_entropy(upcast(student), labels.long()) + 0.5 * deit_hard_distillation(distillation, teacher)


def deit_soft(student: Tensor, distillation: Tensor, teacher: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """DeiT's soft distillation with its ½/½ weighting: ½ CE(ψ(Z_s), y) + ½ τ² KL(ψ(Z_t/τ) ‖ ψ(Z_dist/τ)).

    The KL term is `kd(distillation, teacher, τ)`: KL from the teacher's softened prediction (the released code's
    direction, F.kl_div(log ψ(Z_dist/τ), log ψ(Z_t/τ))), summed over classes, a mean over samples as the paper has
    it.
    The released code divides the summed KL by B·C (`outputs_kd.numel()`), a term C times smaller.
    """
    return 0.5 * F.cross_entropy(upcast(student), labels.long()) + 0.5 * kd(distillation, teacher, temperature)
