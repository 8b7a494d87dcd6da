"""Fused GPU tiles for the blockwise InfoNCE (Pallas on Triton).

The XLA tiles in `mmts_jax.losses.blockwise` write each `(rows, cols)` similarity tile to device
memory and read it back once per reduction; on a GPU that traffic costs as much as the matmul.
These kernels compute the tile in sub-tiles of `(SUB, SUB)` on chip and write only what is needed:
per-sub-tile logsumexp partials (forward) or `dS` (backward). They are the same maths as the XLA
tiles `blockwise._nce_fwd_tile` / `blockwise._nce_bwd_tile`, which stay the reference (and the
CPU/TPU path); the tests run these kernels through the Pallas interpreter against them.

`set_fused_tiles` chooses when they run; `use_fused_tiles` is the decision the blockwise loss asks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from mmts_jax.losses._traversal import SUB, Blocks, grad_matmuls

__all__ = ["nce_bwd_tile", "nce_fwd_tile", "set_fused_tiles", "use_fused_tiles"]

_SUB = SUB  # sub-tile edge: rows and columns per Triton program
_SUB_K = 64  # embedding-dim chunk per step of the in-kernel matmul loop (128 bytes of bf16)
_TRITON = {"num_warps": 8, "num_stages": 3}


# The faster InfoNCE tile kernel per (backend, embedding dtype), as measured side by side in one
# run (fwd + bwd, D = 512, benchmarks/BENCHMARKS.md). One H200, B = 32,768
# (results/loss_h200_side_by_side.json): f32 XLA 23.1 ms vs fused 28.5 ms (Triton's tf32 dot
# is slower than cuBLAS's), bf16 fused 15.3 ms vs XLA 17.3 ms; one H100, B = 131,072
# (results/loss_h100.json): f32 XLA 398 vs fused 448 ms, bf16 fused 221 vs XLA 268 ms.
# Backends and dtypes not listed (CPU, TPU, float64) have no fused kernel: XLA tiles.
FASTEST = {("gpu", "float32"): "xla", ("gpu", "bfloat16"): "fused"}
_KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def _fused_ok(blocks: Blocks, d: int, dtype) -> bool:
  return (
    blocks.rows % _SUB == 0
    and blocks.cols % _SUB == 0
    and d % _SUB_K == 0
    and jnp.dtype(dtype) in _KERNEL_DTYPES
  )


def use_fused_tiles(blocks: Blocks, d: int, dtype) -> bool:
  """Whether the InfoNCE tiles take the fused Pallas kernels.

  By default where `FASTEST` measured them faster (GPUs, bf16 embeddings);
  `set_fused_tiles` overrides this. The tiles must be whole sub-tiles and D a multiple of 64.
  """
  mode = _FUSED[0]
  if mode is False:
    return False
  if mode is None:
    on = FASTEST.get((jax.default_backend(), jnp.dtype(dtype).name)) == "fused"
  else:
    on = mode == "interpret" or jax.default_backend() == "gpu"
  return on and _fused_ok(blocks, d, dtype)


# None (auto: `FASTEST`), False (never), "always" (GPU, f32 and bf16), "interpret" (the Pallas
# interpreter on any backend: slow, checks the kernels' maths on CPU).
_FUSED: list[bool | str | None] = [None]


def set_fused_tiles(mode) -> None:
  """Chooses the InfoNCE tile kernel.

  `None` (default: the measured `FASTEST`), `False` (XLA tiles everywhere), "always" (fused on
  GPUs for f32 and bf16) or "interpret" (the Pallas interpreter, any backend).
  """
  if mode not in (None, False, "always", "interpret"):
    raise ValueError(
      f"set_fused_tiles: mode must be None, False, 'always' or 'interpret', got {mode!r}"
    )
  _FUSED[0] = mode


def _pl():
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  return pl, plgpu


def _sub_matmul(x_ref, y_ref, tf32):
  """`x @ y.T` of one (_SUB, D) x (_SUB, D) pair, accumulated over D in chunks of _SUB_K."""
  pl, _ = _pl()
  d = x_ref.shape[-1]

  def body(k, acc):
    sl = pl.ds(pl.multiple_of(k * _SUB_K, _SUB_K), _SUB_K)
    xk = x_ref[:, sl]
    yk = y_ref[:, sl]
    # DEFAULT lowers to Triton's tf32 dot for f32 operands, HIGHEST to ieee; bf16 is bf16.
    prec = lax.Precision.DEFAULT if tf32 and xk.dtype == jnp.float32 else lax.Precision.HIGHEST
    return acc + lax.dot_general(
      xk, yk, (((1,), (1,)), ((), ())), precision=(prec, prec), preferred_element_type=jnp.float32
    )

  return lax.fori_loop(0, d // _SUB_K, body, jnp.zeros((_SUB, _SUB), jnp.float32))


def _nce_stats_kernel(
  tf32, x_ref, y_ref, ar_ref, ac_ref, rb_ref, cb_ref, rm_ref, rl_ref, cm_ref, cl_ref
):
  s = _sub_matmul(x_ref, y_ref, tf32)
  zr = s * ar_ref[...][:, None] + cb_ref[...][None, :]
  zc = s * ac_ref[...][None, :] + rb_ref[...][:, None]
  mr = jnp.max(zr, axis=1)
  mr_safe = jnp.where(mr == -jnp.inf, 0.0, mr)
  rm_ref[...] = mr
  rl_ref[...] = jnp.sum(jnp.exp(zr - mr_safe[:, None]), axis=1)
  mc = jnp.max(zc, axis=0)
  mc_safe = jnp.where(mc == -jnp.inf, 0.0, mc)
  cm_ref[...] = mc
  cl_ref[...] = jnp.sum(jnp.exp(zc - mc_safe[None, :]), axis=0)


def _nce_ds_kernel(
  tf32,
  need_sums,
  need_a,
  x_ref,
  y_ref,
  ar_ref,
  ac_ref,
  rb_ref,
  cb_ref,
  lr_ref,
  lc_ref,
  wr_ref,
  wc_ref,
  ds_ref,
  *refs,
):
  s = _sub_matmul(x_ref, y_ref, tf32)
  pr = jnp.exp(s * ar_ref[...][:, None] + cb_ref[...][None, :] - lr_ref[...][:, None])
  pc = jnp.exp(s * ac_ref[...][None, :] + rb_ref[...][:, None] - lc_ref[...][None, :])
  ds = wr_ref[...][:, None] * pr + wc_ref[...][None, :] * pc
  ds_ref[...] = ds.astype(ds_ref.dtype)
  if need_sums:
    # float32 row / column sums of dS for the centred bf16 gradient matmuls (grad_matmuls).
    dr_ref, dc_ref = refs[:2]
    dr_ref[...] = jnp.sum(ds, axis=1)
    dc_ref[...] = jnp.sum(ds, axis=0)
    refs = refs[2:]
  if need_a:
    sr_ref, sc_ref = refs
    sr_ref[...] = jnp.sum(pr * s, axis=1)
    sc_ref[...] = jnp.sum(pc * s, axis=0)


def _varying_like(x) -> dict:
  """ShapeDtypeStruct kwargs that make a pallas_call output vary over the axes `x` varies over.

  Inside `shard_map(check_vma=True)` the outputs must say so; the keyword has changed across jax
  versions, so it is looked up.
  """
  import inspect

  aval = jax.typeof(x) if hasattr(jax, "typeof") else None
  params = inspect.signature(jax.ShapeDtypeStruct.__init__).parameters
  for attr, kw in (("mat", "manual_axis_type"), ("vma", "vma")):
    if aval is not None and kw in params and getattr(aval, attr, None) is not None:
      return {kw: getattr(aval, attr)}
  return {}


def _fused_call(kernel, br, bc, d, vec_in, out_shape, like):
  """pallas_call over the (br/_SUB, bc/_SUB) grid of sub-tiles of one (br, bc) tile.

  Inputs: x (br, d), y (bc, d), then `vec_in` row (r) / column (c) vectors; outputs given as
  (kind, dtype): "tile" (br, bc), "rowpart" (bc/_SUB, br), "colpart" (br/_SUB, bc).
  """
  pl, plgpu = _pl()
  gi, gj = br // _SUB, bc // _SUB
  vec = {
    "r": pl.BlockSpec((_SUB,), lambda i, j: (i,)),
    "c": pl.BlockSpec((_SUB,), lambda i, j: (j,)),
  }
  in_specs = [
    pl.BlockSpec((_SUB, d), lambda i, j: (i, 0)),
    pl.BlockSpec((_SUB, d), lambda i, j: (j, 0)),
  ] + [vec[v] for v in vec_in]
  shapes = {
    "tile": ((br, bc), pl.BlockSpec((_SUB, _SUB), lambda i, j: (i, j))),
    "rowpart": ((gj, br), pl.BlockSpec((None, _SUB), lambda i, j: (j, i))),
    "colpart": ((gi, bc), pl.BlockSpec((None, _SUB), lambda i, j: (i, j))),
  }
  outs = [jax.ShapeDtypeStruct(shapes[k][0], dt, **_varying_like(like)) for k, dt in out_shape]
  specs = [shapes[k][1] for k, _ in out_shape]
  interpret = _FUSED[0] == "interpret"
  return pl.pallas_call(
    kernel,
    out_shape=outs,
    grid=(gi, gj),
    in_specs=in_specs,
    out_specs=specs,
    compiler_params=None if interpret else plgpu.CompilerParams(**_TRITON),
    interpret=interpret,
  )


def _tf32(precision) -> bool:
  return precision in (None, lax.Precision.DEFAULT, "default", "fastest")


def _bias(ids, dtype):
  """0 for real samples, -inf for padding: added to the logits it masks the padding."""
  return jnp.where(ids >= 0, 0.0, -jnp.inf).astype(dtype)


def _merge_parts(m, s, axis):
  """Combines logsumexp partials `(m, s)` along `axis`."""
  mt = jnp.max(m, axis=axis)
  mt_safe = jnp.where(jnp.isneginf(mt), 0.0, mt)
  return mt, jnp.sum(s * jnp.exp(m - jnp.expand_dims(mt_safe, axis)), axis=axis)


def _merge_lse(state, part):
  (m, s), (pm, pl_) = state, part
  mn = jnp.maximum(m, pm)
  ms = jnp.where(jnp.isneginf(mn), 0.0, mn)
  return mn, s * jnp.exp(m - ms) + pl_ * jnp.exp(pm - ms)


def nce_fwd_tile(precision, mask_rows, mask_cols, r, c, rs, cs):
  """The fused form of `blockwise._nce_fwd_tile` (same arguments, same result)."""
  del mask_rows, mask_cols  # the bias vectors mask every tile
  xr, ar, rid = r
  yc, ac, cid = c
  br, d = xr.shape
  bc = yc.shape[0]
  f32 = jnp.float32
  call = _fused_call(
    functools.partial(_nce_stats_kernel, _tf32(precision)),
    br,
    bc,
    d,
    "rcrc",
    [("rowpart", f32), ("rowpart", f32), ("colpart", f32), ("colpart", f32)],
    xr,
  )
  rm, rl, cm, cl = call(xr, yc, ar.astype(f32), ac.astype(f32), _bias(rid, f32), _bias(cid, f32))
  return _merge_lse(rs, _merge_parts(rm, rl, 0)), _merge_lse(cs, _merge_parts(cm, cl, 0))


def nce_bwd_tile(precision, mask_rows, mask_cols, need_a, r, c, rs, cs):
  """The fused form of `blockwise._nce_bwd_tile` (same arguments, same result)."""
  del mask_rows, mask_cols
  xr, ar, rid, lse_r, gr = r
  yc, ac, cid, lse_c, gc = c
  dx, dar = rs
  dy, dac = cs
  br, d = xr.shape
  bc = yc.shape[0]
  f32 = jnp.float32
  op = jnp.result_type(xr, yc)
  need_sums = jnp.finfo(op).bits < 32
  parts = [("rowpart", f32), ("colpart", f32)]
  outs = [("tile", op)] + (parts if need_sums else []) + (parts if need_a else [])
  call = _fused_call(
    functools.partial(_nce_ds_kernel, _tf32(precision), need_sums, need_a),
    br,
    bc,
    d,
    "rcrcrcrc",
    outs,
    xr,
  )
  res = call(
    xr,
    yc,
    ar.astype(f32),
    ac.astype(f32),
    _bias(rid, f32),
    _bias(cid, f32),
    lse_r.astype(f32),
    lse_c.astype(f32),
    (gr * ar).astype(f32),
    (gc * ac).astype(f32),
  )
  ds, res = res[0], res[1:]
  sums = None
  if need_sums:
    sums = (jnp.sum(res[0], axis=0), jnp.sum(res[1], axis=0))
    res = res[2:]
  ddx, ddy = grad_matmuls(ds, xr, yc, precision, sums)
  if need_a:
    dar = dar + jnp.sum(res[0], axis=0)
    dac = dac + jnp.sum(res[1], axis=0)
  return (dx + ddx, dar), (dy + ddy, dac)
