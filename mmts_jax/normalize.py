r"""Row-wise cosine normalisation, shared by the models (their output heads) and the losses.

It lives outside both packages so that the models do not import the losses (and the losses do not
import the models): each imports this module only.

.. math::
  \hat x_i = \frac{x_i}{\max(\lVert x_i \rVert_2, \epsilon)}

computed in float32 for bf16/f16/f32 inputs (float64 for float64 inputs), as the official MM-TS
`sim_matrix` does with `eps = 1e-8`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["COSINE_EPS", "compute_dtype", "cosine_normalize"]

COSINE_EPS = 1e-8


def compute_dtype(*xs) -> jnp.dtype:
  """The accumulation dtype: float32 for bf16/f16/f32 inputs, float64 when x64 inputs come in.

  Example:
    >>> import jax.numpy as jnp
    >>> compute_dtype(jnp.ones(2, jnp.bfloat16))
    dtype('float32')
  """
  return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def cosine_normalize(x: jax.Array, eps: float = COSINE_EPS) -> jax.Array:
  """`x / max(||x||, eps)` along the last axis, in the compute dtype.

  Args:
    x: `(..., D)` array.
    eps: lower bound of the norm (an all-zero row stays zero instead of becoming NaN).

  Example:
    >>> import jax.numpy as jnp
    >>> cosine_normalize(jnp.array([[3.0, 4.0], [0.0, 0.0]])).tolist()
    [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
  """
  x = x.astype(compute_dtype(x))
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)
