"""The Mosaic GPU tile kernels against the Triton and XLA ones, side by side in one process.

  python benchmarks/mosaic_tiles_bench.py --out mosaic_tiles.json [--sizes 32768,131072]
      [--cases infonce:bf16,max_margin:bf16,infonce:f32,max_margin:f32]

1. Check, on the GPU (the defaults' kernels and those of each variant timed, `timed_variants`):
   the kernels' outputs against float64 (one 2,048 x 2,048 tile, D = 512,
   per-anchor temperatures 0.005-0.105) and the blockwise bf16 loss on them against the float32
   dense loss at B = 2,048 (tiles of 1,024): values and gradients, relative to the largest entry.
   With max-margin among the cases, its kernels too; per case the blockwise loss on the Mosaic
   kernels against the dense loss.
2. Time the blockwise loss of each case (D = 512, default tiles), forward only and
   forward+backward, with each kernel of `KERNELS`, compiled once each and called in
   alternating rounds; medians per kernel. The card's matmul rates (XLA, 8,192^3; bf16, and f32
   at the default precision, tf32) are measured in the same process for the fraction of the
   roofline (8 B^2 D FLOP per forward+backward).
Rows are written to `--out` as they finish; `--deadline` stops starting new ones.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loss_bench import add_round_args, alternating_ms, write_json  # noqa: E402
from loss_tune import _rel  # noqa: E402

# Mosaic configurations timed, as `MosaicConfig` fields replaced in the defaults per pass (both
# dtypes). Earlier runs timed others (results/mosaic_tiles_h200/ran.txt): run 5 `lag`, runs 7-8
# an option, since removed, that read the vectors before the products, run 10 6 and 16 KiB of
# reduction scratch in both passes (16 KiB in the forward became the default, then run 11
# checked it in the backward: nce_ds with the temperature sums does not fit). Run 12 timed, in
# bf16 at B = 131,072, forward sub-tiles of 256 x 64 per warpgroup (as fast as 128 x 128) and
# one warpgroup per CTA with two CTAs per SM (slower, with or without transposed columns), run
# 13 the forward with transposed columns ("col_chunk", now the default) against the cross-warp
# one ("cross_warp_fwd") and staggered by `lag` ("lag_fwd"; no faster).
# Then the backward's column sums through transposed slices too (its default since run 14;
# "cross_warp_bwd" is the backward before, "cross_warp" both passes before session 13).
_CROSS_WARP_FWD = {"col_chunk": 0, "stages": 4, "reduction_scratch": 16384}
VARIANTS = {
  "mosaic_2wg": {},
  "cross_warp_fwd": {"fwd": _CROSS_WARP_FWD},
  "lag_fwd": {"fwd": {"lag": True}},
  "cross_warp_bwd": {"bwd": {"col_chunk": 0, "sliced_ds": False}},
  "cross_warp": {"fwd": _CROSS_WARP_FWD, "bwd": {"col_chunk": 0, "sliced_ds": False}},
  # Forward sub-tiles of 64 x 256 per warpgroup: one m64n256 wgmma per step of 16 features reads
  # 10 KiB of shared memory where two m64n128 read 12 KiB (run 15: slower, 48.3 vs 44.3 ms).
  "wide_fwd": {"fwd": {"tile_m": 64, "tile_n": 256}},
  # The backward's epilogue on whole sub-tiles (before `MosaicConfig.sliced_ds`, the bf16
  # default since run 17): ncu counted 2.3 million local-memory (spill) requests in that bf16
  # dS program (ncu5_h200.csv).
  "whole_ds": {"bwd": {"sliced_ds": False}},
  # One wgmma group left in flight before a stage goes back to the copy warpgroup (run 4, with
  # the epilogue of then: no faster; run 21, with today's: no faster either, inside the noise).
  "release1": {"fwd": {"release": 1}, "bwd": {"release": 1}},
  # The float32 backward on 64 x 128 sub-tiles per warpgroup in place of 128 x 64: one m64n128
  # tf32 wgmma reads 6 KiB of shared memory per 64K multiply-adds where two m64n64 read 8, and
  # the CTA's TMA loads 0.0625 bytes per multiply-add instead of 0.078; its float32 dS staging
  # (64 KiB for two warpgroups) is as large as before. float32 only: bf16's slices would not
  # fill its staging (`_pass` refuses them).
  "f32_bwd_64x128": {"bwd": {"tile_m": 64, "tile_n": 128, "col_chunk": 128}},
  "f32_bwd_64x128_s4": {"bwd": {"tile_m": 64, "tile_n": 128, "col_chunk": 128, "stages": 4}},
  # The float32 forward on 64 x 128 sub-tiles per warpgroup: a CTA's stage is 32 KiB instead of
  # 48, so four or five stages fit beside the slices (three now).
  "f32_fwd_64_s4": {"fwd": {"tile_m": 64, "stages": 4}},
  "f32_fwd_64_s5": {"fwd": {"tile_m": 64, "stages": 5}},
  # The bf16 backward on 64 x 256 sub-tiles per warpgroup: one m64n256 wgmma reads 10 KiB of
  # shared memory per 256K multiply-adds where two m64n128 (128 x 128) read 12; its slices are
  # 128 columns wide (they must fill the dS staging), so each column vector of a slice takes
  # twice the registers.
  "bf16_bwd_64x256": {"bwd": {"tile_m": 64, "tile_n": 256, "col_chunk": 128}},
  # bf16 on 64 x 128 sub-tiles per warpgroup: a CTA's stage is 32 KiB instead of 48, so five
  # stages fit (about 197 KiB with the slices, by arithmetic), and with `lag` the second
  # warpgroup can run up to four of the eight steps of D = 512 behind the first, so that one's
  # epilogue falls on the other's products (run 13's `lag` on three stages could lag two steps;
  # no faster). The two `lag` forms ran once in the interpreter in session 16 (blockwise InfoNCE,
  # B = 256, D = 512, against the dense loss: value and gradients within the tests' 1e-3 and
  # 1e-2); none is timed yet (that session's device time ran out). The run's float64 checks on
  # the GPU come first, and a stage that does not fit shared memory fails there.
  "bf16_fwd_64_s5": {"fwd": {"tile_m": 64, "stages": 5}},
  "bf16_fwd_64_s5_lag": {"fwd": {"tile_m": 64, "stages": 5, "lag": True}},
  "bf16_bwd_64_s4": {"bwd": {"tile_m": 64, "stages": 4}},
  "bf16_bwd_64_s5_lag": {"bwd": {"tile_m": 64, "stages": 5, "lag": True}},
  # The vectors copied to shared memory by TMA as each sub-tile's products start
  # (`MosaicConfig.stage_vectors`), in both passes, or only the backward's (whose dS program
  # reads six vectors where the forward's reads two).
  "staged": {"fwd": {"stage_vectors": True}, "bwd": {"stage_vectors": True}},
  "staged_bwd": {"bwd": {"stage_vectors": True}},
  # Each compute warpgroup on every other sub-tile with a ring of its own
  # (`MosaicConfig.pingpong`; two stages each: 128 KiB of rings beside the epilogue's 64).
  "pingpong": {"fwd": {"pingpong": True, "stages": 2}, "bwd": {"pingpong": True, "stages": 2}},
  "pingpong_fwd": {"fwd": {"pingpong": True, "stages": 2}},
  # The ping-pong forward on 128 x 64 sub-tiles: a stage is 24 KiB instead of 32, so each
  # warpgroup's ring holds three (144 KiB of rings beside the slices' 64; arithmetic, not
  # measured). Checked once in the interpreter in session 17 (nce_stats, 512 x 384, D = 128,
  # against float64 within the tests' 1e-5); not timed yet.
  "pingpong_n64_fwd": {"fwd": {"pingpong": True, "stages": 3, "tile_n": 64}},
  # The ping-pong walk with one group of products in flight (`release` 1: each stage goes back
  # a step late, so the tensor cores are not left waiting between steps), both passes, and the
  # same on the 128 x 64 forward. Checked once in the interpreter in session 17 (the suite's
  # ping-pong test runs `release` 1; nce_stats on 128 x 64, three stages, against float64).
  "pingpong_r1": {
    "fwd": {"pingpong": True, "stages": 2, "release": 1},
    "bwd": {"pingpong": True, "stages": 2, "release": 1},
  },
  "pingpong_n64_fwd_r1": {"fwd": {"pingpong": True, "stages": 3, "tile_n": 64, "release": 1}},
  # The ping-pong walk with columns reduced across warps in the products' layout (`col_chunk`
  # 0; the two warpgroups' column parts take turns). Session 18's skeleton runs (skeleton3)
  # put one warpgroup's products alone at the rate of two (2.015 ms against 1.985 for 32,768^2)
  # and the ping-pong skeleton at 2.083, so the walk can feed its products. The guess that made
  # these: the transposes' 128 KiB of shared-memory traffic per sub-tile slowed the other
  # warpgroup's products. Reduced in place, the forward needs no slices (64 KiB more for the
  # rings). Run 32: slower; trace9 then put the slow products on `release` 1, not the transposes.
  "pingpong_c0_fwd": {
    "fwd": {"pingpong": True, "stages": 2, "col_chunk": 0, "reduction_scratch": 16384}
  },
  "pingpong_c0_s3_fwd": {
    "fwd": {"pingpong": True, "stages": 3, "col_chunk": 0, "reduction_scratch": 16384}
  },
  # The ping-pong walk with its vectors staged by TMA (`stage_vectors`). Session 18's traces
  # (trace9.json) put a warpgroup's products alone at 5.9-6.4 us per sub-tile on this walk
  # with `release` 0 (7.9-8.4 with `release` 1, trace7.json) and its epilogue at 8.4-8.6:
  # the epilogue, one warp per scheduler, now sets the pace, and each of its vector reads
  # waits for global memory.
  "pingpong_staged": {
    "fwd": {"pingpong": True, "stages": 2, "stage_vectors": True},
    "bwd": {"pingpong": True, "stages": 2, "stage_vectors": True},
  },
  # Three compute warpgroups on the ping-pong walk, 64-row sub-tiles (each warpgroup's
  # accumulator 64 registers of its 152): each epilogue has two other warpgroups' products to
  # hide behind where two warpgroups give it one (trace10: ~6 us of products against 7.7-8.6 of
  # epilogue per 128-row sub-tile). Rings 3 x 2 stages of 24 KiB beside 48 KiB of slices (by
  # arithmetic: about 200 KiB of shared memory). Run 35 (session 19): slower, bf16 InfoNCE
  # forward 49.6 (48.9-52.0) ms against the default's 44.0 (42.3-49.6).
  "pingpong3": {
    "fwd": {"pingpong": True, "wgs": 3, "tile_m": 64, "stages": 2},
    "bwd": {"pingpong": True, "wgs": 3, "tile_m": 64, "stages": 2},
  },
  "pingpong3_staged": {
    "fwd": {"pingpong": True, "wgs": 3, "tile_m": 64, "stages": 2, "stage_vectors": True},
    "bwd": {"pingpong": True, "wgs": 3, "tile_m": 64, "stages": 2, "stage_vectors": True},
  },
  "pingpong_c0": {
    "fwd": {"pingpong": True, "stages": 3, "col_chunk": 0, "reduction_scratch": 16384},
    "bwd": {"pingpong": True, "stages": 2, "col_chunk": 0, "sliced_ds": False},
  },
}


def use_variant(name):
  """Sets the Mosaic configurations of variant `name` (None: the defaults)."""
  from mmts_jax.losses import _mosaic_tiles as mt

  for kind in ("fwd", "bwd"):
    for dtype in mt.DTYPES:
      mt.set_config(kind, None, dtype)
      fields = (VARIANTS.get(name) or {}).get(kind)
      if fields:
        mt.set_config(kind, mt.config(kind, dtype)._replace(**fields), dtype)


def check_kernels(variant) -> dict:
  import jax
  import jax.numpy as jnp

  n, d = 2048, 512
  k = jax.random.split(jax.random.PRNGKey(0), 6)

  def unit(key):
    v = jax.random.normal(key, (n, d))
    return (v / jnp.linalg.norm(v, axis=1, keepdims=True)).astype(jnp.bfloat16)

  x, y = unit(k[0]), unit(k[1])
  use_variant(variant)
  try:
    return _check_kernels(x, y, k)
  finally:
    use_variant(None)


def _check_kernels(x, y, k) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from mmts_jax.losses import _mosaic_tiles as mt

  n = x.shape[0]
  log2e = 1.4426950408889634
  tr = 0.005 + 0.1 * jax.random.uniform(k[2], (n,))
  tc = 0.005 + 0.1 * jax.random.uniform(k[3], (n,))
  ar, ac = (log2e / tr).astype(jnp.float32), (log2e / tc).astype(jnp.float32)
  rm, rl, cm, cl = (np.asarray(v, np.float64) for v in mt.nce_stats(x, y, ar, ac))
  s = np.asarray(x, np.float64) @ np.asarray(y, np.float64).T
  a_r, a_c = np.asarray(ar, np.float64), np.asarray(ac, np.float64)

  def lse2(z, axis):
    m = z.max(axis, keepdims=True)
    return (m + np.log2(np.exp2(z - m).sum(axis, keepdims=True))).squeeze(axis)

  def merge(m, l_):
    top = m.max(0)
    return top + np.log2((l_ * np.exp2(m - top)).sum(0))

  lr, lc = lse2(s * a_r[:, None], 1), lse2(s * a_c[None, :], 0)
  out = {
    "stats_row_lse2_abs": float(np.abs(merge(rm, rl) - lr).max()),
    "stats_col_lse2_abs": float(np.abs(merge(cm, cl) - lc).max()),
  }
  wr = np.asarray(jax.random.normal(k[4], (n,)), np.float64) * a_r
  wc = np.asarray(jax.random.normal(k[5], (n,)), np.float64) * a_c
  vecs = [jnp.asarray(v, jnp.float32) for v in (ar, ac, lr, lc, wr, wc)]
  res = mt.nce_ds(x, y, *vecs, need_sums=True, need_a=True)
  pr = np.exp2(s * a_r[:, None] - lr[:, None])
  pc = np.exp2(s * a_c[None, :] - lc[None, :])
  ds = wr[:, None] * pr + wc[None, :] * pc
  out["ds_rel"] = _rel(res[0], ds)
  wants = [ds.sum(1), ds.sum(0), (pr * s).sum(1), (pc * s).sum(0)]
  out["ds_sums_rel"] = [
    _rel(np.asarray(p, np.float64).sum(0), w) for p, w in zip(res[1:], wants, strict=True)
  ]
  return out


def check_mm_kernels(variant=None) -> dict:
  """The max-margin kernels (with the Mosaic configurations of `variant`) on one 2,048 x 2,048
  bf16 tile against float64: hinge sums and counts, dS r q^T and its float32 sums, relative to
  the largest entry."""
  use_variant(variant)
  try:
    return _check_mm_kernels()
  finally:
    use_variant(None)


def _check_mm_kernels() -> dict:
  import jax.numpy as jnp
  import numpy as np

  from mmts_jax.losses import _mosaic_tiles as mt
  from mmts_jax.losses._reference64 import hinge_inputs, hinge_tile

  n = 2048
  # The diagonal runs through two of the four 1,024-blocks.
  (x, y), (rr, qc, ro, co), (rid, cid) = hinge_inputs(n, 512, seed=4, id_shift=1024)
  gr, gc = np.linspace(-1, 1, n), np.linspace(0.5, -0.5, n)
  f = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
  ids = jnp.asarray(rid), jnp.asarray(cid)
  t = hinge_tile(x, y, rr, qc, ro, co, rid, cid, gr, gc)
  assert t.dsw is not None
  got = [
    np.asarray(v, np.float64).sum(0) for v in mt.mm_stats(x, y, f(rr), f(qc), f(ro), f(co), *ids)
  ]
  wants = [t.hr.sum(1), (t.hr > 0).sum(1), t.hc.sum(0), (t.hc > 0).sum(0)]
  out = {"stats_rel": [_rel(g, w) for g, w in zip(got, wants, strict=True)]}
  res = mt.mm_ds(x, y, f(rr), f(qc), f(ro), f(co), *ids, f(gr), f(gc), need_sums=True)
  # Entries within float32 error of their hinge (`t.tie`) may take either side: dS is compared
  # off them, and their count is reported (run 10 met one, 0.14 of the largest entry off).
  got = np.asarray(res[0], np.float64)
  out["ds_rel"] = _rel(np.where(t.tie, 0, got), np.where(t.tie, 0, t.dsw))
  out["ds_ties"] = int(t.tie.sum())
  out["ds_ties_differing"] = int((t.tie & (np.abs(got - t.dsw) > 0.01 * np.abs(t.dsw).max())).sum())
  wants = [t.dsw.sum(1), t.dsw.sum(0)]
  out["ds_sums_rel"] = [
    _rel(np.asarray(p, np.float64).sum(0), w) for p, w in zip(res[1:], wants, strict=True)
  ]
  return out


def check_loss(loss="infonce", dtype="bf16", variant=None) -> dict:
  """The blockwise loss on the Mosaic kernels (both passes; `variant`'s configurations) at
  B = 2,048 (tiles of 1,024) against the float32 dense loss: at HIGHEST precision, and (float32
  inputs) at the default, tf32 like the kernels."""
  import jax
  import jax.numpy as jnp

  from mmts_jax import losses
  from mmts_jax.losses import _pallas_tiles as pt
  from mmts_jax.losses import dense

  b, d = 2048, 512
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
  dt = {"bf16": jnp.bfloat16, "f32": jnp.float32}[dtype]

  def unit(key):
    v = jax.random.normal(key, (b, d))
    return (v / jnp.linalg.norm(v, axis=1, keepdims=True)).astype(dt)

  x, y = unit(k1), unit(k2)
  t = 0.005 + 0.1 * jax.random.uniform(k3, (b,))
  ours = {"infonce": losses.infonce, "max_margin": losses.max_margin}[loss]
  ref = {"infonce": dense.infonce_dense, "max_margin": dense.max_margin_dense}[loss]
  pt.set_fused_tiles("always")
  pt.set_tile_kernel("mosaic")
  use_variant(variant)
  try:
    assert pt._mosaic_for("bwd", x[:1024], y[:1024], loss)[0], "the Mosaic kernels do not apply"
    f = jax.jit(
      jax.value_and_grad(
        lambda x, y, t: ours(x, y, t, impl="blockwise", block_size=1024), argnums=(0, 1, 2)
      )
    )
    v, g = f(x, y, t)
  finally:
    pt.set_fused_tiles(None)
    pt.set_tile_kernel(None)
    use_variant(None)
  out = {"finite": bool(all(jnp.all(jnp.isfinite(a.astype(jnp.float32))) for a in g))}
  for name, prec in (("highest", jax.lax.Precision.HIGHEST), ("default", None)):
    f0 = jax.jit(jax.value_and_grad(functools.partial(ref, precision=prec), (0, 1, 2)))
    v0, g0 = f0(x.astype(jnp.float32), y.astype(jnp.float32), t)
    out[f"loss_rel_{name}"] = abs(float(v) - float(v0)) / abs(float(v0))
    out[f"grad_rel_{name}"] = [_rel(a.astype(jnp.float32), b_) for a, b_ in zip(g, g0, strict=True)]
  return out


def matmul_tflops(dtype="bf16") -> float:
  """The card's matmul rate (XLA, 8,192^3) for bf16, or f32 at the default precision (tf32)."""
  import jax
  import jax.numpy as jnp

  n = 8192
  a = jnp.ones((n, n), {"bf16": jnp.bfloat16, "f32": jnp.float32}[dtype])
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  ts = []
  for _ in range(10):
    t = time.perf_counter()
    jax.block_until_ready(f(a))
    ts.append(time.perf_counter() - t)
  return 2 * n**3 / sorted(ts)[len(ts) // 2] / 1e12


# The kernels timed per (loss, dtype): "triton" / "mosaic" forced in both passes, "mosaic_fwd"
# Mosaic forward and XLA backward, "xla" the XLA tiles, "auto" the default dispatch; a suffix
# ":<variant>" runs it with the Mosaic configurations of `VARIANTS[variant]`.
# Run 14 timed "auto", "cross_warp_bwd" and "cross_warp" in both dtypes, run 15 "wide_fwd" and
# 64 x 256 sub-tiles in the backward as well (wrong: its slices did not fill the dS staging they
# alias, which `_pass` now refuses), run 16 both passes on the Mosaic kernels ("mosaic") against
# the dispatch ("auto": then Triton's dS in bf16, XLA's tiles for the InfoNCE f32 backward), run
# 17 the bf16 backward on 64-column slices, since then the default and the dispatch's backward,
# run 18 the slices against whole-tile dS ("auto:whole_ds"), run 19 the sweep's column state in
# the inner loop's carry against the inner scan's ys (commit 29ddb95's "scan_state"; inside the
# noise, and the carry form was removed), run 20 nothing (its checks took the deadline), run 21
# "release1" (no faster, inside the noise), run 22 the float32 backward on 64 x 128 sub-tiles
# (faster, with four stages; since then the default, and InfoNCE's f32 backward runs on
# Mosaic), run 23 the float32 forward on 64 x 128 sub-tiles with four or five stages (no
# faster, inside the noise), run 24 the bf16 backward on 64 x 256 sub-tiles (max-margin slower,
# ranges apart), run 25 the bf16 64-row sub-tiles with five stages, with and without `lag`
# (slower or no faster, one call), run 26 the bf16 backward's column sums of dS from a wgmma of
# the staged dS (branch exp/mma-col-sums; no faster, max-margin slower), run 27 two-CTA
# clusters sharing the rows (branch exp/cluster-multicast; no faster), run 28 the vectors
# staged in shared memory ("staged", "staged_bwd"; each inside the noise or nearly, the
# max-margin forward 5% faster, ranges touching), run 29 "staged" again, six rounds (the same),
# run 30 the ping-pong walk ("pingpong", "pingpong_fwd"; inside the noise). Next (queued in
# session 17, not yet run): "pingpong" again, "pingpong_r1", "pingpong_n64_fwd" and
# "pingpong_n64_fwd_r1"; then `profile_tiles.py trace --programs mosaic_fwd,mosaic_ds
# --variants ,pingpong_r1` for the fraction of time a warpgroup is in its products.
# Run 31 (session 18): "pingpong", "pingpong_r1", "pingpong_n64_fwd", "pingpong_n64_fwd_r1"
# (no faster; the 128 x 64 forward slower, ranges apart); run 32 the ping-pong walk with its
# columns reduced in place ("pingpong_c0_fwd", "pingpong_c0_s3_fwd", "pingpong_c0"; slower,
# ranges apart); runs 33 and 34 "pingpong_staged" (inside the noise). Next (queued in session
# 18): three warpgroups on the ping-pong walk ("pingpong3", "pingpong3_staged"), run 35 in
# session 19 (slower), with run 36 the float32 "staged" (inside the noise). Run 37: rows
# reduced as balanced trees, both passes, alone and on the ping-pong walk (commit 5f9c6cd's
# `MosaicConfig.tree_reduce`, removed again): inside the noise or slower
# (results/loss_h200_session19/). Nothing new is queued.
KERNELS = {
  ("infonce", "bf16"): ("auto", "auto:pingpong_staged"),
  ("max_margin", "bf16"): ("auto", "auto:pingpong_staged"),
  ("infonce", "f32"): ("auto", "auto:staged"),
  ("max_margin", "f32"): ("auto", "auto:staged"),
}


def timed_variants(cases, dtype: str = "bf16") -> list[str]:
  """The defaults ("mosaic_2wg") and every variant `KERNELS` times for the `cases` of `dtype`:
  the ones whose kernels the checks run (all nine took run 20's whole deadline)."""
  named = {k.partition(":")[2] for case in cases if case[1] == dtype for k in KERNELS[case]}
  return ["mosaic_2wg"] + sorted(v for v in named if v and v != "mosaic_2wg")


def compiled(kernel: str, b: int, loss: str = "infonce", dtype: str = "bf16"):
  import jax
  from loss_bench import _inputs

  from mmts_jax import losses
  from mmts_jax.losses import _pallas_tiles as pt

  x, y, tau = _inputs(b, 512, dtype)
  kernel, _, variant = kernel.partition(":")
  use_variant(variant or None)
  if kernel == "xla":
    pt.set_fused_tiles(False)
  elif kernel == "triton":
    pt.set_fused_tiles("always")
    pt.set_tile_kernel("triton")
  elif kernel != "auto":
    pt.set_fused_tiles("always", passes=("fwd",) if kernel == "mosaic_fwd" else pt.PASSES)
    pt.set_tile_kernel("mosaic")
  fn = {"infonce": losses.infonce, "max_margin": losses.max_margin}[loss]
  try:
    # tau doubles as the margins (0.05-0.1) of max-margin, as in loss_bench.py.
    f = lambda x, y: fn(x, y, tau, impl="blockwise")  # noqa: E731
    fwd = jax.jit(f).lower(x, y).compile()
    both = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(x, y).compile()
  finally:
    pt.set_fused_tiles(None)
    pt.set_tile_kernel(None)
    use_variant(None)
  return x, y, fwd, both


def time_sizes(sizes, cases, rounds, rep, deadline, t0, write) -> list:
  import jax

  rows = []
  for b in sizes:
    for loss, dtype in cases:
      fns = {}
      case = {"B": b, "loss": loss, "dtype": dtype}
      for kernel in KERNELS[(loss, dtype)]:
        if time.perf_counter() - t0 > deadline:
          break
        try:
          fns[kernel] = compiled(kernel, b, loss, dtype)
          x, y, fwd, both = fns[kernel]
          fwd_v = float(jax.block_until_ready(fwd(x, y)))
          both_v = jax.block_until_ready(both(x, y))
          rows.append(
            {**case, "kernel": kernel, "loss_value": fwd_v, "fwdbwd_loss": float(both_v[0])}
          )
        except Exception as e:  # a kernel that fails to compile is a result too
          rows.append({**case, "kernel": kernel, "error": f"{type(e).__name__}: {str(e)[:400]}"})
          fns.pop(kernel, None)
        write(rows)
      calls = {
        (kernel, name): functools.partial(lambda f, x, y: jax.block_until_ready(f(x, y)), fn, x, y)
        for kernel, (x, y, fwd, both) in fns.items()
        for name, fn in (("fwd", fwd), ("fwd_bwd", both))
      }
      times = alternating_ms(calls, rounds, rep, stop=lambda: time.perf_counter() - t0 > deadline)
      for row in rows:
        for name in ("fwd", "fwd_bwd"):
          same = all(row.get(k) == v for k, v in case.items())
          if same and (row.get("kernel"), name) in times:
            row[f"{name}_ms"], row[f"{name}_ms_all"] = times[(row["kernel"], name)]
      peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", -1)
      rows.append({**case, "process_peak_gib_so_far": round(peak / 2**30, 3)})
      write(rows)
      fns.clear()
  return rows


def tile_programs(n=8192, d=512):
  """The loss's tile programs on one `(n, n)` bf16 tile: `(programs, x, y, ds)`, where
  `programs[name](x, y)` runs one (the Triton and Mosaic forward and dS programs of both losses;
  the dS ones with the float32 dS sums the centred products take) and `ds` is the Mosaic dS
  program's output, what the gradient products take."""
  import jax
  import jax.numpy as jnp

  from mmts_jax.losses import _mosaic_tiles as mt
  from mmts_jax.losses import _pallas_tiles as pt

  k = jax.random.split(jax.random.PRNGKey(2), 2)

  def unit(key):
    v = jax.random.normal(key, (n, d))
    return (v / jnp.linalg.norm(v, axis=1, keepdims=True)).astype(jnp.bfloat16)

  x, y = unit(k[0]), unit(k[1])
  a = jnp.full((n,), 1.4426950408889634 / 0.05, jnp.float32)
  lse = jnp.full((n,), 30.0, jnp.float32)
  w = jnp.full((n,), 1e-4, jnp.float32)
  f32 = jnp.float32

  def triton_ds(x, y):
    parts = [("rowpart", f32), ("colpart", f32)]
    call = pt._program(
      pt._nce_ds_kernel,
      "bwd",
      None,
      x,
      y,
      "rcrcrc",
      [("tile", x.dtype), *parts],
      False,
      True,
      False,
    )
    return call(x, y, a, a, lse, lse, w, w)

  def mosaic_ds(x, y):
    return mt.nce_ds(x, y, a, a, lse, lse, w, w, need_sums=True, need_a=False)

  def triton_fwd(x, y):
    parts = [("rowpart", f32), ("rowpart", f32), ("colpart", f32), ("colpart", f32)]
    return pt._program(pt._nce_stats_kernel, "fwd", None, x, y, "rc", parts, False)(x, y, a, a)

  def mosaic_fwd(x, y):
    return mt.nce_stats(x, y, a, a)

  # Max-margin: unit rows (r = q = 1), offsets 0.1 - 0.3, every id distinct from the others'
  # but the diagonal's, cotangents 1e-4.
  one = jnp.ones((n,), f32)
  off = jnp.linspace(-0.3, 0.1, n, dtype=f32)
  ids = jnp.arange(n, dtype=jnp.int32)
  mm_vecs = (one, one, off, off, ids, ids)

  def triton_mm_fwd(x, y):
    parts = [("rowpart", f32), ("rowpart", f32), ("colpart", f32), ("colpart", f32)]
    call = pt._program(pt._mm_stats_kernel, "fwd", None, x, y, "rcrcrc", parts)
    return call(x, y, *mm_vecs)

  def mosaic_mm_fwd(x, y):
    return mt.mm_stats(x, y, *mm_vecs)

  def triton_mm_ds(x, y):
    outs = [("tile", x.dtype), ("rowpart", f32), ("colpart", f32)]
    call = pt._program(pt._mm_ds_kernel, "bwd", None, x, y, "rcrcrcrc", outs, True)
    return call(x, y, *mm_vecs, w, w)

  def mosaic_mm_ds(x, y):
    return mt.mm_ds(x, y, *mm_vecs, w, w, need_sums=True)

  programs = {
    "triton_ds": triton_ds,
    "mosaic_ds": mosaic_ds,
    "triton_fwd": triton_fwd,
    "mosaic_fwd": mosaic_fwd,
    "triton_mm_fwd": triton_mm_fwd,
    "mosaic_mm_fwd": mosaic_mm_fwd,
    "triton_mm_ds": triton_mm_ds,
    "mosaic_mm_ds": mosaic_mm_ds,
  }
  return programs, x, y, jax.block_until_ready(jax.jit(mosaic_ds)(x, y))


def time_parts(n=8192, d=512, rep=10, tiles=16) -> dict:
  """The loss's pieces on (n, n) bf16 tiles, each jitted alone and run over `tiles` tiles in one
  executable (`lax.map`, so launch and host overheads are amortised): the programs of
  `tile_programs`, and the centred bf16 gradient products on the dS program's output
  (`grad_products`, the tile's means as the centre) and the same two products uncentred;
  medians of `rep` calls divided by `tiles`, ms per tile."""
  import jax
  import jax.numpy as jnp

  from mmts_jax.losses._traversal import Centre, _grad_dots, grad_products

  programs, x, y, ds = tile_programs(n, d)
  f32 = jnp.float32
  xs = jnp.broadcast_to(x, (tiles, n, d)) + jnp.zeros((tiles, 1, 1), x.dtype)
  centre = Centre(jnp.mean(x.astype(f32), axis=0), jnp.mean(y.astype(f32), axis=0))
  dss = jnp.broadcast_to(ds[0], (tiles, n, n)) + jnp.zeros((tiles, 1, 1), ds[0].dtype)

  def over_tiles(fn, stacked):
    """`fn(stacked[t], *rest)` for every tile t in one executable; a scalar out."""

    def run(stack, *rest):
      outs = jax.lax.map(lambda v: fn(v, *rest), stack)
      return sum(jnp.sum(o[:, :1].astype(f32)) for o in jax.tree.leaves(outs))

    return jax.jit(run), stacked

  fns = {name: (*over_tiles(fn, xs), (y,)) for name, fn in programs.items()}
  fns["grad_products_centred"] = (
    *over_tiles(lambda s, x, y, centre: grad_products(s, x, y, None, centre), dss),
    (x, y, centre),
  )
  fns["grad_dots_plain"] = (
    *over_tiles(lambda s, x, y: _grad_dots(s, x, y, None, f32), dss),
    (x, y),
  )
  out = {"n": n, "d": d, "rep": rep, "tiles": tiles}
  for name, (fn, stacked, rest) in fns.items():
    jax.block_until_ready(fn(stacked, *rest))
    ts = []
    for _ in range(rep):
      t = time.perf_counter()
      jax.block_until_ready(fn(stacked, *rest))
      ts.append((time.perf_counter() - t) * 1e3 / tiles)
    ts.sort()
    out[name + "_ms_per_tile"] = round(ts[len(ts) // 2], 4)
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_round_args(ap, deadline=400.0)
  ap.add_argument("--parts", action="store_true", help="only time the tile programs alone")
  ap.add_argument(
    "--cases",
    default="infonce:bf16",
    help="loss:dtype pairs, comma-separated, among " + ", ".join(":".join(k) for k in KERNELS),
  )
  args = ap.parse_args(argv)
  import jax

  t0 = time.perf_counter()
  result = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "argv": sys.argv}

  def write(rows=None):
    if rows is not None:
      result["rows"] = rows
    write_json(args.out, result)

  cases = [tuple(c.split(":")) for c in args.cases.split(",")]
  checked = timed_variants(cases) if any(dt == "bf16" for _, dt in cases) else []
  checks = [(f"check_kernels_{v}", lambda v=v: check_kernels(v)) for v in checked]
  if args.parts:
    result["matmul_bf16_tflops"] = round(matmul_tflops(), 1)
    result["parts"] = time_parts()
    write()
    print(json.dumps(result["parts"]), flush=True)
    return 0
  if any(loss == "max_margin" for loss, _ in cases):
    checks += [(f"check_mm_kernels_{v}", lambda v=v: check_mm_kernels(v)) for v in checked]
  for loss, dt in cases:
    # bf16's kernels are checked against float64 above; float32's through the loss, per variant.
    for v in timed_variants([(loss, dt)], "f32") if dt == "f32" else ["mosaic_2wg"]:
      name = f"check_loss_{loss}_{dt}" + ("" if v == "mosaic_2wg" else f"_{v}")
      checks.append((name, functools.partial(check_loss, loss, dt, v)))
  for name, fn in checks:
    try:
      result[name] = fn()
    except Exception:
      result[name] = {"error": traceback.format_exc()[-3000:]}
    print(name, json.dumps(result[name])[:1500], flush=True)
    write()
  rates = {dt: round(matmul_tflops(dt), 1) for dt in sorted({d for _, d in cases})}
  for dt, rate in rates.items():
    result[f"matmul_{dt}_tflops"] = rate
  sizes = [int(s) for s in args.sizes.split(",")]
  time_sizes(sizes, cases, args.rounds, args.rep, args.deadline, t0, write)
  for row in result.get("rows", []):
    if "fwd_bwd_ms" in row:
      rate = rates[row["dtype"]] * 1e12
      row["roofline"] = round(8 * row["B"] ** 2 * 512 / (row["fwd_bwd_ms"] / 1e3) / rate, 3)
  # The defaults against the committed runs (`default_history.py`): a change to their code path
  # shows in this run's output, not sessions later.
  try:
    from default_history import compare

    result["default_vs_history"] = compare(result.get("rows", []))
  except Exception:
    result["default_vs_history"] = {"error": traceback.format_exc()[-2000:]}
  write()
  for row in result.get("rows", []):
    print(json.dumps({k: v for k, v in row.items() if not k.endswith("_all")}), flush=True)
  for e in result["default_vs_history"] if isinstance(result["default_vs_history"], list) else []:
    if e["shift"]:
      print("default moved against the last runs:", json.dumps(e), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
