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

The traversal (`mmts_jax.losses._traversal`) is shared with the ring-sharded losses
(`mmts_jax.losses.ring`): there the column blocks arrive from the other devices instead of being
local. On GPUs the InfoNCE tiles may run as fused Pallas kernels
(`mmts_jax.losses._pallas_tiles`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mmts_jax.losses import _checks, _pallas_tiles
from mmts_jax.losses._pallas_tiles import set_fused_tiles, use_fused_tiles
from mmts_jax.losses._traversal import (
  DEFAULT_BLOCK,
  Blocks,
  finish_grad,
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
from mmts_jax.normalize import COSINE_EPS, compute_dtype, cosine_normalize

__all__ = [
  "DEFAULT_BLOCK",
  "Blocks",
  "infonce_blockwise",
  "max_margin_blockwise",
  "resolve_blocks",
  "set_fused_tiles",
  "use_fused_tiles",
]


# ---------------------------------------------------------------------------------------------
# InfoNCE tiles.


def _lse_update(state, z, axis):
  m, s = state
  m_new = jnp.maximum(m, jnp.max(z, axis=axis))
  # A row that has only seen masked (-inf) entries keeps s = 0; avoid inf - inf.
  m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
  s = s * jnp.exp(m - m_safe) + jnp.sum(jnp.exp(z - jnp.expand_dims(m_safe, axis)), axis=axis)
  return m_new, s


def _nce_fwd_tile(precision, mask_rows, mask_cols, r, c, rs, cs):
  xr, ar, rid = r
  yc, ac, cid = c
  s = matmul(xr, yc, precision)
  zr = s * ar[:, None]
  zc = s * ac[None, :]
  if mask_cols:
    zr = jnp.where(cid[None, :] >= 0, zr, -jnp.inf)
  if mask_rows:
    zc = jnp.where(rid[:, None] >= 0, zc, -jnp.inf)
  return _lse_update(rs, zr, 1), _lse_update(cs, zc, 0)


def _nce_bwd_tile(
  precision, mask_rows, mask_cols, need_a, r, c, rs, cs, *, centre=None, xr_op=None
):
  xr, ar, rid, lse_r, gr = r
  yc, ac, cid, lse_c, gc = c
  dx, dar = rs
  dy, dac = cs
  s = matmul(xr, yc, precision)
  pr = jnp.exp(s * ar[:, None] - lse_r[:, None])
  pc = jnp.exp(s * ac[None, :] - lse_c[None, :])
  if mask_cols:
    pr = jnp.where(cid[None, :] >= 0, pr, 0.0)
  if mask_rows:
    pc = jnp.where(rid[:, None] >= 0, pc, 0.0)
  ds = (gr * ar)[:, None] * pr + (gc * ac)[None, :] * pc
  dx, dy = grad_update(dx, dy, ds, xr, yc, precision, centre, xr_op=xr_op)
  if need_a:
    # d lse_i / d(1/tau_i) = sum_j p_ij s_ij.
    dar = dar + jnp.sum(pr * s, axis=1)
    dac = dac + jnp.sum(pc * s, axis=0)
  return (dx, dar), (dy, dac)


def _padded(b: int, blocks) -> bool:
  """Whether the `(rows, cols)` tiles of `b` samples end in padding."""
  return b % blocks.rows != 0 or b % blocks.cols != 0


def _full(shape, value, dtype):
  return jnp.full(shape, value, dtype)


def _nce_layout(x, y, a, blocks, axis_name):
  b = x.shape[0]
  ids = global_ids(b, axis_name)
  rows = (split(x, blocks.rows), split(a, blocks.rows, 1), split(ids, blocks.rows, -1))
  cols = (split(y, blocks.cols), split(a, blocks.cols, 1), split(ids, blocks.cols, -1))
  return rows, cols, b % blocks.rows != 0, b % blocks.cols != 0


def _nce_forward(x, y, a, blocks, precision, axis_name):
  kw = {"padded": _padded(x.shape[0], blocks), "precision": precision}
  fused = use_fused_tiles(blocks, x.shape[1], x.dtype, "infonce", "fwd", **kw)
  # The fused tiles take their scales in base 2, made here once (`nce_vectors`).
  a_tile = _pallas_tiles.nce_vectors(a)[0] if fused else a
  rows, cols, mask_rows, mask_cols = _nce_layout(x, y, a_tile, blocks, axis_name)
  dt = a.dtype
  nr, nc = rows[0].shape[0], cols[0].shape[0]
  row0 = varying(
    (_full((nr, blocks.rows), -jnp.inf, dt), _full((nr, blocks.rows), 0, dt)), axis_name
  )
  col0 = varying(
    (_full((nc, blocks.cols), -jnp.inf, dt), _full((nc, blocks.cols), 0, dt)), axis_name
  )
  fwd = _pallas_tiles.nce_fwd_tile if fused else _nce_fwd_tile
  tile = functools.partial(fwd, precision, mask_rows, mask_cols)
  (mr, lr), (mc, lc) = traverse(tile, rows, cols, col0, row0, axis_name)
  b = x.shape[0]
  return merge(mr + jnp.log(lr), b), merge(mc + jnp.log(lc), b)


def _positives(x, y):
  """`<x_i, y_i>` in the compute dtype."""
  dt = compute_dtype(x, y)
  return jnp.sum(x.astype(dt) * y.astype(dt), axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def infonce_lse(x, y, a, blocks, precision, axis_name) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(lse_j s_ij a_i, lse_i s_ij a_j, s_ii a_i)`: each anchor's logsumexp, both ways, and its
  positive logit.

  `x`, `y`: `(b, D)` (the local shard when `axis_name` is set), `a = 1/tau` `(b,)` in the
  compute dtype. Returns three `(b,)` vectors: image anchors over all texts, text anchors over
  all images, the positive logits. The positive term is inside the custom VJP so its gradient
  (nearly the opposite of the logsumexp's when the pairs are close) is added to the others in
  float32, before the one cast to the embeddings' dtype.
  """
  lse_r, lse_c = _nce_forward(x, y, a, blocks, precision, axis_name)
  return lse_r, lse_c, _positives(x, y) * a


def _infonce_lse_fwd(x, y, a, blocks, precision, axis_name):
  x, y, a_ = x.value, y.value, a.value
  lse = _nce_forward(x, y, a_, blocks, precision, axis_name)
  # The pytree structure (not a traced value) says whether 1/tau needs a gradient.
  need_a = (None,) if a.perturbed else ()
  pos = _positives(x, y)
  return lse + (pos * a_,), (x, y, a_, lse, pos, need_a)


def _cotangent(g, like):
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    return jnp.zeros(like.shape, like.dtype)
  return g


def _infonce_lse_bwd(blocks, precision, axis_name, res, g):
  x, y, a, (lse_r, lse_c), pos, need_a = res
  gr, gc, gp = _cotangent(g[0], lse_r), _cotangent(g[1], lse_c), _cotangent(g[2], pos)
  need_a = bool(need_a)
  d = x.shape[1]
  kw = {"padded": _padded(x.shape[0], blocks), "precision": precision}
  fused = use_fused_tiles(blocks, d, x.dtype, "infonce", "bwd", **kw)
  # The fused tiles take their vectors scaled, made here once (`nce_vectors`).
  vr = _pallas_tiles.nce_vectors(a, lse_r, gr) if fused else (a, lse_r, gr)
  vc = _pallas_tiles.nce_vectors(a, lse_c, gc) if fused else (a, lse_c, gc)
  rows, cols, mask_rows, mask_cols = _nce_layout(x, y, vr[0], blocks, axis_name)
  rows = rows + (split(vr[1], blocks.rows), split(vr[2], blocks.rows))
  cols = cols + (split(vc[1], blocks.cols), split(vc[2], blocks.cols))
  acc = compute_dtype(x, y)
  centre = gradient_centre(x, y, axis_name)
  nr, nc = rows[0].shape[0], cols[0].shape[0]
  row0 = varying(
    (grad_zeros((nr, blocks.rows), d, acc, centre), jnp.zeros((nr, blocks.rows), a.dtype)),
    axis_name,
  )
  col0 = varying(
    (grad_zeros((nc, blocks.cols), d, acc, centre), jnp.zeros((nc, blocks.cols), a.dtype)),
    axis_name,
  )
  bwd = _pallas_tiles.nce_bwd_tile if fused else _nce_bwd_tile
  tile = functools.partial(bwd, precision, mask_rows, mask_cols, need_a, centre=centre)
  b = x.shape[0]
  w = gp * a
  ys, ws = split(y, blocks.rows), split(w, blocks.rows)

  def finish(rs, i):
    # Row block i's gradient, whole: the rank-one term and the positive pairs' term added and
    # cast to x's dtype as soon as its sweep is done (no float32 row state for every block).
    g, dar = rs
    y_i, w_i = ys[i].astype(acc), ws[i][:, None]
    return (finish_grad(g, None if centre is None else centre.y) + w_i * y_i).astype(x.dtype), dar

  prep = product_rows(centre, x.dtype)
  (dx, sr), (dy, sc) = traverse(tile, rows, cols, col0, row0, axis_name, prep, finish)
  dx = merge(dx, b)
  dy = merge(finish_grad(dy, None if centre is None else centre.x), b)
  dy = (dy + w[:, None] * x.astype(acc)).astype(y.dtype)
  da = gr * merge(sr, b) + gc * merge(sc, b) + gp * pos if need_a else None
  return dx, dy, da


infonce_lse.defvjp(_infonce_lse_fwd, _infonce_lse_bwd, symbolic_zeros=True)


def infonce_partial_sum(image, text, temperature, blocks, precision, axis_name):
  """Sum over the local anchors of both directions' InfoNCE terms (divide by 2B for the loss)."""
  dt = compute_dtype(image, text)
  b = image.shape[0]
  tau = jnp.broadcast_to(jnp.asarray(temperature, dt), (b,))
  a = 1.0 / tau
  # pyright loses the return type through functools.partial(jax.custom_vjp, ...).
  lse_r, lse_c, pos = infonce_lse(image, text, a, blocks, precision, axis_name)  # pyright: ignore[reportGeneralTypeIssues]
  # Sharded, a NaN partial sum on one device makes the psum-ed loss NaN on all of them.
  return _checks.nan_unless_valid(
    jnp.sum(lse_r - pos) + jnp.sum(lse_c - pos), positive=(tau,), axis_name=axis_name
  )


def infonce_blockwise(image, text, temperature, *, block_size=None, precision=None):
  """Symmetric InfoNCE with per-anchor temperature, tile by tile (never a `(B, B)` array).

  Same value and gradients as `infonce_dense`; memory `O(B*D + rows*cols)`.

  Args:
    image, text: `(B, D)` embeddings, used as given; bf16 accepted (f32 accumulation).
    temperature: scalar or `(B,)` per-anchor temperatures, > 0.
    block_size: None (the default tile, `resolve_blocks`), an int (square tiles) or
      `(rows, cols)`; any `B` works.
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
#
# The cosine similarity is taken as `s_ij = <x_i, y_j> r_i q_j` with `r = 1 / max(||x||, eps)`
# (and `q` for `y`): the tile product runs on the embeddings as given, so bf16 embeddings feed
# the bf16 matrix units exactly (no rounding of normalised vectors to bf16, which moves every
# similarity by ~1e-3, as much as a small margin), with float32 accumulation and scales.


def _hinge_masks(rid, cid):
  return (rid[:, None] != cid[None, :]) & (rid[:, None] >= 0) & (cid[None, :] >= 0)


def _cosines(xr, yc, r, q, precision):
  return matmul(xr, yc, precision) * r[:, None] * q[None, :]


def _mm_fwd_tile(precision, r, c, rs, cs):
  xr, rr, ro, rid = r
  yc, qc, co, cid = c
  s = _cosines(xr, yc, rr, qc, precision)
  keep = _hinge_masks(rid, cid)
  # relu, as the dense reference: zero gradient exactly at the hinge.
  hr = jnp.where(keep, jax.nn.relu(ro[:, None] + s), 0.0)
  hc = jnp.where(keep, jax.nn.relu(co[None, :] + s), 0.0)
  rsum, rcnt = rs
  csum, ccnt = cs
  return (
    (rsum + jnp.sum(hr, axis=1), rcnt + jnp.sum((hr > 0).astype(s.dtype), axis=1)),
    (csum + jnp.sum(hc, axis=0), ccnt + jnp.sum((hc > 0).astype(s.dtype), axis=0)),
  )


def _mm_bwd_tile(precision, r, c, rs, cs, *, centre=None, xr_op=None):
  xr, rr, ro, rid, gr = r
  yc, qc, co, cid, gc = c
  s = _cosines(xr, yc, rr, qc, precision)
  keep = _hinge_masks(rid, cid)
  ds = jnp.where(keep & (ro[:, None] + s > 0), gr[:, None], 0.0) + jnp.where(
    keep & (co[None, :] + s > 0), gc[None, :], 0.0
  )
  # d/dx_i of s_ij = r_i q_j y_j. The scales' gradients come after the sweep (_hinge_sums_bwd).
  dsw = ds * rr[:, None] * qc[None, :]
  return grad_update(rs, cs, dsw, xr, yc, precision, centre, xr_op=xr_op)


def _mm_layout(x, y, r, q, ro, co, blocks, axis_name):
  b = x.shape[0]
  ids = global_ids(b, axis_name)
  rows = (
    split(x, blocks.rows),
    split(r, blocks.rows, 1),
    split(ro, blocks.rows),
    split(ids, blocks.rows, -1),
  )
  cols = (
    split(y, blocks.cols),
    split(q, blocks.cols, 1),
    split(co, blocks.cols),
    split(ids, blocks.cols, -1),
  )
  return rows, cols


def _mm_forward(x, y, r, q, ro, co, blocks, precision, axis_name):
  rows, cols = _mm_layout(x, y, r, q, ro, co, blocks, axis_name)
  dt = ro.dtype
  nr, nc = rows[0].shape[0], cols[0].shape[0]
  zr = jnp.zeros((nr, blocks.rows), dt)
  zc = jnp.zeros((nc, blocks.cols), dt)
  row0 = varying((zr, zr), axis_name)
  col0 = varying((zc, zc), axis_name)
  padded = _padded(x.shape[0], blocks)
  kw = {"padded": padded, "precision": precision}
  if use_fused_tiles(blocks, x.shape[1], x.dtype, "max_margin", "fwd", **kw):
    tile = functools.partial(_pallas_tiles.mm_fwd_tile, precision, padded)
  else:
    tile = functools.partial(_mm_fwd_tile, precision)
  (rsum, rcnt), (csum, ccnt) = traverse(tile, rows, cols, col0, row0, axis_name)
  b = x.shape[0]
  return (merge(rsum, b), merge(csum, b)), (merge(rcnt, b), merge(ccnt, b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def hinge_sums(x, y, r, q, ro, co, op, blocks, precision, axis_name) -> tuple[jax.Array, jax.Array]:
  """Per-anchor hinge sums `(sum_{j!=i} relu(ro_i + s_ij), sum_{i!=j} relu(co_j + s_ij))`.

  `s_ij = <x_i, y_j> r_i q_j`, the products taken in dtype `op` (exact: `x`, `y` are the
  embeddings upcast from `op`), accumulated and scaled in `x`'s dtype. `ro_i = m_i - s_ii` for
  the image anchors (rows), `co_j = m_j - s_jj` for the text anchors. The cotangents of `x` and
  `y` come back in `x`'s dtype, so the normalisation's own gradient adds to them unrounded.
  """
  xo, yo = x.astype(op), y.astype(op)
  return _mm_forward(xo, yo, r, q, ro, co, blocks, precision, axis_name)[0]


def _hinge_sums_fwd(x, y, r, q, ro, co, op, blocks, precision, axis_name):
  xo, yo = x.astype(op), y.astype(op)
  sums, counts = _mm_forward(xo, yo, r, q, ro, co, blocks, precision, axis_name)
  return sums, (xo, yo, r, q, ro, co, counts)


def _hinge_sums_bwd(op, blocks, precision, axis_name, res, g):
  del op
  x, y, r, q, ro, co, (rcnt, ccnt) = res
  gr, gc = g
  rows, cols = _mm_layout(x, y, r, q, ro, co, blocks, axis_name)
  rows = rows + (split(gr, blocks.rows),)
  cols = cols + (split(gc, blocks.cols),)
  acc = compute_dtype(x, y, r)
  d = x.shape[1]
  centre = gradient_centre(x, y, axis_name)
  nr, nc = rows[0].shape[0], cols[0].shape[0]
  row0 = varying(grad_zeros((nr, blocks.rows), d, acc, centre), axis_name)
  col0 = varying(grad_zeros((nc, blocks.cols), d, acc, centre), axis_name)
  padded = _padded(x.shape[0], blocks)
  kw = {"padded": padded, "precision": precision}
  if use_fused_tiles(blocks, d, x.dtype, "max_margin", "bwd", **kw):
    tile = functools.partial(_pallas_tiles.mm_bwd_tile, precision, padded, centre=centre)
  else:
    tile = functools.partial(_mm_bwd_tile, precision, centre=centre)
  prep = product_rows(centre, x.dtype)
  dx, dy = grad_finish(*traverse(tile, rows, cols, col0, row0, axis_name, prep), centre)
  b = x.shape[0]
  dx, dy = merge(dx, b), merge(dy, b)
  # d/dr_i = sum_j dS_ij s_ij / r_i, and sum_j dS_ij s_ij = sum_j (dS r q^T)_ij <x_i, y_j>
  # = <x_i, dx_i>: one row-wise dot after the sweep instead of a product and two reductions
  # in every tile (and the same dx the normalisation's gradient projects).
  dr = jnp.sum(x.astype(acc) * dx, axis=1)
  dq = jnp.sum(y.astype(acc) * dy, axis=1)
  return dx, dy, dr / r, dq / q, gr * rcnt, gc * ccnt


hinge_sums.defvjp(_hinge_sums_fwd, _hinge_sums_bwd)


def max_margin_partial_sum(image, text, margin, blocks, precision, axis_name):
  """Sum of the local anchors' hinge terms, both directions (divide by 2B(B-1) for the loss)."""
  op = jnp.result_type(image, text)
  dt = compute_dtype(image, text)
  x, y = image.astype(dt), text.astype(dt)
  r = 1.0 / jnp.maximum(jnp.linalg.norm(x, axis=1), COSINE_EPS)
  q = 1.0 / jnp.maximum(jnp.linalg.norm(y, axis=1), COSINE_EPS)
  b = x.shape[0]
  m = jnp.broadcast_to(jnp.asarray(margin, dt), (b,))
  offset = m - jnp.sum(cosine_normalize(x) * cosine_normalize(y), axis=1)
  # pyright loses the return type through functools.partial(jax.custom_vjp, ...).
  rsum, csum = hinge_sums(x, y, r, q, offset, offset, op, blocks, precision, axis_name)  # pyright: ignore[reportGeneralTypeIssues]
  return _checks.nan_unless_valid(jnp.sum(rsum) + jnp.sum(csum), positive=(m,), axis_name=axis_name)


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
