"""The fused Pallas layer norm (`pallas_layer_norm`, `lean_layer_norm.layer_norm(...,
kernel="pallas")`) through the Pallas interpreter on CPU, against an independent float64 numpy
layer norm and its analytic gradient; its dispatch (XLA off GPUs unless the interpreter is
asked), its Triton lowering for CUDA, and the models with `lean_layer_norm="pallas"`.

Tolerances: float32 inputs, the output within 1e-5 absolute and every gradient within 1e-5 of
its largest entry (float32 rounding of sums over 768 features); bfloat16 inputs against the
reference on the same rounded inputs and cotangent, the output and dx (both stored in
bfloat16: 2^-8 relative rounding) within 1e-2 of their largest entry, dscale and dbias (float32
sums of exact products) within 1e-5. Models: as `test_speed_options` (1e-5 absolute outputs,
gradients 5e-5 absolute + 1e-5 relative).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_grads import out_and_grads

from mmts_jax.models import TextTransformer, ViT, build_tower
from mmts_jax.models import pallas_layer_norm as pln
from mmts_jax.models.lean_layer_norm import layer_norm, make_layer_norm

EPS = 1e-6


@pytest.fixture
def interpret():
  """The Pallas layer norm through the interpreter for one test, then the defaults again."""
  pln.set_pallas_layer_norm("interpret")
  yield
  pln.set_pallas_layer_norm(None)
  pln.set_layer_norm_config(None)


def _inputs(shape, dtype, seed):
  """x (around 1, spread 2, in `dtype`), scale, bias and a cotangent w representable in `dtype`
  (the cotangent reaching the kernel is in the output's dtype)."""
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  c = shape[-1]
  x = (1.0 + 2.0 * jax.random.normal(k[0], shape)).astype(dtype)
  scale = 1.0 + 0.5 * jax.random.normal(k[1], (c,))
  bias = 0.5 * jax.random.normal(k[2], (c,))
  w = jax.random.normal(k[3], shape).astype(dtype).astype(jnp.float32)
  return x, scale, bias, w


def reference(x, scale, bias, w):
  """float64 numpy: y and the gradients of `sum(w * y)` w.r.t. x, scale, bias."""
  x, s, b, g = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (x, scale, bias, w))
  c = x.shape[-1]
  x2, g2 = x.reshape(-1, c), g.reshape(-1, c)
  mu = x2.mean(axis=1, keepdims=True)
  sigma = np.sqrt(x2.var(axis=1, keepdims=True) + EPS)
  xhat = (x2 - mu) / sigma
  gh = g2 * s
  # d/dx of (x - mu) / sigma applied to gh: (gh - mean(gh) - xhat mean(gh xhat)) / sigma.
  dx = gh - gh.mean(axis=1, keepdims=True) - xhat * (gh * xhat).mean(axis=1, keepdims=True)
  dx = dx / sigma
  y = xhat * s + b
  return y.reshape(x.shape), dx.reshape(x.shape), (g2 * xhat).sum(axis=0), g2.sum(axis=0)


def _value_and_grads(x, scale, bias, w, dtype, kernel):
  """y and the gradients of `sum(w * y)` (w, x, scale, bias), jitted; and the number of
  `pallas_call`s in the traced gradient (the forward and the backward kernel: 2)."""

  def f(x, scale, bias):
    y = layer_norm(x, scale, bias, EPS, dtype, kernel)
    return jnp.sum(w * y.astype(jnp.float32)), y

  vg = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)
  calls = str(jax.make_jaxpr(vg)(x, scale, bias)).count("pallas_call")
  (_, y), grads = jax.jit(vg)(x, scale, bias)
  return y, grads, calls


def _assert_close(got, want, tol_y, tol_dx, tol_ds):
  y, (dx, ds, db) = got
  chex.assert_tree_all_finite((y, dx, ds, db))
  pairs = [(y, want[0], tol_y), (dx, want[1], tol_dx), (ds, want[2], tol_ds), (db, want[3], tol_ds)]
  for got_i, want_i, tol in pairs:
    chex.assert_trees_all_close(
      np.asarray(jnp.asarray(got_i, jnp.float32), np.float64),
      want_i,
      rtol=0.0,
      atol=tol * float(np.max(np.abs(want_i))),
    )


