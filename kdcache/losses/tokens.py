"""Token losses for language-model distillation from a top-k token-logit cache: pure functions on tensors.

Inputs. `student_logits [B, T, V]` (the student's logits at every token position); `teacher_ids [B, T, k]`
(int64, the teacher's top-k token ids, duplicate-free) and `teacher_logprobs [B, T, k]` (the teacher's
full-vocabulary log_softmax at those ids, decoded consistent with the stored tail: Σ exp(logprobs) ≤ 1 and the
tail m_T = 1 − Σ exp(logprobs)); `mask [B, T]` (bool: True where a position counts) or None (every position).
Each loss is the mean over the unmasked positions of a per-position divergence; a fully masked batch gives 0
(gradient 0). Masked positions are never read: their ids and log-probabilities may be padding (−100, −inf).

Distributions. q = softmax(student_logits / T) over the whole vocabulary; p = exp(teacher_logprobs).
  tail="bucket"       k + 1 outcomes: the k ids and "any other token". Teacher (p, m_T), student (q_ids, m_S),
                      m_S = 1 − Σ q_ids, computed as the logsumexp of the student's logits with the k ids
                      left out (exact; no 1 − x cancellation). Where the ids cover the vocabulary (k = V) the
                      student has no tail: that outcome is dropped (a teacher tail there is rounding).
  tail="renormalize"  the teacher renormalised over its ids, p̂ = p / Σ p, and 0 for every other token; the
                      student is its full distribution (its mass outside the ids, m_S, one outcome that p̂ gives
                      0). KL is then DistillKit's `missing=ZERO`: Σ p̂ (log p̂ − log q_ids).
Temperature T (as DistillKit's `get_target_logprobs`): the student's logits are divided by T; the teacher's
stored outcomes (its k probabilities, and its tail for "bucket") are raised to 1/T and renormalised. At T = 1
that is the identity for consistent inputs (Σ p ≤ 1; a Σ p above 1, rounding, is renormalised to 1). Every
divergence at temperature T is multiplied by T², per position, before the mean (Hinton's gradient scale).
0 · log 0 = 0 throughout: a teacher outcome of probability 0 (m_T = 0) adds nothing and no NaN to the value or
the gradient.

Precision. fp16/bf16 student logits are computed in float32 (the result is float32); float32 and float64 keep
their dtype; the teacher's values are cast to it. Memory is O(B·T·V) (a few [B, T, V] tensors; nothing
[B, T, V, k]). The teacher's inputs are detached: only the student's logits (and hidden states) get gradients.

`TOKEN_LOSSES` names the four divergences for the distill loop ("token-kl", "token-reverse-kl", "token-jsd",
"token-tvd"); each takes the same arguments (student_logits, teacher_ids, teacher_logprobs, mask, tail=,
temperature=). `distilbert` is DistilBERT's combination (CE + KD + cosine).

Sources (formulas checked against these; no code was copied):
  DistillKit  arcee-ai/DistillKit `distillkit/lossfuncs/common.py` (`get_target_logprobs`: top-k log-probs
              raised to 1/T and renormalised, the tail as a (k+1)-th outcome under SYMMETRIC_UNIFORM),
              `kl.py` (`sparse_kl_div_inner`; the T² scale in `KLDLoss`).
  DistilBERT  Sanh et al. 2019; huggingface/transformers `examples/research_projects/distillation`
              (`distiller.py`: loss = alpha_ce·T²·KL + alpha_mlm|alpha_clm·CE + alpha_cos·cosine embedding
              loss; `train.py` defaults alpha_ce 5.0, alpha_mlm 2.0 (alpha_clm for causal models), alpha_cos
              1.0, temperature 2.0).
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcache.errors import KdcacheError
from kdcache.tensors import upcast

TAILS = ("bucket", "renormalize")
NEG_INF = float("-inf")

# ---------------------------------------------------------------------------------------------
# checks


def _shape(tensor: Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _check_inputs(call: str, student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor,
                  mask: Tensor | None, tail: str, temperature: float) -> None:
    if tail not in TAILS:
        raise KdcacheError(f"{call}: tail must be 'bucket' or 'renormalize'; got {tail!r}")
    if not temperature > 0:
        raise KdcacheError(f"{call}: temperature must be positive; got {temperature}")
    if student_logits.dim() != 3:
        raise KdcacheError(f"{call}: student logits must be [B, T, V]; got shape {_shape(student_logits)}")
    if teacher_ids.dim() != 3 or teacher_ids.shape != teacher_logprobs.shape:
        raise KdcacheError(f"{call}: teacher ids {_shape(teacher_ids)} and teacher log-probabilities "
                           f"{_shape(teacher_logprobs)} must both be [B, T, k], the same shape")
    if teacher_ids.is_floating_point() or teacher_ids.is_complex():
        raise KdcacheError(f"{call}: teacher ids must be integer token ids (int64); got {teacher_ids.dtype}")
    if teacher_ids.shape[:2] != student_logits.shape[:2]:
        raise KdcacheError(f"{call}: teacher ids {_shape(teacher_ids)} and student logits "
                           f"{_shape(student_logits)} differ in [B, T]")
    if not 1 <= teacher_ids.shape[2] <= student_logits.shape[2]:
        raise KdcacheError(f"{call}: teacher ids {_shape(teacher_ids)} need 1 to V = {student_logits.shape[2]} "
                           f"ids per position (student logits {_shape(student_logits)})")
    if mask is not None and mask.shape != student_logits.shape[:2]:
        raise KdcacheError(f"{call}: mask {_shape(mask)} must be [B, T] of the student logits "
                           f"{_shape(student_logits)}")


# ---------------------------------------------------------------------------------------------
# the k + 1 outcomes


def _positions(mask: Tensor | None, logits: Tensor) -> Tensor:
    """The mask as bool [B, T]; every position when None."""
    if mask is None:
        return torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    return mask.to(device=logits.device, dtype=torch.bool)


# where the student's k ids hold more than this share of its mass, its tail m_S = 1 − Σ q_ids is taken from the
# logits outside the ids (exact) rather than from the complement (which cancels: float32 q_ids hold ~1e-7 each)
COMPLEMENT_SAFE = 1 - 1e-3


def _student_log_probs(scaled_logits: Tensor, ids: Tensor) -> Tensor:
    """log (q_ids, m_S) `[B, T, k+1]` of softmax(scaled_logits); m_S's log is −inf where the ids cover V.

    One log_softmax over the vocabulary; m_S from the k ids' complement, summed in float64, at every position
    whose ids hold less than COMPLEMENT_SAFE of the mass (a student in training, nearly always), and from a second
    pass over the other logits only where they hold more (exact there too)."""
    log_q = scaled_logits.log_softmax(dim=-1)
    log_ids = log_q.gather(-1, ids)
    kept = log_ids.double().exp().sum(dim=-1, keepdim=True)
    log_tail = torch.log1p(-kept.clamp(max=COMPLEMENT_SAFE)).to(log_ids.dtype)
    exact = (kept > COMPLEMENT_SAFE).squeeze(-1)
    if exact.any():
        # where the ids cover V this is −inf with a NaN gradient, and every entry of that gradient falls on an id,
        # which scatter's backward drops: the student's gradient stays finite
        rows = log_q[exact].scatter(-1, ids[exact], NEG_INF).logsumexp(dim=-1, keepdim=True)
        log_tail = log_tail.index_put((exact,), rows)
    return torch.cat([log_ids, log_tail], dim=-1)


def _teacher_log_probs(logprobs: Tensor, has_tail: Tensor, temperature: float) -> Tensor:
    """log of the teacher's k + 1 outcomes `[B, T, k+1]`, raised to 1/T and renormalised; tail −inf where absent."""
    log_kept = logprobs.logsumexp(dim=-1, keepdim=True).clamp(max=0.0)
    log_tail = torch.log(-torch.expm1(log_kept))  # log m_T = log(1 − Σ p); −inf when m_T = 0
    outcomes = torch.cat([logprobs, torch.where(has_tail, log_tail, NEG_INF)], dim=-1) / temperature
    return outcomes - outcomes.logsumexp(dim=-1, keepdim=True)


