"""CLIP's pre-LN transformer pieces, shared by the ViT and the text tower.

A residual block is `x + attn(ln_1(x))` then `x + mlp(ln_2(x))` with
`mlp(x) = c_proj(act(c_fc(x)))` (hidden 4 x width) and multi-head attention

  softmax(q k^T / sqrt(d_head) + mask) v,   q, k, v = x W_q + b_q, x W_k + b_k, x W_v + b_v,

followed by `out_proj`. `act` is QuickGELU `x * sigmoid(1.702 x)` (OpenAI's weights) or the exact
erf GELU (OpenCLIP's LAION weights); flax's `nn.gelu` defaults to the tanh approximation, which
is not what either PyTorch model computes.

Example (`jax.eval_shape` traces the model without compiling it: the shapes, in milliseconds):
  >>> import jax, jax.numpy as jnp
  >>> stack = Transformer(width=8, layers=2, heads=2, act="gelu")
  >>> x = jnp.ones((1, 3, 8))
  >>> jax.eval_shape(lambda x: stack.apply(stack.init(jax.random.PRNGKey(0), x), x), x).shape
  (1, 3, 8)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["activation", "quick_gelu", "MultiHeadAttention", "ResidualBlock", "Transformer"]


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI's GELU approximation `x * sigmoid(1.702 x)`.

  Example:
    >>> float(quick_gelu(jnp.float32(0.0)))
    0.0
  """
  return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
  """`x * Phi(x)` with the erf normal CDF (PyTorch's `nn.GELU()` default)."""
  return jax.nn.gelu(x, approximate=False)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """ "quick_gelu" | "gelu" -> the function."""
  table = {"quick_gelu": quick_gelu, "gelu": exact_gelu}
  if name not in table:
    raise ValueError(f"CLIP activation must be one of {sorted(table)}, got {name!r}")
  return table[name]


class MultiHeadAttention(nn.Module):
  """Scaled dot-product attention of `query` over `inputs_kv` with separate q/k/v projections
  (biases on all four, like `torch.nn.MultiheadAttention`); softmax in float32."""

  width: int
  heads: int
  out_features: int | None = None
  proj_names: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "out_proj")
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, query: jax.Array, inputs_kv: jax.Array, mask: jax.Array | None = None
  ) -> jax.Array:
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    q_name, k_name, v_name, o_name = self.proj_names
    head_dim = self.width // self.heads
    split = lambda t: t.reshape(t.shape[:-1] + (self.heads, head_dim))
    q = split(dense(self.width, q_name)(query))
    k = split(dense(self.width, k_name)(inputs_kv))
    v = split(dense(self.width, v_name)(inputs_kv))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * head_dim**-0.5
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    out = out.reshape(out.shape[:-2] + (self.width,))
    return dense(self.out_features or self.width, o_name)(out)


class ResidualBlock(nn.Module):
  """`x + attn(ln_1(x))`, then `x + c_proj(act(c_fc(ln_2(x))))`."""

  width: int
  heads: int
  act: str = "quick_gelu"
  mlp_ratio: float = 4.0
  ln_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    ln = lambda name: nn.LayerNorm(
      epsilon=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    h = ln("ln_1")(x)
    x = x + MultiHeadAttention(
      self.width, self.heads, dtype=self.dtype, param_dtype=self.param_dtype, name="attn"
    )(h, h, mask)
    h = activation(self.act)(dense(int(self.width * self.mlp_ratio), "c_fc")(ln("ln_2")(x)))
    return x + dense(self.width, "c_proj")(h)


class Transformer(nn.Module):
  """`layers` residual blocks named `resblocks_0 ...`; `remat` recomputes each block's
  activations in the backward pass (memory for compute)."""

  width: int
  layers: int
  heads: int
  act: str = "quick_gelu"
  ln_eps: float = 1e-5
  remat: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    block = nn.remat(ResidualBlock) if self.remat else ResidualBlock
    for i in range(self.layers):
      x = block(
        self.width,
        self.heads,
        act=self.act,
        ln_eps=self.ln_eps,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"resblocks_{i}",
      )(x, mask)
    return x
