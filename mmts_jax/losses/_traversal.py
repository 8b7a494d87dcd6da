r"""How the tiled losses visit the similarity matrix: tile sizes, layout, the local sweep and the
ring over devices.

Every blockwise loss (InfoNCE, max-margin, sigmoid) is written as a `tile(r, c, rs, cs)` function
of one row block and one column block and their running states; this module runs it over every
`(row block, column block)` pair, either locally (`sweep`) or, with `axis_name`, over every
device's column blocks passed round a ring (`ring_traverse`). It imports no loss module, so the
losses import it and not each other.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mmts_jax.normalize import compute_dtype

__all__ = [
  "DEFAULT_BLOCK",
  "SUB",
  "Blocks",
  "axis_size",
  "resolve_blocks",
  "ring_traverse",
  "sweep",
  "traverse",
  "varying_like",
]

# Default tile, (rows, cols). Large enough that each tile's matmul keeps a GPU's matrix units busy,
# small enough that a few f32 tiles stay well under a GiB (see benchmarks/BENCHMARKS.md).
DEFAULT_BLOCK = (8192, 8192)
# From LARGE_BATCH rows up (per device), twice the rows: half the row blocks, so half the kernel
# launches and column-state updates. On one H200 (benchmarks/results/loss_h200_session16/),
# bf16 InfoNCE at B = 131,072 took 150.4 / 153.1 ms instead of 157.6 / 157.5, at 1.36 GiB
# instead of 1.10; at B = 32,768 9.56 ms instead of 10.20 but 0.60 GiB instead of 0.44 (f32:
# 1.00 instead of 0.72), so smaller batches keep the square tile.
LARGE_BATCH = 131072
LARGE_BATCH_BLOCK = (16384, 8192)
# The fused kernels' sub-tile edge (rows and columns per Triton program): tiles are clipped to the
# batch in whole sub-tiles so a ragged batch still takes the fused path, masked.
SUB = 128


class Blocks(NamedTuple):
  rows: int
  cols: int


def resolve_blocks(
  block_size, rows: int, cols: int, fn: str = "blockwise", default: tuple[int, int] | None = None
) -> Blocks:
  """`block_size` (None for the default, an int for square tiles, or `(rows, cols)`) clipped to
  the batch. The default is `default` if given, else `DEFAULT_BLOCK`, or `LARGE_BATCH_BLOCK`
  from `LARGE_BATCH` rows up.

  Example:
    >>> resolve_blocks(None, 5000, 5000)
    Blocks(rows=5120, cols=5120)
    >>> resolve_blocks(None, 131072, 131072)
    Blocks(rows=16384, cols=8192)
  """
  if block_size is None:
    block_size = default or (LARGE_BATCH_BLOCK if rows >= LARGE_BATCH else DEFAULT_BLOCK)
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
  """At most `block`, and no more than `n` rounded up to whole `SUB` sub-tiles."""
  if n <= SUB:
    return min(block, n)
  return min(block, -(-n // SUB) * SUB)


# ---------------------------------------------------------------------------------------------
# Layout: (B, ...) arrays split into (num_blocks, block, ...) with padding.


def split(x, blk: int, fill=0):
  """`(B, ...)` -> `(ceil(B / blk), blk, ...)`, the last block padded with `fill`."""
  n = -(-x.shape[0] // blk)
  pad = n * blk - x.shape[0]
  if pad:
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
  return x.reshape((n, blk) + x.shape[1:])


def merge(x, b: int):
  """Inverse of `split`: the first `b` rows."""
  return x.reshape((-1,) + x.shape[2:])[:b]


def axis_size(axis_name) -> int:
  """The number of devices along `axis_name` (a name or a tuple of names)."""
  return int(lax.psum(1, axis_name))


def global_ids(b: int, axis_name):
  """Global index of each local sample (the diagonal of the global similarity)."""
  ids = jnp.arange(b, dtype=jnp.int32)
  if axis_name is not None:
    ids = ids + lax.axis_index(axis_name).astype(jnp.int32) * b
  return ids


def varying(tree, axis_name):
  """Marks freshly created carries as device-varying, as `shard_map`'s type check wants."""
  if axis_name is None or not hasattr(lax, "pcast"):
    return tree

  def cast(x):
    try:
      return lax.pcast(x, axis_name, to="varying")
    except (ValueError, TypeError, NameError, NotImplementedError):
      return x  # pmap, or already varying

  return jax.tree.map(cast, tree)


