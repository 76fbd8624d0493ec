"""Distillation losses: pure functions on tensors (`functions` on logits, `features` on features and embeddings,
`tokens` on a language model's logits against a top-k token cache, `dense` on dense-prediction maps) and the
`--loss NAME` specs (`spec`)."""

from kdcache.losses.dense import cwd, pixel_kd
from kdcache.losses.features import (at, crd, embedding_cosine, fitnet, irg, irg_edge, irg_vertex, rkd, rkd_angle,
                                      rkd_distance, sp)

from kdcache.losses.functions import (
                                      deit_hard,
                                      deit_hard_distillation,
                                      deit_soft,
                                      dkd,
                                      dml,
                                      kd,
                                      nckd,
                                      sdd,
                                      sdd_lskd,
                                      sdd_region_weights,
                                      sld,
                                      sld_student_term,
                                      sld_switched,
                                      sld_teacher_term,
                                      standardize,
                                      swap_target_max,
                                      tckd,
                                      upcast,
)
from kdcache.losses.spec import (
                                      PAPER_EPOCHS,
                                      PEERS,
                                      LossSpec,
                                      LossSum,
                                      get_loss,
                                      list_losses,
                                      loss_parts,
                                      register_loss,
                                      scaled_loss,
)

from kdcache.losses.tokens import TOKEN_LOSSES, distilbert, token_jsd, token_kl, token_reverse_kl, token_tvd
from kdcache.tensors import attention_map  # the map AT compares, made where models make theirs

__all__ = ["PAPER_EPOCHS", "PEERS", "at", "attention_map", "deit_hard", "deit_hard_distillation", "deit_soft",
           "dkd", "dml", "fitnet", "get_loss", "kd", "list_losses",
           "loss_parts",
           "LossSpec", "LossSum", "nckd", "register_loss", "rkd", "rkd_angle", "rkd_distance", "scaled_loss", "sdd",
           "sdd_lskd",
           "sdd_region_weights", "sld", "sld_student_term", "sld_switched", "sld_teacher_term", "sp", "standardize",
           "swap_target_max", "tckd", "upcast", "crd", "irg", "irg_edge", "irg_vertex",
           "TOKEN_LOSSES", "distilbert", "token_jsd", "token_kl", "token_reverse_kl", "token_tvd",
           "cwd", "pixel_kd", "embedding_cosine"]
