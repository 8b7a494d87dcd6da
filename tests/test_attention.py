"""`models.attention.SelfAttention` against the Flax `MultiHeadDotProductAttention` it replaced
and against an independent float64 numpy reference: same parameter tree, same initial values,
same outputs (float32, no mask / causal+padding mask / attention dropout), and a ViT whose
parameters keep the old layout (checkpoints load unchanged).

Tolerances: float32 outputs agree with Flax's path to 2e-5 absolute (both sum the same products
in a different order) and with the float64 reference to 1e-5 relative + 2e-5 absolute."""

from __future__ import annotations

import doctest

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmts_jax.models import ViT, attention
from mmts_jax.models.attention import SelfAttention

B, L, W, HEADS = 2, 7, 16, 4


def _old(dropout=0.0, dtype=jnp.float32):
  return nn.MultiHeadDotProductAttention(num_heads=HEADS, dropout_rate=dropout, dtype=dtype)


def _new(dropout=0.0, dtype=jnp.float32):
  return SelfAttention(HEADS, dropout, dtype)


def _inputs():
  x = jax.random.normal(jax.random.PRNGKey(1), (B, L, W), jnp.float32)
  valid = jnp.arange(L)[None, :] < jnp.array([[L], [4]])  # second row padded after 4
  mask = nn.combine_masks(nn.make_attention_mask(valid, valid), nn.make_causal_mask(valid))
  return x, jnp.logical_or(mask, jnp.eye(L, dtype=bool)[None, None])


def _numpy_attention(params, x, mask):
  """float64: per-head softmax(q k^T / sqrt(d) + M) v, then the output projection."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  q, k, v = (
    np.einsum("blw,whd->blhd", x, p[n]["kernel"]) + p[n]["bias"] for n in ("query", "key", "value")
  )
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(np.asarray(mask), logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  y = np.einsum("bhqk,bkhd->bqhd", w, v)
  return np.einsum("bqhd,hdw->bqw", y, p["out"]["kernel"]) + p["out"]["bias"]


def test_parameter_tree_and_initial_values_equal_flax_mha():
  x, _ = _inputs()
  old = jax.jit(_old().init)(jax.random.PRNGKey(0), x, x)
  new = jax.jit(_new().init)(jax.random.PRNGKey(0), x)
  chex.assert_trees_all_equal_structs(old, new)
  chex.assert_trees_all_equal_shapes(old, new)
  chex.assert_trees_all_equal(old, new)  # same key -> same values


@pytest.mark.parametrize("masked", [False, True])
def test_float32_outputs_equal_flax_mha_and_float64_reference(masked):
  x, mask = _inputs()
  mask = mask if masked else None
  params = jax.jit(_new().init)(jax.random.PRNGKey(0), x)
  got = jax.jit(_new().apply)(params, x, mask)
  old = jax.jit(lambda p, x, m: _old().apply(p, x, x, mask=m))(params, x, mask)
  chex.assert_trees_all_close(got, old, atol=2e-5, rtol=0)
  np.testing.assert_allclose(
    np.asarray(got), _numpy_attention(params["params"], x, mask), rtol=1e-5, atol=2e-5
  )


def test_gradients_equal_flax_mha():
  x, mask = _inputs()
  params = jax.jit(_new().init)(jax.random.PRNGKey(0), x)
  loss_new = lambda p: jnp.sum(jnp.sin(_new().apply(p, x, mask)))
  loss_old = lambda p: jnp.sum(jnp.sin(_old().apply(p, x, x, mask=mask)))
  chex.assert_trees_all_close(
    jax.jit(jax.grad(loss_new))(params), jax.jit(jax.grad(loss_old))(params), atol=5e-5, rtol=0
  )


def test_attention_dropout_while_training_equals_flax_mha():
  # Same dropout key -> same dropped weights: the explicit-weights path is Flax's own.
  x, mask = _inputs()
  params = jax.jit(_new().init)(jax.random.PRNGKey(0), x)
  rngs = {"dropout": jax.random.PRNGKey(3)}
  got = jax.jit(lambda p: _new(0.5).apply(p, x, mask, deterministic=False, rngs=rngs))(params)
  old = jax.jit(lambda p: _old(0.5).apply(p, x, x, mask=mask, deterministic=False, rngs=rngs))(
    params
  )
  chex.assert_trees_all_close(got, old, atol=2e-5, rtol=0)
  plain = jax.jit(_new().apply)(params, x, mask)
  assert float(jnp.max(jnp.abs(got - plain))) > 1e-3  # dropout did act


def test_bfloat16_compute_stays_close_to_float32():
  x, mask = _inputs()
  params = jax.jit(_new().init)(jax.random.PRNGKey(0), x)
  f32 = jax.jit(_new().apply)(params, x, mask)
  bf16 = jax.jit(_new(dtype=jnp.bfloat16).apply)(params, x, mask)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16, np.float32), np.asarray(f32), atol=0.05)


def test_vit_parameter_layout_is_flax_mha_layout():
  vit = ViT.from_variant("mu/8")
  shapes = jax.eval_shape(vit.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  attn = shapes["params"]["encoder"]["block_0"]["attn"]
  width, heads = 32, 2
  got = {f"{m}/{p}": attn[m][p].shape for m in attn for p in attn[m]}
  want = {
    **{f"{m}/kernel": (width, heads, width // heads) for m in ("query", "key", "value")},
    **{f"{m}/bias": (heads, width // heads) for m in ("query", "key", "value")},
    "out/kernel": (heads, width // heads, width),
    "out/bias": (width,),
  }
  assert got == want


def test_width_not_divisible_by_heads_is_a_value_error():
  with pytest.raises(ValueError, match="width 10 is not divisible by num_heads 4"):
    SelfAttention(4).init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 10)))


def test_docstring_examples_run():
  result = doctest.testmod(attention, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0, result


@pytest.mark.parametrize("length", [7, 8])
def test_even_length_padding_equals_unpadded_attention_and_its_gradients(length):
  # The padding that lets cuDNN train at odd lengths, checked through the XLA kernel (CPU).
  q, k, v = jax.random.normal(jax.random.PRNGKey(4), (3, B, length, HEADS, 8), jnp.float32)
  direct = lambda q, k, v: jax.nn.dot_product_attention(q, k, v)
  padded = lambda q, k, v: attention.even_length_attention(q, k, v, "xla")
  got, want = jax.jit(padded)(q, k, v), jax.jit(direct)(q, k, v)
  assert got.shape == (B, length, HEADS, 8)
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=0)
  loss = lambda f: lambda *a: jnp.sum(jnp.cos(f(*a)))
  chex.assert_trees_all_close(
    jax.jit(jax.grad(loss(padded), argnums=(0, 1, 2)))(q, k, v),
    jax.jit(jax.grad(loss(direct), argnums=(0, 1, 2)))(q, k, v),
    atol=1e-5,
    rtol=0,
  )
