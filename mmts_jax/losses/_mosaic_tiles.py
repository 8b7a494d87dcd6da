r"""Tile kernels for Hopper in Pallas Mosaic GPU: wgmma from shared memory fed by TMA.

The Triton kernels of `_pallas_tiles` compute each `(128, 128)` similarity sub-tile with Triton's
own matmul (operands re-read for each sub-tile, the epilogue not overlapped with loads). These
kernels are warp-specialised: one warpgroup only issues TMA copies of `D`-chunks of the row and
column embeddings into a ring of shared-memory stages, two compute warpgroups each run `wgmma`
on `(tile_m, tile_n)` of the tile (float32 accumulators in registers) and then its epilogue,
while the copy warpgroup already fills the stages of the next tile. The CTAs are persistent: one
per SM, each walking its share of the tile's sub-tiles. bfloat16 embeddings multiply in bf16,
float32 ones in tf32 (JAX's default precision on GPUs; `_pallas_tiles` sends float32 at a higher
`precision` to the XLA tiles).

One kernel body (`_pass`) serves every pass; each pass gives the epilogue of one sub-tile
`S = X_r Y_c^T`. InfoNCE, as `_pallas_tiles._nce_stats_kernel` / `_nce_ds_kernel` (base-2
scales `a = log2(e) / tau`):

.. math::
  \text{fwd: } m^r_i = a_i \max_j S_{ij},\ l^r_i = \sum_j 2^{a_i S_{ij} - m^r_i}
  \ \text{(and the same per column)};\qquad
  \text{bwd: } dS_{ij} = w^r_i 2^{a_i S_{ij} - L^r_i} + w^c_j 2^{a_j S_{ij} - L^c_j}.

Max-margin, as `_pallas_tiles._mm_stats_kernel` / `_mm_ds_kernel`, on cosines
`c_ij = S_ij r_i q_j` off the diagonal (row id != column id):

.. math::
  \text{fwd: } \sum_j [o^r_i + c_{ij}]_+,\ \#\{j: o^r_i + c_{ij} > 0\}
  \ \text{(and per column)};\qquad
  \text{bwd: } dS_{ij} = g^r_i [o^r_i + c_{ij} > 0] + g^c_j [o^c_j + c_{ij} > 0],

written as `dS r q^T` (the scales' gradients follow from the products). The kernels write
per-sub-tile partials that `_pallas_tiles` merges; the gradient products `dS Y`, `dS^T X` stay
on cuBLAS. Only unpadded tiles whose edges the configuration divides take these kernels
(`supported`); everything else keeps the Triton or XLA tiles. On CPU they run through Pallas's
GPU interpreter (`interpret=True`, which needs more than one host device, as the tests' XLA
flags give), which the tests use.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mmts_jax.losses._traversal import varying_like

__all__ = [
  "MosaicConfig",
  "config",
  "mm_ds",
  "mm_stats",
  "nce_ds",
  "nce_stats",
  "profiling",
  "set_config",
  "supported",
]


class MosaicConfig(NamedTuple):
  """`tile_m` rows per compute warpgroup (`wgs` of them per CTA, sharing the column operand),
  `tile_n` columns, `tile_k` of D per pipeline step, `stages` shared-memory stages in flight,
  `ctas_per_sm` persistent CTAs per SM, `release`: wgmma groups left in flight before a stage is
  handed back to the copy warpgroup (0: each step waits for its products). `lag`: warpgroup 1
  starts its first sub-tile once warpgroup 0 has used every stage of the ring, and the shared
  stages keep it that far behind, so one's epilogue falls on the other's products (a ping-pong
  of FlashAttention-3's kind, here through the shared pipeline). `reduction_scratch`: bytes of
  shared memory for cross-warp reductions (Pallas's `reduction_scratch_bytes`; each batch of
  reduced registers that fits in it costs two warpgroup barriers). `col_chunk`: 0 reduces the
  columns in the products' register layout, where a column spans the four warps of a warpgroup
  (shuffles, then shared memory and barriers); `c > 0` stores the sub-tile (the backward: each
  tile it sums per column, dS first) `c` columns at a time in shared memory and reads it back
  transposed, so each column lies inside one warp and is reduced as the rows are. The backward's
  slices share the memory of its dS staging, which is written after them. `sliced_ds` (a
  backward with `col_chunk`): its epilogue computes dS one `col_chunk` slice at a time, reading
  that slice's column vectors then, and holds each finished slice in `x`'s dtype until the
  staging is free, so neither the whole float32 dS nor whole-tile column vectors (32 registers
  per thread each for 128 columns) are live at once. `stage_vectors`: as a warpgroup's products
  start, TMA copies its sub-tile's slices of the row and column vectors (temperatures,
  logsumexps, weights, ...) into shared memory, and the epilogue reads them there instead of
  from global memory, whose latency it would otherwise wait for (once for the rows, once per
  slice of columns). `pingpong`: each compute warpgroup takes every other sub-tile of the CTA's
  share with a ring of `stages` stages of its own (`_pingpong_kernel`), so one's epilogue can
  run while the other's products do (FlashAttention-3's ping-pong); the copy warpgroup fills
  the two rings in the order the sub-tiles are taken (`release` applies there too; with
  `col_chunk` 0 the two warpgroups' column parts take turns on the reduction scratch, in the
  order the walk deals the sub-tiles). Only this walk takes `wgs` 3 (with `col_chunk` > 0):
  each warpgroup's epilogue then has two others' products to hide behind.

  Pallas Mosaic GPU gives every warpgroup the same shared-memory scratch for cross-warp
  reductions (the backward's column sums, and the forward's column maxima and sums with
  `col_chunk` 0), so two compute warpgroups take turns for them (`_rows_and_columns`).
  """

  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 64
  stages: int = 4
  wgs: int = 2
  ctas_per_sm: int = 1
  release: int = 0
  lag: bool = False
  reduction_scratch: int = 2048
  col_chunk: int = 0
  sliced_ds: bool = False
  stage_vectors: bool = False
  pingpong: bool = False


# Measured on one H200 (benchmarks/results/mosaic_tiles_h200/, run 3): two compute warpgroups
# of 128 x 128, 4 stages forward, 3 backward (its dS staging takes 64 KiB of shared memory).
# One warpgroup per CTA, two CTAs per SM: 26% slower forward at B = 131,072. float32 embeddings
# (tf32 wgmma) take chunks of 32 features, the same 128 bytes per row as bfloat16's 64; their
# backward stages float32 dS (see the end of this note for its sub-tiles).
# The forward reduces its columns on transposed 64-column slices (`col_chunk`), three stages
# beside them: at B = 131,072 (run 13, one call, medians) the bf16 InfoNCE forward took 43.8 ms
# instead of 52.1 with the cross-warp column reductions (16 KiB of scratch, four stages),
# max-margin 47.7 instead of 58.5; in float32 68.7 vs 75.7 and 72.2 vs 80.3. Staggering the two
# warpgroups (`lag`) then gained nothing (44.1, 48.8). The backward keeps Pallas's 2 KiB of
# scratch: 16 KiB in both passes was no faster end to end for InfoNCE bf16 (run 10).
# The bf16 backward works on 64-column slices (`sliced_ds`): ptxas spilled 296 bytes per thread
# of the InfoNCE dS program on whole sub-tiles and 48 on slices, max-margin's 940 and 148
# (ptxas1_h200.json); at B = 131,072 with both passes on Mosaic, fwd+bwd 167.5 ms instead of
# 171.6 (InfoNCE), 170.0 instead of 219.8 (max-margin; run 17, medians). The float32 backward
# has one slice per sub-tile (no `sliced_ds`), and takes 64 x 128 sub-tiles per
# warpgroup (its float32 dS staging, 64 KiB for two, leaves room for four stages of 32 KiB): one
# m64n128 tf32 wgmma reads 6 KiB of shared memory per 64K multiply-adds where the 128 x 64
# sub-tiles' two m64n64 read 8. At B = 131,072 (run 22, one call, medians and ranges) InfoNCE
# took 287.0 (282.0-290.7) ms instead of 299.2 (294.0-301.8) on 128 x 64 sub-tiles, max-margin
# 282.4 (279.5-286.2) instead of 292.7 (286.3-295.9); with three stages 293.9 and 289.9, ranges
# overlapping the 128 x 64 sub-tiles'.
_DEFAULTS = {
  ("fwd", "bfloat16"): MosaicConfig(stages=3, col_chunk=64),
  ("bwd", "bfloat16"): MosaicConfig(stages=3, col_chunk=64, sliced_ds=True),
  ("fwd", "float32"): MosaicConfig(tile_k=32, stages=3, col_chunk=64),
  ("bwd", "float32"): MosaicConfig(tile_m=64, tile_n=128, tile_k=32, stages=4, col_chunk=128),
}
CONFIGS = dict(_DEFAULTS)
DTYPES = ("bfloat16", "float32")


def _key(kind: str, dtype) -> tuple[str, str]:
  name = jnp.dtype(dtype).name
  if kind not in ("fwd", "bwd"):
    raise ValueError(f"kind must be 'fwd' or 'bwd', got {kind!r}")
  if name not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {name}")
  return kind, name


def config(kind: str, dtype=jnp.bfloat16) -> MosaicConfig:
  """The `MosaicConfig` of pass `kind` ("fwd" or "bwd") for embeddings of `dtype`.

  Example:
    >>> config("fwd", jnp.float32).tile_k
    32
  """
  return CONFIGS[_key(kind, dtype)]


def set_config(kind: str, cfg: MosaicConfig | None, dtype=jnp.bfloat16) -> None:
  """Sets (None: resets) the `MosaicConfig` of pass `kind` ("fwd" or "bwd") and `dtype`. It
  applies to kernels traced afterwards: a function JAX has already traced keeps the kernels it
  was traced with (jit caches per function and arguments, not per configuration)."""
  try:
    key = _key(kind, dtype)
  except ValueError as e:
    raise ValueError(f"set_config: {e}") from None
  if cfg is not None:
    # wgmma's shapes: 64-row warpgroup tiles, columns in 8s up to 256; chunks of D fill whole
    # 128-byte swizzles; the pipeline keeps `release` stages besides the one in use.
    # Three compute warpgroups: on the ping-pong walk only, where each has its own ring and
    # sub-tiles (the shared pipeline's turns and `lag` are written for two).
    if cfg.wgs not in ((1, 2, 3) if cfg.pingpong else (1, 2)):
      raise ValueError(
        f"set_config: wgs must be 1 or 2 (3 with pingpong), got {cfg.wgs} (pingpong={cfg.pingpong})"
      )
    if cfg.tile_m % 64 or not 0 < cfg.tile_n <= 256 or cfg.tile_n % 8:
      raise ValueError(
        f"set_config: tile_m must be a multiple of 64 and tile_n of 8 up to 256, got "
        f"{cfg.tile_m} x {cfg.tile_n}"
      )
    chunk = 128 // jnp.dtype(dtype).itemsize
    if cfg.tile_k <= 0 or cfg.tile_k % chunk:
      raise ValueError(
        f"set_config: tile_k must be a multiple of {chunk} for {key[1]}, got {cfg.tile_k}"
      )
    if not 0 <= cfg.release < cfg.stages:
      raise ValueError(
        f"set_config: need 0 <= release < stages, got release {cfg.release}, stages {cfg.stages}"
      )
    if cfg.ctas_per_sm < 1:
      raise ValueError(f"set_config: ctas_per_sm must be >= 1, got {cfg.ctas_per_sm}")
    # The ping-pong walk staggers its warpgroups itself, one sub-tile apart.
    if cfg.pingpong and cfg.lag:
      raise ValueError("set_config: pingpong staggers the warpgroups itself; it takes no lag")
    if cfg.wgs == 3 and not cfg.col_chunk:
      raise ValueError(
        "set_config: three warpgroups reduce their columns on transposed slices; they need "
        "col_chunk > 0 (the turns on the reduction scratch are written for two)"
      )
    # The transposed read takes whole 64-row wgmma tiles of S^T.
    if cfg.col_chunk and (cfg.col_chunk % 64 or cfg.tile_n % cfg.col_chunk):
      raise ValueError(
        f"set_config: col_chunk must be 0, or a multiple of 64 dividing tile_n {cfg.tile_n}, "
        f"got {cfg.col_chunk}"
      )
    if cfg.sliced_ds and not cfg.col_chunk:
      raise ValueError("set_config: sliced_ds works on col_chunk slices; it needs col_chunk > 0")
    # One batch of a cross-warp reduction: 4 warps x 32 lanes x 2 float32s.
    if cfg.reduction_scratch < 1024 or cfg.reduction_scratch % 1024:
      raise ValueError(
        f"set_config: reduction_scratch must be a positive multiple of 1024 bytes, got "
        f"{cfg.reduction_scratch}"
      )
  CONFIGS[key] = _DEFAULTS[key] if cfg is None else cfg


def supported(rows: int, cols: int, d: int, dtype, kind: str = "fwd") -> bool:
  """Whether a `(rows, cols)` tile over `d` features of `dtype` fits pass `kind`'s kernel."""
  if jnp.dtype(dtype).name not in DTYPES:
    return False
  cfg = config(kind, dtype)
  # The shared pipeline's CTA tile is `wgs` sub-tiles tall; the ping-pong walk deals single ones.
  rows_per_tile = cfg.tile_m * (1 if cfg.pingpong else cfg.wgs)
  return rows % rows_per_tile == 0 and cols % cfg.tile_n == 0 and d % cfg.tile_k == 0


