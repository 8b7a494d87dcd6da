"""Layer norm with a hand-written backward pass that keeps only its input and two numbers per
row: Flax `nn.LayerNorm`'s parameters and function, less memory traffic.

For a row x of C features (statistics in float32, as Flax computes them, fast variance):

    mu = mean(x),  var = max(mean(x^2) - mu^2, 0),  r = 1 / sqrt(var + eps),
    xhat = (x - mu) r,  y = xhat * scale + bias          (cast to `dtype`).

Backward, with g = dL/dy (float32) and N the rows:

    dbias = sum_N g,  dscale = sum_N g * xhat,  gh = g * scale,
    dx = r (gh - mean(gh) - xhat * mean(gh * xhat))       (cast to x's dtype).

XLA's automatic backward of Flax's layer norm keeps `x - mu` in float32 (twice the bytes of a
bfloat16 activation) and, on the H200 profile of run 6, runs the norm and its gradient in about
a dozen kernels per layer with the residual stream transposed to (L, C, B)
(`benchmarks/profile_attribution.py`). Here the backward keeps x in its own dtype, mu and r, and
recomputes xhat, so XLA sees one row-wise formula per direction.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8))
  >>> params = nn.LayerNorm().init(jax.random.PRNGKey(1), x)
  >>> lean = LeanLayerNorm().apply(params, x)
  >>> bool(jnp.allclose(lean, nn.LayerNorm().apply(params, x), atol=1e-5))
  True
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _stats(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array]:
  """float32 mean and 1/sqrt(var + eps) over the last axis (Flax's fast variance)."""
  xf = x.astype(jnp.float32)
  mu = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.maximum(jnp.mean(xf * xf, axis=-1, keepdims=True) - mu * mu, 0.0)
  return mu, jax.lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(
  x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Dtype
) -> jax.Array:
  """`(x - mean) / sqrt(var + eps) * scale + bias` over the last axis, in `dtype`.

  Example:
    >>> y = layer_norm(jnp.array([[1.0, 3.0]]), jnp.ones(2), jnp.zeros(2), 1e-6, jnp.float32)
    >>> [round(float(v), 4) for v in y[0]]
    [-1.0, 1.0]
  """
  return _normalize(x, scale, bias, epsilon, dtype)[0]


def _normalize(x, scale, bias, epsilon, dtype):
  """`(y, mu, r)`: the forward and the two row statistics the backward keeps."""
  mu, r = _stats(x, epsilon)
  y = (x.astype(jnp.float32) - mu) * r * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(dtype), mu, r


def _fwd(x, scale, bias, epsilon, dtype):
  y, mu, r = _normalize(x, scale, bias, epsilon, dtype)
  return y, (x, mu, r, scale, bias)


def _bwd(epsilon, dtype, residuals, g):
  del epsilon, dtype
  x, mu, r, scale, bias = residuals
  g = g.astype(jnp.float32)
  xhat = (x.astype(jnp.float32) - mu) * r
  rows = tuple(range(x.ndim - 1))
  dbias = jnp.sum(g, axis=rows)
  dscale = jnp.sum(g * xhat, axis=rows)
  gh = g * scale.astype(jnp.float32)
  dx = r * (
    gh - jnp.mean(gh, axis=-1, keepdims=True) - xhat * jnp.mean(gh * xhat, axis=-1, keepdims=True)
  )
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


layer_norm.defvjp(_fwd, _bwd)


class LeanLayerNorm(nn.Module):
  """`nn.LayerNorm` over the last axis (parameters `scale`, `bias` of shape (C,), ones and
  zeros, epsilon 1e-6: Flax's defaults) through `layer_norm`'s hand-written backward."""

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    return layer_norm(x, scale, bias, self.epsilon, self.dtype)


def make_layer_norm(lean: bool, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Module:
  """`LeanLayerNorm` if `lean`, else Flax's `nn.LayerNorm` (same parameters either way)."""
  cls = LeanLayerNorm if lean else nn.LayerNorm
  return cls(dtype=dtype, param_dtype=param_dtype, name=name)
