r"""The fused q/k/v product's split and bias add, whose backward joins dq, dk, dv and sums the
bias gradient in one Pallas (Triton) kernel.

For `h (..., 3, H, D)`, the product `x [Wq Wk Wv]` without its bias, and the bias
`b (3, H, D)`:

.. math::
  q = h_{\cdot,0} + b_0,\quad k = h_{\cdot,1} + b_1,\quad v = h_{\cdot,2} + b_2,
  \qquad dh_{\cdot,t} = (dq, dk, dv)_t,\qquad db_t = \textstyle\sum_{\text{rows}} dh_{\cdot,t}.

`split_qkv(h, b)` is that split (XLA: a slice and an add per t, one fusion). Its backward is
the join of the three cotangents into one `(..., 3, H, D)` tensor for the product's backward
pass, and the bias gradient. On issue 17's H200 profile XLA does both in one fusion per block at
about 54% of the memory bandwidth (2.2 ms of a ViT-B/16 step for the image tower's 12 blocks:
`input_add_reduce_fusion`, with its partial sums in bfloat16). Here, on GPUs, one kernel over a
grid of `(row blocks, 3 x F / bn)` programs reads each cotangent once as rows `(N, F)` (F = H D;
cuDNN's dq, dk, dv are laid out (B, L, H, D), so the rows are free), writes its columns of
`dh (N, 3F)` and, per program, the float32 sums of its rows (`(programs along N, 3F)`, no
atomics), whose sum is db. Elsewhere (and for an F that no block width of at least 16
divides) the same maths in jnp. The switch and block shapes are `set_pallas_qkv` and
`QkvConfig`, as `pallas_gelu`'s. On one H200 the whole ViT-B/16 train step was 0.6-0.7 ms
faster with it (runs 21, 22 of benchmarks/BENCHMARKS.md; the profiles' q/k/v split + join
category: 1.7 ms per step in run 22, 4.4 ms in run 12 without it).

Sharding: the join is a `row_partitioning.row_partitioned` call (rows as the cotangents'
sharding, F replicated, db all-reduced over the rows' axes), as the other row kernels.

Example:
  >>> import jax, jax.numpy as jnp
  >>> h = jnp.arange(24.0).reshape(2, 3, 2, 2)
  >>> b = jnp.ones((3, 2, 2))
  >>> q, k, v = split_qkv(h, b)
  >>> q.shape, float(k[0, 0, 0]), float(v[1, 1, 1])
  ((2, 2, 2), 5.0, 24.0)
  >>> set_pallas_qkv("interpret")  # the Pallas kernel, interpreted on the CPU
  >>> dh, db = jax.grad(lambda h, b: sum(t.sum() for t in split_qkv(h, b)), (0, 1))(h, b)
  >>> set_pallas_qkv(None)
  >>> bool((dh == 1).all()), db.tolist()[0]
  (True, [[2.0, 2.0], [2.0, 2.0]])
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mmts_jax.losses._pallas_tiles import check_powers_of_two
from mmts_jax.models._row_blocks import edges, load, pl_modules, store, sub_block
from mmts_jax.models.kernel_switch import KernelSwitch
from mmts_jax.models.row_partitioning import FEATURES, ROWS, SUM, row_partitioned

__all__ = [
  "QkvConfig",
  "check_split_backward",
  "qkv_config",
  "set_pallas_qkv",
  "set_qkv_config",
  "split_qkv",
]

_SWITCH = KernelSwitch("set_pallas_qkv", (jnp.bfloat16, jnp.float32))
del FEATURES  # the join has no (F,) operand


class QkvConfig(NamedTuple):
  """One program's block: `steps` sub-blocks of `(bm, bn)` down the rows of one cotangent (the
  column sums stay on chip across them), as `pallas_gelu.GeluConfig`; `bn` is lowered to the
  largest power of two (>= 16) that divides F."""

  bm: int = 32
  bn: int = 256
  steps: int = 8
  num_warps: int = 4
  num_stages: int = 2


_DEFAULT = QkvConfig()
_CONFIG: list = [_DEFAULT]


def set_pallas_qkv(mode) -> None:
  """Chooses the backward's path: None (the kernel on GPUs, the default), False (XLA
  everywhere) or "interpret" (the kernel through the Pallas interpreter, any backend)."""
  _SWITCH.set(mode)


def qkv_config() -> QkvConfig:
  """The `QkvConfig` the kernel uses.

  Example:
    >>> qkv_config().bn
    256
  """
  return _CONFIG[0]


def set_qkv_config(cfg: QkvConfig | None) -> None:
  """Sets (None: resets) the kernel's `QkvConfig`; `bm` and `bn` powers of two >= 16."""
  if cfg is None:
    _CONFIG[0] = _DEFAULT
    return
  check_powers_of_two("set_qkv_config", cfg, ("bm", "bn"), at_least=16)
  if cfg.steps < 1:
    raise ValueError(f"set_qkv_config: steps must be >= 1, got {cfg.steps}")
  _CONFIG[0] = cfg


def check_split_backward(value: bool | str) -> bool | str:
  """`split_qkv_backward` checked: False (XLA's backward of the fused product), True (per q, k,
  v: `attention.qkv_projection`) or "pallas" (`split_qkv`'s join kernel).

  Example:
    >>> check_split_backward("pallas"), check_split_backward(False)
    ('pallas', False)
  """
  if isinstance(value, bool) or value == "pallas":
    return value
  raise ValueError(f"split_qkv_backward must be False, True or 'pallas', got {value!r}")


