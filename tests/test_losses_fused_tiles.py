"""The fused InfoNCE tile kernels in every program shape `TileConfig` allows (rectangular
sub-tiles, several column sub-tiles per program, D chunks), through the Pallas interpreter on CPU,
against the float32 dense loss at HIGHEST precision.

Tolerances: float32 loss 1e-5 and gradients 1e-4 relative (to the largest entry); bf16 inputs
against the float32 path on the same rounded inputs: loss 1e-3, gradients 1e-2 (issue 13).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_losses_blockwise import FAST_COMPILE, _rel, _unit

from mmts_jax import losses
from mmts_jax.losses import _pallas_tiles as pt
from mmts_jax.losses import dense

HIGHEST = jax.lax.Precision.HIGHEST

# (bm, bn, bk, j, warps, stages): wide and tall programs of several sub-tiles.
CONFIGS = [
  pt.TileConfig(64, 128, 32, 2, 4, 3),
  pt.TileConfig(128, 64, 16, 2, 4, 4),
]
# (config, B, tile): one 256 x 256 tile with 56 padded rows and columns (the masked kernels), and
# 2 x 2 whole tiles of 128 (the unmasked kernels, maxima from `scale * max(s)`).
CASES = [
  (CONFIGS[0], 200, 256),
  (CONFIGS[1], 200, 256),
  (pt.TileConfig(64, 64, 32, 2, 4, 3), 256, 128),
]


def _vg(fn, *args, **kw):
  """value_and_grad w.r.t. every argument, traced afresh (the tile configuration is read at
  trace time, so no cache across configurations)."""
  f = jax.jit(jax.value_and_grad(lambda x, y, t: fn(x, y, t, **kw), argnums=(0, 1, 2)))
  return f.lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def _inputs(b, d, seed):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  # Temperatures 0.005 to 0.105: logits up to 200, an exp without its running max overflows.
  return _unit(k1, (b, d)), _unit(k2, (b, d)), 0.005 + 0.1 * jax.random.uniform(k3, (b,))


@pytest.mark.parametrize(
  ("cfg", "b", "tile"), CASES, ids=["wide-ragged", "tall-ragged", "whole-tiles"]
)
def test_program_shapes_give_the_dense_loss_and_gradients(interpreted, cfg, b, tile):
  x, y, t = _inputs(b, 32, seed=1)
  v0, g0 = _vg(dense.infonce_dense, x, y, t, precision=HIGHEST)
  pt.set_tile_config("fwd", jnp.float32, cfg)
  pt.set_tile_config("bwd", jnp.float32, cfg._replace(bm=cfg.bn, bn=cfg.bm))
  assert pt.use_fused_tiles(pt.Blocks(tile, tile), 32, jnp.float32)
  v, g = _vg(losses.infonce_blockwise, x, y, t, block_size=tile, precision=HIGHEST)
  assert _rel(v, v0) <= 1e-5
  for got, want in zip(g, g0, strict=True):
    assert np.all(np.isfinite(got)) and _rel(got, want) <= 1e-4


def test_bf16_program_shape_matches_the_float32_path(interpreted):
  x, y, t = _inputs(200, 32, seed=2)
  xb, yb = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
  v0, g0 = _vg(dense.infonce_dense, xb.astype(jnp.float32), yb.astype(jnp.float32), t)
  pt.set_tile_config("fwd", jnp.bfloat16, CONFIGS[0])
  pt.set_tile_config("bwd", jnp.bfloat16, CONFIGS[1])
  v, g = _vg(losses.infonce_blockwise, xb, yb, t, block_size=256)
  assert v.dtype == jnp.float32 and g[0].dtype == jnp.bfloat16
  assert _rel(v, v0) <= 1e-3
  assert _rel(g[0], g0[0]) <= 1e-2 and _rel(g[1], g0[1]) <= 1e-2
  assert _rel(g[2], g0[2]) <= 1e-2


def test_a_batch_of_one_takes_the_xla_tile_and_gives_the_dense_loss(interpreted):
  x, y, t = _inputs(1, 32, seed=3)
  assert not pt.use_fused_tiles(pt.Blocks(1, 1), 32, jnp.float32)
  v0, g0 = _vg(dense.infonce_dense, x, y, t, precision=HIGHEST)
  v, g = _vg(losses.infonce_blockwise, x, y, t, precision=HIGHEST)
  assert _rel(v, v0) <= 1e-6
  for got, want in zip(g, g0, strict=True):
    assert _rel(got, want) <= 1e-5


def test_edges_that_do_not_divide_the_tile_fall_back():
  # A 384-row tile with 256-row programs: 128 divides it; j shrinks until it divides too.
  cfg = pt._fit(pt.TileConfig(256, 256, 128, 4), 384, 640, 96)
  assert (cfg.bm, cfg.bn, cfg.bk, cfg.j) == (128, 128, 32, 1)
  assert pt._fit(pt.TileConfig(128, 128, 64, 4), 256, 1024, 512).j == 4


def test_bad_tile_configs_are_refused():
  with pytest.raises(ValueError, match="bm must be a power of two"):
    pt.set_tile_config("fwd", jnp.float32, pt.TileConfig(bm=96))
  with pytest.raises(ValueError, match="j must be >= 1"):
    pt.set_tile_config("bwd", jnp.float32, pt.TileConfig(j=0))
  with pytest.raises(ValueError, match="kind must be"):
    pt.set_tile_config("both", jnp.float32, pt.TileConfig())


@pytest.mark.parametrize(("b", "tile"), [(200, 256), (256, 128)], ids=["ragged", "whole-tiles"])
def test_fused_max_margin_gives_the_dense_loss_and_gradients(interpreted, b, tile):
  # Unnormalised embeddings (norms 0.5 to 2) and per-anchor margins 0.005 to 0.3.
  x, y, m = _inputs(b, 32, seed=4)
  k = jax.random.PRNGKey(5)
  x = x * (0.5 + 1.5 * jax.random.uniform(k, (b, 1)))
  m = 0.005 + 3 * (m - 0.005)
  v0, g0 = _vg(dense.max_margin_dense, x, y, m, precision=HIGHEST)
  pt.set_tile_config("fwd", jnp.float32, CONFIGS[0])
  pt.set_tile_config("bwd", jnp.float32, CONFIGS[1])
  assert pt.use_fused_tiles(pt.Blocks(tile, tile), 32, jnp.float32, "max_margin", "bwd")
  v, g = _vg(losses.max_margin_blockwise, x, y, m, block_size=tile, precision=HIGHEST)
  assert _rel(v, v0) <= 1e-5
  for got, want in zip(g, g0, strict=True):
    assert np.all(np.isfinite(got)) and _rel(got, want) <= 1e-4


def test_fused_bf16_max_margin_matches_the_float32_path(interpreted):
  # The bf16 embeddings are the tile operands as given (no bf16 rounding of normalised
  # vectors): the loss follows the float32 path on the same inputs at a margin of 0.005.
  from test_losses_numerics import _close_pairs

  x, y = _close_pairs(200, 32, seed=6)
  xb, yb = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
  m = jnp.full((200,), 0.005)
  v0, g0 = _vg(dense.max_margin_dense, xb.astype(jnp.float32), yb.astype(jnp.float32), m)
  v, g = _vg(losses.max_margin_blockwise, xb, yb, m, block_size=256)
  assert float(v0) > 1e-4 and _rel(v, v0) <= 1e-3
  assert _rel(g[0], g0[0]) <= 1e-2 and _rel(g[1], g0[1]) <= 1e-2


def test_bad_fused_tile_passes_are_refused():
  with pytest.raises(ValueError, match="passes must be among"):
    pt.set_fused_tiles("always", passes=("forward",))


def _tile_loop_bodies(jaxpr, found):
  """The bodies of the scans that call a Pallas program: the sweeps' loops over tiles."""
  from jax.extend import core

  for e in jaxpr.eqns:
    if e.primitive.name == "scan":
      body = e.params["jaxpr"].jaxpr
      if any(x.primitive.name == "pallas_call" for x in body.eqns):
        found.append(body)
    if e.primitive.name == "pallas_call":
      continue
    for v in e.params.values():
      if isinstance(v, (core.ClosedJaxpr, core.Jaxpr)):
        _tile_loop_bodies(v.jaxpr if isinstance(v, core.ClosedJaxpr) else v, found)
  return found


