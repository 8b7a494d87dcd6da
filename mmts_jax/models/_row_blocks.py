"""Block helpers shared by the row-wise Pallas (Triton) kernels of the towers (`pallas_gelu`,
`pallas_qkv`): a program covers `steps` sub-blocks of `(bm, bn)` one after the other down the
rows of an `(N, F)` matrix; rows and columns past the edges are masked."""

from __future__ import annotations

import jax.numpy as jnp


def pl_modules():
  """`(pallas, pallas.triton)`, imported when a kernel is built."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  return pl, plgpu


def load(ref, mask):
  """The block of `ref`; with `mask`, zeros where it is False (rows or columns past the edge)."""
  if mask is None:
    return ref[...]
  _, plgpu = pl_modules()
  return plgpu.load(ref, mask=mask, other=0)


def store(ref, value, mask):
  if mask is None:
    ref[...] = value
  else:
    _, plgpu = pl_modules()
    plgpu.store(ref, value, mask=mask)


def edges(cfg, n, f):
  """Masks of the program's valid columns `(bn,)` and, per sub-block k, `(bm, bn)`, or None
  where the blocks divide N (F) and nothing needs masking. The program ids are read here,
  outside the loop over sub-blocks (the interpreter substitutes them only at the kernel's top
  level)."""
  pl, _ = pl_modules()
  i, j = pl.program_id(0), pl.program_id(1)
  col_ok = None
  if f % cfg.bn:
    col_ok = j * cfg.bn + jnp.arange(cfg.bn) < f
  ragged_rows = n % (cfg.bm * cfg.steps) != 0

  def rows(k):
    if not ragged_rows:
      return None if col_ok is None else jnp.broadcast_to(col_ok[None, :], (cfg.bm, cfg.bn))
    ok = ((i * cfg.steps + k) * cfg.bm + jnp.arange(cfg.bm) < n)[:, None]
    ok = ok if col_ok is None else ok & col_ok[None, :]
    return jnp.broadcast_to(ok, (cfg.bm, cfg.bn))

  return col_ok, rows


def sub_block(cfg, k):
  """The rows of sub-block k within the program's block."""
  pl, _ = pl_modules()
  return pl.ds(pl.multiple_of(k * cfg.bm, cfg.bm), cfg.bm)
