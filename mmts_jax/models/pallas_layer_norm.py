r"""Fused layer norm of a 2-D `(N, C)` matrix in two Pallas (Triton) kernels: the GPU form of
`lean_layer_norm.layer_norm` (`kernel="pallas"`), same maths, same residuals.

Forward, one program per block of `rows_fwd` rows (all C features of a row on chip), for a row
x (float32 statistics, Flax's fast variance):

.. math::
  \mu = \tfrac1C \textstyle\sum_c x_c,\quad
  r = \big(\max(\tfrac1C \textstyle\sum_c x_c^2 - \mu^2,\ 0) + \epsilon\big)^{-1/2},\quad
  y = (x - \mu)\, r\, s + b,

writing y (in `dtype`), mu and r (float32, one per row). Backward, with g = dL/dy, `xhat =
(x - mu) r` recomputed from x and `gh = g s`:

.. math::
  dx = r\,\big(gh - \overline{gh} - \hat x\,\overline{gh\,\hat x}\big),\quad
  ds = \textstyle\sum_N g\,\hat x,\quad db = \textstyle\sum_N g,

one program per `rows_bwd * steps` rows (`steps` blocks of `rows_bwd` in a loop, `programs_bwd`
programs at most), each writing dx of its rows and its own float32 partial sums of ds and db
(its row of a `(programs, 2, C)` matrix, no atomics); one `jnp.sum` over the programs finishes
both. With `layer_norm_bwd(..., residual=g_x)` the kernel reads one more `(N, C)` operand and
writes :math:`g_x + dx` instead (`residual_layer_norm`: a pre-LN block's skip-connection
cotangent, added in float32 before the one rounding to x's dtype; 83.75 vs 84.69 ms per
ViT-B/16 step on one H200, BENCHMARKS.md run 16); with `column_sum=True` as well, a third
partial sum, of dx (`add_layer_norm`'s bias gradient).

The feature axis is padded on chip to the next power of two (Triton's block sizes) and the
padding masked, as are the rows past N (any N). Timed on an H200 (bfloat16, forward +
backward, `benchmarks/pallas_kernels_bench.py`): 0.148 / 0.244 ms at (50688, 768) with the
default blocks (`LayerNormConfig`), 0.072 / 0.070 at (19968, 512) and 0.313 / 0.388 at (66048,
1024) with the earlier (16, 8, 528, 8), against XLA's form of the same maths alone; in the
train step the layer norms fuse with their neighbours differently (BENCHMARKS.md, run 11).

`set_pallas_layer_norm` chooses where they run; `use_pallas_layer_norm` is the decision
`lean_layer_norm` asks. By default on GPUs only (float32 / bfloat16, C <= `MAX_FEATURES`); on
CPU / TPU the XLA form of `lean_layer_norm` runs instead, unless the Pallas interpreter is
asked for ("interpret": slow, checks the kernels' maths anywhere).

Sharding: both kernels are `row_partitioning.row_partitioned` calls, so under the trainer's
multi-device `jit` the rows stay split over whichever mesh axes they are sharded on (each device
runs the kernels on its own rows) and the features are replicated (a sharded feature axis is
gathered first); dscale and dbias are each device's sums, all-reduced over the rows' axes. Rows
that do not split evenly are replicated for the call. Checked on the 8-device simulated CPU mesh
through the interpreter (values, gradients, and no all-gather in the compiled HLO:
tests/test_pallas_sharding.py); not run on GPUs: the Triton lowering of the per-device body is
checked from the CPU (lowered for CUDA inside a `shard_map`), the partitioned program was not
compiled for a GPU.

Limits: the kernels read and write row-major `(N, C)` matrices: a `(B, L, C)` stream that XLA
lays out otherwise (the ViT's `(L, C, B)`, `transformer.flat_residual`) is copied around each
call, hence the train-step variant pairs them with `flat_residual`.

Example (the interpreter on CPU, 5 rows: two forward programs of 4 rows, 3 rows masked):
  >>> from mmts_jax.models.lean_layer_norm import layer_norm
  >>> x = jax.random.normal(jax.random.PRNGKey(0), (5, 24))
  >>> s, b = jnp.full((24,), 2.0), jnp.ones(24)
  >>> set_pallas_layer_norm("interpret")
  >>> y = layer_norm(x, s, b, 1e-6, jnp.float32, "pallas")
  >>> set_pallas_layer_norm(None)
  >>> bool(jnp.allclose(y, layer_norm(x, s, b, 1e-6, jnp.float32, "xla"), atol=1e-5))
  True
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mmts_jax.losses._pallas_tiles import check_powers_of_two
from mmts_jax.models.kernel_switch import KernelSwitch
from mmts_jax.models.row_partitioning import FEATURES, ROW, ROWS, SUM, row_partitioned

__all__ = [
  "LayerNormConfig",
  "MAX_FEATURES",
  "layer_norm_bwd",
  "layer_norm_fwd",
  "layer_norm_config",
  "set_layer_norm_config",
  "set_pallas_layer_norm",
  "use_pallas_layer_norm",
]

MAX_FEATURES = 1024  # ViT-L's width; a row of more would not fit in registers at these blocks


class LayerNormConfig(NamedTuple):
  """Rows per forward program; rows per backward block and the most backward programs (each
  loops over `ceil(N / rows_bwd / programs_bwd)` blocks); Triton warps per program.

  The default is the fastest of six blocks timed on an H200 at ViT-B/16's (50688, 768)
  bfloat16 (`benchmarks/pallas_kernels_bench.py`, session 6): forward + backward 0.148 ms
  against 0.203 ms for the first guess (16, 8, 528, 8) and 0.244 ms for the XLA form.
  Small blocks and 4 warps keep many programs resident per multiprocessor, which hides the
  row reductions' latency; other widths (512, 1024) ran this default but were not swept.
  """

  rows_fwd: int = 4
  rows_bwd: int = 4
  programs_bwd: int = 1056  # 8 per streaming multiprocessor of an H100 / H200 (132)
  num_warps: int = 4


_CONFIG = [LayerNormConfig()]
# None: the kernels on GPUs, XLA elsewhere; False: XLA everywhere; "interpret": the Pallas
# interpreter on any backend.
_SWITCH = KernelSwitch("set_pallas_layer_norm", (jnp.float32, jnp.bfloat16))


def set_pallas_layer_norm(mode) -> None:
  """Chooses where `lean_layer_norm`'s `kernel="pallas"` runs the Pallas kernels.

  `mode`: `None` (default: GPUs; the XLA form elsewhere), `False` (the XLA form everywhere) or
  "interpret" (the Pallas interpreter on any backend).

  Example:
    >>> set_pallas_layer_norm("interpret")
    >>> use_pallas_layer_norm(768, jnp.bfloat16)
    True
    >>> set_pallas_layer_norm(None)
  """
  _SWITCH.set(mode)


def use_pallas_layer_norm(features: int, dtype) -> bool:
  """Whether a layer norm of rows of `features` in `dtype` takes the Pallas kernels.

  Example:
    >>> use_pallas_layer_norm(768, jnp.bfloat16)  # on CPU, by default
    False
  """
  return _SWITCH.on(dtype) and 0 < features <= MAX_FEATURES


def layer_norm_config() -> LayerNormConfig:
  """The block sizes the kernels use now.

  Example:
    >>> layer_norm_config().rows_fwd
    4
  """
  return _CONFIG[0]


def set_layer_norm_config(cfg: LayerNormConfig | None) -> None:
  """Sets (None: resets) the block sizes; rows and warps must be powers of two.

  Example:
    >>> set_layer_norm_config(LayerNormConfig(rows_fwd=32))
    >>> layer_norm_config().rows_fwd
    32
    >>> set_layer_norm_config(None)
  """
  if cfg is None:
    _CONFIG[0] = LayerNormConfig()
    return
  check_powers_of_two("set_layer_norm_config", cfg, ("rows_fwd", "rows_bwd", "num_warps"))
  if cfg.programs_bwd < 1:
    raise ValueError(f"set_layer_norm_config: programs_bwd must be >= 1, got {cfg.programs_bwd}")
  _CONFIG[0] = cfg


def _pl():
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  return pl, plgpu


def _block(start, rows: int, n: int, c: int):
  """The `(rows, next_pow2(C))` block of rows from `start`: its index, its row and full masks."""
  pl, _ = _pl()
  cp = pl.next_power_of_2(c)
  live = start + jnp.arange(rows) < n
  mask = live[:, None] & (jnp.arange(cp) < c)[None, :]
  return (pl.ds(start, rows), pl.ds(0, cp)), pl.ds(start, rows), live, mask


def _features(c: int):
  """The padded feature index and its mask (scale, bias, the partial sums)."""
  pl, _ = _pl()
  cp = pl.next_power_of_2(c)
  return pl.ds(0, cp), jnp.arange(cp) < c


def _fwd_kernel(rows, n, c, eps, add, x_ref, *refs):
  # With `add`, two more operands after x, the branch z (N, C) and its bias a (C,), and one
  # more result first: the stream h = x + z + a (float32 sum, rounded once to x's dtype), whose
  # rounded value the statistics are taken of (the backward reloads it as x).
  if add:
    z_ref, a_ref, s_ref, b_ref, h_ref, y_ref, mu_ref, r_ref = refs
  else:
    s_ref, b_ref, y_ref, mu_ref, r_ref = refs
  pl, plgpu = _pl()
  idx, row_idx, live, mask = _block(pl.program_id(0) * rows, rows, n, c)
  cols, cmask = _features(c)
  x = plgpu.load(x_ref.at[idx], mask=mask, other=0).astype(jnp.float32)
  if add:
    z = plgpu.load(z_ref.at[idx], mask=mask, other=0).astype(jnp.float32)
    a = plgpu.load(a_ref.at[cols], mask=cmask, other=0).astype(jnp.float32)
    h = (x + z + a[None, :]).astype(h_ref.dtype)
    plgpu.store(h_ref.at[idx], h, mask=mask)
    # Padded rows and features hold a, not 0: zero them for the sums below.
    x = jnp.where(mask, h.astype(jnp.float32), 0.0)
  s = plgpu.load(s_ref.at[cols], mask=cmask, other=0).astype(jnp.float32)
  b = plgpu.load(b_ref.at[cols], mask=cmask, other=0).astype(jnp.float32)
  # The padding is 0, so the sums over the padded block are the sums over the C features.
  mu = jnp.sum(x, axis=1) / c
  var = jnp.maximum(jnp.sum(x * x, axis=1) / c - mu * mu, 0.0)
  r = jax.lax.rsqrt(var + eps)
  y = (x - mu[:, None]) * r[:, None] * s[None, :] + b[None, :]
  plgpu.store(y_ref.at[idx], y.astype(y_ref.dtype), mask=mask)
  plgpu.store(mu_ref.at[row_idx], mu, mask=live)
  plgpu.store(r_ref.at[row_idx], r, mask=live)


def _bwd_kernel(rows, steps, n, c, residual, colsum, x_ref, mu_ref, r_ref, s_ref, g_ref, *refs):
  # With `residual`, one more operand before the outputs: the cotangent that reaches x by the
  # skip connection, added to dx in registers (one more load, no extra pass over dx). With
  # `colsum`, one more result last: the program's float32 sums of dx over its rows (the
  # gradient of the bias `add_layer_norm` added to the stream).
  # The partial sums share one `(programs, 2 or 3, C)` output, so that one reduction over the
  # programs finishes all of them (separate outputs became one small kernel each on the H200).
  gx_ref, (dx_ref, parts_ref) = (refs[0], refs[1:]) if residual else (None, refs)
  pl, plgpu = _pl()
  p = pl.program_id(0)
  cols, cmask = _features(c)
  s = plgpu.load(s_ref.at[cols], mask=cmask, other=0).astype(jnp.float32)

  def body(k, acc):
    idx, row_idx, live, mask = _block((p * steps + k) * rows, rows, n, c)
    x = plgpu.load(x_ref.at[idx], mask=mask, other=0).astype(jnp.float32)
    g = plgpu.load(g_ref.at[idx], mask=mask, other=0).astype(jnp.float32)
    # Masked rows read mu = r = 0: their xhat and g are 0 and add nothing to the sums.
    mu = plgpu.load(mu_ref.at[row_idx], mask=live, other=0)
    r = plgpu.load(r_ref.at[row_idx], mask=live, other=0)
    xhat = (x - mu[:, None]) * r[:, None]
    gh = g * s[None, :]
    mean_gh = jnp.sum(gh, axis=1) / c
    mean_ghx = jnp.sum(gh * xhat, axis=1) / c
    dx = r[:, None] * (gh - mean_gh[:, None] - xhat * mean_ghx[:, None])
    if gx_ref is not None:
      dx = dx + plgpu.load(gx_ref.at[idx], mask=mask, other=0).astype(jnp.float32)
    plgpu.store(dx_ref.at[idx], dx.astype(dx_ref.dtype), mask=mask)
    ds, db, dsum = acc
    # Masked rows load zeros everywhere, so their dx is 0 and adds nothing to dsum.
    dsum = dsum + jnp.sum(dx, axis=0) if colsum else dsum
    return ds + jnp.sum(g * xhat, axis=0), db + jnp.sum(g, axis=0), dsum

  zero = jnp.zeros((pl.next_power_of_2(c),), jnp.float32)
  ds, db, dsum = jax.lax.fori_loop(0, steps, body, (zero, zero, zero))
  for k, total in enumerate((ds, db, dsum) if colsum else (ds, db)):
    plgpu.store(parts_ref.at[p, jnp.int32(k), cols], total, mask=cmask)


def _call(kernel, grid, out_shape, like, interpret: bool, cfg: LayerNormConfig):
  from mmts_jax.losses._traversal import varying_like

  pl, plgpu = _pl()
  outs = [jax.ShapeDtypeStruct(shape, dt, **varying_like(like)) for shape, dt in out_shape]
  params = None if interpret else plgpu.CompilerParams(num_warps=cfg.num_warps)
  return pl.pallas_call(
    kernel, out_shape=outs, grid=(grid,), compiler_params=params, interpret=interpret
  )


def _check(x: jax.Array, scale: jax.Array, name: str) -> tuple[int, int]:
  if x.ndim != 2 or scale.shape != (x.shape[1],):
    raise ValueError(
      f"{name}: x must be (N, C) and scale / bias (C,), got {x.shape} and {scale.shape}"
    )
  return x.shape[0], x.shape[1]


def layer_norm_fwd(
  x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(y, mu, r)` of the rows of `x (N, C)`: y in `dtype`, mu and r float32 `(N,)`.

  Example:
    >>> set_pallas_layer_norm("interpret")
    >>> y, mu, r = layer_norm_fwd(jnp.array([[1.0, 3.0]]), jnp.ones(2), jnp.zeros(2), 0.0,
    ...                           jnp.float32)
    >>> y.tolist(), mu.tolist(), r.tolist()
    ([[-1.0, 1.0]], [2.0], [1.0])
    >>> set_pallas_layer_norm(None)
  """
  _check(x, scale, "layer_norm_fwd")
  return _fwd_rows(float(epsilon), jnp.dtype(dtype), *_settings(), x, scale, bias)


