"""Nakada et al. (AISTATS 2023) with linear encoders: the contrastive cross-covariance `S(beta)`,
closed-form gradients and minimisers, a linear generative model, and learning from unpaired data.

Imports jax, numpy (and scipy lazily, for optimal assignment) only.
"""

from __future__ import annotations

from mmts_jax.projects.nakada.cross_covariance import (
  centered_cross_covariance,
  cross_covariance,
  infonce_weights,
  linear_weights,
  loss_weights,
)
from mmts_jax.projects.nakada.linear_model import (
  LinearEncoders,
  closed_form_grad,
  embed,
  gradient_descent,
  identity,
  init_encoders,
  linear_minimiser,
  loss,
  regulariser,
  similarities,
  unimodal_minimiser,
)
from mmts_jax.projects.nakada.subspace import orthonormal_basis, row_space, sin_theta
from mmts_jax.projects.nakada.unpaired import (
  combined_loss,
  detect_pairs,
  pair_metrics,
  self_train_linear,
)

__all__ = [
  "centered_cross_covariance",
  "cross_covariance",
  "infonce_weights",
  "linear_weights",
  "loss_weights",
  "LinearEncoders",
  "closed_form_grad",
  "embed",
  "gradient_descent",
  "identity",
  "init_encoders",
  "linear_minimiser",
  "loss",
  "regulariser",
  "similarities",
  "unimodal_minimiser",
  "orthonormal_basis",
  "row_space",
  "sin_theta",
  "combined_loss",
  "detect_pairs",
  "pair_metrics",
  "self_train_linear",
]
