r"""Blockwise InfoNCE and max-margin: the MM-TS losses without the `(B, B)` similarity matrix.

The similarity `s_ij = <x_i, y_j>` is visited in tiles of `rows x cols` (a `lax.scan` over row
blocks, and inside it over column blocks). One tile serves both directions: its rows update the
image->text statistics of the row anchors, its columns (the transposed view) the text->image
statistics of the column anchors, so each tile is multiplied once per pass.

InfoNCE keeps an online logsumexp per anchor and direction,

.. math::
  m \leftarrow \max(m, \max_j z_j), \qquad
  \ell \leftarrow \ell\, e^{m_{old}-m} + \sum_j e^{z_j - m}, \qquad
  \mathrm{lse} = m + \log \ell,

with `z_ij = s_ij / tau_i` for rows and `z_ij = s_ij / tau_j` for columns. The backward pass is
written by hand (`jax.custom_vjp`): it recomputes each tile once and forms

.. math::
  \frac{\partial L}{\partial s_{ij}} = g^{r}_i \frac{e^{s_{ij}/\tau_i - \mathrm{lse}^r_i}}{\tau_i}
      + g^{c}_j \frac{e^{s_{ij}/\tau_j - \mathrm{lse}^c_j}}{\tau_j},

then `dX += dS Y_c`, `dY_c += dS^T X`. Max-margin keeps per-anchor sums and counts of active
hinges, `relu(m_i - s_ii + s_ij)`, so its backward needs only the hinge indicators. Memory is
`O(B * D + rows * cols)`, independent of `B^2`; any `B` works (the last tile is masked).

The traversal is shared with the ring-sharded losses (`mmts_jax.losses.ring`): there the column
blocks arrive from the other devices instead of being local.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mmts_jax.losses.dense import compute_dtype, cosine_normalize

__all__ = ["infonce_blockwise", "max_margin_blockwise", "resolve_blocks", "DEFAULT_BLOCK"]

# Default tile, (rows, cols). Large enough that each tile's matmul keeps a GPU's matrix units busy,
# small enough that a few f32 tiles stay well under a GiB (see benchmarks/BENCHMARKS.md).
DEFAULT_BLOCK = (8192, 8192)


class Blocks(NamedTuple):
  rows: int
  cols: int


def resolve_blocks(block_size, rows: int, cols: int, fn: str = "blockwise") -> Blocks:
  """`block_size` (None, an int for square tiles, or `(rows, cols)`) clipped to the batch."""
  if block_size is None:
    block_size = DEFAULT_BLOCK
  if isinstance(block_size, (tuple, list)):
    if len(block_size) != 2:
      raise ValueError(f"{fn}: block_size must be an int or (rows, cols), got {block_size!r}")
    br, bc = block_size
  else:
    br = bc = block_size
  for v in (br, bc):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
      raise TypeError(f"{fn}: block_size must be an int or a pair of ints, got {block_size!r}")
    if v < 1:
      raise ValueError(f"{fn}: block_size must be >= 1, got {block_size!r}")
  return Blocks(_clip(int(br), rows), _clip(int(bc), cols))


def _clip(block: int, n: int) -> int:
  """The tile edge for `n` samples: at most `block`, and no more than `n` rounded up to the
  fused kernels' sub-tile (a ragged batch then still gets whole sub-tiles, masked)."""
  if n <= _SUB:
    return min(block, n)
  return min(block, -(-n // _SUB) * _SUB)


# ---------------------------------------------------------------------------------------------
# Layout: (B, ...) arrays split into (num_blocks, block, ...) with padding.


def _split(x, blk: int, fill=0):
  n = -(-x.shape[0] // blk)
  pad = n * blk - x.shape[0]
  if pad:
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
  return x.reshape((n, blk) + x.shape[1:])


def _merge(x, b: int):
  return x.reshape((-1,) + x.shape[2:])[:b]


def _axis_size(axis_name) -> int:
  return int(lax.psum(1, axis_name))


def _global_ids(b: int, axis_name):
  """Global index of each local sample (the diagonal of the global similarity)."""
  ids = jnp.arange(b, dtype=jnp.int32)
  if axis_name is not None:
    ids = ids + lax.axis_index(axis_name).astype(jnp.int32) * b
  return ids


def _varying(tree, axis_name):
  """Mark freshly created carries as device-varying, as `shard_map`'s type check wants."""
  if axis_name is None or not hasattr(lax, "pcast"):
    return tree

  def cast(x):
    try:
      return lax.pcast(x, axis_name, to="varying")
    except (ValueError, TypeError, NameError, NotImplementedError):
      return x  # pmap, or already varying
  return jax.tree.map(cast, tree)


# ---------------------------------------------------------------------------------------------
# Traversal: every row block meets every column block once.


def sweep(tile: Callable, rows, cols, row_state, col_state):
  """Runs `tile` over all (row block, column block) pairs.

  `rows`/`row_state` are pytrees of `(nR, Br, ...)` arrays, `cols`/`col_state` of `(nC, Bc, ...)`.
  `tile(r, c, rs, cs) -> (rs, cs)` sees one block of each. The row state stays in the inner
  loop's carry; the column state is threaded through as the inner scan's xs/ys, so no
  dynamic-update-slice of a large buffer is needed.
  """
  def outer(cs_all, r_xs):
    r, rs = r_xs

    def inner(rs, c_xs):
      c, cs = c_xs
      return tile(r, c, rs, cs)

    rs, cs_all = lax.scan(inner, rs, (cols, cs_all))
    return cs_all, rs

  col_state, row_state = lax.scan(outer, col_state, (rows, row_state))
  return row_state, col_state


def traverse(tile, rows, fixed, moving, carry, axis_name):
  """All local rows meet all columns: the local ones, or, with `axis_name`, every device's.

  `fixed` are the column blocks and their read-only data, `moving` the per-column state that
  accumulates over rows (and, sharded, travels home with its block); `carry` the row state.
  """
  def step(fixed, moving, carry):
    return sweep(tile, rows, fixed, carry, moving)
  if axis_name is None:
    return step(fixed, moving, carry)
  from mmts_jax.losses import ring  # ring imports this module; import late to avoid a cycle
  return ring.ring_traverse(step, fixed, moving, carry, axis_name)


def _matmul(a, b, precision):
  """`a @ b.T` in f32 (or f64) accumulation, low-precision operands fed as they are."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                         preferred_element_type=compute_dtype(a, b))


def _grad_matmuls(ds, xr, yc, precision):
  """`(dS @ Y_c, dS^T @ X_r)`; bf16 embeddings get a bf16 `dS` so both run on the fast units."""
  op = jnp.result_type(xr, yc)
  if jnp.finfo(op).bits < jnp.finfo(ds.dtype).bits:
    ds = ds.astype(op)
  out = compute_dtype(xr, yc)
  dx = lax.dot_general(ds, yc, (((1,), (0,)), ((), ())), precision=precision,
                       preferred_element_type=out)
  dy = lax.dot_general(ds, xr, (((0,), (0,)), ((), ())), precision=precision,
                       preferred_element_type=out)
  return dx, dy


# ---------------------------------------------------------------------------------------------
# Fused GPU tiles (Pallas on Triton). The XLA tiles above write each (rows, cols) similarity
# tile to device memory and read it back once per reduction; on a GPU that traffic costs as much
# as the matmul. These kernels compute the tile in sub-tiles of (_SUB, _SUB) on chip and write
# only what is needed: per-sub-tile logsumexp partials (forward) or dS (backward). They are the
# same maths as `_nce_fwd_tile`/`_nce_bwd_tile`, which stay the reference (and the CPU/TPU path).

_SUB = 128   # sub-tile edge: rows and columns per Triton program
_SUB_K = 64  # embedding-dim chunk per step of the in-kernel matmul loop (128 bytes of bf16)
_TRITON = {"num_warps": 8, "num_stages": 3}


def _fused_ok(blocks: Blocks, d: int, dtype) -> bool:
  return (blocks.rows % _SUB == 0 and blocks.cols % _SUB == 0 and d % _SUB_K == 0
          and jnp.dtype(dtype) in _FUSED_DTYPES[_FUSED[0] is not None])


def use_fused_tiles(blocks: Blocks, d: int, dtype) -> bool:
  """Whether the InfoNCE tiles take the fused Pallas kernels.

  By default on GPUs for bf16 embeddings only: measured on an H100 (benchmarks/
  BENCHMARKS.md), Triton's tf32 matmul loses more than the fusion saves for f32, while
  for bf16 the fused tiles are faster than XLA's. `set_fused_tiles` overrides this.
  """
  mode = _FUSED[0]
  if mode is False:
    return False
  on = mode in ("interpret", "always") or jax.default_backend() == "gpu"
  return on and _fused_ok(blocks, d, dtype)


# None (auto: GPU and bf16 only), False (never), "always" (GPU, f32 and bf16), "interpret"
# (the Pallas interpreter on any backend: slow, checks the kernels' maths on CPU).
_FUSED = [None]
_FUSED_DTYPES = {False: (jnp.dtype(jnp.bfloat16),),
                 True: (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))}


def set_fused_tiles(mode) -> None:
  """`None` (default: GPU, bf16), `False` (XLA tiles everywhere), "always" or "interpret"."""
  if mode not in (None, False, "always", "interpret"):
    raise ValueError(f"set_fused_tiles: mode must be None, False, 'always' or 'interpret', got "
                     f"{mode!r}")
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
    return acc + lax.dot_general(xk, yk, (((1,), (1,)), ((), ())), precision=(prec, prec),
                                 preferred_element_type=jnp.float32)

  return lax.fori_loop(0, d // _SUB_K, body, jnp.zeros((_SUB, _SUB), jnp.float32))


def _nce_stats_kernel(tf32, x_ref, y_ref, ar_ref, ac_ref, rb_ref, cb_ref,
                      rm_ref, rl_ref, cm_ref, cl_ref):
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


def _nce_ds_kernel(tf32, need_a, x_ref, y_ref, ar_ref, ac_ref, rb_ref, cb_ref, lr_ref, lc_ref,
                   wr_ref, wc_ref, ds_ref, *a_refs):
  s = _sub_matmul(x_ref, y_ref, tf32)
  pr = jnp.exp(s * ar_ref[...][:, None] + cb_ref[...][None, :] - lr_ref[...][:, None])
  pc = jnp.exp(s * ac_ref[...][None, :] + rb_ref[...][:, None] - lc_ref[...][None, :])
  ds = wr_ref[...][:, None] * pr + wc_ref[...][None, :] * pc
  ds_ref[...] = ds.astype(ds_ref.dtype)
  if need_a:
    sr_ref, sc_ref = a_refs
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
  vec = {"r": pl.BlockSpec((_SUB,), lambda i, j: (i,)),
         "c": pl.BlockSpec((_SUB,), lambda i, j: (j,))}
  in_specs = [pl.BlockSpec((_SUB, d), lambda i, j: (i, 0)),
              pl.BlockSpec((_SUB, d), lambda i, j: (j, 0))] + [vec[v] for v in vec_in]
  shapes = {"tile": ((br, bc), pl.BlockSpec((_SUB, _SUB), lambda i, j: (i, j))),
            "rowpart": ((gj, br), pl.BlockSpec((None, _SUB), lambda i, j: (j, i))),
            "colpart": ((gi, bc), pl.BlockSpec((None, _SUB), lambda i, j: (i, j)))}
  outs = [jax.ShapeDtypeStruct(shapes[k][0], dt, **_varying_like(like)) for k, dt in out_shape]
  specs = [shapes[k][1] for k, _ in out_shape]
  interpret = _FUSED[0] == "interpret"
  return pl.pallas_call(
      kernel, out_shape=outs, grid=(gi, gj), in_specs=in_specs, out_specs=specs,
      compiler_params=None if interpret else plgpu.CompilerParams(**_TRITON),
      interpret=interpret)


def _tf32(precision) -> bool:
  return precision in (None, lax.Precision.DEFAULT, "default", "fastest")


def _bias(ids, dtype):
  """0 for real samples, -inf for padding: added to the logits it masks the padding."""
  return jnp.where(ids >= 0, 0.0, -jnp.inf).astype(dtype)


def _merge_parts(m, l, axis):
  """Combines logsumexp partials `(m, l)` along `axis`."""
  mt = jnp.max(m, axis=axis)
  mt_safe = jnp.where(jnp.isneginf(mt), 0.0, mt)
  return mt, jnp.sum(l * jnp.exp(m - jnp.expand_dims(mt_safe, axis)), axis=axis)


def _merge_lse(state, part):
  (m, l), (pm, pl_) = state, part
  mn = jnp.maximum(m, pm)
  ms = jnp.where(jnp.isneginf(mn), 0.0, mn)
  return mn, l * jnp.exp(m - ms) + pl_ * jnp.exp(pm - ms)


def _nce_fwd_tile_fused(precision, mask_rows, mask_cols, r, c, rs, cs):
  del mask_rows, mask_cols  # the bias vectors mask every tile
  xr, ar, rid = r
  yc, ac, cid = c
  br, d = xr.shape
  bc = yc.shape[0]
  f32 = jnp.float32
  call = _fused_call(functools.partial(_nce_stats_kernel, _tf32(precision)), br, bc, d,
                     "rcrc", [("rowpart", f32), ("rowpart", f32), ("colpart", f32),
                              ("colpart", f32)], xr)
  rm, rl, cm, cl = call(xr, yc, ar.astype(f32), ac.astype(f32), _bias(rid, f32),
                        _bias(cid, f32))
  return _merge_lse(rs, _merge_parts(rm, rl, 0)), _merge_lse(cs, _merge_parts(cm, cl, 0))


def _nce_bwd_tile_fused(precision, mask_rows, mask_cols, need_a, r, c, rs, cs):
  del mask_rows, mask_cols
  xr, ar, rid, lse_r, gr = r
  yc, ac, cid, lse_c, gc = c
  dx, dar = rs
  dy, dac = cs
  br, d = xr.shape
  bc = yc.shape[0]
  f32 = jnp.float32
  op = jnp.result_type(xr, yc)
  outs = [("tile", op)] + ([("rowpart", f32), ("colpart", f32)] if need_a else [])
  call = _fused_call(functools.partial(_nce_ds_kernel, _tf32(precision), need_a), br, bc, d,
                     "rcrcrcrc", outs, xr)
  res = call(xr, yc, ar.astype(f32), ac.astype(f32), _bias(rid, f32), _bias(cid, f32),
             lse_r.astype(f32), lse_c.astype(f32), (gr * ar).astype(f32), (gc * ac).astype(f32))
  ddx, ddy = _grad_matmuls(res[0], xr, yc, precision)
  if need_a:
    dar = dar + jnp.sum(res[1], axis=0)
    dac = dac + jnp.sum(res[2], axis=0)
  return (dx + ddx, dar), (dy + ddy, dac)


# ---------------------------------------------------------------------------------------------
# InfoNCE tiles.


def _lse_update(state, z, axis):
  m, l = state
  m_new = jnp.maximum(m, jnp.max(z, axis=axis))
  # A row that has only seen masked (-inf) entries keeps l = 0; avoid inf - inf.
  m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
  l = l * jnp.exp(m - m_safe) + jnp.sum(jnp.exp(z - jnp.expand_dims(m_safe, axis)), axis=axis)
  return m_new, l


def _nce_fwd_tile(precision, mask_rows, mask_cols, r, c, rs, cs):
  xr, ar, rid = r
  yc, ac, cid = c
  s = _matmul(xr, yc, precision)
  zr = s * ar[:, None]
  zc = s * ac[None, :]
  if mask_cols:
    zr = jnp.where(cid[None, :] >= 0, zr, -jnp.inf)
  if mask_rows:
    zc = jnp.where(rid[:, None] >= 0, zc, -jnp.inf)
  return _lse_update(rs, zr, 1), _lse_update(cs, zc, 0)


def _nce_bwd_tile(precision, mask_rows, mask_cols, need_a, r, c, rs, cs):
  xr, ar, rid, lse_r, gr = r
  yc, ac, cid, lse_c, gc = c
  dx, dar = rs
  dy, dac = cs
  s = _matmul(xr, yc, precision)
  pr = jnp.exp(s * ar[:, None] - lse_r[:, None])
  pc = jnp.exp(s * ac[None, :] - lse_c[None, :])
  if mask_cols:
    pr = jnp.where(cid[None, :] >= 0, pr, 0.0)
  if mask_rows:
    pc = jnp.where(rid[:, None] >= 0, pc, 0.0)
  ds = (gr * ar)[:, None] * pr + (gc * ac)[None, :] * pc
  ddx, ddy = _grad_matmuls(ds, xr, yc, precision)
  if need_a:
    # d lse_i / d(1/tau_i) = sum_j p_ij s_ij.
    dar = dar + jnp.sum(pr * s, axis=1)
    dac = dac + jnp.sum(pc * s, axis=0)
  return (dx + ddx, dar), (dy + ddy, dac)


def _full(shape, value, dtype):
  return jnp.full(shape, value, dtype)


def _nce_layout(x, y, a, blocks, axis_name):
  b = x.shape[0]
  ids = _global_ids(b, axis_name)
  rows = (_split(x, blocks.rows), _split(a, blocks.rows, 1), _split(ids, blocks.rows, -1))
  cols = (_split(y, blocks.cols), _split(a, blocks.cols, 1), _split(ids, blocks.cols, -1))
  return rows, cols, b % blocks.rows != 0, b % blocks.cols != 0


def _nce_forward(x, y, a, blocks, precision, axis_name):
  rows, cols, mask_rows, mask_cols = _nce_layout(x, y, a, blocks, axis_name)
  dt = a.dtype
  nr, nc = rows[0].shape[0], cols[0].shape[0]
  row0 = _varying((_full((nr, blocks.rows), -jnp.inf, dt), _full((nr, blocks.rows), 0, dt)),
                  axis_name)
  col0 = _varying((_full((nc, blocks.cols), -jnp.inf, dt), _full((nc, blocks.cols), 0, dt)),
                  axis_name)
  fwd = _nce_fwd_tile_fused if use_fused_tiles(blocks, x.shape[1], x.dtype) else _nce_fwd_tile
  tile = functools.partial(fwd, precision, mask_rows, mask_cols)
  (mr, lr), (mc, lc) = traverse(tile, rows, cols, col0, row0, axis_name)
  b = x.shape[0]
  return _merge(mr + jnp.log(lr), b), _merge(mc + jnp.log(lc), b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def infonce_lse(x, y, a, blocks, precision, axis_name):
  """`(lse_i s_ij a_i over j, lse_i s_ij a_j over i)`: the logsumexp of each anchor, both ways.

  `x`, `y`: `(b, D)` (the local shard when `axis_name` is set), `a = 1/tau` `(b,)` in the
  compute dtype. Returns two `(b,)` vectors: image anchors over all texts, text anchors over all
  images.
  """
  return _nce_forward(x, y, a, blocks, precision, axis_name)


def _infonce_lse_fwd(x, y, a, blocks, precision, axis_name):
  lse = _nce_forward(x.value, y.value, a.value, blocks, precision, axis_name)
  # The pytree structure (not a traced value) says whether 1/tau needs a gradient.
  need_a = (None,) if a.perturbed else ()
  return lse, (x.value, y.value, a.value, lse, need_a)


def _cotangent(g, like):
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    return jnp.zeros(like.shape, like.dtype)
  return g


def _infonce_lse_bwd(blocks, precision, axis_name, res, g):
  x, y, a, (lse_r, lse_c), need_a = res
  gr, gc = _cotangent(g[0], lse_r), _cotangent(g[1], lse_c)
  need_a = bool(need_a)
  rows, cols, mask_rows, mask_cols = _nce_layout(x, y, a, blocks, axis_name)
  rows = rows + (_split(lse_r, blocks.rows), _split(gr, blocks.rows))
  cols = cols + (_split(lse_c, blocks.cols), _split(gc, blocks.cols))
  acc = compute_dtype(x, y)
  d = x.shape[1]
  nr, nc = rows[0].shape[0], cols[0].shape[0]
  row0 = _varying((jnp.zeros((nr, blocks.rows, d), acc), jnp.zeros((nr, blocks.rows), a.dtype)),
                  axis_name)
  col0 = _varying((jnp.zeros((nc, blocks.cols, d), acc), jnp.zeros((nc, blocks.cols), a.dtype)),
                  axis_name)
  bwd = _nce_bwd_tile_fused if use_fused_tiles(blocks, d, x.dtype) else _nce_bwd_tile
  tile = functools.partial(bwd, precision, mask_rows, mask_cols, need_a)
  (dx, sr), (dy, sc) = traverse(tile, rows, cols, col0, row0, axis_name)
  b = x.shape[0]
  dx, dy = _merge(dx, b).astype(x.dtype), _merge(dy, b).astype(y.dtype)
  da = gr * _merge(sr, b) + gc * _merge(sc, b) if need_a else None
  return dx, dy, da


infonce_lse.defvjp(_infonce_lse_fwd, _infonce_lse_bwd, symbolic_zeros=True)


def infonce_partial_sum(image, text, temperature, blocks, precision, axis_name):
  """Sum over the local anchors of both directions' InfoNCE terms (divide by 2B for the loss)."""
  dt = compute_dtype(image, text)
  b = image.shape[0]
  a = 1.0 / jnp.broadcast_to(jnp.asarray(temperature, dt), (b,))
  lse_r, lse_c = infonce_lse(image, text, a, blocks, precision, axis_name)
  pos = jnp.sum(image.astype(dt) * text.astype(dt), axis=1) * a
  return jnp.sum(lse_r - pos) + jnp.sum(lse_c - pos)


def infonce_blockwise(image, text, temperature, *, block_size=None, precision=None):
  """Symmetric InfoNCE with per-anchor temperature, tile by tile (never a `(B, B)` array).

  Same value and gradients as `infonce_dense`; memory `O(B*D + rows*cols)`.

  Args:
    image, text: `(B, D)` embeddings, used as given; bf16 accepted (f32 accumulation).
    temperature: scalar or `(B,)` per-anchor temperatures, > 0.
    block_size: None (`DEFAULT_BLOCK`), an int (square tiles) or `(rows, cols)`; any `B` works.
    precision: matmul precision.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (10, 8))
    >>> x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    >>> loss = infonce_blockwise(x, x, jnp.full((10,), 0.07), block_size=4)
  """
  b = image.shape[0]
  blocks = resolve_blocks(block_size, b, b, "infonce")
  return infonce_partial_sum(image, text, temperature, blocks, precision, None) / (2 * b)


# ---------------------------------------------------------------------------------------------
# Max-margin tiles: per-anchor hinge sums and the number of active hinges.


def _hinge_masks(rid, cid):
  return (rid[:, None] != cid[None, :]) & (rid[:, None] >= 0) & (cid[None, :] >= 0)


def _mm_fwd_tile(precision, r, c, rs, cs):
  xr, ro, rid = r
  yc, co, cid = c
  s = _matmul(xr, yc, precision)
  keep = _hinge_masks(rid, cid)
  # relu, as the dense reference: zero gradient exactly at the hinge.
  hr = jnp.where(keep, jax.nn.relu(ro[:, None] + s), 0.0)
  hc = jnp.where(keep, jax.nn.relu(co[None, :] + s), 0.0)
  rsum, rcnt = rs
  csum, ccnt = cs
  return ((rsum + jnp.sum(hr, axis=1), rcnt + jnp.sum((hr > 0).astype(s.dtype), axis=1)),
          (csum + jnp.sum(hc, axis=0), ccnt + jnp.sum((hc > 0).astype(s.dtype), axis=0)))


def _mm_bwd_tile(precision, r, c, rs, cs):
  xr, ro, rid, gr = r
  yc, co, cid, gc = c
  s = _matmul(xr, yc, precision)
  keep = _hinge_masks(rid, cid)
  ds = (jnp.where(keep & (ro[:, None] + s > 0), gr[:, None], 0.0)
        + jnp.where(keep & (co[None, :] + s > 0), gc[None, :], 0.0))
  ddx, ddy = _grad_matmuls(ds, xr, yc, precision)
  return rs + ddx, cs + ddy


def _mm_layout(x, y, ro, co, blocks, axis_name):
  b = x.shape[0]
  ids = _global_ids(b, axis_name)
  rows = (_split(x, blocks.rows), _split(ro, blocks.rows), _split(ids, blocks.rows, -1))
  cols = (_split(y, blocks.cols), _split(co, blocks.cols), _split(ids, blocks.cols, -1))
  return rows, cols


def _mm_forward(x, y, ro, co, blocks, precision, axis_name):
  rows, cols = _mm_layout(x, y, ro, co, blocks, axis_name)
  dt = ro.dtype
  nr, nc = rows[0].shape[0], cols[0].shape[0]
  zr = jnp.zeros((nr, blocks.rows), dt)
  zc = jnp.zeros((nc, blocks.cols), dt)
  row0 = _varying((zr, zr), axis_name)
  col0 = _varying((zc, zc), axis_name)
  tile = functools.partial(_mm_fwd_tile, precision)
  (rsum, rcnt), (csum, ccnt) = traverse(tile, rows, cols, col0, row0, axis_name)
  b = x.shape[0]
  return (_merge(rsum, b), _merge(csum, b)), (_merge(rcnt, b), _merge(ccnt, b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def hinge_sums(x, y, ro, co, blocks, precision, axis_name):
  """Per-anchor hinge sums `(sum_{j!=i} relu(ro_i + s_ij), sum_{i!=j} relu(co_j + s_ij))`.

  `ro_i = m_i - s_ii` for the image anchors (rows), `co_j = m_j - s_jj` for the text anchors.
  """
  return _mm_forward(x, y, ro, co, blocks, precision, axis_name)[0]


def _hinge_sums_fwd(x, y, ro, co, blocks, precision, axis_name):
  sums, counts = _mm_forward(x, y, ro, co, blocks, precision, axis_name)
  return sums, (x, y, ro, co, counts)


def _hinge_sums_bwd(blocks, precision, axis_name, res, g):
  x, y, ro, co, (rcnt, ccnt) = res
  gr, gc = g
  rows, cols = _mm_layout(x, y, ro, co, blocks, axis_name)
  rows = rows + (_split(gr, blocks.rows),)
  cols = cols + (_split(gc, blocks.cols),)
  acc = compute_dtype(x, y)
  d = x.shape[1]
  row0 = _varying(jnp.zeros(rows[0].shape[:2] + (d,), acc), axis_name)
  col0 = _varying(jnp.zeros(cols[0].shape[:2] + (d,), acc), axis_name)
  tile = functools.partial(_mm_bwd_tile, precision)
  dx, dy = traverse(tile, rows, cols, col0, row0, axis_name)
  b = x.shape[0]
  return (_merge(dx, b).astype(x.dtype), _merge(dy, b).astype(y.dtype), gr * rcnt, gc * ccnt)


hinge_sums.defvjp(_hinge_sums_fwd, _hinge_sums_bwd)


def max_margin_partial_sum(image, text, margin, blocks, precision, axis_name):
  """Sum of the local anchors' hinge terms, both directions (divide by 2B(B-1) for the loss)."""
  x = cosine_normalize(image)
  y = cosine_normalize(text)
  b = x.shape[0]
  m = jnp.broadcast_to(jnp.asarray(margin, x.dtype), (b,))
  offset = m - jnp.sum(x * y, axis=1)
  rsum, csum = hinge_sums(x, y, offset, offset, blocks, precision, axis_name)
  return jnp.sum(rsum) + jnp.sum(csum)


def max_margin_blockwise(image, text, margin, *, block_size=None, precision=None):
  """Bidirectional max-margin loss with per-anchor margin, tile by tile (no `(B, B)` array).

  Same value and gradients as `max_margin_dense` (cosine similarities, eps 1e-8, relu hinge,
  mean over the `2B(B-1)` off-diagonal terms).

  Example:
    >>> import jax
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (10, 8))
    >>> loss = max_margin_blockwise(x, x[::-1], 0.2, block_size=(4, 3))
  """
  b = image.shape[0]
  if b < 2:
    raise ValueError("max_margin: needs a batch of at least 2 (it has no negatives otherwise)")
  blocks = resolve_blocks(block_size, b, b, "max_margin")
  # float: the count 2B(B-1) passes 2**31 above B = 32,768 and would overflow a weak int32.
  part = max_margin_partial_sum(image, text, margin, blocks, precision, None)
  return part / float(2 * b * (b - 1))
