r"""InfoNCE tile kernels for Hopper in Pallas Mosaic GPU: wgmma from shared memory fed by TMA.

The Triton kernels of `_pallas_tiles` compute each `(128, 128)` similarity sub-tile with Triton's
own matmul (operands re-read for each sub-tile, the exponentials not overlapped with loads).
These kernels are warp-specialised: one warpgroup only issues TMA copies of `D`-chunks of the
row and column embeddings into a ring of shared-memory stages, two compute warpgroups each run
`wgmma` on `(tile_m, tile_n)` of the tile (float32 accumulators in registers) and then its
epilogue, while the copy warpgroup already fills the stages of the next tile. The CTAs are
persistent: one per SM, each walking its share of the tile's sub-tiles.

The maths are those of `_pallas_tiles._nce_stats_kernel` / `_nce_ds_kernel` (base-2 scales
`a = log2(e) / tau`), per sub-tile `S = X_r Y_c^T`:

.. math::
  \text{fwd: } m^r_i = a_i \max_j S_{ij},\ l^r_i = \sum_j 2^{a_i S_{ij} - m^r_i}
  \ \text{(and the same per column)};\qquad
  \text{bwd: } dS_{ij} = w^r_i 2^{a_i S_{ij} - L^r_i} + w^c_j 2^{a_j S_{ij} - L^c_j},

written as per-sub-tile partials that `_pallas_tiles` merges; the gradient products `dS Y`,
`dS^T X` stay on cuBLAS. Only unpadded bfloat16 tiles whose edges the configuration divides take
these kernels (`supported`); everything else keeps the Triton or XLA tiles. On CPU they run
through Pallas's GPU interpreter (`interpret=True`), which the tests use.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mmts_jax.losses._traversal import varying_like

__all__ = ["MosaicConfig", "config", "nce_ds", "nce_stats", "set_config", "supported"]


class MosaicConfig(NamedTuple):
  """`tile_m` rows per compute warpgroup (`wgs` of them per CTA, sharing the column operand),
  `tile_n` columns, `tile_k` of D per pipeline step, `stages` shared-memory stages in flight,
  `ctas_per_sm` persistent CTAs per SM, `release`: wgmma groups left in flight before a stage is
  handed back to the copy warpgroup (0: each step waits for its products). `lag`: warpgroup 1
  starts its first sub-tile once warpgroup 0 has used every stage of the ring, and the shared
  stages keep it that far behind, so one's epilogue falls on the other's products (a ping-pong
  of FlashAttention-3's kind, here through the shared pipeline).

  Pallas Mosaic GPU gives every warpgroup the same shared-memory scratch for cross-warp
  reductions (the column maxima and sums), so two compute warpgroups take turns for them
  (`_rows_and_columns`).
  """

  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 64
  stages: int = 4
  wgs: int = 2
  ctas_per_sm: int = 1
  release: int = 0
  lag: bool = False


# Measured on one H200 (benchmarks/results/mosaic_tiles_h200/, run 3): two compute warpgroups
# of 128 x 128, 4 stages forward, 3 backward (its dS staging takes 64 KiB of shared memory).
# One warpgroup per CTA, two CTAs per SM: 26% slower forward at B = 131,072.
_DEFAULTS = {"fwd": MosaicConfig(), "bwd": MosaicConfig(stages=3)}
CONFIGS = dict(_DEFAULTS)


def config(kind: str) -> MosaicConfig:
  """The `MosaicConfig` of pass `kind` ("fwd" or "bwd")."""
  return CONFIGS[kind]


def set_config(kind: str, cfg: MosaicConfig | None) -> None:
  """Sets (None: resets) the `MosaicConfig` of pass `kind` ("fwd" or "bwd")."""
  if kind not in _DEFAULTS:
    raise ValueError(f"set_config: kind must be 'fwd' or 'bwd', got {kind!r}")
  if cfg is not None:
    # wgmma's shapes: 64-row warpgroup tiles, columns in 8s up to 256; bf16 chunks of D fill
    # whole 128-byte swizzles; the pipeline keeps `release` stages besides the one in use.
    if cfg.wgs not in (1, 2):
      raise ValueError(f"set_config: wgs must be 1 or 2, got {cfg.wgs}")
    if cfg.tile_m % 64 or not 0 < cfg.tile_n <= 256 or cfg.tile_n % 8:
      raise ValueError(
        f"set_config: tile_m must be a multiple of 64 and tile_n of 8 up to 256, got "
        f"{cfg.tile_m} x {cfg.tile_n}"
      )
    if cfg.tile_k <= 0 or cfg.tile_k % 64:
      raise ValueError(f"set_config: tile_k must be a multiple of 64, got {cfg.tile_k}")
    if not 0 <= cfg.release < cfg.stages:
      raise ValueError(
        f"set_config: need 0 <= release < stages, got release {cfg.release}, stages {cfg.stages}"
      )
    if cfg.ctas_per_sm < 1:
      raise ValueError(f"set_config: ctas_per_sm must be >= 1, got {cfg.ctas_per_sm}")
  CONFIGS[kind] = _DEFAULTS[kind] if cfg is None else cfg


def supported(rows: int, cols: int, d: int, dtype, kind: str = "fwd") -> bool:
  """Whether a `(rows, cols)` tile over `d` features of `dtype` fits pass `kind`'s kernel."""
  cfg = config(kind)
  return (
    jnp.dtype(dtype) == jnp.bfloat16
    and rows % (cfg.wgs * cfg.tile_m) == 0
    and cols % cfg.tile_n == 0
    and d % cfg.tile_k == 0
  )


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
  col0: jax.Array  # first column
  m_idx: jax.Array  # CTA row block
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
    plgpu.barrier_wait(turn.at[0])
    columns()
    plgpu.barrier_arrive(turn.at[1])


def _tiled_kernel(cfg: MosaicConfig, x_g, y_g, epilogue, scratch, y_transposed=False):
  """The shared skeleton: the persistent walk over sub-tiles, the TMA/wgmma pipeline over D,
  then `epilogue(s, tile, scratch)` per warpgroup with its float32 `(tile_m, tile_n)`
  similarities `s` and its `_Tile`. `y_transposed`: `y_g` holds `Y^T` (the interpreter's
  wgmma cannot read a transposed shared-memory operand)."""
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
    turn=plgpu.Barrier(num_arrivals=1, num_barriers=2) if cfg.wgs == 2 else None,
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
        col0=n_idx * tn,
        m_idx=m_idx,
        n_idx=n_idx,
        wg=wg,
        first=info.local_index == 0,
        last=info.local_index == info.num_local_steps - 1,
        turn=turn,
      )

      def context(run):
        @functools.partial(pl.run_scoped, acc=plgpu.ACC((tm, tn), jnp.float32))
        def _acc(acc):
          run(acc)
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
      lowering_semantics=plgpu.LoweringSemantics.Warpgroup, approx_math=True
    ),
    interpret=_interpret_params() if interpret else None,
  )


