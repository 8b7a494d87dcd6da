"""The warp-specialised Mosaic GPU kernels (`mmts_jax.losses._mosaic_tiles`: InfoNCE and
max-margin, bf16 and float32) through Pallas's GPU interpreter on CPU (TMA copies, barriers,
wgmma and the persistent walk simulated), against float64 references, their lowering to Mosaic
GPU for CUDA from the CPU, and the dispatch that picks them.

Tolerances: the kernels' base-2 logsumexp partials merged, 1e-5 absolute against float64 on the
same bf16 inputs (float32 accumulation over D = 128; 5e-5 for float32 inputs over D = 96); dS
within 4e-3 of its largest entry when stored in bf16 (2^-8 relative per entry), 1e-5 in float32;
float32 row / column sums within 1e-5 of the largest sum; max-margin hinge sums within 1e-5,
active counts exact; the blockwise losses with these kernels against the float32 dense losses:
bf16 inputs loss 1e-3, gradients 1e-2 relative (issue 13's bounds), float32 1e-5 / 1e-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_losses_blockwise import FAST_COMPILE, _rel, _unit

from mmts_jax import losses
from mmts_jax.losses import _mosaic_tiles as mt
from mmts_jax.losses import _pallas_tiles as pt
from mmts_jax.losses import dense
from mmts_jax.losses._reference64 import hinge_inputs, hinge_tile

LOG2E = 1.4426950408889634


def _tile_inputs(br, bc, d, seed):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  x, y = _unit(k[0], (br, d)).astype(jnp.bfloat16), _unit(k[1], (bc, d)).astype(jnp.bfloat16)
  # Temperatures 0.005 to 0.105: base-2 logits up to 290.
  tr = 0.005 + 0.1 * jax.random.uniform(k[2], (br,))
  tc = 0.005 + 0.1 * jax.random.uniform(k[3], (bc,))
  return x, y, (LOG2E / tr).astype(jnp.float32), (LOG2E / tc).astype(jnp.float32)


def _lse2(z, axis):
  m = z.max(axis, keepdims=True)
  return (m + np.log2(np.exp2(z - m).sum(axis, keepdims=True))).squeeze(axis)


def _with_wgs(n, lag):
  for kind in ("fwd", "bwd"):
    for dt in (jnp.bfloat16, jnp.float32):
      mt.set_config(kind, mt.config(kind, dt)._replace(wgs=n, lag=lag), dt)
  yield n
  for kind in ("fwd", "bwd"):
    for dt in (jnp.bfloat16, jnp.float32):
      mt.set_config(kind, None, dt)


@pytest.fixture(
  params=[(1, False), (2, False), (2, True)],
  ids=["one-warpgroup", "two-warpgroups", "two-warpgroups-lagged"],
)
def wgs(request):
  """Compute warpgroups per CTA: two take turns for the backward's column reductions
  (barriers; the forward's columns go through transposed slices by default), and with `lag`
  the second starts a ring of stages behind the first (another barrier)."""
  yield from _with_wgs(*request.param)


@pytest.fixture(params=[(1, False), (2, False)], ids=["one-warpgroup", "two-warpgroups"])
def wgs_unlagged(request):
  """`wgs` without `lag`, which only delays the second warpgroup's start: the stats and dS
  tests cover it, for the suite's time."""
  yield from _with_wgs(*request.param)


def _merge2(m, s):
  top = m.max(0)
  return top + np.log2((s * np.exp2(m - top)).sum(0))


def _check_nce_stats(br, bc, seed):
  """`nce_stats` on a `(br, bc)` tile (D = 128) in the interpreter: its partials merge to the
  float64 logsumexps within 1e-5. Returns the shapes of the row and column partials."""
  x, y, ar, ac = _tile_inputs(br, bc, 128, seed=seed)
  rm, rl, cm, cl = map(np.asarray, mt.nce_stats(x, y, ar, ac, interpret=True))
  assert rm.shape == rl.shape and cm.shape == cl.shape
  s = np.asarray(x, np.float64) @ np.asarray(y, np.float64).T
  want_r = _lse2(s * np.asarray(ar, np.float64)[:, None], 1)
  want_c = _lse2(s * np.asarray(ac, np.float64)[None, :], 0)
  np.testing.assert_allclose(_merge2(rm, rl), want_r, atol=1e-5, rtol=0)
  np.testing.assert_allclose(_merge2(cm, cl), want_c, atol=1e-5, rtol=0)
  return rm.shape, cm.shape


def test_stats_kernel_partials_merge_to_the_float64_logsumexps(wgs):
  # (columns / tile_n, rows) row partials, (rows / tile_m, columns) column partials.
  assert _check_nce_stats(512, 384, seed=0) == ((3, 512), (4, 384))


@pytest.mark.parametrize(("need_sums", "need_a"), [(True, True), (False, False)])
def test_ds_kernel_matches_float64(wgs, need_sums, need_a):
  _check_nce_ds(need_sums, need_a)


def _check_nce_ds(need_sums, need_a):
  x, y, ar, ac = _tile_inputs(256, 256, 128, seed=1)
  s = np.asarray(x, np.float64) @ np.asarray(y, np.float64).T
  a_r, a_c = np.asarray(ar, np.float64), np.asarray(ac, np.float64)
  lr, lc = _lse2(s * a_r[:, None], 1), _lse2(s * a_c[None, :], 0)
  k1, k2 = jax.random.split(jax.random.PRNGKey(2))
  wr = np.asarray(jax.random.normal(k1, (256,)), np.float64) * a_r
  wc = np.asarray(jax.random.normal(k2, (256,)), np.float64) * a_c
  vecs = [jnp.asarray(v, jnp.float32) for v in (ar, ac, lr, lc, wr, wc)]
  out = mt.nce_ds(x, y, *vecs, need_sums=need_sums, need_a=need_a, interpret=True)
  assert len(out) == 1 + 2 * (need_sums + need_a)
  pr = np.exp2(s * a_r[:, None] - lr[:, None])
  pc = np.exp2(s * a_c[None, :] - lc[None, :])
  ds = wr[:, None] * pr + wc[None, :] * pc
  assert out[0].dtype == jnp.bfloat16 and out[0].shape == (256, 256)
  scale = np.abs(ds).max()
  np.testing.assert_allclose(np.asarray(out[0], np.float64), ds, atol=4e-3 * scale, rtol=0)
  parts = [np.asarray(p, np.float64) for p in out[1:]]
  wants = []
  if need_sums:
    wants += [ds.sum(1), ds.sum(0)]
  if need_a:
    wants += [(pr * s).sum(1), (pc * s).sum(0)]
  for got, want in zip(parts, wants, strict=True):
    np.testing.assert_allclose(got.sum(0), want, atol=1e-5 * np.abs(want).max(), rtol=0)


def test_float32_kernels_on_tf32_chunks_match_float64(wgs_unlagged):
  # float32 embeddings take D in chunks of 32 (128 bytes, as bf16's 64) and 64 x 128 backward
  # sub-tiles per warpgroup. The interpreter multiplies in float32 (the GPU in tf32, whose error
  # benchmarks/mosaic_tiles_bench.py measures): logsumexps of logits up to 290 within 5e-5.
  x, y, ar, ac = _tile_inputs(256, 256, 96, seed=4)  # D = 96: three chunks
  noise = jax.random.normal(jax.random.PRNGKey(5), x.shape)
  x = x.astype(jnp.float32) + 1e-3 * noise  # below bf16's resolution
  y = y.astype(jnp.float32)
  assert mt.config("fwd", jnp.float32).tile_k == mt.config("bwd", jnp.float32).tile_k == 32
  rm, rl, cm, cl = map(np.asarray, mt.nce_stats(x, y, ar, ac, interpret=True))
  assert cm.shape == (256 // mt.config("fwd", jnp.float32).tile_m, 256)
  s = np.asarray(x, np.float64) @ np.asarray(y, np.float64).T
  a_r, a_c = np.asarray(ar, np.float64), np.asarray(ac, np.float64)
  lr, lc = _lse2(s * a_r[:, None], 1), _lse2(s * a_c[None, :], 0)
  np.testing.assert_allclose(_merge2(rm, rl), lr, atol=5e-5, rtol=0)
  np.testing.assert_allclose(_merge2(cm, cl), lc, atol=5e-5, rtol=0)
  wr = np.linspace(-1, 1, 256) * a_r
  wc = np.linspace(1, -1, 256) * a_c
  vecs = [jnp.asarray(v, jnp.float32) for v in (ar, ac, lr, lc, wr, wc)]
  ds, sr, sc = mt.nce_ds(x, y, *vecs, need_sums=False, need_a=True, interpret=True)
  bwd = mt.config("bwd", jnp.float32)
  assert ds.dtype == jnp.float32 and sr.shape == (256 // bwd.tile_n, 256)
  assert sc.shape == (256 // bwd.tile_m, 256)
  pr = np.exp2(s * a_r[:, None] - lr[:, None])
  pc = np.exp2(s * a_c[None, :] - lc[None, :])
  want = wr[:, None] * pr + wc[None, :] * pc
  scale = np.abs(want).max()
  np.testing.assert_allclose(np.asarray(ds, np.float64), want, atol=1e-5 * scale, rtol=0)
  for got, w in ((sr, (pr * s).sum(1)), (sc, (pc * s).sum(0))):
    np.testing.assert_allclose(np.asarray(got, np.float64).sum(0), w, atol=1e-5 * np.abs(w).max())


def test_max_margin_kernels_match_float64(wgs_unlagged):
  _check_mm_kernels()


def _check_mm_kernels(n=256):
  (x, y), vecs, (rid, cid) = hinge_inputs(n, 128, seed=6, id_shift=128)
  f32 = [jnp.asarray(v, jnp.float32) for v in vecs]
  ids = jnp.asarray(rid), jnp.asarray(cid)
  gr, gc = np.linspace(-1, 1, n), np.linspace(0.5, -0.5, n)
  t = hinge_tile(x, y, *vecs, rid, cid, gr, gc)
  assert t.dsw is not None
  out = [np.asarray(o, np.float64) for o in mt.mm_stats(x, y, *f32, *ids, interpret=True)]
  # (columns / tile_n, rows) row partials, (rows / tile_m, columns) column partials.
  tile_m, tile_n = mt.config("fwd").tile_m, mt.config("fwd").tile_n
  assert [o.shape for o in out] == [(n // tile_n, n)] * 2 + [(n // tile_m, n)] * 2
  for got, want in ((out[0], t.hr.sum(1)), (out[2], t.hc.sum(0))):
    np.testing.assert_allclose(got.sum(0), want, atol=1e-5 * np.abs(want).max(), rtol=0)
  # Which hinges are active: no entry of these inputs lies within float32 error of its hinge.
  assert not t.tie.any()
  np.testing.assert_array_equal(out[1].sum(0), (t.hr > 0).sum(1))
  np.testing.assert_array_equal(out[3].sum(0), (t.hc > 0).sum(0))
  res = mt.mm_ds(x, y, *f32, *ids, *map(jnp.asarray, (gr, gc)), need_sums=True, interpret=True)
  assert res[0].dtype == jnp.bfloat16
  scale = np.abs(t.dsw).max()
  np.testing.assert_allclose(np.asarray(res[0], np.float64), t.dsw, atol=4e-3 * scale, rtol=0)
  wants = [t.dsw.sum(1), t.dsw.sum(0)]
  for got, want in zip(res[1:], wants, strict=True):
    got = np.asarray(got, np.float64).sum(0)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)


@pytest.fixture
def whole_tile_backward():
  """The bf16 backward's epilogue on whole sub-tiles (`sliced_ds` off, as before run 17)."""
  mt.set_config("bwd", mt.config("bwd")._replace(sliced_ds=False))
  yield
  mt.set_config("bwd", None)


def test_the_whole_tile_backward_matches_float64(whole_tile_backward):
  # The default backward computes dS 64 columns at a time (`sliced_ds`), these sub-tiles two
  # slices wide; here the InfoNCE kernel on the whole 128-column sub-tile, to the same bounds
  # (max-margin's terms are the same code in either epilogue: the default tests cover them).
  assert not mt.config("bwd").sliced_ds
  _check_nce_ds(need_sums=True, need_a=True)


@pytest.fixture
def pingpong_walk():
  """Both passes in both dtypes on the ping-pong walk (`pingpong`: a ring of two stages per
  compute warpgroup, every other sub-tile each, the copy warpgroup's own barriers; one group of
  products left in flight, `release`, so each stage goes back a step late), reading
  their vectors from shared memory (`stage_vectors`: TMA copies and a barrier per warpgroup
  before the products; the interpreter simulates both)."""
  for kind in ("fwd", "bwd"):
    for dt in (jnp.bfloat16, jnp.float32):
      fields = {"pingpong": True, "stages": 2, "release": 1, "stage_vectors": True}
      mt.set_config(kind, mt.config(kind, dt)._replace(**fields), dt)
  yield
  for kind in ("fwd", "bwd"):
    for dt in (jnp.bfloat16, jnp.float32):
      mt.set_config(kind, None, dt)


def test_kernels_on_the_pingpong_walk_match_float64(pingpong_walk):
  # The bounds above. 512 x 384 on the interpreter's two CTAs: six sub-tiles each, three per
  # warpgroup, so each stage of both rings is reused and its barriers pass several phases
  # (the interpreter checks that every phase is waited for). Then a forward (bf16) and a
  # backward (float32) program lower for CUDA.
  assert mt.config("fwd").pingpong and mt.config("bwd", jnp.float32).pingpong
  assert mt.config("fwd").stage_vectors and mt.config("bwd", jnp.float32).stage_vectors
  _check_nce_stats(512, 384, seed=0)
  _check_nce_ds(need_sums=True, need_a=True)  # (max-margin's epilogues ride the same walk)
  xs = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16)
  xf = jax.ShapeDtypeStruct((1024, 512), jnp.float32)
  v = jax.ShapeDtypeStruct((1024,), jnp.float32)
  fwd = jax.jit(lambda x, y, a, b: mt.nce_stats(x, y, a, b))
  assert "mosaic_gpu" in fwd.trace(xs, xs, v, v).lower(lowering_platforms=("cuda",)).as_text()
  bwd = jax.jit(lambda *a: mt.nce_ds(*a, need_sums=False, need_a=True))
  assert "mosaic_gpu" in bwd.trace(xf, xf, *([v] * 6)).lower(lowering_platforms=("cuda",)).as_text()
  with pytest.raises(ValueError, match="pingpong staggers the warpgroups itself"):
    mt.set_config("bwd", mt.config("bwd")._replace(lag=True))


@pytest.fixture
def pingpong_three_warpgroups():
  """Both bf16 passes on the ping-pong walk with three compute warpgroups of 64-row sub-tiles
  (the interpreter runs each CTA's four warpgroups as threads: two CTAs take the suite's eight
  simulated devices)."""
  for kind in ("fwd", "bwd"):
    fields = {"pingpong": True, "wgs": 3, "tile_m": 64, "stages": 2}
    mt.set_config(kind, mt.config(kind)._replace(**fields))
  yield
  for kind in ("fwd", "bwd"):
    mt.set_config(kind, None)


def test_three_pingpong_warpgroups_match_float64(pingpong_three_warpgroups):
  # The bounds above. 384 x 384 is eighteen 64 x 128 sub-tiles, nine per CTA, three per
  # warpgroup, so each warpgroup's ring is reused; the dS check's 256 x 256 deals a CTA's four
  # sub-tiles 2, 1, 1; the max-margin check's 384 x 384 three per warpgroup again.
  assert mt.config("fwd").wgs == 3 and mt.config("bwd").pingpong
  assert _check_nce_stats(384, 384, seed=5) == ((3, 384), (6, 384))
  _check_nce_ds(need_sums=True, need_a=True)
  _check_mm_kernels(384)
  # 1,000 rows: 64-row sub-tiles do not divide them; the walk takes 1,024 (no CTA tile of 192).
  assert not mt.supported(1000, 1024, 512, jnp.bfloat16) and mt.supported(
    1024, 1024, 512, jnp.bfloat16
  )
  with pytest.raises(ValueError, match=r"wgs must be 1 or 2 \(3 with pingpong\), got 3"):
    mt.set_config("fwd", mt.config("fwd")._replace(pingpong=False))
  with pytest.raises(ValueError, match="three warpgroups reduce their columns on transposed"):
    mt.set_config("fwd", mt.config("fwd")._replace(col_chunk=0))


@pytest.fixture
def pingpong_cross_warp_columns():
  """The bf16 forward on the ping-pong walk with its columns reduced across warps (`col_chunk`
  0), so the two warpgroups' column parts take turns on Pallas's reduction scratch."""
  fields = {"pingpong": True, "stages": 2, "col_chunk": 0, "reduction_scratch": 16384}
  mt.set_config("fwd", mt.config("fwd")._replace(**fields))
  yield
  mt.set_config("fwd", None)


def test_pingpong_turns_match_float64_for_odd_and_even_shares(pingpong_cross_warp_columns):
  # 384 x 384 is nine 128 x 128 sub-tiles on the interpreter's two CTAs: five on one (warpgroup
  # 0 takes the last), four on the other (warpgroup 1 does), so both of the walk's final waits
  # on the turns run; the interpreter fails a kernel that leaves a phase unwaited.
  assert mt.config("fwd").pingpong and mt.config("fwd").col_chunk == 0
  _check_nce_stats(384, 384, seed=4)


@pytest.fixture
def cross_warp_columns(request):
  """Both passes with their columns reduced across warps in the products' layout (`col_chunk`
  0, as before session 13; two warpgroups take turns), for `request.param`'s dtype; the
  defaults restored afterwards."""
  dt = request.param
  old = mt.config("fwd", dt)
  mt.set_config("fwd", old._replace(col_chunk=0, stages=4, reduction_scratch=16384), dt)
  mt.set_config("bwd", mt.config("bwd", dt)._replace(col_chunk=0, sliced_ds=False), dt)
  yield dt
  mt.set_config("fwd", None, dt)
  mt.set_config("bwd", None, dt)


@pytest.mark.parametrize("cross_warp_columns", [jnp.bfloat16, jnp.float32], indirect=True)
def test_kernels_with_cross_warp_columns_match_float64(cross_warp_columns):
  # The bounds above: logsumexps 1e-5 (bf16, D = 128) / 5e-5 (float32, D = 96), here also
  # 5e-7 relative (four float32 ulps: these inputs' base-2 logsumexps reach 77); hinge sums 1e-5
  # of the largest, counts exact. 384 columns: three sub-tiles.
  dt = cross_warp_columns
  d, tol = (128, 1e-5) if dt == jnp.bfloat16 else (96, 5e-5)
  x, y, ar, ac = _tile_inputs(256, 384, d, seed=8)
  x, y = x.astype(dt), y.astype(dt)
  rm, rl, cm, cl = map(np.asarray, mt.nce_stats(x, y, ar, ac, interpret=True))
  assert cm.shape == (256 // 128, 384)
  s = np.asarray(x, np.float64) @ np.asarray(y, np.float64).T
  a_r, a_c = np.asarray(ar, np.float64), np.asarray(ac, np.float64)
  np.testing.assert_allclose(_merge2(rm, rl), _lse2(s * a_r[:, None], 1), atol=tol, rtol=5e-7)
  np.testing.assert_allclose(_merge2(cm, cl), _lse2(s * a_c[None, :], 0), atol=tol, rtol=5e-7)
  (x, y), vecs, (rid, cid) = hinge_inputs(256, 128, seed=6, id_shift=128)
  x, y = jnp.asarray(x, dt), jnp.asarray(y, dt)
  t = hinge_tile(x, y, *vecs, rid, cid, np.zeros(256), np.zeros(256))
  assert not t.tie.any()
  f32 = [jnp.asarray(v, jnp.float32) for v in vecs]
  out = mt.mm_stats(x, y, *f32, jnp.asarray(rid), jnp.asarray(cid), interpret=True)
  out = [np.asarray(o, np.float64).sum(0) for o in out]
  for got, want in ((out[0], t.hr.sum(1)), (out[2], t.hc.sum(0))):
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)
  np.testing.assert_array_equal(out[1], (t.hr > 0).sum(1))
  np.testing.assert_array_equal(out[3], (t.hc > 0).sum(0))
  if dt == jnp.bfloat16:  # the backward's cross-warp column sums, with bf16 dS
    _check_nce_ds(need_sums=True, need_a=True)


def _vg(fn, *args, **kw):
  f = jax.jit(jax.value_and_grad(lambda x, y, t: fn(x, y, t, **kw), argnums=(0, 1, 2)))
  return f.lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def test_blockwise_loss_on_the_mosaic_kernels_matches_the_dense_loss(interpreted):
  # The default configurations: two compute warpgroups per CTA (the backward's taking turns).
  assert mt.config("fwd").wgs == mt.config("bwd").wgs == 2
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
  b, d = 256, 64  # two column tiles of 128: the partials merge across tiles
  xb = _unit(k1, (b, d)).astype(jnp.bfloat16)
  yb = _unit(k2, (b, d)).astype(jnp.bfloat16)
  t = 0.005 + 0.1 * jax.random.uniform(k3, (b,))
  pt.set_tile_kernel("mosaic")
  try:
    assert pt._mosaic_for("fwd", xb, yb) == (True, True)
    v, g = _vg(losses.infonce_blockwise, xb, yb, t, block_size=(256, 128))
  finally:
    pt.set_tile_kernel(None)
  v0, g0 = _vg(dense.infonce_dense, xb.astype(jnp.float32), yb.astype(jnp.float32), t)
  assert _rel(v, v0) <= 1e-3
  for got, want in zip(g, g0, strict=True):
    assert np.all(np.isfinite(np.asarray(got, np.float32))) and _rel(got, want) <= 1e-2


@pytest.mark.parametrize(
  ("loss", "dtype"),
  [("max_margin", jnp.bfloat16), ("infonce", jnp.float32), ("max_margin", jnp.float32)],
)
def test_blockwise_losses_on_the_mosaic_kernels_match_the_dense_losses(interpreted, loss, dtype):
  # Both passes forced onto the Mosaic kernels; B = 256 in tiles of (256, 128). float32 runs
  # the interpreter's float32 products: 1e-5 / 1e-4 against the float32 dense loss.
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(7), 3)
  b, d = 256, 64
  xb, yb = _unit(k1, (b, d)).astype(dtype), _unit(k2, (b, d)).astype(dtype)
  t = 0.005 + 0.1 * jax.random.uniform(k3, (b,))  # temperatures, or margins
  ours = {"infonce": losses.infonce_blockwise, "max_margin": losses.max_margin_blockwise}[loss]
  ref = {"infonce": dense.infonce_dense, "max_margin": dense.max_margin_dense}[loss]
  pt.set_tile_kernel("mosaic")
  try:
    assert pt._mosaic_for("bwd", xb, yb, loss) == (True, True)
    v, g = _vg(ours, xb, yb, t, block_size=(256, 128))
  finally:
    pt.set_tile_kernel(None)
  v0, g0 = _vg(ref, xb.astype(jnp.float32), yb.astype(jnp.float32), t)
  tol = (1e-3, 1e-2) if dtype == jnp.bfloat16 else (1e-5, 1e-4)
  assert _rel(v, v0) <= tol[0]
  for got, want in zip(g, g0, strict=True):
    assert np.all(np.isfinite(np.asarray(got, np.float32))) and _rel(got, want) <= tol[1]


def test_padded_or_full_precision_tiles_keep_the_other_kernels(interpreted):
  x = jnp.zeros((256, 64), jnp.bfloat16)
  pt.set_tile_kernel("mosaic")
  try:
    assert pt._mosaic_for("fwd", x, x)[0]
    assert not pt._mosaic_for("fwd", x[:192], x)[0]  # rows: whole sub-tiles of 128
    f = x.astype(jnp.float32)
    assert pt._mosaic_for("bwd", f, f)[0]  # float32 on tf32 wgmma: JAX's default precision
    assert not pt._mosaic_for("bwd", f, f, "infonce", jax.lax.Precision.HIGHEST)[0]
    assert not pt._mosaic_for("fwd", x.astype(jnp.float16), x)[0]
  finally:
    pt.set_tile_kernel(None)
  assert not pt._mosaic_for("fwd", x, x)[0]  # on CPU the measured default never picks them


def test_the_measured_dispatch_falls_back_per_dtype(monkeypatch):
  # On a Hopper GPU (as the dispatch is told): where FASTEST names the Mosaic kernels but they
  # do not apply, bf16 takes the Triton tiles and float32 the XLA tiles.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  hopper = [True]
  monkeypatch.setattr(pt, "_hopper", lambda: hopper[0])
  blocks, f32, bf16 = pt.Blocks(8192, 8192), jnp.float32, jnp.bfloat16

  def fused(dtype, loss, kind, **kw):
    return pt.use_fused_tiles(blocks, 512, dtype, loss, kind, **kw)

  assert fused(f32, "infonce", "fwd") and fused(f32, "infonce", "bwd")
  assert fused(f32, "max_margin", "fwd") and fused(f32, "max_margin", "bwd")
  assert not fused(f32, "infonce", "fwd", padded=True)
  assert not fused(f32, "infonce", "bwd", padded=True)
  assert not fused(f32, "max_margin", "bwd", precision=jax.lax.Precision.HIGHEST)
  with jax.default_matmul_precision("highest"):  # JAX's own default raised: no tf32
    assert not fused(f32, "infonce", "fwd") and fused(bf16, "infonce", "fwd")
  assert fused(bf16, "max_margin", "fwd", padded=True)  # the Triton kernel takes padding
  assert not pt.use_fused_tiles(pt.Blocks(8192, 8192 - 64), 512, f32, "infonce", "fwd")
  hopper[0] = False
  assert not fused(f32, "infonce", "fwd") and fused(bf16, "infonce", "fwd")


def test_bad_tile_kernels_and_configs_are_refused():
  with pytest.raises(ValueError, match="kernel must be None, 'triton' or 'mosaic'"):
    pt.set_tile_kernel("wgmma")
  bad = [
    (mt.MosaicConfig(wgs=4, pingpong=True), r"wgs must be 1 or 2 \(3 with pingpong\), got 4"),
    (mt.MosaicConfig(tile_m=96), "tile_m must be a multiple of 64 .* got 96 x 128"),
    (mt.MosaicConfig(tile_n=512), "got 128 x 512"),
    (mt.MosaicConfig(tile_k=32), "tile_k must be a multiple of 64 for bfloat16, got 32"),
    (mt.MosaicConfig(stages=2, release=2), "release 2, stages 2"),
    (mt.MosaicConfig(ctas_per_sm=0), "ctas_per_sm must be >= 1, got 0"),
    (mt.MosaicConfig(reduction_scratch=1000), "reduction_scratch must be .* 1024 bytes, got 1000"),
    (
      mt.MosaicConfig(col_chunk=32),
      "col_chunk must be 0, or a multiple of 64 dividing tile_n 128, got 32",
    ),
    (mt.MosaicConfig(tile_n=64, col_chunk=128), "dividing tile_n 64, got 128"),
    (mt.MosaicConfig(sliced_ds=True), "sliced_ds works on col_chunk slices; it needs col_chunk"),
  ]
  for cfg, message in bad:
    with pytest.raises(ValueError, match=message):
      mt.set_config("fwd", cfg)
  with pytest.raises(ValueError, match="kind must be 'fwd' or 'bwd'"):
    mt.set_config("both", None)
  with pytest.raises(ValueError, match="tile_k must be a multiple of 32 for float32, got 16"):
    mt.set_config("fwd", mt.MosaicConfig(tile_k=16), jnp.float32)
  with pytest.raises(ValueError, match="dtype must be one of .* got float16"):
    mt.set_config("fwd", None, jnp.float16)
  # Nothing refused was kept.
  assert mt.config("fwd") == mt.MosaicConfig(stages=3, col_chunk=64)
  assert mt.config("fwd", jnp.float32) == mt.MosaicConfig(tile_k=32, stages=3, col_chunk=64)
  assert mt.config("bwd") == mt.MosaicConfig(stages=3, col_chunk=64, sliced_ds=True)


def test_a_backward_whose_slices_would_not_fill_its_ds_staging_is_refused():
  # 64 x 256 bf16 sub-tiles stage 32 KiB of dS per warpgroup, 64-column float32 slices 16 KiB:
  # aliased, one warpgroup's slices would overlap the other's staging.
  mt.set_config("bwd", mt.config("bwd")._replace(tile_m=64, tile_n=256))
  try:
    x = jnp.zeros((256, 128), jnp.bfloat16)
    v = jnp.zeros((256,), jnp.float32)
    with pytest.raises(ValueError, match="256 columns of bfloat16 take col_chunk 128, got 64"):
      mt.nce_ds(x, x, v, v, v, v, v, v, need_sums=True, need_a=False, interpret=True)
  finally:
    mt.set_config("bwd", None)


def test_the_kernels_lower_to_mosaic_gpu_for_cuda():
  # The Pallas-to-Mosaic-GPU lowering (layouts, reductions, TMA and wgmma shapes) runs on the
  # CPU; compiling to PTX needs a GPU (benchmarks/mosaic_tiles_bench.py checks that on one).
  xs = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((1024,), jnp.float32)
  fwd = jax.jit(lambda x, y, a, b: mt.nce_stats(x, y, a, b))
  text = fwd.trace(xs, xs, v, v).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
  bwd = jax.jit(lambda *a: mt.nce_ds(*a, need_sums=True, need_a=True))
  text = bwd.trace(xs, xs, *([v] * 6)).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
  ids = jax.ShapeDtypeStruct((1024,), jnp.int32)
  mm = jax.jit(lambda x, y, *a: mt.mm_stats(x, y, *a))
  text = mm.trace(xs, xs, v, v, v, v, ids, ids).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
  mm = jax.jit(lambda x, y, *a: mt.mm_ds(x, y, *a, need_sums=True))
  text = mm.trace(xs, xs, v, v, v, v, ids, ids, v, v).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
  xf = jax.ShapeDtypeStruct((1024, 512), jnp.float32)
  f32 = jax.jit(lambda *a: mt.nce_ds(*a, need_sums=False, need_a=True))
  text = f32.trace(xf, xf, *([v] * 6)).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def test_the_ring_lowers_with_the_mosaic_kernels_for_cuda(monkeypatch):
  # The ring runs the tile passes inside `shard_map` with its varying-axes types checked: the
  # kernels' outputs must declare them (`like=`). Lowered for CUDA from the CPU, with the
  # dispatch told it is on a Hopper GPU: forced, every tile pass is a Mosaic GPU kernel.
  from jax.sharding import Mesh
  from jax.sharding import PartitionSpec as P

  mesh = Mesh(np.array(jax.devices()[:2]), ("batch",))
  xs = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16)
  ts = jax.ShapeDtypeStruct((1024,), jnp.float32)

  def sharded(loss):
    return jax.shard_map(
      lambda x, y, t: loss(x, y, t, axis_name="batch", sharded="ring", block_size=512),
      mesh=mesh,
      in_specs=(P("batch"),) * 3,
      out_specs=P(),
      check_vma=True,
    )

  ring = sharded(losses.infonce)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(pt, "_hopper", lambda: True)

  def lowered(kernel):
    pt.set_tile_kernel(kernel)
    try:
      f = jax.jit(jax.value_and_grad(ring, argnums=(0, 1)))
      return f.trace(xs, xs, ts).lower(lowering_platforms=("cuda",)).as_text()
    finally:
      pt.set_tile_kernel(None)

  text = lowered("mosaic")
  assert "mosaic_gpu" in text and "xla.gpu.triton" not in text
  text = lowered("triton")
  assert "xla.gpu.triton" in text and "mosaic_gpu" not in text
  # The measured default (bf16): both passes on the Mosaic kernels.
  text = lowered(None)
  assert "mosaic_gpu" in text and "xla.gpu.triton" not in text
  # Max-margin in the ring, by the measured default: the same.
  f = jax.jit(jax.value_and_grad(sharded(losses.max_margin), argnums=(0, 1)))
  text = f.trace(xs, xs, ts).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text and "xla.gpu.triton" not in text
  # float32 InfoNCE by the measured default: both passes on Mosaic too (since session 15), so
  # four kernel call sites (each pass: the ring's hops and its last step), where a forward-only
  # dispatch has two.
  xf = jax.ShapeDtypeStruct((1024, 512), jnp.float32)
  text = jax.jit(jax.value_and_grad(ring, argnums=(0, 1))).trace(xf, xf, ts)
  text = text.lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("custom_call @mosaic_gpu") == 4, text.count("custom_call @mosaic_gpu")


def test_profiling_records_the_kernels_built_inside_it(tmp_path):
  # `profiling` gives the kernels built inside it Mosaic GPU's on-device profiler; outside it
  # they are built as before. (Lowering a profiled kernel for CUDA needs a GPU backend for the
  # trace's callback, so this reads the kernel's parameters in the jaxpr. A new function each
  # time: JAX caches a trace per function, not per configuration.)
  xs = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((1024,), jnp.float32)

  def params():
    jaxpr = jax.make_jaxpr(lambda x, y, a, b: mt.nce_stats(x, y, a, b))(xs, xs, v, v)
    return str(jaxpr)

  assert "profile_space=0" in params()
  with mt.profiling(str(tmp_path), space=64):
    text = params()
  assert "profile_space=64" in text and f"profile_dir='{tmp_path}'" in text
  assert "profile_space=0" in params() and mt._PROFILE == {}


def test_ptxas_reports_are_read_for_registers_and_spills():
  import sys
  from pathlib import Path

  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
  from profile_tiles import parse_ptxas

  # Two functions: the largest count of each kind is kept.
  report = """ptxas info    : Compiling entry function 'a' for 'sm_90a'
ptxas info    : Used 168 registers, used 16 barriers, 288 bytes cumulative stack size
ptxas info    : 0 bytes stack frame, 296 bytes spill stores, 320 bytes spill loads
ptxas info    : Used 40 registers
ptxas info    : 8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"""
  assert parse_ptxas(report) == {
    "registers": 168,
    "spill_store_bytes": 296,
    "spill_load_bytes": 320,
  }
  assert parse_ptxas("no report") == {
    "registers": None,
    "spill_store_bytes": None,
    "spill_load_bytes": None,
  }


def test_stream_gaps_bin_idle_time_between_kernels_per_call():
  import sys
  from pathlib import Path

  import pytest

  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
  from profile_tiles import gaps

  # Two calls: kernels of 10 us with gaps of 1.5 us, 30 us and 0 (back to back), one overlap.
  ev = [
    (0, 10_000, "a"),
    (11_500, 21_500, "b"),
    (51_500, 61_500, "a"),
    (61_500, 71_500, "b"),
    (70_000, 75_000, "c"),  # overlaps b by 1.5 us: busy counts it once
  ]
  g = gaps(list(reversed(ev)), calls=2)  # the order of the events does not matter
  assert g["kernels_per_call"] == 2.5
  assert g["span_ms_per_call"] == pytest.approx(75e-3 / 2, abs=1e-3)
  busy = 10 + 10 + 10 + 10 + 3.5
  assert g["busy_ms_per_call"] == pytest.approx(busy / 2 / 1e3, abs=1e-3)
  assert g["idle_ms_per_call"] == pytest.approx((75 - busy) / 2 / 1e3, abs=1e-3)
  assert g["count_per_call"] == {
    "<=1us": 0,
    "<=2us": 0.5,
    "<=5us": 0,
    "<=20us": 0,
    "<=100us": 0.5,
    ">100us": 0,
  }
  assert g["longest"][0] == {"us": 30.0, "after": "b", "before": "a"}
  assert gaps([], calls=1) == {"kernels_per_call": 0}
  with pytest.raises(ValueError, match="calls must be >= 1, got 0"):
    gaps(ev, calls=0)


def test_the_trace_summary_measures_overlap_of_the_products():
  import sys
  from pathlib import Path

  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
  from profile_tiles import summarise

  events = []

  def region(tid, name, begin, end):
    events.append({"name": name, "ph": "B", "ts": begin, "tid": tid, "pid": 1})
    events.append({"name": name, "ph": "E", "ts": end, "tid": tid, "pid": 1})

  # One CTA: warpgroup 0 (tid 1) in its products over [0, 4], warpgroup 1 (tid 2) over [2, 6],
  # the memory warpgroup (tid 3) records nothing; the CTA spans [0, 10].
  region(1, "mma", 0.0, 4.0)
  region(1, "epilogue", 4.0, 8.0)
  region(1, "cols", 4.5, 7.0)
  region(2, "mma", 2.0, 6.0)
  region(2, "epilogue", 6.0, 10.0)
  got = summarise({"traceEvents": events})
  assert got["ctas"] == 1
  assert got["fraction_any_wg_in_mma"] == pytest.approx(0.6)  # [0, 6] of [0, 10]
  assert got["fraction_both_wgs_in_mma"] == pytest.approx(0.2)  # [2, 4]
  assert got["region_mean_us"]["wg0/cols"] == pytest.approx(2.5)
  assert got["region_count"] == {
    "wg0/cols": 1,
    "wg0/epilogue": 1,
    "wg0/mma": 1,
    "wg1/epilogue": 1,
    "wg1/mma": 1,
  }
  # Three compute warpgroups (tids 1-3, the copy warpgroup 4): the third's products over [6, 9]
  # join the union; "both" is defined for two only.
  region(3, "mma", 6.0, 9.0)
  got = summarise({"traceEvents": events}, compute_wgs=3, wgs_per_cta=4)
  assert got["ctas"] == 1 and got["fraction_any_wg_in_mma"] == pytest.approx(0.9)
  assert got["fraction_both_wgs_in_mma"] is None and got["region_count"]["wg2/mma"] == 1


def test_the_benchmarks_kernels_name_known_kernels_and_valid_variants():
  # A typo here costs a GPU call: every timed kernel is a known one, every variant exists and
  # passes `set_config`'s checks in both dtypes, and the defaults come back afterwards.
  import sys
  from pathlib import Path

  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
  import mosaic_tiles_bench as bench

  defaults = {(k, dt): mt.config(k, dt) for k in ("fwd", "bwd") for dt in mt.DTYPES}
  for names in bench.KERNELS.values():
    for name in names:
      kernel, _, variant = name.partition(":")
      assert kernel in ("auto", "xla", "triton", "mosaic", "mosaic_fwd"), name
      assert not variant or variant in bench.VARIANTS, name
  # The float64 checks run the defaults and the variants timed for the cases asked, no others.
  assert bench.timed_variants([("infonce", "bf16")]) == ["mosaic_2wg"] + sorted(
    {k.partition(":")[2] for k in bench.KERNELS[("infonce", "bf16")]} - {""}
  )
  try:
    for variant in bench.VARIANTS:
      bench.use_variant(variant)
  finally:
    bench.use_variant(None)
  assert {(k, dt): mt.config(k, dt) for k, dt in defaults} == defaults