def varying_like(x) -> dict:
  """ShapeDtypeStruct kwargs that make a kernel output (Pallas Triton or Mosaic GPU) vary over
  the axes `x` varies over.

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


# ---------------------------------------------------------------------------------------------
# Matmuls of one tile.


def matmul(a, b, precision):
  """`a @ b.T` in f32 (or f64) accumulation, low-precision operands fed as they are."""
  return lax.dot_general(
    a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=compute_dtype(a, b)
  )


# Centre the low-precision gradient products (see `Centre`). Read at trace time; the benchmark
# turns it off to measure what it costs.
CENTRE_LOW_PRECISION = True


class Centre(NamedTuple):
  r"""The means that low-precision gradient products subtract from their operands.

  Rounding `dS` to bf16 alone loses the gradient when the embeddings share a large common
  component (near-duplicates, late training): `dX_i = sum_j dS_ij y_j` cancels that component
  almost exactly, and a 2^-8 relative error per `dS_ij` does not. So with a low-precision `dS`
  the operands are centred, exactly, for any fixed vector `ybar`:

  .. math::
    dS\,Y = dS\,(Y - \mathbf{1}\bar y^\top) + (dS\,\mathbf{1})\,\bar y^\top,

  the bf16 product sees only the small residuals `Y - ybar`, and the row sums `dS 1` (column
  sums for `dS^T X`) are accumulated in float32 beside the products. `ybar` is one vector for
  the whole batch (every device's columns, on a ring), so the rank-one terms are added once
  after the sweep (`grad_finish`) rather than in every tile, and no tile reduces its block.
  """

  x: jax.Array  # (D,) float32 mean of the row embeddings
  y: jax.Array  # (D,) float32 mean of the column embeddings


def gradient_centre(x, y, axis_name=None) -> Centre | None:
  """The `Centre` of the gradient products over `x`, `y` (the local shards; with `axis_name`
  the means are over every device's), or None where the products are not centred: operands of
  32 bits or more, or `CENTRE_LOW_PRECISION` off."""
  op = jnp.result_type(x, y)
  if not CENTRE_LOW_PRECISION or jnp.finfo(op).bits >= 32:
    return None
  out = compute_dtype(x, y)
  means = (jnp.mean(x.astype(out), axis=0), jnp.mean(y.astype(out), axis=0))
  if axis_name is not None:
    means = lax.pmean(means, axis_name)
  return Centre(*means)


# float32 gradient products on Hopper GPUs take the embeddings' blocks transposed, `(D, rows)`:
# the contraction runs over their rows, which row-major blocks hold MN-major, and Hopper's tf32
# `wgmma` reads K-major operands only. On one H200 (benchmarks/results/loss_h200_session19/)
# f32 InfoNCE at B = 131,072 took 259.5-260.1 ms instead of 285.0-285.5. "auto": on compute
# capability 9.x, where it was measured; True / False: everywhere / nowhere (the tests and
# benchmarks). Read at trace time.
K_MAJOR_F32: bool | str = "auto"


def hopper() -> bool:
  """Whether the default device is a Hopper GPU (compute capability 9.x)."""
  dev = jax.devices()[0]
  return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9.")


def _k_major(dtype) -> bool:
  if jnp.dtype(dtype) != jnp.float32:
    return False
  return hopper() if K_MAJOR_F32 == "auto" else bool(K_MAJOR_F32)


def _grad_dots(ds, xr, yc, precision, out, xr_t=None):
  """`(dS Y_c, dS^T X_r)`; K-major for float32 where `_k_major` says so, with `xr_t` the row
  block already transposed when the caller has it."""

  def dot(a, b, dims):
    return lax.dot_general(a, b, (dims, ((), ())), precision=precision, preferred_element_type=out)

  if not _k_major(ds.dtype):
    return dot(ds, yc, ((1,), (0,))), dot(ds, xr, ((0,), (0,)))
  yct = _transposed(yc)
  xrt = _transposed(xr) if xr_t is None else xr_t
  return dot(ds, yct, ((1,), (1,))), dot(ds, xrt, ((0,), (1,)))


def _transposed(v):
  """`v.T` as a copy XLA keeps: without the barrier it folds the transpose back into the
  product's dimension numbers, and the operand is MN-major again."""
  return lax.optimization_barrier(v.T)


def _centred(v, mean):
  """`v - mean` rounded back to `v`'s dtype."""
  return (v.astype(mean.dtype) - mean).astype(v.dtype)


def product_rows(centre: Centre | None, dtype):
  """The sweep's `prepare_rows` for a backward's gradient products over embeddings of `dtype`:
  each row block's embeddings (the first entry of its row data) as the products take them,
  made once per row block, outside the loop over column blocks, and handed to every tile as
  `xr_op` (`grad_update`): centred with a `centre`, transposed where float32 products take
  K-major operands (`K_MAJOR_F32`); None when neither."""
  if centre is not None:
    return lambda r: {"xr_op": _centred(r[0], centre.x)}
  if _k_major(dtype):
    return lambda r: {"xr_op": _transposed(r[0])}
  return None


def grad_products(ds, xr, yc, precision, centre: Centre | None, xr_op=None):
  """`(dS (Y_c - ybar), dS^T (X_r - xbar))` (`centre`'s means; without one, uncentred) with
  `dS` in the operands' dtype, so low-precision embeddings run both on the fast units. `xr_op`:
  the row block as `product_rows` made it, when the caller has it."""
  op = jnp.result_type(xr, yc)
  out = compute_dtype(xr, yc)
  if centre is None:
    return _grad_dots(ds.astype(op), xr, yc, precision, out, xr_t=xr_op)
  xr = _centred(xr, centre.x) if xr_op is None else xr_op
  return _grad_dots(ds.astype(op), xr, _centred(yc, centre.y), precision, out)


def grad_zeros(shape, d: int, dtype, centre: Centre | None):
  """The zero gradient state of `shape` (`(blocks, block)`) samples of `d` features: the
  gradient, and with a `centre` its float32 sums of dS beside it."""
  grad = jnp.zeros(tuple(shape) + (d,), dtype)
  return grad if centre is None else (grad, jnp.zeros(shape, centre.x.dtype))


def summed_into(state, parts):
  """`state + parts.sum(0)` as one reduction over the state and the `(parts, n)` partial sums
  together: a fused program's partials then cost one kernel per tile, not a sum and an add.

  Example:
    >>> summed_into(jnp.array([1.0, 2.0]), jnp.ones((3, 2)))
    Array([4., 5.], dtype=float32)
  """
  both = jnp.concatenate([state[None], parts.astype(state.dtype)], 0)
  return jnp.sum(both, axis=0)


def grad_update(dx, dy, ds, xr, yc, precision, centre: Centre | None, xr_op=None, sum_parts=None):
  """Adds one tile's `dS Y_c` to the row state `dx` and `dS^T X_r` to the column state `dy`
  (states from `grad_zeros`). With a `centre`, dS's float32 row and column sums go into the
  states too: `sum_parts`, the `(parts, n)` partial sums a fused program wrote, reduced into
  them (`summed_into`), else taken from `ds`. `xr_op`: the row block as `product_rows` made it,
  else it is prepared here."""
  ddx, ddy = grad_products(ds, xr, yc, precision, centre, xr_op)
  # The column state is a slice of the sweep's carry: folded into the product (cuBLAS adds into
  # its output), the slice would first be copied out and the result copied back; kept apart,
  # the sum is one in-place dynamic-update-slice fusion.
  ddy = lax.optimization_barrier(ddy)
  if centre is None:
    return dx + ddx, dy + ddy
  (gx, sx), (gy, sy) = dx, dy
  if sum_parts is not None:
    return (gx + ddx, summed_into(sx, sum_parts[0])), (gy + ddy, summed_into(sy, sum_parts[1]))
  out = compute_dtype(xr, yc)
  sums = (jnp.sum(ds, axis=1, dtype=out), jnp.sum(ds, axis=0, dtype=out))
  return (gx + ddx, sx + sums[0]), (gy + ddy, sy + sums[1])


def grad_finish(dx, dy, centre: Centre | None):
  """The gradients from the swept states: the rank-one terms `(dS 1) ybar^T`, `(dS^T 1) xbar^T`
  added once (`Centre`)."""
  if centre is None:
    return dx, dy
  return finish_grad(dx, centre.y), finish_grad(dy, centre.x)


def finish_grad(state, mean):
  """One side's gradient from its swept state (`grad_finish`): with centring (`state` a pair),
  the rank-one term `(dS 1) mean^T` added; without, the state itself. Works on any block of it,
  so a sweep can finish each row block as it is done (`sweep`'s `finish_rows`)."""
  if mean is None or not isinstance(state, tuple):
    return state
  g, sums = state
  return g + sums[..., None] * mean


# ---------------------------------------------------------------------------------------------
# Traversal: every row block meets every column block once.


def sweep(
  tile: Callable,
  rows,
  cols,
  row_state,
  col_state,
  prepare_rows=None,
  finish_rows=None,
  axis_name=None,
):
  """Runs `tile` over all (row block, column block) pairs.

  `rows`/`row_state` are pytrees of `(nR, Br, ...)` arrays, `cols`/`col_state` of `(nC, Bc, ...)`.
  `tile(r, c, rs, cs) -> (rs, cs)` sees one block of each. `prepare_rows(r) -> dict`, if given,
  runs once per row block, outside the loop over column blocks, and its entries reach every
  tile of that row block as keyword arguments (XLA does not hoist such work out of the inner
  loop itself: the profiles showed it once per tile). `finish_rows(rs, i) -> out`, if given,
  turns row block `i`'s state into what the caller keeps of it once all its columns are done
  (the gradient in the embeddings' dtype, say), and the sweep returns the stacked `out` in
  place of the row state: the whole float32 row state then never exists at once (it is read a
  block at a time from `row_state`, which, when it is zeros, XLA need not build). `axis_name`:
  the mesh axes the sweep runs inside (`shard_map`), which the stacked `out` varies over.

  Both states stay whole in the loops' carries, and each block of them is read and written back
  in place (a dynamic-update-slice of the carry). Threaded through a scan as xs / ys instead, a
  state is two buffers, the one read and the one written (for the backward's float32 gradient
  states, 256 MiB each at B = 131,072, D = 512), and the inner scan's ys a fresh buffer per row
  block, zero-filled and copied back into the outer loop's carry.
  """
  n_rows = jax.tree.leaves(rows)[0].shape[0]
  n_cols = jax.tree.leaves(cols)[0].shape[0]

  def block(tree, i):
    return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), tree)

  def put(tree, v, i):
    return jax.tree.map(lambda a, b: lax.dynamic_update_index_in_dim(a, b, i, 0), tree, v)

  def outer(states, r_xs):
    out_all, cs_all = states
    r, i = r_xs
    kw = {} if prepare_rows is None else prepare_rows(r)
    rs = block(out_all if finish_rows is None else row_state, i)

    def inner(carry, c_xs):
      rs, cs_all = carry
      c, j = c_xs
      rs, cs = tile(r, c, rs, block(cs_all, j), **kw)
      return (rs, put(cs_all, cs, j)), None

    (rs, cs_all), _ = lax.scan(inner, (rs, cs_all), (cols, jnp.arange(n_cols)))
    return (put(out_all, rs if finish_rows is None else finish_rows(rs, i), i), cs_all), None

  if finish_rows is None:
    out = row_state  # updated in place
  else:
    one = jax.eval_shape(finish_rows, block(row_state, 0), jnp.int32(0))
    out = jax.tree.map(lambda a: jnp.zeros((n_rows,) + a.shape, a.dtype), one)
    out = varying(out, axis_name)
  (out, col_state), _ = lax.scan(outer, (out, col_state), (rows, jnp.arange(n_rows)))
  return out, col_state


