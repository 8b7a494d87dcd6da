"""Sentence embeddings from token states: mean / CLS / max pooling and L2 normalisation.

Mean pooling follows sentence-transformers: `sum_t m_t h_t / max(sum_t m_t, 1e-9)` over the
attention mask `m`; normalisation divides by `max(||e||_2, 1e-12)` (torch `F.normalize`).
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["pool", "l2_normalize", "POOLING_MODES"]

POOLING_MODES = ("mean", "cls", "max")


def pool(hidden, mask, mode: str = "mean"):
  """`(B, L, H)` token states and `(B, L)` mask -> `(B, H)` float32 sentence embeddings.

  Example:
    >>> h = jnp.arange(12.0).reshape(1, 3, 4)
    >>> pool(h, jnp.array([[1, 1, 0]]))
    Array([[2., 3., 4., 5.]], dtype=float32)
  """
  hidden = hidden.astype(jnp.float32)
  m = mask.astype(jnp.float32)[..., None]
  if mode == "mean":
    return (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)
  if mode == "cls":
    return hidden[:, 0]
  if mode == "max":
    # Masked positions can never win (sentence-transformers uses -1e9 the same way).
    return jnp.where(m > 0, hidden, -1e9).max(axis=1)
  raise ValueError(f"pooling mode {mode!r} is not one of {POOLING_MODES}")


def l2_normalize(x, eps: float = 1e-12):
  """`x / max(||x||_2, eps)` along the last axis."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)