def _interpret_params():
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

  return InterpretGPUParams()


def nce_stats(x, y, ar, ac, *, interpret: bool = False, like=None):
  """Base-2 logsumexp partials of one unpadded tile: `(rm, rl)` of shape `(cols / tile_n,
  rows)` (per column sub-tile, each row's maximum and sum) and `(cm, cl)` of shape
  `(rows / tile_m, cols)`. `ar`, `ac`: the base-2 scales `log2(e) / tau` of rows and columns.
  `like`: an array whose device-variance (inside `shard_map`) the outputs take."""
  pl, plgpu = _plgpu()
  cfg = config("fwd")
  (br, _), bc = x.shape, y.shape[0]
  tm, tn = cfg.tile_m, cfg.tile_n
  f32 = jnp.float32
  rowpart = _struct((bc // tn, br), f32, like)
  colpart = _struct((br // tm, bc), f32, like)
  out = [rowpart, rowpart, colpart, colpart]
  layout = plgpu.Layout.WGMMA

  def body(x_g, y_g, ar_g, ac_g, rm_g, rl_g, cm_g, cl_g):
    def epilogue(s, tile, scratch):
      rsm, csm = scratch
      wg = tile.wg
      rows, cols = pl.ds(tile.row0, tm), pl.ds(tile.col0, tn)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last sub-tile's stores read smem

      # Every scale is positive, so the scaled maximum is the scale times the maximum of S.
      def row_stats():
        a_r = _load(ar_g.at[rows], layout.reduce(1), interpret)
        mr = a_r * jnp.max(s, axis=1)
        rsm[wg, 0] = mr
        rsm[wg, 1] = jnp.sum(jnp.exp2(s * _bcast(a_r, s.shape, 0) - _bcast(mr, s.shape, 0)), 1)

      def col_stats():
        a_c = _load(ac_g.at[cols], layout.reduce(0), interpret)
        mc = a_c * jnp.max(s, axis=0)
        csm[wg, 0] = mc
        csm[wg, 1] = jnp.sum(jnp.exp2(s * _bcast(a_c, s.shape, 1) - _bcast(mc, s.shape, 1)), 0)

      _rows_and_columns(tile, row_stats, col_stats)
      plgpu.commit_smem()
      part = tile.m_idx * cfg.wgs + wg
      for k, target in enumerate((rm_g, rl_g)):
        plgpu.copy_smem_to_gmem(rsm.at[wg, k], target.at[tile.n_idx, rows])
      for k, target in enumerate((cm_g, cl_g)):
        plgpu.copy_smem_to_gmem(csm.at[wg, k], target.at[part, cols])

    scratch = (plgpu.SMEM((cfg.wgs, 2, tm), f32), plgpu.SMEM((cfg.wgs, 2, tn), f32))
    _tiled_kernel(cfg, x_g, y_g, epilogue, scratch, y_transposed=interpret)

  return _launch(body, out, interpret, cfg)(x, y.T if interpret else y, ar, ac)


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
  pl, plgpu = _plgpu()
  cfg = config("bwd")
  (br, _), bc = x.shape, y.shape[0]
  tm, tn = cfg.tile_m, cfg.tile_n
  f32 = jnp.float32
  op = x.dtype
  rowpart = _struct((bc // tn, br), f32, like)
  colpart = _struct((br // tm, bc), f32, like)
  nvec = int(need_sums) + int(need_a)  # vectors per side: dS sums, p s sums
  out = [_struct((br, bc), op, like)] + [rowpart, colpart] * nvec
  layout = plgpu.Layout.WGMMA

  def body(x_g, y_g, ar_g, ac_g, lr_g, lc_g, wr_g, wc_g, ds_g, *part_g):
    def epilogue(s, tile, scratch):
      ds_smem, rsm, csm = scratch
      wg = tile.wg
      rows, cols = pl.ds(tile.row0, tm), pl.ds(tile.col0, tn)
      row_vec = functools.partial(_load, layout=layout.reduce(1), interpret=interpret)
      col_vec = functools.partial(_load, layout=layout.reduce(0), interpret=interpret)
      a_r, l_r, w_r = row_vec(ar_g.at[rows]), row_vec(lr_g.at[rows]), row_vec(wr_g.at[rows])
      a_c, l_c, w_c = col_vec(ac_g.at[cols]), col_vec(lc_g.at[cols]), col_vec(wc_g.at[cols])
      shape = s.shape
      pr = jnp.exp2(s * _bcast(a_r, shape, 0) - _bcast(l_r, shape, 0))
      pc = jnp.exp2(s * _bcast(a_c, shape, 1) - _bcast(l_c, shape, 1))
      ds = _bcast(w_r, shape, 0) * pr + _bcast(w_c, shape, 1) * pc
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last sub-tile's stores read smem
      ds_smem[wg] = ds.astype(op)
      # Staging rows of the vectors: k = 0 the dS sums, then the p s sums.
      kinds = ([ds] if need_sums else []) + ([None] if need_a else [])

      def row_sums():
        for k, v in enumerate(kinds):
          rsm[wg, k] = jnp.sum(pr * s if v is None else v, axis=1)

      def col_sums():
        for k, v in enumerate(kinds):
          csm[wg, k] = jnp.sum(pc * s if v is None else v, axis=0)

      _rows_and_columns(tile, row_sums, col_sums)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(ds_smem.at[wg], ds_g.at[rows, cols])
      part = tile.m_idx * cfg.wgs + wg
      for k in range(len(kinds)):
        plgpu.copy_smem_to_gmem(rsm.at[wg, k], part_g[2 * k].at[tile.n_idx, rows])
        plgpu.copy_smem_to_gmem(csm.at[wg, k], part_g[2 * k + 1].at[part, cols])

    scratch = (
      plgpu.SMEM((cfg.wgs, tm, tn), op, transforms=_swizzled(tn, op)),
      plgpu.SMEM((cfg.wgs, max(nvec, 1), tm), f32),
      plgpu.SMEM((cfg.wgs, max(nvec, 1), tn), f32),
    )
    _tiled_kernel(cfg, x_g, y_g, epilogue, scratch, y_transposed=interpret)

  return _launch(body, out, interpret, cfg)(x, y.T if interpret else y, ar, ac, lr, lc, wr, wc)