def _num_sms() -> int:
  try:
    return int(jax.devices()[0].core_count)
  except (AttributeError, TypeError, ValueError):
    return 132  # interpreter on CPU: any count is correct, this one is an H100 / H200's


def _plgpu():
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  return pl, plgpu


def _load(ref, layout, interpret):
  """`ref` (a GMEM vector slice) into registers in `layout`. The interpreter has no rule for
  `plgpu.load` (nor for layouts, which do not change values): a plain read there."""
  _, plgpu = _plgpu()
  if interpret:
    return ref[...]
  return plgpu.load(ref, (), layout=layout, optimized=False)


def _load_transposed(ref, interpret):
  """The transpose of a `(rows, cols)` float32 SMEM `ref` in registers, in the transposed wgmma
  layout (where each row of the result, a column of `ref`, lies inside one warp)."""
  _, plgpu = _plgpu()
  if interpret:
    return ref[...].T
  t = plgpu.transpose_ref(ref, (1, 0))
  return plgpu.load(t, (), layout=plgpu.Layout.WGMMA_TRANSPOSED, optimized=True)


def _struct(shape, dtype, like):
  return jax.ShapeDtypeStruct(shape, dtype, **(varying_like(like) if like is not None else {}))


def _swizzled(cols: int, dtype):
  """Shared-memory transforms of a buffer with `cols` minor elements of `dtype`: 8-row tiles as
  wide as the largest swizzle those bytes allow, swizzled (what TMA and wgmma read)."""
  _, plgpu = _plgpu()
  item = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(cols * item * 8)
  return (plgpu.TilingTransform((8, swizzle // item)), plgpu.SwizzleTransform(swizzle))


def _bcast(v, shape, dim):
  return lax.broadcast_in_dim(v, shape, [dim])


class _Tile(NamedTuple):
  """Where one warpgroup's sub-tile lies, and what its epilogue needs to take turns."""

  row0: jax.Array  # first row of the sub-tile in the tile
  part: jax.Array  # row0 // tile_m, the row of the column partials it writes
  col0: jax.Array  # first column
  n_idx: jax.Array  # column sub-tile
  wg: jax.Array  # compute warpgroup
  first: jax.Array  # the CTA's first sub-tile
  last: jax.Array  # its last
  turn: Any  # two barriers passing the turn between two compute warpgroups, or None


def _rows_and_columns(tile: _Tile, rows, columns) -> None:
  """Runs `rows()` and `columns()` (the part with cross-warp reductions) of one epilogue.

  Pallas Mosaic GPU gives every warpgroup the same shared-memory scratch for cross-warp
  reductions, so with two compute warpgroups their column parts take turns: warpgroup 0 does
  its columns, then its rows; warpgroup 1 its rows, then (once 0 is done) its columns. The
  turns also stagger the two warpgroups' exponentials."""
  pl, plgpu = _plgpu()
  if tile.turn is None:
    rows()
    columns()
    return
  turn = tile.turn

  @pl.when(tile.wg == 0)
  def _first():
    @pl.when(jnp.logical_not(tile.first))
    def _wait():
      with jax.named_scope("wait"):
        plgpu.barrier_wait(turn.at[1])  # warpgroup 1 is done with the last sub-tile's columns

    columns()
    plgpu.barrier_arrive(turn.at[0])
    rows()

    @pl.when(tile.last)
    def _drain():
      plgpu.barrier_wait(turn.at[1])  # every phase of a barrier is waited for

  @pl.when(tile.wg == 1)
  def _second():
    rows()
    with jax.named_scope("wait"):
      plgpu.barrier_wait(turn.at[0])
    columns()
    plgpu.barrier_arrive(turn.at[1])


def _tiled_kernel(
  cfg: MosaicConfig, x_g, y_g, epilogue, scratch, y_transposed=False, prologue=None
):
  """The shared skeleton: the persistent walk over sub-tiles, the TMA/wgmma pipeline over D,
  then `epilogue(s, tile, scratch)` per warpgroup with its float32 `(tile_m, tile_n)`
  similarities `s` and its `_Tile`; `prologue(tile, scratch)`, if given, runs before the
  products. `y_transposed`: `y_g` holds `Y^T` (the interpreter's wgmma cannot read a
  transposed shared-memory operand)."""
  pl, plgpu = _plgpu()
  br, d = x_g.shape
  bc = y_g.shape[1] if y_transposed else y_g.shape[0]
  tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
  m_iters, n_iters, k_iters = br // (cfg.wgs * tm), bc // tn, d // tk
  transforms = _swizzled(tk, x_g.dtype)
  y_transforms = _swizzled(tn, x_g.dtype)

  rel = {"delay_release": cfg.release} if cfg.release else {}
  x_kw = {"transforms": transforms, **rel}

  def pipeline(body, context):
    return plgpu.emit_pipeline_warp_specialized(
      body,
      grid=(k_iters,),
      memory_registers=40,
      in_specs=[
        plgpu.BlockSpec((cfg.wgs * tm, tk), lambda k: (0, k), **x_kw),
        plgpu.BlockSpec((tk, tn), lambda k: (k, 0), transforms=y_transforms, **rel)
        if y_transposed
        else plgpu.BlockSpec((tn, tk), lambda k: (0, k), **x_kw),
      ],
      wg_axis="wg",
      num_compute_wgs=cfg.wgs,
      max_concurrent_steps=min(cfg.stages, k_iters),
      compute_context=context,
    )

  def ignore(*_, **__):
    return None

  @functools.partial(
    pl.run_scoped,
    allocs=pipeline(ignore, ignore).get_allocations(x_g, y_g),
    scratch=scratch,
    # Two warpgroups share the cross-warp reduction scratch: their column parts take turns
    # (transposed columns need no cross-warp reductions).
    turn=plgpu.Barrier(num_arrivals=1, num_barriers=2)
    if cfg.wgs == 2 and not cfg.col_chunk
    else None,
    go=plgpu.Barrier(num_arrivals=1) if cfg.wgs == 2 and cfg.lag else None,
    collective_axes="wg",
  )
  def _scope(allocs, scratch, turn, go):
    wg = lax.axis_index("wg")
    # The last step warpgroup 0 can take alone: the ring's stages are full until 1 reads them.
    lead = min(cfg.stages, k_iters) - 1

    @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
    def _tiles(info):
      (lin,) = info.index
      # Column sub-tiles innermost: the CTA's rows of X stay hot in L2 across them.
      m_idx, n_idx = lin // n_iters, lin % n_iters
      tile = _Tile(
        row0=m_idx * (cfg.wgs * tm) + wg * tm,
        # As a product, not `row0 // tm`: with the quotient (session 17's 6907c2a to 9502e3a)
        # the bf16 max-margin forward took 53.8-54.0 ms at B = 131,072 (medians of runs 30-33),
        # against 46.2-47.5 before (runs 25-29) and 47.7 with this again (run 34), InfoNCE's
        # 41.6-43.3 throughout (results/loss_h200_session17/, results/loss_h200_session18/).
        part=m_idx * cfg.wgs + wg,
        col0=n_idx * tn,
        n_idx=n_idx,
        wg=wg,
        first=info.local_index == 0,
        last=info.local_index == info.num_local_steps - 1,
        turn=turn,
      )

      def context(run):
        if prologue is not None:
          prologue(tile, scratch)

        @functools.partial(pl.run_scoped, acc=plgpu.ACC((tm, tn), jnp.float32))
        def _acc(acc):
          # Named scopes are regions of Mosaic GPU's on-device profiler (`profiling`); without
          # it they cost nothing.
          with jax.named_scope("mma"):
            run(acc)
          with jax.named_scope("epilogue"):
            epilogue(acc[...], tile, scratch)

      def mma(idx, x_s, y_s, acc):
        (k,) = idx
        if go is not None:

          @pl.when(tile.first & (wg == 1) & (k == 0))
          def _late():
            plgpu.barrier_wait(go)

        y_op = y_s if y_transposed else plgpu.transpose_ref(y_s, (1, 0))
        plgpu.wgmma(acc, x_s.at[pl.ds(wg * tm, tm)], y_op)
        plgpu.wgmma_wait(cfg.release)
        if go is not None:

          @pl.when(tile.first & (wg == 0) & (k == lead))
          def _start_the_other():
            plgpu.barrier_arrive(go)

        return acc

      pipeline(mma, context)(
        x_g.at[pl.ds(m_idx * (cfg.wgs * tm), cfg.wgs * tm), :],
        y_g.at[:, pl.ds(tile.col0, tn)] if y_transposed else y_g.at[pl.ds(tile.col0, tn), :],
        allocations=allocs,
      )

  # Every TMA store issued by the epilogues must land before the kernel exits.
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _pingpong_kernel(
  cfg: MosaicConfig, x_g, y_g, epilogue, scratch, y_transposed=False, prologue=None
):
  """`_tiled_kernel`'s contract on another walk: the CTA's share of `(tile_m, tile_n)`
  sub-tiles is dealt to its compute warpgroups in turn (local sub-tile t to warpgroup
  t % wgs), each with its own ring of `stages` shared-memory stages holding that sub-tile's
  rows and columns, `tile_k` features at a time. The copy warpgroup fills the rings in the
  order of the sub-tiles, waiting only for the ring it fills: while one warpgroup is in its
  epilogue, the next one's products run from its own ring."""
  pl, plgpu = _plgpu()
  br, d = x_g.shape
  bc = y_g.shape[1] if y_transposed else y_g.shape[0]
  tm, tn, tk, wgs, depth = cfg.tile_m, cfg.tile_n, cfg.tile_k, cfg.wgs, cfg.stages
  m_iters, n_iters, k_iters = br // tm, bc // tn, d // tk
  dtype = x_g.dtype
  y_block = (tk, tn) if y_transposed else (tn, tk)
  y_transforms = _swizzled(tn if y_transposed else tk, dtype)

  @functools.partial(
    pl.run_scoped,
    xs=plgpu.SMEM((wgs, depth, tm, tk), dtype, transforms=_swizzled(tk, dtype)),
    ys=plgpu.SMEM((wgs, depth, *y_block), dtype, transforms=y_transforms),
    # Per warpgroup and stage: filled (two copies) and released (by its warpgroup).
    full=plgpu.Barrier(num_arrivals=2, num_barriers=wgs * depth),
    free=plgpu.Barrier(num_arrivals=1, num_barriers=wgs * depth),
    # Columns reduced across warps (`col_chunk` 0) share Pallas's reduction scratch: the two
    # warpgroups' column parts take turns (`_rows_and_columns`), in the walk's order anyway.
    turn=plgpu.Barrier(num_arrivals=1, num_barriers=2) if wgs == 2 and not cfg.col_chunk else None,
    scratch=scratch,
    collective_axes="wg",
  )
  def _scope(xs, ys, full, free, turn, scratch):
    wg = lax.axis_index("wg")

    def sub_tile(info):
      """The local sub-tile's indices, its warpgroup, and the running count of that
      warpgroup's pipeline steps before it (which picks the stages and barrier phases)."""
      (lin,) = info.index
      m_idx, n_idx = lin // n_iters, lin % n_iters
      t = info.local_index
      return m_idx, n_idx, t % wgs, (t // wgs) * k_iters

    @pl.when(wg == wgs)
    def _copies():
      plgpu.set_max_registers(40, action="decrease")

      @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
      def _fill(info):
        m_idx, n_idx, owner, step0 = sub_tile(info)
        for k in range(k_iters):
          step = step0 + k
          slot = lax.rem(step, depth)
          b = owner * depth + slot

          @pl.when(step >= depth)
          def _wait(b=b):  # the stage's last contents are consumed
            plgpu.barrier_wait(free.at[b])

          x_src = x_g.at[pl.ds(m_idx * tm, tm), pl.ds(k * tk, tk)]
          if y_transposed:
            y_src = y_g.at[pl.ds(k * tk, tk), pl.ds(n_idx * tn, tn)]
          else:
            y_src = y_g.at[pl.ds(n_idx * tn, tn), pl.ds(k * tk, tk)]
          plgpu.copy_gmem_to_smem(x_src, xs.at[owner, slot], full.at[b])
          plgpu.copy_gmem_to_smem(y_src, ys.at[owner, slot], full.at[b])

        @pl.when(info.local_index == info.num_local_steps - 1)
        def _drain():  # every phase of a barrier is waited for: each used stage's last release
          n = info.num_local_steps
          for w in range(wgs):
            steps = (n + wgs - 1 - w) // wgs * k_iters
            for slot in range(depth):

              @pl.when(steps > slot)
              def _last(b=w * depth + slot):
                plgpu.barrier_wait(free.at[b])

    @pl.when(wg < wgs)
    def _compute():
      plgpu.set_max_registers(_compute_registers(40, wgs), action="increase")

      @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
      def _tiles(info):
        m_idx, n_idx, owner, step0 = sub_tile(info)

        @pl.when(owner == wg)
        def _own():
          t = info.local_index
          tile = _Tile(
            row0=m_idx * tm,
            part=m_idx,
            col0=n_idx * tn,
            n_idx=n_idx,
            wg=wg,
            first=t < wgs,
            last=jnp.bool_(False),  # the turns' last waits are `_drain_turns`, below
            turn=turn,
          )
          if prologue is not None:
            prologue(tile, scratch)

          def release(k):  # step k's products are done: its stage goes back to the copies
            plgpu.barrier_arrive(free.at[wg * depth + lax.rem(step0 + k, depth)])

          @functools.partial(pl.run_scoped, acc=plgpu.ACC((tm, tn), jnp.float32))
          def _acc(acc):
            with jax.named_scope("mma"):
              # `release` groups of products stay in flight, their stages held until done.
              for k in range(k_iters):
                slot = lax.rem(step0 + k, depth)
                plgpu.barrier_wait(full.at[wg * depth + slot])
                y_s = ys.at[wg, slot]
                y_op = y_s if y_transposed else plgpu.transpose_ref(y_s, (1, 0))
                plgpu.wgmma(acc, xs.at[wg, slot], y_op)
                plgpu.wgmma_wait(cfg.release)
                if k >= cfg.release:
                  release(k - cfg.release)
              plgpu.wgmma_wait(0)
              for k in range(max(k_iters - cfg.release, 0), k_iters):
                release(k)
            with jax.named_scope("epilogue"):
              epilogue(acc[...], tile, scratch)

        if turn is not None:
          n = info.num_local_steps

          @pl.when(info.local_index == n - 1)
          def _drain_turns():
            # Column parts alternate 0, 1, 0, ...; each warpgroup waits before its own for the
            # other's last (warpgroup 0 not before its first). So one arrival is left: 1's last
            # when the CTA's sub-tiles are even in number, 0's when odd. Every phase of a
            # barrier is waited for.
            @pl.when((wg == 0) & (n % 2 == 0))
            def _even():
              plgpu.barrier_wait(turn.at[1])

            @pl.when((wg == 1) & (n % 2 == 1))
            def _odd():
              plgpu.barrier_wait(turn.at[0])

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _compute_registers(reserved: int, wgs: int) -> int:
  """Registers per thread of each compute warpgroup when the copy warpgroup keeps `reserved`:
  the register file's 512 per thread of one warpgroup shared out, at most 255, in 8s."""
  return int(min(256, (512 - reserved) / wgs) // 8 * 8)


# Set by `profiling`: Mosaic GPU's on-device profiler's settings for the kernels built inside it.
_PROFILE: dict[str, Any] = {}


@contextlib.contextmanager
def profiling(directory: str, space: int = 256):
  """Kernels built inside record, per warpgroup, when each named region of the kernel body
  ("mma", "epilogue", "rows", "cols", "wait") begins and ends (up to `space` events each), and
  write the traces (Chrome trace JSON) to `directory` when they run. For benchmarks: the
  recording costs a few cycles per event, and its buffer takes 48 bytes of shared memory per
  unit of `space` (lowered for CUDA: the default forward has room for 256, not 512; a CTA
  walking 16 sub-tiles records about 160 events)."""
  _PROFILE.update(profile_space=space, profile_dir=directory)
  try:
    yield
  finally:
    _PROFILE.clear()


def _launch(body, outs, interpret, cfg: MosaicConfig):
  _, plgpu = _plgpu()
  return plgpu.kernel(
    body,
    out_type=outs,
    # The interpreter simulates every CTA's threads: two of them walk the tile just as well.
    grid=(2 if interpret else _num_sms() * cfg.ctas_per_sm,),
    grid_names=("sm",),
    num_threads=cfg.wgs + 1,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(
      lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
      approx_math=True,
      reduction_scratch_bytes=cfg.reduction_scratch,
      **_PROFILE,
    ),
    interpret=_interpret_params() if interpret else None,
  )


def _interpret_params():
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

  return InterpretGPUParams()


class _Terms(NamedTuple):
  """What one sub-tile's epilogue produces (closures over its registers): `ds` the tile to
  write, or None; `rows()` / `cols()` the per-row / per-column vectors to write (each a list;
  called where the two warpgroups take turns, so the work inside them is staggered). The
  backward gives `col_tiles()` instead of `cols`: the float32 tiles whose column sums it
  writes, summed in registers or on transposed slices (`MosaicConfig.col_chunk`)."""

  ds: Any
  rows: Any
  cols: Any
  col_tiles: Any = None


def _pass(kind, x, y, rvecs, cvecs, terms, nvec: int, with_ds: bool, interpret, like, lines=None):
  """One kernel over an unpadded tile: per warpgroup sub-tile `S` (float32),
  `terms(s, r, c) -> _Terms`, where `r[k]()` / `c[k]()` read the sub-tile's slice of row vector
  `rvecs[k]` / column vector `cvecs[k]` into registers. Read where it is used, a vector stays
  out of the registers the rest of the epilogue needs (the 128 x 128 float32 sub-tile takes 128
  per thread, a column vector 32 more): the InfoNCE forward took 65.7 ms at B = 131,072 with its
  vectors read up front, 53.8 ms with each read in its own reduction
  (results/mosaic_tiles_h200/ runs 7 and 8; registers are our reading, not profiled); reading
  them before the products were issued was as slow (65.1 ms). Returns `[dS]` (if `with_ds`,
  `x`'s dtype) + `nvec` row partials `(cols / tile_n, rows)` + `nvec` column partials
  `(rows / tile_m, cols)`.

  `lines` (forward passes, for `MosaicConfig.col_chunk`): `lines(v, own, other, axis)`, the
  `nvec` statistics along `axis` of `v` (`S`, or a slice of `S^T`), where `own[k]()` reads
  vector `k` of the lines reduced (one entry per index of the other axis) and `other[k]()` that
  of the entries along `axis`. It then serves both parts in place of `terms`."""
  pl, plgpu = _plgpu()
  cfg = config(kind, x.dtype)
  (br, _), bc = x.shape, y.shape[0]
  tm, tn = cfg.tile_m, cfg.tile_n
  f32, op = jnp.float32, x.dtype
  out = [_struct((br, bc), op, like)] if with_ds else []
  out += [_struct((bc // tn, br), f32, like)] * nvec + [_struct((br // tm, bc), f32, like)] * nvec
  layout = plgpu.Layout.WGMMA
  nr = len(rvecs)
  chunk = cfg.col_chunk
  if chunk and lines is None and not with_ds:
    raise ValueError(f"col_chunk needs the statistics' lines in this {kind!r} pass")
  if chunk and with_ds and chunk * 4 != tn * jnp.dtype(op).itemsize:
    # Each warpgroup's float32 slices alias its own dS staging only if the two are the same
    # size; otherwise one warpgroup's slices overlap the other's staging (a race the
    # interpreter, which does not alias, cannot show: the GPU check of 64 x 256 backward
    # sub-tiles with 64-column slices gave NaN, results/mosaic_tiles_h200/ run 15).
    raise ValueError(
      f"the backward's col_chunk must fill its dS staging: {tn} columns of {jnp.dtype(op).name} "
      f"take col_chunk {tn * jnp.dtype(op).itemsize // 4}, got {chunk}"
    )

  stage = cfg.stage_vectors

  def body(x_g, y_g, *refs):
    r_g, c_g = refs[:nr], refs[nr : nr + len(cvecs)]
    out_g = refs[nr + len(cvecs) :]
    ds_g = out_g[0] if with_ds else None
    parts = out_g[1:] if with_ds else out_g
    row_g, col_g = parts[:nvec], parts[nvec:]

    def sources(tile, scratch):
      """The sub-tile's row and column vectors, as refs of `tm` / `tn` entries: its slices of
      the global vectors, or with `stage_vectors` the warpgroup's copies in shared memory."""
      if not stage:
        rows, cols = pl.ds(tile.row0, tm), pl.ds(tile.col0, tn)
        return [v.at[rows] for v in r_g], [v.at[cols] for v in c_g]
      rsv, csv, _ = scratch[-1]
      return [v.at[tile.wg] for v in rsv], [v.at[tile.wg] for v in csv]

    def stage_vectors(tile, scratch):
      """Before the products: the sub-tile's vector slices to the warpgroup's shared memory."""
      rsv, csv, bar = scratch[-1]
      rows, cols = pl.ds(tile.row0, tm), pl.ds(tile.col0, tn)
      plgpu.commit_smem()  # the last epilogue's threads are done reading the copies
      for g, v in zip(r_g, rsv, strict=True):
        plgpu.copy_gmem_to_smem(g.at[rows], v.at[tile.wg], bar.at[tile.wg])
      for g, v in zip(c_g, csv, strict=True):
        plgpu.copy_gmem_to_smem(g.at[cols], v.at[tile.wg], bar.at[tile.wg])

    def vectors_ready(tile, scratch):
      if stage:
        plgpu.barrier_wait(scratch[-1][2].at[tile.wg])

    def loaders(tile, scratch):
      """Per vector, a function reading the sub-tile's slice of it into registers."""
      rs, cs = sources(tile, scratch)
      r = [functools.partial(_load, v, layout.reduce(1), interpret) for v in rs]
      return r, [functools.partial(_load, v, layout.reduce(0), interpret) for v in cs]

    def transposed_loaders(tile, c0, scratch):
      """For `lines` on `S[:, c0 : c0 + chunk]^T`: readers of its columns' vectors (its own)
      and of the rows' (the other axis), in the transposed layout."""
      t = plgpu.Layout.WGMMA_TRANSPOSED
      rs, cs = sources(tile, scratch)
      own = [functools.partial(_load, v.at[pl.ds(c0, chunk)], t.reduce(1), interpret) for v in cs]
      return own, [functools.partial(_load, v, t.reduce(0), interpret) for v in rs]

    def slice_loaders(tile, c0, scratch):
      """Readers of the column vectors' slice for columns `c0 : c0 + chunk` of the sub-tile."""
      _, cs = sources(tile, scratch)
      return [
        functools.partial(_load, v.at[pl.ds(c0, chunk)], layout.reduce(0), interpret) for v in cs
      ]

    def transposed_sum(q, tsm, wg):
      """Column sums of the `(tm, chunk)` float32 tile `q`, through the warpgroup's slice of
      shared memory and back transposed, so each column is summed inside one warp."""
      tsm[wg] = q
      return jnp.sum(_load_transposed(tsm.at[wg], interpret), axis=1)

    def write_out(tile, scratch):
      """The sub-tile's dS (staged) and vectors (in `rsm`, `csm`) to global memory."""
      (ds_smem, _), rsm, csm = scratch[:3]
      wg, rows, cols = tile.wg, pl.ds(tile.row0, tm), pl.ds(tile.col0, tn)
      plgpu.commit_smem()
      if ds_g is not None:
        plgpu.copy_smem_to_gmem(ds_smem.at[wg], ds_g.at[rows, cols])
      part = tile.part
      for k in range(nvec):
        plgpu.copy_smem_to_gmem(rsm.at[wg, k], row_g[k].at[tile.n_idx, rows])
        plgpu.copy_smem_to_gmem(csm.at[wg, k], col_g[k].at[part, cols])

    def sliced_epilogue(s, tile, scratch):
      """The backward with `sliced_ds`: `terms` per slice of `chunk` columns. Each slice's
      column sums go through the shared slices (the staging's memory), so its dS waits in
      registers, in `op`, until every slice is done."""
      (ds_smem, tsm), rsm, csm = scratch[:3]
      wg = tile.wg
      vectors_ready(tile, scratch)
      r, _ = loaders(tile, scratch)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last sub-tile's stores read smem
      row_sums, kept = [], []
      for c0 in range(0, tn, chunk):
        t = terms(s[:, c0 : c0 + chunk], r, slice_loaders(tile, c0, scratch))
        with jax.named_scope("rows"):
          sums = t.rows()
          row_sums = [a + b for a, b in zip(row_sums, sums, strict=True)] if row_sums else sums
        with jax.named_scope("cols"):
          for k, q in enumerate(t.col_tiles()):
            csm[wg, k, pl.ds(c0, chunk)] = transposed_sum(q, tsm, wg)
        kept.append(t.ds.astype(op))
      for k, v in enumerate(row_sums):
        rsm[wg, k] = v
      for c0, v in zip(range(0, tn, chunk), kept, strict=True):
        ds_smem[wg, :, pl.ds(c0, chunk)] = v
      write_out(tile, scratch)

    def epilogue(s, tile, scratch):
      if with_ds and cfg.sliced_ds:
        return sliced_epilogue(s, tile, scratch)
      (ds_smem, tsm), rsm, csm = scratch[:3]
      wg = tile.wg
      vectors_ready(tile, scratch)
      r, c = loaders(tile, scratch)
      if chunk and not with_ds:
        assert lines is not None
        t = _Terms(None, functools.partial(lines, s, r, c, 1), None)
      else:
        t = terms(s, r, c)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last sub-tile's stores read smem
      if with_ds and not chunk:
        ds_smem[wg] = t.ds.astype(op)

      def transposed_columns(c0, tiles):
        """The column outputs of `S[:, c0 : c0 + chunk]` (the backward: the column sums of
        `tiles`), each slice through shared memory and back transposed: a column's entries
        then lie in one warp."""
        if not with_ds:
          assert lines is not None
          tsm[wg] = s[:, c0 : c0 + chunk]
          own, other = transposed_loaders(tile, c0, scratch)
          return lines(_load_transposed(tsm.at[wg], interpret), own, other, 1)
        return [transposed_sum(q[:, c0 : c0 + chunk], tsm, wg) for q in tiles]

      def row_part():
        with jax.named_scope("rows"):
          for k, v in enumerate(t.rows()):
            rsm[wg, k] = v

      def col_part():
        with jax.named_scope("cols"):
          if not chunk:
            cols = t.cols() if t.col_tiles is None else [jnp.sum(q, 0) for q in t.col_tiles()]
            for k, v in enumerate(cols):
              csm[wg, k] = v
            return
          tiles = t.col_tiles() if with_ds else None
          for c0 in range(0, tn, chunk):
            for k, v in enumerate(transposed_columns(c0, tiles)):
              csm[wg, k, pl.ds(c0, chunk)] = v

      _rows_and_columns(tile, row_part, col_part)
      if with_ds and chunk:  # its staging held the slices
        ds_smem[wg] = t.ds.astype(op)
      write_out(tile, scratch)

    staging = plgpu.SMEM((cfg.wgs, tm, tn), op, transforms=_swizzled(tn, op)) if with_ds else None
    slices = plgpu.SMEM((cfg.wgs, tm, chunk), f32, transforms=_swizzled(chunk, f32))
    vectors = (
      plgpu.SMEM((cfg.wgs, max(nvec, 1), tm), f32),
      plgpu.SMEM((cfg.wgs, max(nvec, 1), tn), f32),
    )
    # The backward's slices share its dS staging's memory (written after them); Pallas's
    # interpreter has no aliased refs, and no shared-memory limit: two buffers there.
    if with_ds and chunk and not interpret:
      buffers = plgpu.RefUnion(staging, slices)
    else:
      buffers = (staging, slices if chunk else None)
    scratch = (buffers, *vectors)
    if stage:  # per vector and warpgroup its sub-tile's slice, and a barrier per warpgroup
      rsv = [plgpu.SMEM((cfg.wgs, tm), v.dtype) for v in rvecs]
      csv = [plgpu.SMEM((cfg.wgs, tn), v.dtype) for v in cvecs]
      bar = plgpu.Barrier(num_arrivals=len(rvecs) + len(cvecs), num_barriers=cfg.wgs)
      scratch = (*scratch, (rsv, csv, bar))
    prologue = stage_vectors if stage else None
    walk = _pingpong_kernel if cfg.pingpong else _tiled_kernel
    walk(cfg, x_g, y_g, epilogue, scratch, interpret, prologue)

  return _launch(body, out, interpret, cfg)(x, y.T if interpret else y, *rvecs, *cvecs)


def _interleave(out, with_ds: bool, nvec: int):
  """`[dS] + rows + cols` -> `[dS] + [row_0, col_0, row_1, col_1, ...]`."""
  head, parts = (out[:1], out[1:]) if with_ds else ([], out)
  return head + [p for k in range(nvec) for p in (parts[k], parts[nvec + k])]


def _row(v, shape):
  return _bcast(v, shape, 0)


def _col(v, shape):
  return _bcast(v, shape, 1)


def nce_stats(x, y, ar, ac, *, interpret: bool = False, like=None):
  """Base-2 logsumexp partials of one unpadded tile: `(rm, rl)` of shape `(cols / tile_n,
  rows)` (per column sub-tile, each row's maximum and sum) and `(cm, cl)` of shape
  `(rows / tile_m, cols)`. `ar`, `ac`: the base-2 scales `log2(e) / tau` of rows and columns.
  `like`: an array whose device-variance (inside `shard_map`) the outputs take."""

  def lines(v, own, other, axis):
    # Every scale is positive, so the scaled maximum is the scale times the maximum of S.
    a, d = own[0](), 1 - axis
    m = a * jnp.max(v, axis=axis)
    return [m, jnp.sum(jnp.exp2(v * _bcast(a, v.shape, d) - _bcast(m, v.shape, d)), axis)]

  def terms(s, r, c):
    return _Terms(None, lambda: lines(s, r, c, 1), lambda: lines(s, c, r, 0))

  return _pass("fwd", x, y, [ar], [ac], terms, 2, False, interpret, like, lines)


def nce_ds(
  x,
  y,
  ar,
  ac,
  lr,
  lc,
  wr,
  wc,
  *,
  need_sums: bool,
  need_a: bool,
  interpret: bool = False,
  like=None,
):
  """`dS` of one unpadded tile in `x`'s dtype, then if `need_sums` its float32 row partials
  `(cols / tile_n, rows)` and column partials `(rows / tile_m, cols)`, then if `need_a` those of
  `p s` (the temperature gradients). Vectors: base-2 scales, base-2 logsumexps, `g a`."""

  def terms(s, r, c):
    (a_r, l_r, w_r), (a_c, l_c, w_c), shape = (f() for f in r), (f() for f in c), s.shape
    pr = jnp.exp2(s * _row(a_r, shape) - _row(l_r, shape))
    pc = jnp.exp2(s * _col(a_c, shape) - _col(l_c, shape))
    ds = _row(w_r, shape) * pr + _col(w_c, shape) * pc

    def rows():
      return [jnp.sum(ds, 1)] * need_sums + [jnp.sum(pr * s, 1)] * need_a

    def col_tiles():
      return [ds] * need_sums + [pc * s] * need_a

    return _Terms(ds, rows, None, col_tiles)

  nvec = int(need_sums) + int(need_a)
  out = _pass("bwd", x, y, [ar, lr, wr], [ac, lc, wc], terms, nvec, True, interpret, like)
  return _interleave(out, True, nvec)


def _cosines(s, r, c):
  """`s r q^T`, the cosines of a max-margin sub-tile (`r[0]`, `c[0]`: the inverse norms)."""
  return s * _row(r[0](), s.shape) * _col(c[0](), s.shape)


def _hinge_sum_count(sc, own, other, axis):
  """Sums and counts along `axis` of `relu(o + c)` over the cosines `sc` off the diagonal:
  `own[1]()` the lines' offsets `o`; `own[2]()`, `other[2]()` the ids (equal on the diagonal),
  read here, so no boolean tile stays live in registers."""
  d, zero = 1 - axis, jnp.zeros_like(sc)
  keep = _bcast(own[2](), sc.shape, d) != _bcast(other[2](), sc.shape, axis)
  h = jnp.where(keep, jnp.maximum(_bcast(own[1](), sc.shape, d) + sc, 0.0), zero)
  return [jnp.sum(h, axis), jnp.sum(jnp.where(h > 0, 1.0, zero), axis)]


def mm_stats(x, y, rr, qc, ro, co, rid, cid, *, interpret: bool = False, like=None):
  """Max-margin hinge partials of one unpadded tile: row sums and counts of
  `relu(ro_i + s_ij r_i q_j)` over `j != i`, `(cols / tile_n, rows)` each, then the column
  sums and counts of `relu(co_j + s_ij r_i q_j)`, `(rows / tile_m, cols)` each. `rid`, `cid`:
  the samples' global ids (int32), equal on the diagonal."""

  def lines(v, own, other, axis):
    # `v` is S or a slice of S^T: the cosines scale its lines by their own inverse norms.
    sc = v * _bcast(own[0](), v.shape, 1 - axis) * _bcast(other[0](), v.shape, axis)
    return _hinge_sum_count(sc, own, other, axis)

  def terms(s, r, c):
    sc = _cosines(s, r, c)  # once for both parts, in place of S
    return _Terms(
      None,
      lambda: _hinge_sum_count(sc, r, c, 1),
      lambda: _hinge_sum_count(sc, c, r, 0),
    )

  return _pass("fwd", x, y, [rr, ro, rid], [qc, co, cid], terms, 2, False, interpret, like, lines)


def mm_ds(
  x,
  y,
  rr,
  qc,
  ro,
  co,
  rid,
  cid,
  gr,
  gc,
  *,
  need_sums: bool,
  interpret: bool = False,
  like=None,
):
  """The max-margin backward of one unpadded tile: `dS r q^T` in `x`'s dtype (what the
  gradient products take), then if `need_sums` its float32 row / column partials. `gr`, `gc`:
  the hinge sums' cotangents. (The scales' gradients `sum_j dS_ij s_ij = <x_i, dx_i>` come from
  the products, after the sweep.)"""

  def terms(s, r, c):
    # Every vector read up front and the mask computed once: reading them at each use (as the
    # forward does) made this kernel 25% slower (results/mosaic_tiles_h200/ runs 7 and 8).
    (rr, ro, rid, gr), (qc, co, cid, gc) = (f() for f in r), (f() for f in c)
    shape = s.shape
    sc = s * _row(rr, shape) * _col(qc, shape)
    keep, zero = _row(rid, shape) != _col(cid, shape), jnp.zeros_like(sc)
    ds = jnp.where(keep & (_row(ro, shape) + sc > 0), _row(gr, shape), zero) + jnp.where(
      keep & (_col(co, shape) + sc > 0), _col(gc, shape), zero
    )
    dsw = ds * _row(rr, shape) * _col(qc, shape)

    def rows():
      return [jnp.sum(dsw, 1)] * need_sums

    def col_tiles():
      return [dsw] * need_sums

    return _Terms(dsw, rows, None, col_tiles)

  nvec = int(need_sums)
  out = _pass("bwd", x, y, [rr, ro, rid, gr], [qc, co, cid, gc], terms, nvec, True, interpret, like)
  return _interleave(out, True, nvec)