# (3, 13, C): 39 rows, reshaped to (39, C); not a multiple of the 16-row forward blocks nor of
# the 8-row backward blocks, which 2 programs take 3 blocks each (the last block of the second
# program has no row at all).
@pytest.mark.parametrize("c", [512, 768])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_pallas_layer_norm_matches_the_float64_reference(interpret, c, dtype):
  pln.set_layer_norm_config(pln.LayerNormConfig(rows_fwd=16, rows_bwd=8, programs_bwd=2))
  x, scale, bias, w = _inputs((3, 13, c), dtype, seed=c)
  y, grads, calls = _value_and_grads(x, scale, bias, w, dtype, "pallas")
  assert calls == 2, "the forward and the backward are the Pallas kernels"
  assert y.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == jnp.float32
  bf16 = dtype == jnp.bfloat16
  tol = 1e-2 if bf16 else 1e-5
  _assert_close((y, grads), reference(x, scale, bias, w), tol, tol, 1e-5)


def test_pallas_layer_norm_of_rows_fewer_than_a_block_with_another_output_dtype(interpret):
  # 5 rows of 1024 features (ViT-L's width) in 16-row blocks: one program, 11 rows masked;
  # float32 input, bfloat16 output (the towers compute in bfloat16 from float32 sums).
  x, scale, bias, w = _inputs((5, 1024), jnp.float32, seed=5)
  w = w.astype(jnp.bfloat16).astype(jnp.float32)
  y, grads, calls = _value_and_grads(x, scale, bias, w, jnp.bfloat16, "pallas")
  assert calls == 2 and y.dtype == jnp.bfloat16 and grads[0].dtype == jnp.float32
  # y is bfloat16; the gradients float32 from the bf16 cotangent.
  _assert_close((y, grads), reference(x, scale, bias, w), 1e-2, 1e-5, 1e-5)


def test_pallas_choice_falls_back_to_xla_where_the_kernels_do_not_run():
  x, scale, bias, w = _inputs((3, 13, 512), jnp.float32, seed=1)
  # CPU, default mode: the XLA form, with the same values as kernel="xla".
  y, grads, calls = _value_and_grads(x, scale, bias, w, jnp.float32, "pallas")
  assert calls == 0
  y_xla, grads_xla, _ = _value_and_grads(x, scale, bias, w, jnp.float32, "xla")
  chex.assert_trees_all_equal((y, grads), (y_xla, grads_xla))
  try:
    pln.set_pallas_layer_norm("interpret")
    assert _value_and_grads(x, scale, bias, w, jnp.float32, "xla")[2] == 0
    # One row as a 1-D vector, float16, or rows of more than MAX_FEATURES: the XLA form even
    # under the interpreter.
    assert _value_and_grads(x[0, 0], scale, bias, w[0, 0], jnp.float32, "pallas")[2] == 0
    x16 = x.astype(jnp.float16)
    assert _value_and_grads(x16, scale, bias, w, jnp.float16, "pallas")[2] == 0
    xl, sl, bl, wl = _inputs((2, pln.MAX_FEATURES + 8), jnp.float32, seed=2)
    assert _value_and_grads(xl, sl, bl, wl, jnp.float32, "pallas")[2] == 0
    pln.set_pallas_layer_norm(False)
    assert not pln.use_pallas_layer_norm(512, jnp.float32)
  finally:
    pln.set_pallas_layer_norm(None)