def _outcomes(student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, positions: Tensor,
              tail: str, temperature: float) -> tuple[Tensor, Tensor]:
    """The teacher's and the student's log-probabilities over the k + 1 outcomes at temperature T."""
    scaled = upcast(student_logits) / temperature if temperature != 1 else upcast(student_logits)
    kept = positions.unsqueeze(-1)
    # masked positions read valid distinct ids and finite log-probabilities, whatever padding they hold
    ids = torch.where(kept, teacher_ids.long(), torch.arange(teacher_ids.shape[-1], device=teacher_ids.device))
    logprobs = torch.where(kept, teacher_logprobs.detach().to(scaled.dtype), 0.0)
    log_q = _student_log_probs(scaled, ids)
    student_has_tail = log_q[..., -1:] > NEG_INF
    has_tail = student_has_tail & (tail == "bucket")
    with torch.no_grad():
        log_p = _teacher_log_probs(logprobs, has_tail, temperature)
    return log_p, log_q


# ---------------------------------------------------------------------------------------------
# divergences over the last axis of log-probabilities (−inf: probability 0)


def _weighted_log_ratio(log_w: Tensor, log_other: Tensor) -> Tensor:
    """Σ w (log w − log other) over the last axis; outcomes with w = 0 add 0, to the value and the gradient."""
    present = log_w > NEG_INF
    # where() on both sides: an −inf in the unused branch would send NaN through the gradient
    safe_w = torch.where(present, log_w, 0.0)
    safe_other = torch.where(present, log_other, 0.0)
    return torch.where(present, safe_w.exp() * (safe_w - safe_other), 0.0).sum(dim=-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    return _weighted_log_ratio(log_p, log_q)


def _reverse_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    support = log_p > NEG_INF
    log_q_on_support = torch.where(support, log_q, NEG_INF)
    return _weighted_log_ratio(log_q_on_support - log_q_on_support.logsumexp(dim=-1, keepdim=True), log_p)


def _jsd(log_p: Tensor, log_q: Tensor) -> Tensor:
    neither = (log_p == NEG_INF) & (log_q == NEG_INF)
    log_mixture = torch.logaddexp(torch.where(neither, 0.0, log_p), torch.where(neither, 0.0, log_q)) - math.log(2)
    return 0.5 * (_weighted_log_ratio(log_p, log_mixture) + _weighted_log_ratio(log_q, log_mixture))


def _tvd(log_p: Tensor, log_q: Tensor) -> Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)


