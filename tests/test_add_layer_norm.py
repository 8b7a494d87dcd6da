"""`add_layer_norm` (h = x + z + a and LN(h) in one forward kernel; dh, dz = dh and the bias
gradient da = sum_N dh from one backward kernel) and `lean_layer_norm="pallas_add"`, through
the Pallas interpreter on CPU: values and every gradient against an independent float64 numpy
reference, the kernel path against the XLA path, the towers against `lean_layer_norm=True`
(same parameter tree: outputs and gradients, blocks with and without remat, dropout on), the
forward without a separate residual add and the backward without a separate bias reduction,
the rows sharded over the 8 simulated devices without an all-gather, the Triton lowering for
CUDA, and bad inputs.

Tolerances: float32, h and y within 1e-5 of their largest entry and every gradient within 1e-5
of its largest entry (float32 sums over up to 768 features and 39 rows); bfloat16 inputs: h
is the float32 sum rounded once (within 2^-8 relative: 1e-2 of the largest entry), y and dx
within 1e-2, dscale, dbias and da (float32 sums of the float32 dx) within 1e-2 too, as the
reference sums the unrounded dh of bfloat16 statistics. Models as `test_residual_layer_norm`
(outputs 1e-5 absolute, gradients 5e-5 absolute + 1e-5 relative).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hlo_collectives import collectives
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from model_grads import out_and_grads

from mmts_jax.models import TextTransformer, ViT
from mmts_jax.models import pallas_layer_norm as pln
from mmts_jax.models.lean_layer_norm import check_lean
from mmts_jax.models.residual_layer_norm import add_layer_norm

EPS = 1e-6
IMAGE = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 3), jnp.float32)


@pytest.fixture
def interpret():
  pln.set_pallas_layer_norm("interpret")
  yield
  pln.set_pallas_layer_norm(None)
  pln.set_layer_norm_config(None)


def _inputs(shape, dtype, seed):
  """x, z (in `dtype`), a, scale, bias, and the cotangents w_y of y and w_h of h."""
  k = jax.random.split(jax.random.PRNGKey(seed), 7)
  c = shape[-1]
  x = (1.0 + 2.0 * jax.random.normal(k[0], shape)).astype(dtype)
  z = jax.random.normal(k[1], shape).astype(dtype)
  a = 0.3 * jax.random.normal(k[2], (c,))
  scale = 1.0 + 0.5 * jax.random.normal(k[3], (c,))
  bias = 0.5 * jax.random.normal(k[4], (c,))
  rounded = lambda k: jax.random.normal(k, shape).astype(dtype).astype(jnp.float32)
  return x, z, a, scale, bias, rounded(k[5]), rounded(k[6])


def reference(x, z, a, scale, bias, w_y, w_h, h_dtype):
  """float64 numpy: h (the float32 sum rounded to `h_dtype`), y = LN(h), and the gradients of
  `sum(w_y * y) + sum(w_h * h)` w.r.t. x, z, a, scale, bias from the formulas."""
  f64 = lambda t: np.asarray(jnp.asarray(t, jnp.float32), np.float64)
  h = f64(jnp.asarray(f64(x) + f64(z) + f64(a), jnp.float32).astype(h_dtype))
  s, b, g, gh_ = f64(scale), f64(bias), f64(w_y), f64(w_h)
  c = h.shape[-1]
  h2, g2 = h.reshape(-1, c), g.reshape(-1, c)
  sigma = np.sqrt(h2.var(axis=1, keepdims=True) + EPS)
  xhat = (h2 - h2.mean(axis=1, keepdims=True)) / sigma
  gs = g2 * s
  d = gs - gs.mean(axis=1, keepdims=True) - xhat * (gs * xhat).mean(axis=1, keepdims=True)
  dh = gh_ + (d / sigma).reshape(h.shape)
  y = (xhat * s + b).reshape(h.shape)
  da = dh.reshape(-1, c).sum(axis=0)
  return h, y, dh, dh, da, (g2 * xhat).sum(axis=0), g2.sum(axis=0)


def _vjp(x, z, a, s, b, w_y, w_h, dtype, kernel="pallas"):
  (h, y), vjp = jax.vjp(lambda *t: add_layer_norm(*t, EPS, dtype, kernel), x, z, a, s, b)
  return (h, y, *vjp((w_h.astype(h.dtype), w_y.astype(y.dtype))))


def _assert_close(got, want, tols):
  chex.assert_tree_all_finite(got)
  for got_i, want_i, tol in zip(got, want, tols, strict=True):
    want_i = np.asarray(want_i, np.float64)
    chex.assert_trees_all_close(
      np.asarray(jnp.asarray(got_i, jnp.float32), np.float64),
      want_i,
      rtol=0.0,
      atol=tol * float(np.max(np.abs(want_i))),
    )


@pytest.mark.parametrize("kernel", ["pallas", "xla"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_add_layer_norm_matches_the_float64_reference(interpret, kernel, dtype):
  # 39 rows (3, 13, C): not a multiple of the 16-row forward nor the 8-row backward blocks.
  pln.set_layer_norm_config(pln.LayerNormConfig(rows_fwd=16, rows_bwd=8, programs_bwd=2))
  x, z, a, s, b, w_y, w_h = _inputs((3, 13, 768), dtype, seed=0)
  got = jax.jit(lambda *t: _vjp(*t, dtype, kernel))(x, z, a, s, b, w_y, w_h)
  want = reference(x, z, a, s, b, w_y, w_h, dtype)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  _assert_close(got, want, (tol,) * 7)
  assert got[2].dtype == x.dtype and got[3].dtype == z.dtype and got[4].dtype == a.dtype


def test_the_kernel_path_equals_the_xla_path(interpret):
  x, z, a, s, b, w_y, w_h = _inputs((40, 96), jnp.float32, seed=1)
  got = jax.jit(lambda *t: _vjp(*t, jnp.float32, "pallas"))(x, z, a, s, b, w_y, w_h)
  want = jax.jit(lambda *t: _vjp(*t, jnp.float32, "xla"))(x, z, a, s, b, w_y, w_h)
  _assert_close(got, want, (1e-5,) * 7)


def _init(model, x):
  return jax.jit(model.clone(lean_layer_norm=True).init)(jax.random.PRNGKey(0), x)


def _same_as_lean(make, x, rngs=None):
  """`make(lean)` with "pallas_add" against `lean=True` (the XLA layer norm, the bias inside
  each Dense): same parameter tree, outputs and gradients."""
  fast, plain = make("pallas_add"), make(True)
  params = _init(plain, x)
  shapes = lambda m: jax.eval_shape(m.init, jax.random.PRNGKey(0), x)
  chex.assert_trees_all_equal_shapes_and_dtypes(shapes(fast), shapes(plain), params)
  out, grads = out_and_grads(fast, params, x, rngs)
  plain_out, plain_grads = out_and_grads(plain, params, x, rngs)
  chex.assert_trees_all_close(out, plain_out, atol=1e-5, rtol=0)
  chex.assert_trees_all_close(grads, plain_grads, atol=5e-5, rtol=1e-5)
  # The biases the kernels differentiate really are trained: nonzero gradients.
  for name in ("block_0", "block_1"):
    blk = grads["params"]["encoder"][name]
    assert float(jnp.abs(blk["attn"]["out"]["bias"]).max()) > 0
    assert float(jnp.abs(blk["mlp"]["fc2"]["bias"]).max()) > 0


@pytest.mark.parametrize(("flat", "remat"), [(False, False), (True, True)])
def test_vit_with_pallas_add_matches_the_plain_layer_norm(interpret, flat, remat):
  _same_as_lean(
    lambda lean: ViT.from_variant(
      "mu/8", lean_layer_norm=lean, flat_residual=flat, remat=remat
    ).clone(depth=2),
    IMAGE,
  )


def test_text_tower_with_pallas_add_matches_the_plain_layer_norm(interpret):
  ids = jnp.array([[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 0, 0, 0, 0]], jnp.int32)
  kw = dict(vocab_size=50, max_len=7, width=16, depth=2, num_heads=2, mlp_dim=32)
  _same_as_lean(
    lambda lean: TextTransformer(**kw, lean_layer_norm=lean, flat_residual=True, even_length=True),
    ids,
  )


def test_with_dropout_on_the_branches_match_too(interpret):
  # Dropout on: the branch is dropout(z + a) added with a zero bias (same values and masks).
  _same_as_lean(
    lambda lean: ViT.from_variant("mu/8", lean_layer_norm=lean, dropout=0.1).clone(depth=2),
    IMAGE,
    rngs={"dropout": jax.random.PRNGKey(7)},
  )


def _fusion_ops(model, x):
  """The gradient's jaxpr: the adds of two (B L, C) / (B, L, C) tensors and the reductions
  over the rows to a (C,) vector, outside the Pallas calls."""
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(model.apply(p, x))))(params).jaxpr
  stream = {(10, 32), (2, 5, 32)}
  counts = {"add": 0, "row_sum": 0}

  def walk(jp):
    for eqn in jp.eqns:
      if eqn.primitive.name == "pallas_call":
        continue
      shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
      if eqn.primitive.name in ("add", "add_any") and len(shapes) == 2:
        counts["add"] += all(s in stream for s in shapes)
      if eqn.primitive.name == "reduce_sum" and shapes and shapes[0] in stream:
        counts["row_sum"] += tuple(eqn.outvars[0].aval.shape) == (32,)
      for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else ():
        walk(sub)
      for p in eqn.params.values():
        if hasattr(p, "jaxpr"):
          walk(p.jaxpr if hasattr(p.jaxpr, "eqns") else p.jaxpr.jaxpr)

  walk(jaxpr)
  return counts


def test_no_separate_residual_add_or_bias_reduction(interpret):
  # ViT mu/8, 2 blocks, width 32, flat stream, fused q/k/v: "pallas_res" adds each branch to
  # the stream (4 adds, forward) and reduces the attention out / fc2 bias gradients over the
  # rows (4 reductions); "pallas_add" does both inside its kernels.
  counts = {
    lean: _fusion_ops(
      ViT.from_variant("mu/8", lean_layer_norm=lean, flat_residual=True, fused_qkv=True).clone(
        depth=2
      ),
      IMAGE,
    )
    for lean in ("pallas_res", "pallas_add")
  }
  assert counts["pallas_res"]["add"] >= 4 and counts["pallas_res"]["row_sum"] >= 4, counts
  assert counts["pallas_add"] == {"add": 0, "row_sum": 0}, counts


def test_rows_stay_sharded_over_8_devices(interpret):
  pln.set_layer_norm_config(pln.LayerNormConfig(rows_fwd=4, rows_bwd=2, programs_bwd=2))
  x, z, a, s, b, w_y, w_h = _inputs((64, 48), jnp.float32, seed=3)
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  rows, feat = NamedSharding(mesh, P("data", None)), NamedSharding(mesh, P())
  fn = jax.jit(
    lambda *t: _vjp(*t, jnp.float32), in_shardings=(rows, rows, feat, feat, feat, rows, rows)
  )
  compiled = fn.lower(x, z, a, s, b, w_y, w_h).compile()
  got = compiled(x, z, a, s, b, w_y, w_h)
  _assert_close(got, reference(x, z, a, s, b, w_y, w_h, jnp.float32), (1e-5,) * 7)
  found = collectives(compiled.as_text())
  # No (N, C) tensor moves: only the all-reduces of da, dscale, dbias.
  assert set(found) == {"all-reduce"} and set(found["all-reduce"]) == {"f32[48]"}, found
  assert got[0].sharding.spec[0] == "data" and got[2].sharding.spec[0] == "data"


def test_the_kernels_lower_to_triton_for_cuda():
  n, c = 256, 768
  x, v, s = jnp.ones((n, c), jnp.bfloat16), jnp.ones((n,)), jnp.ones((c,))
  fwd = jax.jit(lambda x: pln.add_layer_norm_fwd(x, x, s, s, s, EPS, jnp.bfloat16))
  bwd = jax.jit(lambda x: pln.layer_norm_bwd(x, v, v, s, x, residual=x, column_sum=True))
  for fn in (fwd, bwd):
    text = fn.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1


def test_bad_values_raise_value_errors_naming_them():
  assert check_lean("pallas_add") == "pallas_add"
  x = jnp.ones((2, 8))
  with pytest.raises(ValueError, match=r"z must be \(2, 8\) and a \(8,\), got \(2, 4\), \(8,\)"):
    add_layer_norm(x, jnp.ones((2, 4)), jnp.ones(8), jnp.ones(8), jnp.zeros(8), EPS, jnp.float32)
  with pytest.raises(ValueError, match="column_sum needs residual"):
    v = jnp.ones(2)
    pln.layer_norm_bwd(x, v, v, jnp.ones(8), x, column_sum=True)
  with pytest.raises(ValueError, match=r"z must be \(2, 8\) and a \(8,\), got \(2, 8\), \(4,\)"):
    pln.add_layer_norm_fwd(x, x, jnp.ones(4), jnp.ones(8), jnp.zeros(8), EPS, jnp.float32)