def test_bad_choices_raise_value_errors_naming_them():
  x = jnp.ones((2, 8))
  with pytest.raises(ValueError, match="'cuda'"):
    layer_norm(x, jnp.ones(8), jnp.zeros(8), EPS, jnp.float32, "cuda")
  with pytest.raises(ValueError, match="'always'"):
    pln.set_pallas_layer_norm("always")
  with pytest.raises(ValueError, match="rows_fwd must be a power of two, got 12"):
    pln.set_layer_norm_config(pln.LayerNormConfig(rows_fwd=12))
  with pytest.raises(ValueError, match="'yes'"):
    make_layer_norm("yes", jnp.float32, jnp.float32, "ln")
  with pytest.raises(ValueError, match="'palas'"):
    build_tower({"name": "vit", "variant": "mu/8", "lean_layer_norm": "palas"}, "image", None)
  with pytest.raises(ValueError, match=r"\(2, 3, 8\)"):
    pln.layer_norm_fwd(jnp.ones((2, 3, 8)), jnp.ones((8,)), jnp.zeros((8,)), EPS, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_pallas_layer_norm_lowers_to_triton_for_cuda(dtype):
  # No GPU here: lowering for CUDA from the CPU still runs Pallas's Triton lowering of every
  # primitive in both kernels (masked loads and stores, the row sums, rsqrt, the loop).
  n, c = 300, 768
  x, v, s = jnp.ones((n, c), dtype), jnp.ones((n,)), jnp.ones((c,))
  fwd = lambda x: pln.layer_norm_fwd(x, s, s, EPS, dtype)
  bwd = lambda x: pln.layer_norm_bwd(x, v, v, s, x)
  for fn in (fwd, bwd):
    text = jax.jit(fn).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1


IMAGE = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3), jnp.float32)


@pytest.fixture(scope="module")
def plain_vit():
  plain = ViT.from_variant("mu/8")
  params = jax.jit(plain.init)(jax.random.PRNGKey(0), IMAGE)
  return params, out_and_grads(plain, params, IMAGE)


@pytest.mark.parametrize("flat", [False, True], ids=["3d", "flat"])
def test_vit_with_the_pallas_layer_norm_keeps_outputs_and_gradients(interpret, plain_vit, flat):
  params, (plain_out, plain_grads) = plain_vit
  fast = ViT.from_variant("mu/8", lean_layer_norm="pallas", flat_residual=flat)
  # 2 blocks x 2 norms + ln_pre + ln_final, each a forward and a backward kernel.
  grad = jax.grad(lambda p: jnp.sum(fast.apply(p, IMAGE, train=True)))
  assert str(jax.make_jaxpr(grad)(params)).count("pallas_call") == 12
  out, grads = out_and_grads(fast, params, IMAGE)
  chex.assert_trees_all_close(out, plain_out, atol=1e-5, rtol=0)
  chex.assert_trees_all_close(grads, plain_grads, atol=5e-5, rtol=1e-5)


def test_text_tower_with_the_pallas_layer_norm_keeps_outputs_and_gradients(interpret):
  ids = jnp.array([[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 0, 0, 0, 0]], jnp.int32)
  kw = dict(vocab_size=50, max_len=7, width=16, depth=1, num_heads=2, mlp_dim=32)
  plain = TextTransformer(**kw)
  fast = TextTransformer(**kw, lean_layer_norm="pallas", flat_residual=True, even_length=True)
  params = jax.jit(plain.init)(jax.random.PRNGKey(0), ids)
  out, grads = out_and_grads(fast, params, ids)
  plain_out, plain_grads = out_and_grads(plain, params, ids)
  chex.assert_trees_all_close(out, plain_out, atol=1e-5, rtol=0)
  chex.assert_trees_all_close(grads, plain_grads, atol=5e-5, rtol=1e-5)


def test_build_tower_passes_the_pallas_choice():
  tower, _ = build_tower(
    {"name": "vit", "variant": "mu/8", "lean_layer_norm": "pallas"}, "image", jnp.float32
  )
  text, _ = build_tower(
    {
      "name": "transformer",
      "width": 16,
      "depth": 1,
      "num_heads": 2,
      "mlp_dim": 32,
      "lean_layer_norm": "pallas",
    },
    "text",
    jnp.float32,
  )
  assert tower.lean_layer_norm == "pallas" and text.lean_layer_norm == "pallas"
