"""The MM-TS loss math, materialising the (B, B) similarity matrix. Every other path (blockwise,
ring-sharded) is tested against these functions.

Conventions (as the official MM-TS / AVION code):
  * `s_ij = <image_i, text_j>`; row i of both the image->text and the text->image logits is
    divided by the anchor's own temperature `tau_i`.
  * InfoNCE = 0.5 * (CE(image->text) + CE(text->image)), mean over anchors.
  * Max-margin: `relu(m_i - (s_ii - s_ij))` for image anchors and `relu(m_i - (s_ii - s_ji))`
    for text anchors, over all `j != i`, mean over the 2B(B-1) terms, on cosine similarities.
  * Sigmoid (SigLIP): `log(1 + exp(-z_ij (s_ij / tau + b)))` over all pairs, `z_ij = +1` on the
    diagonal, -1 off it, each pair once with the image anchor's temperature and bias and once
    with the text anchor's, sum over the 2B^2 terms divided by 2B (SigLIP's loss for scalar tau).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmts_jax.losses._checks import nan_unless_valid
from mmts_jax.normalize import COSINE_EPS, compute_dtype, cosine_normalize

__all__ = [
  "COSINE_EPS",
  "compute_dtype",
  "cosine_normalize",
  "infonce_dense",
  "max_margin_dense",
  "sigmoid_dense",
  "similarity",
]


def similarity(a, b, precision=None):
  """`a @ b.T` with low-precision inputs fed to the matmul as they are and f32 accumulation."""
  out = compute_dtype(a, b)
  return jnp.matmul(a, b.T, precision=precision, preferred_element_type=out)


def _per_anchor(value, batch, dtype):
  return jnp.broadcast_to(jnp.asarray(value, dtype), (batch,))


def infonce_dense(image, text, temperature, precision=None):
  """Symmetric InfoNCE with per-anchor temperature, from the full similarity matrix."""
  b = image.shape[0]
  s = similarity(image, text, precision)
  tau = _per_anchor(temperature, b, s.dtype)
  inv_tau = 1.0 / tau
  logits_i2t = s * inv_tau[:, None]
  logits_t2i = s.T * inv_tau[:, None]
  diag = jnp.diagonal(s) * inv_tau
  loss_i2t = jax.nn.logsumexp(logits_i2t, axis=1) - diag
  loss_t2i = jax.nn.logsumexp(logits_t2i, axis=1) - diag
  return nan_unless_valid(0.5 * (jnp.mean(loss_i2t) + jnp.mean(loss_t2i)), positive=(tau,))


def max_margin_dense(image, text, margin, precision=None):
  """Bidirectional max-margin ranking loss with per-anchor margin, on cosine similarities."""
  b = image.shape[0]
  if b < 2:
    raise ValueError("max_margin: needs a batch of at least 2 (it has no negatives otherwise)")
  s = similarity(cosine_normalize(image), cosine_normalize(text), precision)
  m = _per_anchor(margin, b, s.dtype)
  pos = jnp.diagonal(s)
  off = ~jnp.eye(b, dtype=bool)
  # relu, not maximum: its gradient at the hinge is 0, as torch's relu.
  hinge_i2t = jax.nn.relu(m[:, None] - pos[:, None] + s)
  hinge_t2i = jax.nn.relu(m[:, None] - pos[:, None] + s.T)
  total = jnp.sum(jnp.where(off, hinge_i2t + hinge_t2i, 0))
  # A Python float: 2B(B-1) overflows int32 for B > 32,768.
  return nan_unless_valid(total / float(2 * b * (b - 1)), positive=(m,))


def sigmoid_dense(image, text, temperature, *, bias, precision=None):
  """The sigmoid (SigLIP) loss with per-anchor temperature and bias, from the full matrix."""
  b = image.shape[0]
  s = similarity(image, text, precision)
  tau = _per_anchor(temperature, b, s.dtype)
  c = _per_anchor(bias, b, s.dtype)
  z = 2.0 * jnp.eye(b, dtype=s.dtype) - 1.0
  # softplus(-u) = -log sigmoid(u), stable for either sign of u.
  image_anchor = jax.nn.softplus(-z * (s / tau[:, None] + c[:, None]))
  text_anchor = jax.nn.softplus(-z * (s / tau[None, :] + c[None, :]))
  loss = (jnp.sum(image_anchor) + jnp.sum(text_anchor)) / (2 * b)
  return nan_unless_valid(loss, positive=(tau,), finite=(c,))