def test_fused_infonce_tiles_do_no_per_sample_vector_work_in_the_loop(interpreted):
  # Each op on a per-sample vector inside the loop over tiles is a kernel launch per tile on a
  # GPU (session 20's profiles: seven multiplies and six reductions and merges per tile). The
  # vectors come scaled from outside (`nce_vectors`) and each side's partials merge into its
  # state in one reduction (`_merge_lse`, `summed_into`).
  import collections

  b, tile = 256, 128
  x, y, t = _inputs(b, 32, seed=3)
  f = lambda x, y, t: losses.infonce_blockwise(x, y, t, block_size=tile)  # noqa: E731
  jaxpr = jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, y, t).jaxpr
  bodies = _tile_loop_bodies(jaxpr, [])
  assert len(bodies) == 2  # the forward's and the backward's inner loops
  for body in bodies:
    ops = collections.Counter(
      e.primitive.name
      for e in body.eqns
      if any(getattr(v.aval, "shape", None) == (tile,) for v in e.outvars)
    )
    elementwise = {k: n for k, n in ops.items() if k in ("mul", "add", "sub", "exp", "max")}
    assert elementwise == {}, ops
    assert ops["reduce_max"] == 0, ops
  fwd_ops = collections.Counter(e.primitive.name for e in bodies[0].eqns)
  assert fwd_ops["reduce"] == 2 and fwd_ops["reduce_sum"] == 0, fwd_ops  # one per side
