r"""Blockwise sigmoid (SigLIP) loss with per-anchor temperature: no `(B, B)` array.

The loss (`mmts_jax.losses.sigmoid` states it in full) is a sum over all pairs of

.. math::
  \ell(u) = \log(1 + e^{-u}), \qquad
  u^r_{ij} = z_{ij}\,(s_{ij}/\tau_i + b_i), \qquad u^c_{ij} = z_{ij}\,(s_{ij}/\tau_j + b_j),

`z_ij = +1` on the (global) diagonal and `-1` off it: the row (image) anchor `i` weighs pair
`(i, j)` with its own temperature and bias, the column (text) anchor `j` with its own. There is
no normaliser across pairs, so each tile's rows and columns just add their terms to per-anchor
sums. The backward (`jax.custom_vjp`) recomputes each tile once and forms

.. math::
  p^r_{ij} = -z_{ij}\,\sigma(-u^r_{ij}), \qquad
  \frac{\partial L}{\partial s_{ij}} = g^r_i\,p^r_{ij}/\tau_i + g^c_j\,p^c_{ij}/\tau_j,

then `dX += dS Y_c`, `dY_c += dS^T X_r`; the temperature and bias gradients are the per-anchor
sums of `p s` and `p`. Memory `O(B*D + rows*cols)`; any `B` (the last tile is masked). The same
tiles run over the ring (`mmts_jax.losses.ring.sigmoid_ring`).

The per-pair expressions live in `mmts_jax.losses._sigmoid_pairs`, shared by the two tile kernels:
the XLA tiles here (the portable path and the reference of the other) and the fused Pallas tiles
of `mmts_jax.losses._pallas_tiles` (`sig_fwd_tile`, `sig_bwd_tile`), which keep each similarity
sub-tile on chip. Which one runs is `_pallas_tiles.use_fused_tiles(..., "sigmoid", pass)`, the
rule of the InfoNCE and max-margin tiles (`set_fused_tiles` overrides it; by default where
`_pallas_tiles.FASTEST` measured the fused tiles faster: bf16 on GPUs, 1.08-1.11x the XLA tiles
on an H200 at B = 32,768-131,072; f32 keeps the XLA tiles, `benchmarks/BENCHMARKS.md`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mmts_jax.losses import _checks, _pallas_tiles
from mmts_jax.losses._pallas_tiles import use_fused_tiles
from mmts_jax.losses._sigmoid_pairs import pair_cotangent, pair_losses, pair_slopes
from mmts_jax.losses._traversal import (
  DEFAULT_BLOCK,
  global_ids,
  grad_finish,
  grad_update,
  grad_zeros,
  gradient_centre,
  matmul,
  merge,
  product_rows,
  resolve_blocks,
  split,
  traverse,
  varying,
)
from mmts_jax.normalize import compute_dtype

__all__ = ["sigmoid_blockwise", "sigmoid_partial_sum"]

# The sigmoid keeps the square default tile at every batch: the taller one from
# `_traversal.LARGE_BATCH` rows up was measured for InfoNCE and max-margin (session 16), and the
# sigmoid's own timings (benchmarks/BENCHMARKS.md) are on this one.
SIGMOID_BLOCK = DEFAULT_BLOCK


def _fwd_tile(precision, r, c, rs, cs):
  xr, ar, cr, rid = r
  yc, ac, cc, cid = c
  s = matmul(xr, yc, precision)
  lr, lc = pair_losses(s, rid, cid, ar, cr, ac, cc)
  return rs + jnp.sum(lr, axis=1), cs + jnp.sum(lc, axis=0)


def _bwd_tile(precision, r, c, rs, cs, *, centre=None, xr_op=None):
  xr, ar, cr, rid, gr = r
  yc, ac, cc, cid, gc = c
  dx, sr, qr = rs
  dy, sc, qc = cs
  s = matmul(xr, yc, precision)
  pr, pc = pair_slopes(s, rid, cid, ar, cr, ac, cc)
  ds = pair_cotangent(pr, pc, gr * ar, gc * ac)
  dx, dy = grad_update(dx, dy, ds, xr, yc, precision, centre, xr_op=xr_op)
  return (
    (dx, sr + jnp.sum(pr * s, axis=1), qr + jnp.sum(pr, axis=1)),
    (dy, sc + jnp.sum(pc * s, axis=0), qc + jnp.sum(pc, axis=0)),
  )


def _layout(x, y, a, c, blocks, axis_name):
  ids = global_ids(x.shape[0], axis_name)
  rows = (
    split(x, blocks.rows),
    split(a, blocks.rows, 1),
    split(c, blocks.rows),
    split(ids, blocks.rows, -1),
  )
  cols = (
    split(y, blocks.cols),
    split(a, blocks.cols, 1),
    split(c, blocks.cols),
    split(ids, blocks.cols, -1),
  )
  return rows, cols


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def sigmoid_sums(x, y, a, c, blocks, precision, axis_name) -> tuple[jax.Array, jax.Array]:
  """Per-anchor sums `(sum_j l(u^r_ij), sum_i l(u^c_ij))` for the local rows and columns.

  `a = 1/tau` and `c` (the bias) are `(b,)` vectors in the compute dtype.
  """
  rows, cols = _layout(x, y, a, c, blocks, axis_name)
  zr = varying(jnp.zeros(rows[1].shape, a.dtype), axis_name)
  zc = varying(jnp.zeros(cols[1].shape, a.dtype), axis_name)
  fused = use_fused_tiles(blocks, x.shape[1], x.dtype, "sigmoid", "fwd")
  tile = functools.partial(_pallas_tiles.sig_fwd_tile if fused else _fwd_tile, precision)
  rsum, csum = traverse(tile, rows, cols, zc, zr, axis_name)
  b = x.shape[0]
  return merge(rsum, b), merge(csum, b)


def _sums_fwd(x, y, a, c, blocks, precision, axis_name):
  return sigmoid_sums(x, y, a, c, blocks, precision, axis_name), (x, y, a, c)


def _sums_bwd(blocks, precision, axis_name, res, g):
  x, y, a, c = res
  gr, gc = g
  rows, cols = _layout(x, y, a, c, blocks, axis_name)
  rows = rows + (split(gr, blocks.rows),)
  cols = cols + (split(gc, blocks.cols),)
  acc = compute_dtype(x, y)
  d = x.shape[1]
  centre = gradient_centre(x, y, axis_name)

  def zeros(blk):
    return (
      grad_zeros(blk.shape, d, acc, centre),
      jnp.zeros(blk.shape, a.dtype),
      jnp.zeros(blk.shape, a.dtype),
    )

  row0 = varying(zeros(rows[1]), axis_name)
  col0 = varying(zeros(cols[1]), axis_name)
  fused = use_fused_tiles(blocks, d, x.dtype, "sigmoid", "bwd")
  bwd = _pallas_tiles.sig_bwd_tile if fused else _bwd_tile
  tile = functools.partial(bwd, precision, centre=centre)
  prep = product_rows(centre, x.dtype)
  (dx, sr, qr), (dy, sc, qc) = traverse(tile, rows, cols, col0, row0, axis_name, prep)
  dx, dy = grad_finish(dx, dy, centre)
  b = x.shape[0]
  da = gr * merge(sr, b) + gc * merge(sc, b)
  dc = gr * merge(qr, b) + gc * merge(qc, b)
  return merge(dx, b).astype(x.dtype), merge(dy, b).astype(y.dtype), da, dc


sigmoid_sums.defvjp(_sums_fwd, _sums_bwd)


def sigmoid_partial_sum(image, text, temperature, bias, blocks, precision, axis_name):
  """Sum of the local anchors' terms, both roles (divide by 2B for the loss)."""
  dt = compute_dtype(image, text)
  b = image.shape[0]
  tau = jnp.broadcast_to(jnp.asarray(temperature, dt), (b,))
  c = jnp.broadcast_to(jnp.asarray(bias, dt), (b,))
  # A scalar temperature or bias given inside shard_map is replicated: mark it device-varying
  # (its gradient is then psum-ed back) so it can travel round the ring with its block.
  a, c = varying((1.0 / tau, c), axis_name)
  # pyright loses the return type through functools.partial(jax.custom_vjp, ...).
  rsum, csum = sigmoid_sums(image, text, a, c, blocks, precision, axis_name)  # pyright: ignore[reportGeneralTypeIssues]
  return _checks.nan_unless_valid(
    jnp.sum(rsum) + jnp.sum(csum), positive=(tau,), finite=(c,), axis_name=axis_name
  )


def sigmoid_blockwise(image, text, temperature, *, bias, block_size=None, precision=None):
  """The sigmoid loss with per-anchor temperature, tile by tile (never a `(B, B)` array).

  Same value and gradients as `dense.sigmoid_dense`; memory `O(B*D + rows*cols)`.

  Args:
    image, text: `(B, D)` embeddings, used as given; bf16 accepted (f32 accumulation).
    temperature: scalar or `(B,)` per-anchor temperatures, > 0.
    bias: scalar (SigLIP's `b`) or `(B,)` per-anchor bias.
    block_size: None (the default tile), an int (square tiles) or `(rows, cols)`.
    precision: matmul precision.

  Example:
    >>> import jax.numpy as jnp
    >>> loss = sigmoid_blockwise(jnp.eye(3), jnp.eye(3), 0.1, bias=-5.0, block_size=2)
    >>> round(float(loss), 4)  # all 9 pairs have |u| = 10 - 5: 9 log(1 + e^-5) / 3
    0.0201
  """
  b = image.shape[0]
  blocks = resolve_blocks(block_size, b, b, "sigmoid", default=SIGMOID_BLOCK)
  return sigmoid_partial_sum(image, text, temperature, bias, blocks, precision, None) / (2 * b)