def _masked_mean(per_position: Tensor, positions: Tensor) -> Tensor:
    """Mean over the unmasked positions; 0 (gradient 0) when there are none."""
    total = torch.where(positions, per_position, 0.0).sum()
    return total / positions.sum().clamp(min=1)


def _token_loss(call: str, divergence: Callable[[Tensor, Tensor], Tensor], student_logits: Tensor,
                teacher_ids: Tensor, teacher_logprobs: Tensor, mask: Tensor | None, tail: str,
                temperature: float) -> Tensor:
    _check_inputs(call, student_logits, teacher_ids, teacher_logprobs, mask, tail, temperature)
    positions = _positions(mask, student_logits)
    log_p, log_q = _outcomes(student_logits, teacher_ids, teacher_logprobs, positions, tail, temperature)
    return temperature**2 * _masked_mean(divergence(log_p, log_q), positions)


# ---------------------------------------------------------------------------------------------
# the losses


def token_kl(student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, mask: Tensor | None = None,
             tail: str = "bucket", temperature: float = 1.0) -> Tensor:
    """T² · mean over unmasked positions of KL(teacher ‖ student) on the k + 1 (bucket) or k (renormalize) outcomes.

    bucket: Σ_i p_i (log p_i − log q_i) + m_T (log m_T − log m_S); renormalize: Σ_i p̂_i (log p̂_i − log q_i),
    p̂ = p / Σ p, q the student's full-vocabulary softmax at the ids (DistillKit's sparse KL). At temperature T the
    teacher's outcomes are p^(1/T) renormalised, q = softmax(logits / T), and the KL per position is scaled by T².
    """
    return _token_loss("token_kl()", _kl, student_logits, teacher_ids, teacher_logprobs, mask, tail, temperature)


def token_reverse_kl(student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor,
                     mask: Tensor | None = None, tail: str = "bucket", temperature: float = 1.0) -> Tensor:
    """T² · mean over unmasked positions of KL(student ‖ teacher), on the teacher's support.

    bucket: Σ_i q_i (log q_i − log p_i) + m_S (log m_S − log m_T). The reverse KL is infinite wherever the
    student has mass the teacher gives 0 (its tail under renormalize, or when m_T = 0); there it is taken on the
    teacher's support, the student renormalised over it: renormalize is KL(q̂ ‖ p̂), q̂ = q_ids / Σ q_ids. A tiny
    m_T > 0 keeps its tail outcome, so the loss grows as m_S log(m_S / m_T). Temperature as `token_kl`; the
    reverse KL per position is scaled by T².
    """
    return _token_loss("token_reverse_kl()", _reverse_kl, student_logits, teacher_ids, teacher_logprobs, mask,
                       tail, temperature)


