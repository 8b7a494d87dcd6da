"""The fused sigmoid (SigLIP) tile kernels (`_pallas_tiles.sig_fwd_tile` / `sig_bwd_tile`)
through the Pallas interpreter on CPU, against the float64 reference of `test_sigmoid_loss`
(values and gradients w.r.t. both embeddings, the per-anchor temperatures and biases).

Tolerances: float32 inputs at HIGHEST precision, loss 1e-5 relative and every gradient 1e-4
relative to its largest entry; bf16 inputs against the reference on the same rounded inputs,
loss 1e-3 and gradients 1e-2 (issue 13's bounds); fused against XLA tile outputs 1e-6.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from test_losses_blockwise import FAST_COMPILE, _unit
from test_sigmoid_loss import reference

from mmts_jax import losses
from mmts_jax.losses import _pallas_tiles as pt
from mmts_jax.losses import blockwise_sigmoid

HIGHEST = jax.lax.Precision.HIGHEST


def _inputs(b, d, seed, tau_max=0.105):
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
  # Temperatures from 0.005 (logits up to +-200) and biases around SigLIP's -10.
  tau = 0.005 + (tau_max - 0.005) * jax.random.uniform(k3, (b,))
  bias = -10.0 + 4.0 * jax.random.normal(k4, (b,))
  return _unit(k1, (b, d)), _unit(k2, (b, d)), tau, bias


def _loss(x, y, t, c, **kw):
  return losses.sigmoid_blockwise(x, y, t, bias=c, **kw)


def _vg(*args, **kw):
  """Value and gradients w.r.t. (image, text, bias, temperature), the order of `reference`;
  traced afresh (the tile configuration is read at trace time) and the number of Pallas calls
  in the traced program (one forward and one backward kernel per tile pass)."""
  f = jax.value_and_grad(lambda x, y, t, c: _loss(x, y, t, c, **kw), argnums=(0, 1, 3, 2))
  calls = str(jax.make_jaxpr(f)(*args)).count("pallas_call")
  got = jax.jit(f).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)
  return got, calls


def _assert_close(got, want, tol_v, tol_g):
  """chex: the loss within `tol_v` relative, each gradient within `tol_g` of its largest entry."""
  v, grads = got
  chex.assert_tree_all_finite((v, grads))
  chex.assert_trees_all_close(np.float64(v), want[0], rtol=tol_v, atol=0.0)
  for g, w in zip(grads, want[1:], strict=True):
    chex.assert_trees_all_close(
      np.asarray(g, np.float64), w, rtol=0.0, atol=tol_g * float(np.max(np.abs(w)))
    )


# (config, B, tile): one 256 x 256 tile with 56 padded rows and columns; 3 x 3 tiles of 128, the
# last row and column of tiles ragged (84 real of 128), so column sums travel across row tiles;
# 2 x 2 whole tiles. Programs of several column sub-tiles (j = 2) and D in chunks.
CASES = [
  (pt.TileConfig(64, 128, 32, 2, 4, 3), 200, 256),
  (pt.TileConfig(64, 64, 16, 2, 4, 3), 300, 128),
  (pt.TileConfig(128, 64, 32, 1, 4, 4), 256, 128),
]


@pytest.mark.parametrize(("cfg", "b", "tile"), CASES, ids=["one-ragged", "3x3-ragged", "whole"])
def test_fused_sigmoid_matches_the_float64_reference(interpreted, cfg, b, tile):
  x, y, t, c = _inputs(b, 32, seed=b)
  pt.set_tile_config("fwd", jnp.float32, cfg)
  pt.set_tile_config("bwd", jnp.float32, cfg._replace(bm=cfg.bn, bn=cfg.bm))
  got, calls = _vg(x, y, t, c, block_size=tile, precision=HIGHEST)
  assert calls == 2, "the forward and backward tiles are the fused kernels"
  _assert_close(got, reference(x, y, t, c), 1e-5, 1e-4)


def test_fused_sigmoid_with_a_scalar_bias_and_temperature(interpreted):
  # SigLIP's own parameterisation: one learned temperature and bias, scalar gradients.
  x, y, _, _ = _inputs(200, 32, seed=3)
  t, c = jnp.float32(0.1), jnp.float32(-10.0)
  got, calls = _vg(x, y, t, c, block_size=256, precision=HIGHEST)
  assert calls == 2 and got[1][2].shape == () and got[1][3].shape == ()
  want = reference(x, y, t, c)
  _assert_close(got, want[:4] + (np.sum(want[4]),), 1e-5, 1e-4)  # d/dtau of a shared tau


def test_fused_sigmoid_at_temperature_0005_stays_finite(interpreted):
  # Every anchor at tau = 0.005: logits of +-200, and near-duplicate pairs (the positives'
  # similarities close to those of their neighbours) so both signs of u are large.
  x, y, _, _ = _inputs(200, 32, seed=4)
  y = _unit(jax.random.PRNGKey(5), (200, 32)) * 0.05 + x
  y = y / jnp.linalg.norm(y, axis=1, keepdims=True)
  t = jnp.full((200,), 0.005)
  c = jnp.zeros((200,))
  got, calls = _vg(x, y, t, c, block_size=256, precision=HIGHEST)
  assert calls == 2
  _assert_close(got, reference(x, y, t, c), 1e-5, 1e-4)


def test_fused_sigmoid_bf16_inputs(interpreted):
  x, y, t, c = _inputs(200, 32, seed=6)
  xb, yb = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
  pt.set_tile_config("fwd", jnp.bfloat16, CASES[0][0])
  pt.set_tile_config("bwd", jnp.bfloat16, CASES[1][0])
  got, calls = _vg(xb, yb, t, c, block_size=256)
  assert calls == 2
  v, g = got
  # f32 accumulation: the loss and the temperature / bias gradients in float32, the embeddings'
  # gradients in their own dtype.
  assert v.dtype == jnp.float32 and g[0].dtype == jnp.bfloat16 and g[3].dtype == jnp.float32
  _assert_close(got, reference(xb.astype(jnp.float32), yb.astype(jnp.float32), t, c), 1e-3, 1e-2)


def test_a_batch_of_one_takes_the_xla_tile_and_matches_the_reference(interpreted):
  # B = 1 gives a 1 x 1 tile, not whole 128-row sub-tiles: the dispatch keeps the XLA tile.
  x, y, t, c = _inputs(1, 32, seed=7)
  assert not pt.use_fused_tiles(pt.Blocks(1, 1), 32, jnp.float32, "sigmoid", "fwd")
  got, calls = _vg(x, y, t, c, precision=HIGHEST)
  assert calls == 0
  _assert_close(got, reference(x, y, t, c), 1e-5, 1e-4)


def test_one_real_sample_in_a_padded_fused_tile_matches_the_xla_tile(interpreted):
  # The kernels themselves on a batch of one: one real row and column, 127 of padding.
  pt.set_tile_config("fwd", jnp.float32, CASES[0][0])
  pt.set_tile_config("bwd", jnp.float32, CASES[0][0])
  x, _, _, _ = _inputs(1, 32, seed=8)
  # s = 1, tau = 0.5, bias -1: u = 1, a term and slope of order one (not a comparison of zeros).
  y, t, c = x, jnp.array([0.5]), jnp.array([-1.0])

  def pad(v, fill=0):
    return jnp.pad(v, [(0, 127)] + [(0, 0)] * (v.ndim - 1), constant_values=fill)

  ids = pad(jnp.zeros((1,), jnp.int32), -1)
  g = jnp.array([0.7], jnp.float32)
  r = (pad(x), pad(1.0 / t), pad(c), ids)
  cl = (pad(y), pad(1.0 / t), pad(c), ids)
  z = jnp.zeros((128,))
  for fused, xla, extra, state in (
    (pt.sig_fwd_tile, blockwise_sigmoid._fwd_tile, (), (z, z)),
    (pt.sig_bwd_tile, blockwise_sigmoid._bwd_tile, (pad(g),), ((jnp.zeros((128, 32)), z, z),) * 2),
  ):
    got = fused(HIGHEST, r + extra, cl + extra, *state)
    want = xla(HIGHEST, r + extra, cl + extra, *state)
    chex.assert_tree_all_finite(got)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(jax.tree.leaves(got)[0][0]).max()) > 1e-3  # the real sample's entry


def test_the_ring_runs_the_fused_tiles_on_the_8_device_mesh(interpreted):
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  assert mesh.size == 8, "tests/conftest.py forces 8 CPU devices"
  # 8 x 128 rows: each device's block is one whole fused tile; 8 hops round the ring.
  x, y, t, c = _inputs(1024, 16, seed=9)
  # check_vma=False: jax 0.10's Pallas interpreter drops the varying-axes type of a kernel's
  # loop carry inside shard_map (for every fused kernel, InfoNCE's too); the compiled GPU kernels
  # declare it (`_traversal.varying_like`).
  fn = jax.shard_map(
    lambda x, y, t, c: losses.sigmoid(
      x, y, t, bias=c, axis_name="batch", sharded="ring", block_size=128, precision=HIGHEST
    ),
    mesh=mesh,
    in_specs=(P("batch"),) * 4,
    out_specs=P(),
    check_vma=False,
  )
  f = jax.value_and_grad(fn, argnums=(0, 1, 3, 2))
  # Both passes, each in the ring's scan body and in its last hop (which has no onward send).
  assert str(jax.make_jaxpr(f)(x, y, t, c)).count("pallas_call") == 4
  got = jax.jit(f).lower(x, y, t, c).compile(compiler_options=FAST_COMPILE)(x, y, t, c)
  _assert_close(got, reference(x, y, t, c), 1e-5, 1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_fused_sigmoid_kernels_lower_to_triton_for_cuda(dtype):
  # No GPU here: lowering for CUDA from the CPU still runs Pallas's Triton lowering of every
  # primitive in the kernels (softplus, the logistic, the masks), so one it cannot lower fails.
  b, d = 256, 64
  x = jnp.ones((b, d), dtype)
  v, ids = jnp.ones((b,)), jnp.arange(b, dtype=jnp.int32)
  acc = (jnp.zeros((b, d)), v, v)

  def fwd(x):
    return pt.sig_fwd_tile(None, (x, v, v, ids), (x, v, v, ids), v, v)

  def bwd(x):
    return pt.sig_bwd_tile(None, (x, v, v, ids, v), (x, v, v, ids, v), acc, acc)

  try:
    pt.set_fused_tiles("always")
    for fn in (fwd, bwd):
      text = jax.jit(fn).trace(x).lower(lowering_platforms=("cuda",)).as_text()
      assert text.count("__gpu$xla.gpu.triton") == 1
  finally:
    pt.set_fused_tiles(None)


def test_sigmoid_dispatch_follows_the_fused_tile_rule():
  blocks = pt.Blocks(256, 256)
  # Auto: the fused tiles where they were measured faster (bf16 on GPUs), XLA's on this CPU.
  assert pt.FASTEST[("gpu", "bfloat16", "sigmoid")] == {"fwd": "fused", "bwd": "fused"}
  assert ("gpu", "float32", "sigmoid") not in pt.FASTEST
  assert not pt.use_fused_tiles(blocks, 64, jnp.bfloat16, "sigmoid", "fwd")
  try:
    pt.set_fused_tiles("interpret", passes=("bwd",))
    assert pt.use_fused_tiles(blocks, 64, jnp.bfloat16, "sigmoid", "bwd")
    assert not pt.use_fused_tiles(blocks, 64, jnp.bfloat16, "sigmoid", "fwd")
    assert not pt.use_fused_tiles(blocks, 64, jnp.float64, "sigmoid", "bwd")
    assert not pt.use_fused_tiles(pt.Blocks(100, 256), 64, jnp.float32, "sigmoid", "bwd")
  finally:
    pt.set_fused_tiles(None)


def test_fast_softplus_and_sigmoid_match_float64():
  # The fused kernels' formulas (`softplus_fast`, `sigmoid_fast`), with the interpreter's exact
  # exp2 / log2 / division in place of the ex2 / lg2 / rcp instructions, against float64 over
  # every logit whose result is a normal float32 (x from -80 to 60, both sides of the series /
  # lg2 switch of log1p at t = 1/8, x = -2.079): relative error within |x| 2^-23 + 2^-21 (the
  # rounding of |x| log2 e dominates at large |x|).
  x = np.concatenate([np.linspace(-80, 60, 14001), [-2.0794, -2.08, -8.3]]).astype(np.float32)
  x64 = x.astype(np.float64)
  try:
    pt.set_fused_tiles("interpret")
    sp = np.asarray(pt.softplus_fast(jnp.asarray(x)), np.float64)
    sg = np.asarray(pt.sigmoid_fast(jnp.asarray(x)), np.float64)
  finally:
    pt.set_fused_tiles(None)
  bound = np.abs(x64) * 2.0**-23 + 2.0**-21
  for got, want in ((sp, np.logaddexp(0.0, x64)), (sg, 1.0 / (1.0 + np.exp(-x64)))):
    assert np.all(np.isfinite(got))
    np.testing.assert_array_less(np.abs(got - want) / want, bound)
  # Past float32's range the terms are 0 (softplus) and 0 / 1 (sigmoid), never nan.
  try:
    pt.set_fused_tiles("interpret")
    far = jnp.array([-200.0, 200.0])
    assert pt.softplus_fast(far).tolist() == [0.0, 200.0]
    assert pt.sigmoid_fast(far).tolist() == [0.0, 1.0]
  finally:
    pt.set_fused_tiles(None)