def _shift(tree, axis_name, n):
  perm = [(i, (i + 1) % n) for i in range(n)]
  return jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), tree)


def ring_traverse(step, fixed, moving, carry, axis_name, last_step=None):
  """Visits every device's column blocks: `n` calls of `step(fixed, moving, carry)`, the last
  one of `last_step` if given.

  `fixed` (the visiting blocks and their read-only data) is forwarded to the next device before
  `step` runs, so the send overlaps it; `moving` (per-column state) is forwarded after `step`
  has updated it. After `n` hops `moving` is back on its own device; `carry` never moves.
  """
  n = axis_size(axis_name)
  last_step = last_step or step
  if n == 1:
    return last_step(fixed, moving, carry)

  def hop(state, _):
    fixed, moving, carry = state
    upcoming = _shift(fixed, axis_name, n)  # independent of `step`: XLA overlaps the two
    carry, moving = step(fixed, moving, carry)
    return (upcoming, _shift(moving, axis_name, n), carry), None

  (fixed, moving, carry), _ = lax.scan(hop, (fixed, moving, carry), None, length=n - 1)
  carry, moving = last_step(fixed, moving, carry)  # the last block needs no onward send
  return carry, _shift(moving, axis_name, n)


def traverse(tile, rows, fixed, moving, carry, axis_name, prepare_rows=None, finish_rows=None):
  """All local rows meet all columns: the local ones, or, with `axis_name`, every device's.

  `fixed` are the column blocks and their read-only data, `moving` the per-column state that
  accumulates over rows (and, sharded, travels home with its block); `carry` the row state.
  `prepare_rows`, `finish_rows`: as `sweep`'s (on a ring the rows are finished in the last
  hop, after they have met every device's columns). Returns `(row state, or what
  `finish_rows` made of it, column state)`.
  """

  def step(fixed, moving, carry, finish=None):
    return sweep(tile, rows, fixed, carry, moving, prepare_rows, finish, axis_name)

  last = functools.partial(step, finish=finish_rows)
  if axis_name is None:
    return last(fixed, moving, carry)
  return ring_traverse(step, fixed, moving, carry, axis_name, last)
