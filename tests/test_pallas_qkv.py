"""`pallas_qkv.split_qkv` (the fused q/k/v product's split + bias, whose backward joins dq, dk,
dv and sums the bias gradient in one Pallas kernel) and `split_qkv_backward="pallas"`, through
the Pallas interpreter on CPU: values and gradients against float64 numpy, the kernel path
against the XLA path, a fallback width, the ViT and text tower against XLA's backward (same
parameters), the rows sharded over the 8 simulated devices without an all-gather, the Triton
lowering for CUDA, and bad values.

Tolerances: the join is a copy (exact in any dtype); the bias gradient is a float32 sum, within
1e-5 of its largest entry against float64 (float32 summation order over up to 600 rows);
models as `test_residual_layer_norm` (outputs 1e-5 absolute, gradients 5e-5 absolute + 1e-5
relative).
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

from mmts_jax.models import TextTransformer, ViT, build_tower
from mmts_jax.models import pallas_qkv as pq

IMAGE = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 3), jnp.float32)


@pytest.fixture
def interpret():
  pq.set_pallas_qkv("interpret")
  yield
  pq.set_pallas_qkv(None)
  pq.set_qkv_config(None)


def _inputs(lead, heads, d, dtype, seed):
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  h = jax.random.normal(k[0], (*lead, 3, heads, d)).astype(dtype)
  b = 0.5 * jax.random.normal(k[1], (3, heads, d))
  gs = [jax.random.normal(kk, (*lead, heads, d)).astype(dtype) for kk in k[2:]]
  return h, b, gs


def _vjp(h, b, gs):
  outs, vjp = jax.vjp(pq.split_qkv, h, b)
  return outs, vjp(tuple(gs))


def _reference(h, b, gs):
  f64 = lambda t: np.asarray(jnp.asarray(t, jnp.float32), np.float64)
  h, b = f64(h), f64(b)
  outs = [h[..., t, :, :] + b[t] for t in range(3)]
  dh = np.stack([f64(g) for g in gs], axis=-3)
  db = dh.reshape(-1, *dh.shape[-3:]).sum(axis=0)
  return outs, dh, db


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(("lead", "heads", "d"), [((3, 199), 4, 16), ((2, 8), 2, 32)])
def test_split_and_join_match_float64(interpret, dtype, lead, heads, d):
  # (3, 199) rows: 597, not a multiple of the 32 x 8 rows of a program (ragged last block).
  h, b, gs = _inputs(lead, heads, d, dtype, seed=0)
  outs, (dh, db) = jax.jit(_vjp)(h, b, gs)
  want_outs, want_dh, want_db = _reference(h, b, gs)
  for got, want in zip(outs, want_outs, strict=True):
    tol = 0 if dtype == jnp.float32 else 1e-2 * float(np.max(np.abs(want)))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=max(tol, 1e-6), rtol=0)
  np.testing.assert_array_equal(np.asarray(dh.astype(jnp.float32), np.float64), want_dh)
  assert dh.dtype == h.dtype and db.dtype == b.dtype
  chex.assert_trees_all_close(
    np.asarray(db, np.float64), want_db, atol=1e-5 * float(np.max(np.abs(want_db))), rtol=0
  )


def test_the_kernel_path_equals_the_xla_path(interpret):
  h, b, gs = _inputs((40,), 4, 32, jnp.float32, seed=1)
  got = jax.jit(_vjp)(h, b, gs)
  pq.set_pallas_qkv(False)
  want = jax.jit(_vjp)(h, b, gs)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=0)


def test_a_width_no_block_divides_takes_the_xla_form(interpret):
  # F = 3 x 8 = 24: no power of two >= 16 divides it, so the join is jnp's (no pallas_call).
  h, b, gs = _inputs((10,), 3, 8, jnp.float32, seed=2)
  assert "pallas_call" not in str(jax.make_jaxpr(_vjp)(h, b, gs))
  _, (dh, db) = _vjp(h, b, gs)
  _, want_dh, want_db = _reference(h, b, gs)
  np.testing.assert_array_equal(np.asarray(dh, np.float64), want_dh)
  np.testing.assert_allclose(np.asarray(db, np.float64), want_db, atol=1e-5, rtol=0)


def _same_as_xla_backward(make, x):
  fast, plain = make("pallas"), make(False)
  params = jax.jit(plain.init)(jax.random.PRNGKey(0), x)
  calls = lambda m: str(
    jax.make_jaxpr(jax.grad(lambda p: jnp.sum(m.apply(p, x, train=True))))(params)
  ).count("pallas_call")
  assert calls(fast) == 2 and calls(plain) == 0  # one join per block (2 blocks)
  out, grads = out_and_grads(fast, params, x)
  want_out, want_grads = out_and_grads(plain, params, x)
  chex.assert_trees_all_close(out, want_out, atol=1e-5, rtol=0)
  chex.assert_trees_all_close(grads, want_grads, atol=5e-5, rtol=1e-5)


def test_vit_with_the_pallas_join_matches_xla(interpret):
  _same_as_xla_backward(
    lambda s: ViT.from_variant("mu/8", fused_qkv=True, split_qkv_backward=s).clone(depth=2),
    IMAGE,
  )


def test_text_tower_with_the_pallas_join_matches_xla(interpret):
  ids = jnp.array([[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 0, 0, 0, 0]], jnp.int32)
  kw = dict(vocab_size=50, max_len=7, width=32, depth=2, num_heads=2, mlp_dim=32)
  _same_as_xla_backward(
    lambda s: TextTransformer(**kw, fused_qkv=True, split_qkv_backward=s, flat_residual=True),
    ids,
  )


def test_rows_stay_sharded_over_8_devices(interpret):
  pq.set_qkv_config(pq.QkvConfig(bm=16, steps=1))
  h, b, gs = _inputs((64,), 2, 16, jnp.float32, seed=3)
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  fn = jax.jit(_vjp, in_shardings=(rows, rep, [rows] * 3))
  compiled = fn.lower(h, b, gs).compile()
  got = compiled(h, b, gs)
  chex.assert_trees_all_close(got, jax.jit(_vjp)(h, b, gs), atol=1e-5, rtol=0)
  found = collectives(compiled.as_text())
  # No (N, F) tensor moves: only the all-reduce of the (3 F,) bias gradient.
  assert set(found) == {"all-reduce"} and set(found["all-reduce"]) == {"f32[96]"}, found
  assert got[1][0].sharding.spec[0] == "data", "dh keeps the rows' sharding"


@pytest.mark.parametrize(("n", "f"), [(50688, 768), (19968, 512), (300, 1024)])
def test_the_join_lowers_to_triton_for_cuda(n, f):
  # No GPU here: lowering for CUDA from the CPU runs Pallas's Triton lowering of the kernel
  # (the three `pl.when` branches, masked loads and stores, the loop) at the towers' shapes.
  g = jnp.ones((n, f), jnp.bfloat16)
  fn = jax.jit(lambda a, b, c: pq._join_rows(False, pq.QkvConfig(), a, b, c))
  text = fn.trace(g, g, g).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 1


def test_bad_values_raise_value_errors_naming_them():
  with pytest.raises(ValueError, match="split_qkv_backward must be False, True or 'pallas'"):
    build_tower(
      {"name": "vit", "variant": "mu/8", "split_qkv_backward": "triton"}, "image", jnp.float32
    )
  with pytest.raises(ValueError, match=r"h must be \(..., 3, H, D\).*\(2, 4, 2, 8\)"):
    pq.split_qkv(jnp.ones((2, 4, 2, 8)), jnp.ones((3, 2, 8)))
  with pytest.raises(ValueError, match="got 'always'"):
    pq.set_pallas_qkv("always")
  with pytest.raises(ValueError, match="bn must be a power of two >= 16, got 48"):
    pq.set_qkv_config(pq.QkvConfig(bn=48))
  vit, _ = build_tower(
    {"name": "vit", "variant": "mu/8", "split_qkv_backward": "pallas"}, "image", jnp.float32
  )
  assert vit.split_qkv_backward == "pallas"