def _width(cfg: QkvConfig, f: int) -> int | None:
  """The column block: the largest power of two <= cfg.bn that divides F, at least 16."""
  bn = cfg.bn
  while bn >= 16 and f % bn:
    bn //= 2
  return bn if bn >= 16 else None


def _use_kernel(g: jax.Array) -> bool:
  if g.size == 0 or _width(_CONFIG[0], g.shape[-1] * g.shape[-2]) is None:
    return False
  return _SWITCH.on(g.dtype)


def _join_kernel(cfg, n, f, dq_ref, dk_ref, dv_ref, dh_ref, db_ref):
  """Program (i, j): columns `j % (F / bn)` of cotangent `j // (F / bn)` for the rows of block
  i, copied to columns j of dh, and their float32 sums over those rows."""
  pl, _ = pl_modules()
  per = f // cfg.bn
  t = pl.program_id(1) // per
  _, row_ok = edges(cfg, n, f)

  def copy(ref):
    def body(k, acc):
      rows, mask = sub_block(cfg, k), row_ok(k)
      g = load(ref.at[rows, :], mask)
      store(dh_ref.at[rows, :], g.astype(dh_ref.dtype), mask)
      return acc + jnp.sum(g.astype(jnp.float32), axis=0)

    db = lax.fori_loop(0, cfg.steps, body, jnp.zeros((cfg.bn,), jnp.float32))
    store(db_ref, db, None)

  for index, ref in enumerate((dq_ref, dk_ref, dv_ref)):
    pl.when(t == index)(lambda ref=ref: copy(ref))


def _join_local(interpret, cfg, dq, dk, dv):
  """The join on the rows it is given: `(dh (N, 3F), db (3F,))`."""
  pl, plgpu = pl_modules()
  n, f = dq.shape
  bm = max(16, min(cfg.bm, 1 << max(n - 1, 0).bit_length()))
  cfg = cfg._replace(bn=_width(cfg, f), bm=bm, steps=max(1, min(cfg.steps, -(-n // bm))))
  rows = cfg.bm * cfg.steps
  per = f // cfg.bn
  grid = (pl.cdiv(n, rows), 3 * per)
  in_block = pl.BlockSpec((rows, cfg.bn), lambda i, j: (i, j % per))
  out_block = pl.BlockSpec((rows, cfg.bn), lambda i, j: (i, j))
  parts_block = pl.BlockSpec((None, cfg.bn), lambda i, j: (i, j))
  params = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
  dh, parts = pl.pallas_call(
    lambda *refs: _join_kernel(cfg, n, f, *refs),
    out_shape=[
      jax.ShapeDtypeStruct((n, 3 * f), dq.dtype),
      jax.ShapeDtypeStruct((grid[0], 3 * f), jnp.float32),
    ],
    grid=grid,
    in_specs=[in_block] * 3,
    out_specs=[out_block, parts_block],
    compiler_params=None if interpret else plgpu.CompilerParams(**params),
    interpret=interpret,
  )(dq, dk, dv)
  return dh, jnp.sum(parts, axis=0)


# Rows sharded as the cotangents', features replicated; db all-reduced over the row axes.
_join_rows = row_partitioned(_join_local, (ROWS, ROWS, ROWS), (ROWS, SUM), 2)


def _split(h, b) -> tuple[jax.Array, jax.Array, jax.Array]:
  b = b.astype(h.dtype)
  return h[..., 0, :, :] + b[0], h[..., 1, :, :] + b[1], h[..., 2, :, :] + b[2]


@jax.custom_vjp
def split_qkv(h: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(q, k, v)` from `h (..., 3, H, D)` and `b (3, H, D)` (module docstring), in h's dtype.

  Example:
    >>> q, k, v = split_qkv(jnp.zeros((4, 3, 2, 8)), jnp.ones((3, 2, 8)))
    >>> q.shape, float(v.sum())
    ((4, 2, 8), 64.0)
  """
  if h.ndim < 3 or h.shape[-3] != 3 or b.shape != h.shape[-3:]:
    raise ValueError(
      f"split_qkv: h must be (..., 3, H, D) and b (3, H, D), got {h.shape} and {b.shape}"
    )
  return _split(h, b)


def _fwd(h, b):
  return split_qkv(h, b), (jnp.zeros((0,), h.dtype), jnp.zeros((0,), b.dtype))


def _bwd(residuals, grads):
  h_like, b_like = residuals
  dq, dk, dv = (g.astype(h_like.dtype) for g in grads)
  lead, (heads, d) = dq.shape[:-2], dq.shape[-2:]
  if _use_kernel(dq):
    rows = lambda g: g.reshape(-1, heads * d)
    dh, db = _join_rows(_SWITCH.interpret, _CONFIG[0], rows(dq), rows(dk), rows(dv))
    dh = dh.reshape(*lead, 3, heads, d)
  else:
    dh = jnp.stack([dq, dk, dv], axis=-3)
    db = jnp.sum(dh.astype(jnp.float32), axis=tuple(range(dh.ndim - 3)))
  return dh, db.reshape(3, heads, d).astype(b_like.dtype)


split_qkv.defvjp(_fwd, _bwd)