def token_jsd(student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, mask: Tensor | None = None,
              tail: str = "bucket", temperature: float = 1.0) -> Tensor:
    """T² · mean over unmasked positions of JSD(P, Q) = ½ KL(P ‖ M) + ½ KL(Q ‖ M), M = (P + Q) / 2, natural log.

    P, Q the teacher's and the student's outcomes (bucket: the ids and the tail; renormalize: p̂ on the ids, and
    the student's mass outside them against 0, which adds ½ m_S log 2, DistillKit's `missing=ZERO`). 0 ≤ JSD ≤
    log 2 before the scale. Temperature as `token_kl`; the JSD per position is scaled by T².
    """
    return _token_loss("token_jsd()", _jsd, student_logits, teacher_ids, teacher_logprobs, mask, tail, temperature)


def token_tvd(student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, mask: Tensor | None = None,
              tail: str = "bucket", temperature: float = 1.0) -> Tensor:
    """T² · mean over unmasked positions of the total variation ½ Σ |p − q| over the outcomes.

    bucket: ½ (Σ_i |p_i − q_i| + |m_T − m_S|); renormalize: ½ (Σ_i |p̂_i − q_i| + m_S), the distance between
    p̂ (0 off the ids) and the full q. 0 ≤ TVD ≤ 1 before the scale. Temperature as `token_kl`; the TVD per
    position is scaled by T².
    """
    return _token_loss("token_tvd()", _tvd, student_logits, teacher_ids, teacher_logprobs, mask, tail, temperature)


TOKEN_LOSSES: dict[str, Callable[..., Tensor]] = {
    "token-kl": token_kl,
    "token-reverse-kl": token_reverse_kl,
    "token-jsd": token_jsd,
    "token-tvd": token_tvd,
}


def _check_distilbert(labels: Tensor, student_logits: Tensor, student_hidden: Tensor,
                      teacher_hidden: Tensor) -> None:
    call = "distilbert()"
    if labels.shape != student_logits.shape[:2]:
        raise KdcacheError(f"{call}: labels {_shape(labels)} must be [B, T] of the student logits "
                           f"{_shape(student_logits)}")
    if student_hidden.dim() != 3 or teacher_hidden.dim() != 3:
        raise KdcacheError(f"{call}: hidden states must be [B, T, D]; got student {_shape(student_hidden)} and "
                           f"teacher {_shape(teacher_hidden)}")
    if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
        raise KdcacheError(f"{call}: student hidden {_shape(student_hidden)} and teacher hidden "
                           f"{_shape(teacher_hidden)} differ in size D; project the student's hidden states to "
                           f"the teacher's size first")
    if student_hidden.shape[:2] != student_logits.shape[:2] or teacher_hidden.shape[:2] != student_logits.shape[:2]:
        raise KdcacheError(f"{call}: student hidden {_shape(student_hidden)} and teacher hidden "
                           f"{_shape(teacher_hidden)} must be [B, T, D] of the student logits "
                           f"{_shape(student_logits)}")


def distilbert(student_logits: Tensor, labels: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor,
               student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None,
               temperature: float = 2.0, ce_weight: float = 2.0, kd_weight: float = 5.0, cos_weight: float = 1.0,
               tail: str = "bucket") -> Tensor:
    """DistilBERT's loss (Sanh et al. 2019): ce_weight·CE + kd_weight·token_kl at T + cos_weight·(1 − cosine).

    CE: the student's cross-entropy against `labels` (the next-token ids, [B, T]) at T = 1; token_kl includes its
    T²; the cosine is between the student's and the teacher's hidden states [B, T, D]; each is a mean over the
    unmasked positions. The defaults are DistilBERT's (distillation `train.py`: alpha_ce 5 on the KD term, which
    it calls ce, alpha_mlm/alpha_clm 2 on the label CE, alpha_cos 1, temperature 2).
    """
    kd_term = token_kl(student_logits, teacher_ids, teacher_logprobs, mask, tail=tail, temperature=temperature)
    _check_distilbert(labels, student_logits, student_hidden, teacher_hidden)
    positions = _positions(mask, student_logits)
    logits = upcast(student_logits)
    safe_labels = torch.where(positions, labels.long(), 0)  # masked positions may hold −100
    cross_entropy = logits.logsumexp(dim=-1) - logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    hidden = upcast(student_hidden)
    cosine = F.cosine_similarity(hidden, teacher_hidden.detach().to(hidden.dtype), dim=-1)
    return (ce_weight * _masked_mean(cross_entropy, positions) + kd_weight * kd_term
            + cos_weight * _masked_mean(1.0 - cosine, positions))
