"""Feature tower: an MLP over precomputed (frozen) video or image features, for fine-tuning
the projection on top of a frozen backbone (AVION / VAST-style feature training).

`features (B, F) -> [Dense -> GELU -> Dropout] x len(hidden_dims) -> LayerNorm -> (B, H_last)`.
With `hidden_dims=()` it is the identity plus a LayerNorm (a linear probe once projected).

Example:
  >>> import jax, jax.numpy as jnp
  >>> tower = FeatureTower(hidden_dims=(64,))
  >>> x = jnp.ones((4, 256))
  >>> tower.apply(tower.init(jax.random.PRNGKey(0), x), x).shape
  (4, 64)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class FeatureTower(nn.Module):
  hidden_dims: Sequence[int] = (1024,)
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, *, train: bool = False):
    if features.ndim != 2:
      raise ValueError(f"FeatureTower: features must be (B, F), got shape {tuple(features.shape)}")
    x = features.astype(self.dtype)
    for i, h in enumerate(self.hidden_dims):
      x = nn.Dense(h, dtype=self.dtype, param_dtype=self.param_dtype, name=f"dense_{i}")(x)
      x = nn.gelu(x)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln")(x)
