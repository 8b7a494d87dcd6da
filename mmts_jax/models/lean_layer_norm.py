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

`kernel="pallas"` computes the same two directions with the fused Pallas kernels of
`pallas_layer_norm` (the input seen as `(N, C)` rows; mu and r kept as `(N,)`) where
`pallas_layer_norm.use_pallas_layer_norm` allows (GPUs, float32 / bfloat16, C <= 1024), and with
the XLA form above elsewhere (timed on an H200: `pallas_layer_norm`'s docstring).

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

from mmts_jax.models import pallas_layer_norm

Dtype = Any
KERNELS = ("xla", "pallas")


def _stats(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array]:
  """float32 mean and 1/sqrt(var + eps) over the last axis (Flax's fast variance)."""
  xf = x.astype(jnp.float32)
  mu = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.maximum(jnp.mean(xf * xf, axis=-1, keepdims=True) - mu * mu, 0.0)
  return mu, jax.lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def layer_norm(
  x: jax.Array,
  scale: jax.Array,
  bias: jax.Array,
  epsilon: float,
  dtype: Dtype,
  kernel: str = "xla",
) -> jax.Array:
  """`(x - mean) / sqrt(var + eps) * scale + bias` over the last axis, in `dtype`.

  `kernel`: "xla" (the formula as jnp operations) or "pallas" (`pallas_layer_norm`'s fused
  kernels where they run, else "xla"); same maths.

  Example:
    >>> y = layer_norm(jnp.array([[1.0, 3.0]]), jnp.ones(2), jnp.zeros(2), 1e-6, jnp.float32)
    >>> [round(float(v), 4) for v in y[0]]
    [-1.0, 1.0]
  """
  return _normalize(x, scale, bias, epsilon, dtype, kernel)[0]


def takes_pallas(x: jax.Array, kernel: str) -> bool:
  """Whether this call takes the Pallas kernels (ValueError for an unknown `kernel`)."""
  if kernel not in KERNELS:
    raise ValueError(f"layer_norm: kernel must be one of {KERNELS}, got {kernel!r}")
  # A 1-D input keeps the XLA form: `_bwd` tells the Pallas residuals by their (N,) mu, which
  # a single row's (1,) mu would not differ from. An empty input has no row for a program.
  if kernel == "xla" or x.ndim < 2 or x.size == 0:
    return False
  return pallas_layer_norm.use_pallas_layer_norm(x.shape[-1], x.dtype)


def _normalize(x, scale, bias, epsilon, dtype, kernel):
  """`(y, mu, r)`: the forward and the two row statistics the backward keeps. The Pallas
  form keeps them as `(N,)` for the `(N, C)` rows of x, the XLA form as x's shape with C -> 1."""
  if takes_pallas(x, kernel):
    y, mu, r = pallas_layer_norm.layer_norm_fwd(
      x.reshape(-1, x.shape[-1]), scale, bias, epsilon, dtype
    )
    return y.reshape(x.shape), mu, r
  mu, r = _stats(x, epsilon)
  y = (x.astype(jnp.float32) - mu) * r * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(dtype), mu, r


def forward(
  x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Dtype, kernel: str
) -> tuple[jax.Array, tuple]:
  """`(y, residuals)`: `layer_norm`'s value and what `backward` needs (x, mu, r, scale, bias),
  for custom derivatives built on this layer norm (`residual_layer_norm`).

  Example:
    >>> y, res = forward(jnp.array([[1.0, 3.0]]), jnp.ones(2), jnp.zeros(2), 0.0, jnp.float32,
    ...                  "xla")
    >>> y.tolist(), len(res)
    ([[-1.0, 1.0]], 5)
  """
  y, mu, r = _normalize(x, scale, bias, epsilon, dtype, kernel)
  return y, (x, mu, r, scale, bias)


def backward(
  residuals: tuple, g: jax.Array, g_x: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(dx, dscale, dbias)` of the layer norm for the cotangent `g = dL/dy`, in the form its
  `forward` took (the Pallas kernel or jnp). `g_x` (x's shape): a cotangent reaching x by
  another path, added to dx in float32 before dx is cast to x's dtype (in the Pallas kernel
  itself: `pallas_layer_norm.layer_norm_bwd`'s `residual`).

  Example:
    >>> _, res = forward(jnp.array([[1.0, 3.0]]), jnp.ones(2), jnp.zeros(2), 0.0, jnp.float32,
    ...                  "xla")
    >>> dx, ds, db = backward(res, jnp.array([[1.0, 1.0]]), g_x=jnp.array([[5.0, 6.0]]))
    >>> dx.tolist(), ds.tolist(), db.tolist()
    ([[5.0, 6.0]], [-1.0, 1.0], [1.0, 1.0])
  """
  x, mu, r, scale, bias = residuals
  if mu.ndim < x.ndim:  # the forward took the Pallas kernels: (N,) statistics
    c = x.shape[-1]
    rows = lambda a: a.reshape(-1, c)
    dx, dscale, dbias = pallas_layer_norm.layer_norm_bwd(
      rows(x), mu, r, scale, rows(g), None if g_x is None else rows(g_x)
    )
    return dx.reshape(x.shape), dscale.astype(scale.dtype), dbias.astype(bias.dtype)
  g = g.astype(jnp.float32)
  xhat = (x.astype(jnp.float32) - mu) * r
  rows = tuple(range(x.ndim - 1))
  dbias = jnp.sum(g, axis=rows)
  dscale = jnp.sum(g * xhat, axis=rows)
  gh = g * scale.astype(jnp.float32)
  dx = r * (
    gh - jnp.mean(gh, axis=-1, keepdims=True) - xhat * jnp.mean(gh * xhat, axis=-1, keepdims=True)
  )
  if g_x is not None:
    dx = dx + g_x.astype(jnp.float32)
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


def _fwd(x, scale, bias, epsilon, dtype, kernel):
  return forward(x, scale, bias, epsilon, dtype, kernel)


def _bwd(epsilon, dtype, kernel, residuals, g):
  del epsilon, dtype, kernel
  return backward(residuals, g)


layer_norm.defvjp(_fwd, _bwd)


class LeanLayerNorm(nn.Module):
  """`nn.LayerNorm` over the last axis (parameters `scale`, `bias` of shape (C,), ones and
  zeros, epsilon 1e-6: Flax's defaults) through `layer_norm`'s hand-written backward, with
  `kernel` "xla" or "pallas" (`layer_norm`)."""

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    return layer_norm(x, scale, bias, self.epsilon, self.dtype, self.kernel)


# "pallas_res": "pallas", and each pre-LN block's two layer norms fold the skip connection's
# cotangent into their backward kernel (`transformer.EncoderBlock`, `residual_layer_norm`).
# "pallas_add": "pallas_res", and each of them also adds the branch before it and that branch's
# bias (the attention's output projection, fc2) in its forward kernel and returns the bias's
# gradient from its backward kernel (`residual_layer_norm.add_layer_norm`).
LEAN_CHOICES = (False, True, "pallas", "pallas_res", "pallas_add")
_PALLAS = ("pallas", "pallas_res", "pallas_add")


def check_lean(lean: bool | str) -> bool | str:
  """`lean` if it is one of `LEAN_CHOICES`, else ValueError naming it.

  Example:
    >>> check_lean("pallas_res")
    'pallas_res'
  """
  if not (isinstance(lean, bool) or lean in _PALLAS):
    raise ValueError(f"lean_layer_norm must be one of {LEAN_CHOICES}, got {lean!r}")
  return lean


def make_layer_norm(lean: bool | str, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Module:
  """Flax's `nn.LayerNorm` if `lean` is False, `LeanLayerNorm` if True, `LeanLayerNorm` with
  the Pallas kernels if "pallas", "pallas_res" or "pallas_add" (a layer norm outside a residual
  block: ViT's `ln_pre`, the final one), same parameters every way.

  Example:
    >>> make_layer_norm("pallas", jnp.float32, jnp.float32, "ln").kernel
    'pallas'
  """
  if check_lean(lean) is False:
    return nn.LayerNorm(dtype=dtype, param_dtype=param_dtype, name=name)
  kernel = "pallas" if lean in _PALLAS else "xla"
  return LeanLayerNorm(dtype=dtype, param_dtype=param_dtype, kernel=kernel, name=name)
