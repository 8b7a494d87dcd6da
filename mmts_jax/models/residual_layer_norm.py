r"""The layer norm of a pre-LN block's residual stream, whose backward pass also adds the
cotangent that reaches the stream through the skip connection: one kernel instead of the
layer norm's backward followed by an add.

A pre-LN block uses its stream x twice, `x + attn(LN(x))`: once through the layer norm and once
through the skip connection, so dL/dx is the sum of two cotangents. With `residual_layer_norm`,
which returns the pair `(x, y = LN(x))` and whose x output carries the skip connection, the
sum is part of the layer norm's own backward. For rows x of C features (float32 statistics as
in `lean_layer_norm`), a cotangent :math:`g_x` of the x output and :math:`g_y` of y:

.. math::
  \hat x = (x - \mu)\, r,\quad gh = g_y\, s,\quad
  dx = g_x + r\,\big(gh - \overline{gh} - \hat x\,\overline{gh\,\hat x}\big),\quad
  ds = \textstyle\sum_N g_y\,\hat x,\quad db = \textstyle\sum_N g_y,

dx summed in float32 and rounded once to x's dtype. With `kernel="pallas"` (where
`pallas_layer_norm.use_pallas_layer_norm` allows) dx is written by the Pallas backward kernel
with :math:`g_x` as one more operand (`pallas_layer_norm.layer_norm_bwd(..., residual=)`);
otherwise the same maths in jnp. Without it, XLA runs a separate add per layer norm in the
backward pass (read two `(N, C)` tensors, write one; on the H200 profile of issue 17 about
1.3-1.6 ms of a ViT-B/16 step at batch 256). On one H200: 83.75 vs 84.69 ms per step (run 16).

Example:
  >>> import jax, jax.numpy as jnp
  >>> x = jnp.array([[1.0, 3.0]])
  >>> f = lambda x: residual_layer_norm(x, jnp.ones(2), jnp.zeros(2), 0.0, jnp.float32, "xla")
  >>> (same, y), vjp = jax.vjp(f, x)
  >>> bool((same == x).all()), y.tolist()
  (True, [[-1.0, 1.0]])
  >>> vjp((jnp.array([[5.0, 6.0]]), jnp.array([[1.0, 1.0]])))[0].tolist()  # g_x + LN'(g_y)
  [[5.0, 6.0]]
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmts_jax.models import lean_layer_norm, pallas_layer_norm

Dtype = Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def residual_layer_norm(
  x: jax.Array,
  scale: jax.Array,
  bias: jax.Array,
  epsilon: float,
  dtype: Dtype,
  kernel: str = "xla",
) -> tuple[jax.Array, jax.Array]:
  """`(x, LN(x))`: x unchanged and `lean_layer_norm.layer_norm(x, ...)`; the backward returns
  `g_x + LN_bwd(g_y)` as dx (module docstring). `kernel`: "xla" or "pallas" as `layer_norm`.

  Example:
    >>> x, y = residual_layer_norm(jnp.array([[1.0, 3.0]]), jnp.ones(2), jnp.zeros(2), 1e-6,
    ...                            jnp.float32)
    >>> x.tolist(), [round(float(v), 4) for v in y[0]]
    ([[1.0, 3.0]], [-1.0, 1.0])
  """
  return x, lean_layer_norm.layer_norm(x, scale, bias, epsilon, dtype, kernel)


def _fwd(x, scale, bias, epsilon, dtype, kernel):
  y, residuals = lean_layer_norm.forward(x, scale, bias, epsilon, dtype, kernel)
  return (x, y), residuals


def _bwd(epsilon, dtype, kernel, residuals, cotangents):
  del epsilon, dtype, kernel
  g_x, g_y = cotangents
  return lean_layer_norm.backward(residuals, g_y, g_x=g_x)


residual_layer_norm.defvjp(_fwd, _bwd)


class ResidualLayerNorm(nn.Module):
  """`LeanLayerNorm`'s parameters (`scale` ones, `bias` zeros, both (C,); epsilon 1e-6) and
  layer norm, called as `x, y = ResidualLayerNorm()(x)` (`residual_layer_norm`): the x output is
  the one a pre-LN block adds its branch to.

  Example:
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8))
    >>> params = lean_layer_norm.LeanLayerNorm().init(jax.random.PRNGKey(1), x)
    >>> same, y = ResidualLayerNorm().apply(params, x)
    >>> bool(jnp.allclose(y, lean_layer_norm.LeanLayerNorm().apply(params, x)))
    True
  """

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel: str = "xla"

  @nn.compact
  def __call__(
    self, x: jax.Array, z: jax.Array | None = None, a: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    """`(x, LN(x))`; with a branch z and its bias a, `add_layer_norm`'s `(h, LN(h))` for
    `h = x + z + a`."""
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    if z is not None:
      if a is None:
        raise ValueError("ResidualLayerNorm: a branch z needs its bias a")
      return add_layer_norm(x, z, a, scale, bias, self.epsilon, self.dtype, self.kernel)
    return residual_layer_norm(x, scale, bias, self.epsilon, self.dtype, self.kernel)


def add_layer_norm(
  x: jax.Array,
  z: jax.Array,
  a: jax.Array,
  scale: jax.Array,
  bias: jax.Array,
  epsilon: float,
  dtype: Dtype,
  kernel: str = "xla",
) -> tuple[jax.Array, jax.Array]:
  r"""`(h, LN(h))` for the stream `h = x + z + a`: a pre-LN block's skip input x, the branch
  z before its bias, and that bias a `(C,)` (summed in float32, rounded once to x's dtype).
  The backward is `residual_layer_norm`'s with one more result, the bias gradient:

  .. math::
    dh = g_h + \mathrm{LN\_bwd}(g_y),\qquad dx = dz = dh,\qquad da = \textstyle\sum_N dh,

  With `kernel="pallas"` (where the Pallas layer norm runs) the forward is one kernel reading
  x and z and writing h and LN(h) (`pallas_layer_norm.add_layer_norm_fwd`: no separate add
  of the branch and its bias), and `da` comes from the backward kernel's own column sums
  (`layer_norm_bwd(..., column_sum=True)`: no separate reduction of dh); otherwise the same
  maths in jnp, da then summed from the rounded dh.

  Example:
    >>> x, z, a = jnp.array([[1.0, 1.0]]), jnp.array([[0.0, 1.0]]), jnp.array([0.0, 1.0])
    >>> f = lambda x, z, a: add_layer_norm(x, z, a, jnp.ones(2), jnp.zeros(2), 0.0, jnp.float32)
    >>> (h, y), vjp = jax.vjp(f, x, z, a)
    >>> h.tolist(), y.tolist()
    ([[1.0, 3.0]], [[-1.0, 1.0]])
    >>> [t.tolist() for t in vjp((jnp.array([[5.0, 6.0]]), jnp.zeros((1, 2))))]  # dx, dz, da
    [[[5.0, 6.0]], [[5.0, 6.0]], [5.0, 6.0]]
  """
  return _add_layer_norm(
    x, z, a, scale, bias, epsilon, dtype, kernel, jnp.dtype(z.dtype), jnp.dtype(a.dtype)
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _add_layer_norm(x, z, a, scale, bias, epsilon, dtype, kernel, z_dtype, a_dtype):
  return _add_fwd(x, z, a, scale, bias, epsilon, dtype, kernel, z_dtype, a_dtype)[0]


def _add_fwd(x, z, a, scale, bias, epsilon, dtype, kernel, z_dtype, a_dtype):
  del z_dtype, a_dtype
  if z.shape != x.shape or a.shape != (x.shape[-1],):
    raise ValueError(
      f"add_layer_norm: z must be {x.shape} and a ({x.shape[-1]},), got {z.shape}, {a.shape}"
    )
  if lean_layer_norm.takes_pallas(x, kernel):
    c = x.shape[-1]
    h, y, mu, r = pallas_layer_norm.add_layer_norm_fwd(
      x.reshape(-1, c), z.reshape(-1, c), a, scale, bias, epsilon, dtype
    )
    h, y = h.reshape(x.shape), y.reshape(x.shape)
    return (h, y), (h, mu, r, scale, bias)
  f32 = jnp.float32
  h = (x.astype(f32) + z.astype(f32) + a.astype(f32)).astype(x.dtype)
  y, residuals = lean_layer_norm.forward(h, scale, bias, epsilon, dtype, "xla")
  return (h, y), residuals


def _add_bwd(epsilon, dtype, kernel, z_dtype, a_dtype, residuals, cotangents):
  del epsilon, dtype, kernel
  g_h, g_y = cotangents
  h, mu, r, scale, bias = residuals
  if mu.ndim < h.ndim:  # the forward took the Pallas kernel: (N,) statistics
    c = h.shape[-1]
    rows = lambda t: t.reshape(-1, c)
    dh, ds, db, da = pallas_layer_norm.layer_norm_bwd(
      rows(h), mu, r, scale, rows(g_y), rows(g_h), column_sum=True
    )
    dh, ds, db = dh.reshape(h.shape), ds.astype(scale.dtype), db.astype(bias.dtype)
  else:
    dh, ds, db = lean_layer_norm.backward(residuals, g_y, g_x=g_h)
    da = jnp.sum(dh.astype(jnp.float32), axis=tuple(range(h.ndim - 1)))
  return dh, dh.astype(z_dtype), da.astype(a_dtype), ds, db


_add_layer_norm.defvjp(_add_fwd, _add_bwd)