def _settings() -> tuple[bool, LayerNormConfig]:
  """The mode and blocks now, passed on as static arguments: the partitioned calls are built
  when the program compiles, and must see the settings of the trace."""
  return _SWITCH.interpret, _CONFIG[0]


def _fwd_local(epsilon, dtype, interpret, cfg, x, *args):
  """The forward kernel on the rows it is given (all of them, or one device's): `args` are
  `(scale, bias)`, or `(z, a, scale, bias)` for `add_layer_norm_fwd` (h is then the first
  result)."""
  n, c = x.shape
  rows = cfg.rows_fwd
  f32 = jnp.float32
  add = len(args) == 4
  kernel = lambda *refs: _fwd_kernel(rows, n, c, epsilon, add, *refs)
  out = [((n, c), x.dtype)] * add + [((n, c), dtype), ((n,), f32), ((n,), f32)]
  return tuple(_call(kernel, _cdiv(n, rows), out, x, interpret, cfg)(x, *args))


def add_layer_norm_fwd(
  x: jax.Array,
  z: jax.Array,
  a: jax.Array,
  scale: jax.Array,
  bias: jax.Array,
  epsilon: float,
  dtype,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """`(h, y, mu, r)`: the stream `h = x + z + a` (a block's skip input x, its branch z and
  the branch's bias a `(C,)`; summed in float32, rounded once to x's dtype) and `layer_norm_fwd`
  of h, from one kernel that reads x and z and writes h and y (no separate add).

  Example:
    >>> set_pallas_layer_norm("interpret")
    >>> h, y, mu, r = add_layer_norm_fwd(jnp.array([[1.0, 1.0]]), jnp.array([[0.0, 2.0]]),
    ...                                  jnp.array([0.0, 0.0]), jnp.ones(2), jnp.zeros(2), 0.0,
    ...                                  jnp.float32)
    >>> h.tolist(), y.tolist(), mu.tolist()
    ([[1.0, 3.0]], [[-1.0, 1.0]], [2.0])
    >>> set_pallas_layer_norm(None)
  """
  _check(x, scale, "add_layer_norm_fwd")
  if z.shape != x.shape or a.shape != scale.shape:
    raise ValueError(
      f"add_layer_norm_fwd: z must be {x.shape} and a {scale.shape}, got {z.shape}, {a.shape}"
    )
  return _fwd_add_rows(float(epsilon), jnp.dtype(dtype), *_settings(), x, z, a, scale, bias)


def layer_norm_bwd(
  x: jax.Array,
  mu: jax.Array,
  r: jax.Array,
  scale: jax.Array,
  g: jax.Array,
  residual: jax.Array | None = None,
  column_sum: bool = False,
) -> tuple[jax.Array, ...]:
  """`(dx, dscale, dbias)` from the forward's residuals and `g = dL/dy (N, C)`: dx in x's
  dtype, dscale and dbias float32 `(C,)`. `column_sum` (with `residual`): a fourth result, the
  float32 sum of dx over the rows (before dx's rounding), from the same kernel: the gradient
  of the bias `add_layer_norm_fwd` added to the stream.

  `residual` (optional, `(N, C)`, any float dtype): a cotangent that reaches x by another path
  (a pre-LN block's skip connection), added to dx inside the same kernel before dx is written,
  in float32: `dx = residual + r (gh - mean(gh) - xhat mean(gh xhat))`, one rounding to x's
  dtype (`residual_layer_norm`; BENCHMARKS.md run 16).

  Example:
    >>> set_pallas_layer_norm("interpret")
    >>> x = jnp.array([[1.0, 3.0], [0.0, 4.0]])
    >>> dx, ds, db = layer_norm_bwd(x, jnp.array([2.0, 2.0]), jnp.array([1.0, 0.5]),
    ...                             jnp.ones(2), jnp.array([[1.0, 0.0], [0.0, 1.0]]))
    >>> dx.tolist(), ds.tolist(), db.tolist()
    ([[0.0, 0.0], [0.0, 0.0]], [-1.0, 1.0], [1.0, 1.0])
    >>> dx, _, _ = layer_norm_bwd(x, jnp.array([2.0, 2.0]), jnp.array([1.0, 0.5]),
    ...                           jnp.ones(2), jnp.array([[1.0, 0.0], [0.0, 1.0]]), residual=x)
    >>> dx.tolist()
    [[1.0, 3.0], [0.0, 4.0]]
    >>> set_pallas_layer_norm(None)
  """
  n, c = _check(x, scale, "layer_norm_bwd")
  if g.shape != x.shape or mu.shape != (n,) or r.shape != (n,):
    raise ValueError(
      f"layer_norm_bwd: g must be {x.shape} and mu, r ({n},), got {g.shape}, {mu.shape}, {r.shape}"
    )
  if residual is None:
    if column_sum:
      raise ValueError("layer_norm_bwd: column_sum needs residual")
    return _bwd_rows(*_settings(), x, mu, r, scale, g)
  if residual.shape != x.shape:
    raise ValueError(f"layer_norm_bwd: residual must be {x.shape}, got {residual.shape}")
  if column_sum:
    return _bwd_sum_rows(*_settings(), x, mu, r, scale, g, residual)
  return _bwd_res_rows(*_settings(), x, mu, r, scale, g, residual)


def _bwd_local(interpret, cfg, x, mu, r, scale, g, *residual):
  """The backward kernel on the rows it is given: dx (plus `residual`, if given: at most one)
  and the sums of ds, db over those rows."""
  return _bwd_impl(interpret, cfg, False, x, mu, r, scale, g, *residual)


def _bwd_sum_local(interpret, cfg, x, mu, r, scale, g, residual):
  """As `_bwd_local` with the residual, and the sum of dx over the rows as a fourth result."""
  return _bwd_impl(interpret, cfg, True, x, mu, r, scale, g, residual)


def _bwd_impl(interpret, cfg, colsum, x, mu, r, scale, g, *residual):
  n, c = x.shape
  blocks = _cdiv(n, cfg.rows_bwd)
  programs = min(blocks, cfg.programs_bwd)
  steps = _cdiv(blocks, programs)
  programs = _cdiv(blocks, steps)  # no program without a block
  kernel = lambda *refs: _bwd_kernel(cfg.rows_bwd, steps, n, c, bool(residual), colsum, *refs)
  f32 = jnp.float32
  out = [((n, c), x.dtype), ((programs, 3 if colsum else 2, c), f32)]
  dx, parts = _call(kernel, programs, out, x, interpret, cfg)(x, mu, r, scale, g, *residual)
  return (dx, *jnp.sum(parts, axis=0))


# Rows sharded as x's, features replicated; ds and db all-reduced over the row axes.
_fwd_rows = row_partitioned(_fwd_local, (ROWS, FEATURES, FEATURES), (ROWS, ROW, ROW), 4)
_bwd_rows = row_partitioned(_bwd_local, (ROWS, ROW, ROW, FEATURES, ROWS), (ROWS, SUM, SUM), 2)
# The same with the skip connection's cotangent: rows, sharded as x's.
_bwd_res_rows = row_partitioned(
  _bwd_local, (ROWS, ROW, ROW, FEATURES, ROWS, ROWS), (ROWS, SUM, SUM), 2
)
# `add_layer_norm`: the branch z sharded as x, its bias a replicated, h one more rows result;
# the backward's column sum of dx (the bias's gradient) all-reduced as ds, db.
_fwd_add_rows = row_partitioned(
  _fwd_local, (ROWS, ROWS, FEATURES, FEATURES, FEATURES), (ROWS, ROWS, ROW, ROW), 4
)
_bwd_sum_rows = row_partitioned(
  _bwd_sum_local, (ROWS, ROW, ROW, FEATURES, ROWS, ROWS), (ROWS, SUM, SUM, SUM), 2
)


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)
