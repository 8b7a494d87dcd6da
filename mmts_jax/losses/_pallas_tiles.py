r"""Fused GPU tiles for the blockwise InfoNCE, max-margin and sigmoid losses (Pallas on Triton).

The XLA tiles in `mmts_jax.losses.blockwise` write each `(rows, cols)` similarity tile to device
memory and read it back once per reduction; on a GPU that traffic costs as much as the matmul.
These kernels compute the tile in sub-tiles of `(SUB, SUB)` on chip and write only what is needed:
per-sub-tile logsumexp partials (forward) or `dS` (backward). They are the same maths as the XLA
tiles `blockwise._nce_fwd_tile` / `blockwise._nce_bwd_tile` (and `_mm_*_tile`,
`blockwise_sigmoid._fwd_tile` / `_bwd_tile`), which stay the reference (and the CPU/TPU path);
the tests run these kernels through the Pallas interpreter against the dense losses. The sigmoid
kernels evaluate the per-pair terms with the very functions of `_sigmoid_pairs` the XLA tiles
use: per sub-tile `S = X_r Y_c^T` (float32 accumulation),

.. math::
  \text{fwd: } \sum_j \mathrm{softplus}(-u^r_{ij}),\ \sum_i \mathrm{softplus}(-u^c_{ij});
  \qquad \text{bwd: } dS_{ij} = \tfrac{g^r_i}{\tau_i} p^r_{ij} + \tfrac{g^c_j}{\tau_j} p^c_{ij},
  \ \sum p\,s,\ \sum p \text{ per anchor},

`u = z (s / tau + b)`, `p = -z sigma(-u)`, `z = +-1` on / off the diagonal; the gradient
products `dS Y_c`, `dS^T X_r` then run on cuBLAS (`grad_update`), as for InfoNCE.

`set_fused_tiles` chooses when they run; `use_fused_tiles` is the decision the blockwise loss asks.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mmts_jax.losses import _mosaic_tiles
from mmts_jax.losses._sigmoid_pairs import pair_cotangent, pair_losses, pair_slopes
from mmts_jax.losses._traversal import (
  SUB,
  Blocks,
  grad_update,
  hopper,
  summed_into,
  varying_like,
)

__all__ = [
  "TileConfig",
  "mm_bwd_tile",
  "mm_fwd_tile",
  "nce_bwd_tile",
  "nce_fwd_tile",
  "nce_vectors",
  "set_fused_tiles",
  "set_tile_config",
  "set_tile_kernel",
  "sig_bwd_tile",
  "sig_fwd_tile",
  "tile_config",
  "use_fused_tiles",
]


class TileConfig(NamedTuple):
  """The shape of one fused-kernel program and its Triton settings.

  A program computes `j` sub-tiles of `(bm, bn)` one after the other along the columns (the
  row statistics stay on chip across them), each as a matmul over D in chunks of `bk`.
  """

  bm: int = 128
  bn: int = 128
  bk: int = 64
  j: int = 1
  num_warps: int = 8
  num_stages: int = 3


# Per (pass, embedding dtype): the fastest of `benchmarks/loss_tune.py`'s variants on one H200,
# B = 32,768, D = 512 (results/loss_tune_h200_run1.json; bf16 fwd 4.14 ms vs 5.05 ms for the
# previous 128/128/64/1/8/3, bwd 7.66 vs 8.72 ms). Tiles whose rows or columns the configured
# edges do not divide fall back to 128 / 64 (`_fit`).
DEFAULT_CONFIG = TileConfig()
_TUNED: dict[tuple[str, str], TileConfig] = {
  ("fwd", "bfloat16"): TileConfig(128, 128, 64, 2, 4, 3),
  ("bwd", "bfloat16"): TileConfig(128, 128, 32, 1, 4, 4),
  ("fwd", "float32"): TileConfig(128, 128, 32, 1, 4, 4),
  ("bwd", "float32"): TileConfig(128, 128, 32, 1, 4, 4),
}
CONFIGS: dict[tuple[str, str], TileConfig] = dict(_TUNED)


def tile_config(kind: str, dtype) -> TileConfig:
  """The `TileConfig` of pass `kind` ("fwd" or "bwd") for embeddings of `dtype`.

  Example:
    >>> import jax.numpy as jnp
    >>> tile_config("bwd", jnp.bfloat16)
    TileConfig(bm=128, bn=128, bk=32, j=1, num_warps=4, num_stages=4)
  """
  return CONFIGS.get((kind, jnp.dtype(dtype).name), DEFAULT_CONFIG)


def set_tile_config(kind: str, dtype, cfg: TileConfig | None) -> None:
  """Sets (or with None, resets to the tuned default) the `TileConfig` of one pass and dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> set_tile_config("fwd", jnp.float32, TileConfig(bm=64, j=2))
    >>> tile_config("fwd", jnp.float32).bm
    64
    >>> set_tile_config("fwd", jnp.float32, None)
    >>> tile_config("fwd", jnp.float32).bm
    128
  """
  if kind not in ("fwd", "bwd"):
    raise ValueError(f"set_tile_config: kind must be 'fwd' or 'bwd', got {kind!r}")
  key = (kind, jnp.dtype(dtype).name)
  if cfg is None:
    CONFIGS.pop(key, None)
    if key in _TUNED:
      CONFIGS[key] = _TUNED[key]
    return
  check_powers_of_two("set_tile_config", cfg, ("bm", "bn", "bk"), at_least=16)
  if cfg.j < 1:
    raise ValueError(f"set_tile_config: j must be >= 1, got {cfg.j}")
  CONFIGS[key] = cfg


def check_powers_of_two(who: str, cfg, names: tuple[str, ...], at_least: int = 1) -> None:
  """ValueError naming the first of `cfg`'s fields `names` that is not a power of two (>=
  `at_least`): Triton's block shapes (and warps) must be powers of two.

  Example:
    >>> check_powers_of_two("set_x", TileConfig(bm=48), ("bm",), at_least=16)
    Traceback (most recent call last):
    ...
    ValueError: set_x: bm must be a power of two >= 16, got 48
  """
  bound = f" >= {at_least}" if at_least > 1 else ""
  for name in names:
    v = getattr(cfg, name)
    if v < at_least or v < 1 or v & (v - 1):
      raise ValueError(f"{who}: {name} must be a power of two{bound}, got {v}")


def _fit(cfg: TileConfig, rows: int, cols: int, d: int) -> TileConfig:
  """`cfg` with edges that divide the tile: the configured ones, else 128, else 64."""

  def edge(want, n):
    return next((e for e in (want, 128, 64) if n % e == 0), want)

  bm, bn = edge(cfg.bm, rows), edge(cfg.bn, cols)
  bk = next((e for e in (cfg.bk, 64, 32, 16) if d % e == 0), cfg.bk)
  j = cfg.j
  while j > 1 and (cols // bn) % j:
    j //= 2
  return cfg._replace(bm=bm, bn=bn, bk=bk, j=max(j, 1))


# The faster tile kernel per (backend, embedding dtype, loss) and pass, as measured side by side
# in one run (fwd + bwd, D = 512, benchmarks/BENCHMARKS.md), one H200, B = 32,768 and 131,072:
# - bf16 InfoNCE: fused 11.9 ms (tuned `CONFIGS`) vs XLA 17.1 ms at 32,768; of the fused
#   kernels, the Mosaic GPU forward ("mosaic", `_mosaic_tiles`) beats Triton's at 131,072
#   (53.8 vs 60.9 ms; fwd + bwd 181.1 vs 189.8 ms, results/mosaic_tiles_h200/ run 8), its dS
#   kernel did not then (185.1 ms with both passes on Mosaic): the backward stayed Triton's
#   until session 14 (below).
# - f32 InfoNCE: the Mosaic forward on tf32 wgmma 77.2 vs XLA 139.3 ms at 131,072, fwd + bwd
#   316.6 vs 379.5 ms; at 32,768 19.7 vs 23.2 ms (run 8). With Mosaic's backward too: 311.3 ms
#   (round ranges 302.5-313.3 vs 314.1-321.6) in run 8, 310.7 vs 313.1 ms with overlapping
#   ranges in run 6: the XLA backward stayed, until session 15 (below). Triton's tf32 products
#   are slower than cuBLAS's (fused 24.0 vs XLA 23.4 ms at 32,768,
#   results/loss_tune_h200_run1.json).
# - bf16 max-margin: Mosaic forward, Triton backward 239.2 ms at 131,072 vs 252.6 on Triton,
#   243.9 on Mosaic, 305.8 on XLA (run 9, round ranges apart); at 32,768 15.6 vs 16.3 ms,
#   inside the noise (15.5-17.1 vs 16.2-18.5). With the backward that no longer reduces `dS c`
#   per tile (every kind alike): 209.4 vs 218.2 ms on Mosaic in both passes (run 10).
# - f32 max-margin: Mosaic in both passes 323.6 vs XLA 436.5 ms at 131,072, 20.8 vs 27.4 ms at
#   32,768 (run 9; Mosaic forward with the XLA backward 380.9 / 24.4 ms), timed before that
#   change; since it, 313.3 ms in both passes on Mosaic (run 11, the XLA backward not re-timed).
# - bf16, both losses, since the Mosaic dS programs work on 64-column slices (`MosaicConfig.
#   sliced_ds`): Mosaic in both passes 167.5 vs 172.7 ms with Triton's dS (InfoNCE), 170.0 vs
#   195.1 ms (max-margin) at 131,072 (run 17, one call, medians; run 16, before the slices:
#   169.8 vs 169.9 and 218.4 vs 189.3).
# - f32 InfoNCE, since the float32 backward takes 64 x 128 sub-tiles and four stages
#   (`_mosaic_tiles._DEFAULTS`): Mosaic in both passes 287.0 (282.0-290.7) vs 306.8
#   (297.2-314.3) ms with the XLA backward at 131,072 (run 22, one call, medians and ranges).
# - bf16 sigmoid: fused (fast math, 64 x 64 programs) 17.02 vs XLA 18.81 ms, 258.3 vs 280.0 ms
#   at 131,072 (results/sigmoid_tiles_h200/ run 2); f32 stays on XLA's 23.8 ms against 31.5.
# Entries not listed (CPU, TPU, float64, f32 sigmoid) run the XLA tiles.
FASTEST = {
  ("gpu", "bfloat16", "infonce"): {"fwd": "mosaic", "bwd": "mosaic"},
  ("gpu", "float32", "infonce"): {"fwd": "mosaic", "bwd": "mosaic"},
  ("gpu", "bfloat16", "max_margin"): {"fwd": "mosaic", "bwd": "mosaic"},
  ("gpu", "float32", "max_margin"): {"fwd": "mosaic", "bwd": "mosaic"},
  ("gpu", "bfloat16", "sigmoid"): {"fwd": "fused", "bwd": "fused"},
}
# Where `FASTEST` says "mosaic" and the Mosaic GPU kernels do not apply to a tile: bfloat16
# takes the Triton kernels ("fused"), float32 the XLA tiles (Triton's tf32 products are slower).
MOSAIC_FALLBACK = {"bfloat16": "fused", "float32": "xla"}
_KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
LOSSES = ("infonce", "max_margin", "sigmoid")
PASSES = ("fwd", "bwd")


def _fused_ok(blocks: Blocks, d: int, dtype) -> bool:
  return (
    blocks.rows % SUB == 0
    and blocks.cols % SUB == 0
    and d % 16 == 0
    and jnp.dtype(dtype) in _KERNEL_DTYPES
  )


def use_fused_tiles(
  blocks: Blocks,
  d: int,
  dtype,
  loss: str = "infonce",
  kind: str = "fwd",
  *,
  padded: bool = False,
  precision=None,
) -> bool:
  """Whether pass `kind` ("fwd" / "bwd") of `loss` takes the fused Pallas kernels.

  By default where `FASTEST` measured them faster; `set_fused_tiles` overrides this. The tiles
  must be whole sub-tiles of `SUB` and D a multiple of 16. Where `FASTEST` names the Mosaic GPU
  kernels but they do not apply (`padded` tiles, shapes they do not take, f32 at a `precision`
  or `jax.default_matmul_precision` above tf32, a GPU other than Hopper), `MOSAIC_FALLBACK` says
  which tiles run instead.

  Example:
    >>> import jax.numpy as jnp
    >>> use_fused_tiles(Blocks(256, 256), 64, jnp.bfloat16, "max_margin", "bwd")  # on CPU
    False
    >>> set_fused_tiles("interpret", passes=("bwd",))
    >>> use_fused_tiles(Blocks(256, 256), 64, jnp.bfloat16, "max_margin", "bwd")
    True
    >>> use_fused_tiles(Blocks(256, 256), 64, jnp.bfloat16, "max_margin", "fwd")
    False
    >>> set_fused_tiles(None)
  """
  mode, passes = _FUSED
  if mode is False:
    return False
  if mode is None:
    name = jnp.dtype(dtype).name
    choice = FASTEST.get((jax.default_backend(), name, loss), {}).get(kind)
    if choice == "mosaic" and MOSAIC_FALLBACK.get(name) == "xla":
      fits = _mosaic_fits(blocks.rows, blocks.cols, d, dtype, kind, precision)
      on = fits and not padded and _hopper()
    else:
      on = choice in ("fused", "mosaic")
  else:
    on = (mode == "interpret" or jax.default_backend() == "gpu") and kind in passes
  return on and _fused_ok(blocks, d, dtype)


# (mode, passes). mode: None (auto: `FASTEST`), False (never), "always" (GPU, f32 and bf16, the
# `passes` listed), "interpret" (the Pallas interpreter on any backend: slow, checks the
# kernels' maths on CPU).
_FUSED: list = [None, PASSES]


def set_fused_tiles(mode, passes=PASSES) -> None:
  """Chooses the tile kernel of the blockwise InfoNCE, max-margin and sigmoid losses.

  `mode`: `None` (default: the measured `FASTEST`), `False` (XLA tiles everywhere), "always"
  (fused on GPUs for f32 and bf16) or "interpret" (the Pallas interpreter, any backend).
  `passes`: with "always" / "interpret", the passes ("fwd", "bwd") that take the fused
  kernels; the others take the XLA tiles.
  """
  if mode not in (None, False, "always", "interpret"):
    raise ValueError(
      f"set_fused_tiles: mode must be None, False, 'always' or 'interpret', got {mode!r}"
    )
  bad = [p for p in passes if p not in PASSES]
  if bad:
    raise ValueError(f"set_fused_tiles: passes must be among {PASSES}, got {tuple(passes)!r}")
  _FUSED[:] = [mode, tuple(passes)]


# Which fused kernel an InfoNCE pass takes where it takes one: None (the measured `FASTEST`:
# "mosaic" there means the warp-specialised Mosaic GPU kernels of `_mosaic_tiles` on Hopper,
# "fused" the Triton ones), "triton" or "mosaic" (forced; the latter through the Mosaic GPU
# interpreter under `set_fused_tiles("interpret")`).
_KERNEL: list = [None]


def set_tile_kernel(kernel) -> None:
  """Chooses the fused InfoNCE kernel: None (measured default), "triton" or "mosaic".

  Mosaic GPU kernels need a Hopper GPU (or the interpreter) and unpadded bfloat16 tiles whose
  edges their configuration divides; other tiles keep the Triton kernels.
  """
  if kernel not in (None, "triton", "mosaic"):
    raise ValueError(f"set_tile_kernel: kernel must be None, 'triton' or 'mosaic', got {kernel!r}")
  _KERNEL[0] = kernel


def _hopper() -> bool:
  return hopper()  # a name of this module's own, so tests can stand in for the device


# Values of `jax_default_matmul_precision` (the global setting and its context manager) under
# which XLA itself multiplies float32 in tf32 or less.
_TF32_DEFAULTS = (None, "default", "fastest", "bfloat16", "tensorfloat32")


def _mosaic_precision_ok(dtype, precision) -> bool:
  """float32 tiles run on tf32 wgmma: only where `precision`, or without one JAX's default
  matmul precision (`jax.default_matmul_precision`), allows tf32.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> _mosaic_precision_ok(jnp.float32, None), _mosaic_precision_ok(jnp.float32, "highest")
    (True, False)
    >>> with jax.default_matmul_precision("highest"):
    ...   _mosaic_precision_ok(jnp.float32, None)
    False
  """
  if jnp.dtype(dtype) != jnp.float32:
    return True
  if precision is None:
    return getattr(jax.config, "jax_default_matmul_precision", None) in _TF32_DEFAULTS
  return _tf32(precision)


def _mosaic_fits(rows: int, cols: int, d: int, dtype, kind: str, precision) -> bool:
  """Whether a `(rows, cols)` tile of `d` features fits pass `kind`'s Mosaic GPU kernel at
  `precision`: the one rule `use_fused_tiles` and the tile passes (`_mosaic_for`) share."""
  supported = _mosaic_tiles.supported(rows, cols, d, dtype, kind)
  return supported and _mosaic_precision_ok(dtype, precision)


def _mosaic_for(kind: str, xr, yc, loss: str = "infonce", precision=None) -> tuple[bool, bool]:
  """(whether this unpadded tile pass of `loss` takes the Mosaic GPU kernel, interpreted)."""
  interpret = _FUSED[0] == "interpret"
  if _KERNEL[0] == "triton":
    return False, interpret
  if _KERNEL[0] is None:
    key = (jax.default_backend(), jnp.dtype(xr.dtype).name, loss)
    if FASTEST.get(key, {}).get(kind) != "mosaic":
      return False, interpret
  fits = _mosaic_fits(xr.shape[0], yc.shape[0], xr.shape[1], xr.dtype, kind, precision)
  return fits and (interpret or _hopper()), interpret


def _pl():
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  return pl, plgpu


def _sub_matmul(cfg, tf32, x_ref, y_ref, cols):
  """`x @ y[cols].T` of one (bm, D) x (bn, D) pair in float32, over D in chunks of `bk`."""
  pl, _ = _pl()
  d = x_ref.shape[-1]

  def body(k, acc):
    sl = pl.ds(pl.multiple_of(k * cfg.bk, cfg.bk), cfg.bk)
    xk = x_ref[:, sl]
    yk = y_ref[cols, sl]
    # DEFAULT lowers to Triton's tf32 dot for f32 operands, HIGHEST to ieee; bf16 is bf16.
    prec = lax.Precision.DEFAULT if tf32 and xk.dtype == jnp.float32 else lax.Precision.HIGHEST
    return acc + lax.dot_general(
      xk, yk, (((1,), (1,)), ((), ())), precision=(prec, prec), preferred_element_type=jnp.float32
    )

  return lax.fori_loop(0, d // cfg.bk, body, jnp.zeros((cfg.bm, cfg.bn), jnp.float32))


def _over_columns(cfg, body, init):
  """Runs `body(cols, carry) -> carry` over the program's `j` column sub-tiles."""
  pl, _ = _pl()
  if cfg.j == 1:
    return body(pl.ds(0, cfg.bn), init)
  return lax.fori_loop(
    0, cfg.j, lambda jj, c: body(pl.ds(pl.multiple_of(jj * cfg.bn, cfg.bn), cfg.bn), c), init
  )


# Refs a kernel variant does not take (no padding, no dS sums, no 1/tau sums): never read.
_ABSENT: tuple[Any, Any] = (None, None)


def _safe(m):
  return jnp.where(m == -jnp.inf, 0.0, m)


# The kernels work in base 2: the scales arrive multiplied by log2(e), so each exponential is
# one `ex2.approx` (the multi-function unit's single instruction; libdevice's `expf`, what
# `jnp.exp` lowers to, adds a range reduction of several float32 operations per element).
# Relative error about 2^-22: float32 rounding. False: libdevice `exp2f` (the A/B switch).
FAST_EXP = [True]
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def ptx_unary(instruction: str, x: jax.Array) -> jax.Array:
  """One PTX instruction `instruction $0, $1` elementwise on float32 `x`, inside a Pallas
  Triton kernel: the multi-function unit's `ex2.approx.ftz.f32` (2^x, relative error about
  2^-22) or `rcp.approx.ftz.f32` (1/x, about 2^-23), one instruction each where libdevice's
  `exp2f` and IEEE division take several float32 operations per element."""
  _, plgpu = _pl()
  (out,) = plgpu.elementwise_inline_asm(
    f"{instruction} $0, $1;",
    args=[x],
    constraints="=f,f",
    pack=1,
    result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)],
  )
  return out


def _exp2(x):
  if _FUSED[0] == "interpret" or not FAST_EXP[0]:
    return jnp.exp2(x)
  return ptx_unary("ex2.approx.ftz.f32", x)


def _log2(x):
  if _FUSED[0] == "interpret":
    return jnp.log2(x)
  return ptx_unary("lg2.approx.ftz.f32", x)


def _rcp(x):
  if _FUSED[0] == "interpret":
    return 1.0 / x
  return ptx_unary("rcp.approx.ftz.f32", x)


# The sigmoid kernels' `softplus` and `sigmoid` in the multi-function unit's instructions (True)
# or JAX's (`jax.nn.softplus`: a log1p and an exp through libdevice; False, the A/B switch).
FAST_SIGMOID = [True]
_SERIES = 0.125  # below it log1p(t) is its series; above, ln 2 lg2(1 + t) loses < 2^-21


def _log1p_small(t):
  """log1p(t) for 0 <= t < 1/8 as its series to t^8 (Horner; truncation below t^8 / 9, 7e-9
  relative at t = 1/8): `lg2(1 + t)` would round `1 + t` and lose the small terms' digits."""
  acc = jnp.full_like(t, -1.0 / 8)
  for k in range(7, 0, -1):
    acc = (1.0 if k == 1 else (-1.0) ** (k + 1) / k) + t * acc
  return t * acc


def softplus_fast(x):
  r"""`softplus(x) = max(x, 0) + log1p(2^{-|x| log2 e})` with one `ex2` and one `lg2`: the
  log1p as `ln 2 lg2(1 + t)` for `t >= 1/8` and as its series below (where `1 + t` would round
  away the digits of the small terms: those of far negatives are ~e^-10 and smaller). Relative
  error within `|x| 2^-23 + 2^-21` with exact exp2 / log2 (the rounding of `|x| log2 e`
  dominates for large |x|; `tests/test_sigmoid_fused_tiles.py`); the GPU's ex2 / lg2 add about
  2^-22 each.

  Example (the interpreter's exact exp2 / log2 stand in for the instructions off the GPU):
    >>> import jax, jax.numpy as jnp
    >>> set_fused_tiles("interpret")
    >>> x = jnp.array([-30.0, -8.3, -2.0, 0.0, 3.0])
    >>> close = jnp.allclose(softplus_fast(x), jax.nn.softplus(x), rtol=5e-6, atol=0)
    >>> set_fused_tiles(None)
    >>> bool(close)
    True
  """
  t = _exp2(-jnp.abs(x) * _LOG2E)
  log1p = jnp.where(t < _SERIES, _log1p_small(t), _LN2 * _log2(1.0 + t))
  return jnp.maximum(x, 0.0) + log1p


def sigmoid_fast(x):
  """`1 / (1 + 2^{-x log2 e})`: one `ex2` and one `rcp` (0 and 1 at the extremes: 2^{+large}
  is inf, whose reciprocal is 0)."""
  return _rcp(1.0 + _exp2(-x * _LOG2E))


def _sig_fns() -> dict:
  if FAST_SIGMOID[0]:
    return {"softplus": softplus_fast, "sigmoid": sigmoid_fast}
  return {"softplus": jax.nn.softplus, "sigmoid": jax.nn.sigmoid}


def _logits(s, scale, bias, axis):
  """`s * scale (+ bias)` and its maximum along `axis`: axis 1, the rows (a scale per row, a
  bias per column); axis 0, the columns. Without padding (`bias` None) the maximum is
  `scale * max(s)`, as every scale is positive: one reduction of `s`, no scaled tile for it."""
  sc = jnp.expand_dims(scale, axis)
  if bias is None:
    return s * sc, scale * jnp.max(s, axis=axis)
  z = s * sc + jnp.expand_dims(bias, 1 - axis)
  return z, jnp.max(z, axis=axis)


def _nce_stats_kernel(cfg, tf32, masked, x_ref, y_ref, ar_ref, ac_ref, *refs):
  """Base-2 row logsumexp partials over the program's columns (online, on chip) and column
  partials per sub-tile. With `masked`, -inf biases of the padding follow the scales."""
  rb_ref, cb_ref = refs[:2] if masked else _ABSENT
  rm_ref, rl_ref, cm_ref, cl_ref = refs[2:] if masked else refs
  ar = ar_ref[...]
  rb = rb_ref[...] if masked else None

  def body(cols, carry):
    m, acc = carry
    s = _sub_matmul(cfg, tf32, x_ref, y_ref, cols)
    zr, mr = _logits(s, ar, cb_ref[cols] if masked else None, 1)
    zc, mc = _logits(s, ac_ref[cols], rb, 0)
    cm_ref[cols] = mc
    cl_ref[cols] = jnp.sum(_exp2(zc - _safe(mc)[None, :]), axis=0)
    mn = jnp.maximum(m, mr)
    ms = _safe(mn)
    return mn, acc * _exp2(m - ms) + jnp.sum(_exp2(zr - ms[:, None]), axis=1)

  init = (jnp.full((cfg.bm,), -jnp.inf, jnp.float32), jnp.zeros((cfg.bm,), jnp.float32))
  m, acc = _over_columns(cfg, body, init)
  rm_ref[...] = m
  rl_ref[...] = acc


def _nce_ds_kernel(cfg, tf32, masked, need_sums, need_a, x_ref, y_ref, *refs):
  """dS of the program's sub-tiles; its float32 row / column sums and the 1/tau sums if asked.

  Vectors: scales (base 2), [padding biases], base-2 logsumexps, the cotangents times 1/tau.
  """
  ar_ref, ac_ref = refs[:2]
  refs = refs[2:]
  rb_ref, cb_ref = refs[:2] if masked else _ABSENT
  refs = refs[2:] if masked else refs
  lr_ref, lc_ref, wr_ref, wc_ref, ds_ref = refs[:5]
  refs = refs[5:]
  dr_ref, dc_ref = refs[:2] if need_sums else _ABSENT
  sr_ref, sc_ref = refs[-2:] if need_a else _ABSENT
  ar, lr, wr = ar_ref[...], lr_ref[...], wr_ref[...]

  def body(cols, carry):
    s = _sub_matmul(cfg, tf32, x_ref, y_ref, cols)
    zr = s * ar[:, None] - lr[:, None]
    zc = s * ac_ref[cols][None, :] - lc_ref[cols][None, :]
    if masked:
      zr = zr + cb_ref[cols][None, :]
      zc = zc + rb_ref[...][:, None]
    pr = _exp2(zr)
    pc = _exp2(zc)
    ds = wr[:, None] * pr + wc_ref[cols][None, :] * pc
    ds_ref[:, cols] = ds.astype(ds_ref.dtype)
    dr, sr = carry
    if need_sums:
      # float32 row / column sums of dS for the centred bf16 gradient products (_traversal.Centre).
      dc_ref[cols] = jnp.sum(ds, axis=0)
      dr = dr + jnp.sum(ds, axis=1)
    if need_a:
      sc_ref[cols] = jnp.sum(pc * s, axis=0)
      sr = sr + jnp.sum(pr * s, axis=1)
    return dr, sr

  zero = jnp.zeros((cfg.bm,), jnp.float32)
  dr, sr = _over_columns(cfg, body, (zero, zero))
  if need_sums:
    dr_ref[...] = dr
  if need_a:
    sr_ref[...] = sr


def _fused_call(kernel, cfg, br, bc, d, vec_in, out_shape, like):
  """pallas_call over the `(br / bm, bc / (bn j))` programs of one `(br, bc)` tile.

  Inputs: x (br, d), y (bc, d), then `vec_in` row (r) / column (c) vectors; outputs given as
  (kind, dtype): "tile" (br, bc), "rowpart" (programs per row, br), "colpart" (br / bm, bc).
  """
  pl, plgpu = _pl()
  wc = cfg.bn * cfg.j  # columns per program
  gi, gj = br // cfg.bm, bc // wc
  vec = {
    "r": pl.BlockSpec((cfg.bm,), lambda i, j: (i,)),
    "c": pl.BlockSpec((wc,), lambda i, j: (j,)),
  }
  in_specs = [
    pl.BlockSpec((cfg.bm, d), lambda i, j: (i, 0)),
    pl.BlockSpec((wc, d), lambda i, j: (j, 0)),
  ] + [vec[v] for v in vec_in]
  shapes = {
    "tile": ((br, bc), pl.BlockSpec((cfg.bm, wc), lambda i, j: (i, j))),
    "rowpart": ((gj, br), pl.BlockSpec((None, cfg.bm), lambda i, j: (j, i))),
    "colpart": ((gi, bc), pl.BlockSpec((None, wc), lambda i, j: (i, j))),
  }
  outs = [jax.ShapeDtypeStruct(shapes[k][0], dt, **varying_like(like)) for k, dt in out_shape]
  specs = [shapes[k][1] for k, _ in out_shape]
  interpret = _FUSED[0] == "interpret"
  params = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
  return pl.pallas_call(
    kernel,
    out_shape=outs,
    grid=(gi, gj),
    in_specs=in_specs,
    out_specs=specs,
    compiler_params=None if interpret else plgpu.CompilerParams(**params),
    interpret=interpret,
  )


def _tf32(precision) -> bool:
  return precision in (None, lax.Precision.DEFAULT, "default", "fastest")


# Program shapes of the sigmoid kernels where they differ from `CONFIGS` (per pass and dtype):
# 64 x 64 programs of 4 warps (results/sigmoid_tiles_h200/ run 2: bf16 fwd + bwd 16.93 ms at
# B = 32,768 vs 43.29 ms in the InfoNCE-tuned 128 x 128 shapes; its per-pair terms keep more
# values live per thread than InfoNCE's).
_SIGMOID_TUNED = {("fwd", "bfloat16"): TileConfig(64, 64, 64, 1, 4, 3)}
_SIGMOID_TUNED[("bwd", "bfloat16")] = _SIGMOID_TUNED[("fwd", "bfloat16")]
SIGMOID_CONFIGS: dict[tuple[str, str], TileConfig] = dict(_SIGMOID_TUNED)


def _program(kernel, kind, precision, xr, yc, vec_in, out_shape, *static, table=None):
  """The `pallas_call` of `kernel` over the tile of rows `xr` and columns `yc`: the `kind`
  ("fwd" / "bwd") `TileConfig` of `xr`'s dtype (from `table` first, if given) fitted to the
  tile, then `kernel(cfg, tf32, *static, *refs)` (`_fused_call` for `vec_in` and `out_shape`)."""
  (br, d), bc = xr.shape, yc.shape[0]
  cfg = (table or {}).get((kind, jnp.dtype(xr.dtype).name)) or tile_config(kind, xr.dtype)
  cfg = _fit(cfg, br, bc, d)
  bound = functools.partial(kernel, cfg, _tf32(precision), *static)
  return _fused_call(bound, cfg, br, bc, d, vec_in, out_shape, xr)


def _grad_update(dx, dy, res, need_sums, xr, yc, precision, centre, xr_op):
  """`(dx, dy, rest)`: the gradient states `dx`, `dy` updated (`grad_update`) from a backward
  program's outputs `res` = dS, then (if `need_sums`) its float32 row and column sums for the
  centred bf16 products, then `rest`."""
  ds, res = res[0], res[1:]
  parts = None
  if need_sums:
    parts, res = res[:2], res[2:]
  dx, dy = grad_update(dx, dy, ds, xr, yc, precision, centre, xr_op=xr_op, sum_parts=parts)
  return dx, dy, res


def _bias(ids, dtype):
  """0 for real samples, -inf for padding: added to the logits it masks the padding."""
  return jnp.where(ids >= 0, 0.0, -jnp.inf).astype(dtype)


def _lse_combine(p, q):
  """Two logsumexp pairs `(m, l)` (`sum = l e^m`) as one."""
  (m1, l1), (m2, l2) = p, q
  m = jnp.maximum(m1, m2)
  ms = jnp.where(jnp.isneginf(m), 0.0, m)  # both empty (-inf): l stays 0, no inf - inf
  return m, l1 * jnp.exp(m1 - ms) + l2 * jnp.exp(m2 - ms)


def _merge_lse(state, m, s):
  """The logsumexp state `(m, l)` of `n` anchors merged with a program's partials `(m, s)`, each
  `(parts, n)`: one variadic reduction over the state and the parts together, so one kernel per
  side of the tile (a maximum, then a sum, then the merge with the state were three).

  Example:
    >>> parts = jnp.array([[1.0], [-jnp.inf]]), jnp.ones((2, 1))
    >>> m, s = _merge_lse((jnp.zeros(1), jnp.ones(1)), *parts)
    >>> round(float(m[0] + jnp.log(s[0])), 6)  # log(e^0 + e^1 + 0)
    1.313262
  """
  sm, sl = state
  dt = jnp.result_type(sm, m)
  mm = jnp.concatenate([sm[None].astype(dt), m.astype(dt)], 0)
  ll = jnp.concatenate([sl[None].astype(dt), s.astype(dt)], 0)
  init = (jnp.array(-jnp.inf, dt), jnp.array(0, dt))
  m_new, s_new = lax.reduce((mm, ll), init, _lse_combine, (0,))
  return m_new.astype(sm.dtype), s_new.astype(sl.dtype)


def nce_vectors(a, lse=None, g=None) -> tuple:
  """InfoNCE's per-sample vectors in the form the fused tiles take them, float32: the base-2
  scales `a log2(e)`, and for the backward `lse log2(e)` and `g a`. The sweep makes them once for
  the whole batch and splits them into blocks like the others: made per tile, each was a kernel
  launch of its own in every tile (five per backward tile in the H200 profiles).

  Example:
    >>> [float(v[0]) for v in nce_vectors(jnp.array([2.0]), jnp.array([1.0]), jnp.array([3.0]))]
    [2.885390043258667, 1.4426950216293335, 6.0]
  """
  f32 = jnp.float32
  out = ((a * _LOG2E).astype(f32),)
  if lse is not None:
    out += ((lse * _LOG2E).astype(f32), (g * a).astype(f32))
  return out


def nce_fwd_tile(precision, mask_rows, mask_cols, r, c, rs, cs):
  """The fused form of `blockwise._nce_fwd_tile` (same arguments and result, except that the
  scales `ar`, `ac` come as `nce_vectors` makes them: `a log2(e)` in float32)."""
  xr, ar, rid = r
  yc, ac, cid = c
  f32 = jnp.float32
  masked = bool(mask_rows or mask_cols)
  mosaic, interpret = _mosaic_for("fwd", xr, yc, "infonce", precision)
  vecs = [ar, ac]
  if mosaic and not masked:
    rm, rl, cm, cl = _mosaic_tiles.nce_stats(xr, yc, *vecs, interpret=interpret, like=xr)
    rm, cm = rm * _LN2, cm * _LN2
    return _merge_lse(rs, rm, rl), _merge_lse(cs, cm, cl)
  call = _program(
    _nce_stats_kernel,
    "fwd",
    precision,
    xr,
    yc,
    "rcrc" if masked else "rc",
    [("rowpart", f32), ("rowpart", f32), ("colpart", f32), ("colpart", f32)],
    masked,
  )
  if masked:
    vecs += [_bias(rid, f32), _bias(cid, f32)]
  rm, rl, cm, cl = call(xr, yc, *vecs)
  # Base-2 maxima back to natural logs; the merges are in natural logs.
  rm, cm = rm * _LN2, cm * _LN2
  return _merge_lse(rs, rm, rl), _merge_lse(cs, cm, cl)


def nce_bwd_tile(precision, mask_rows, mask_cols, need_a, r, c, rs, cs, *, centre=None, xr_op=None):
  """The fused form of `blockwise._nce_bwd_tile` (same arguments and result, except that the
  vectors come as `nce_vectors` makes them: `a log2(e)`, `lse log2(e)` and `g a`)."""
  xr, ar, rid, lse_r, gr = r
  yc, ac, cid, lse_c, gc = c
  dx, dar = rs
  dy, dac = cs
  f32 = jnp.float32
  op = jnp.result_type(xr, yc)
  need_sums = jnp.finfo(op).bits < 32
  masked = bool(mask_rows or mask_cols)
  parts = [("rowpart", f32), ("colpart", f32)]
  outs = [("tile", op)] + (parts if need_sums else []) + (parts if need_a else [])
  vec_in = ("rcrc" if masked else "rc") + "rcrc"
  scales = [ar, ac]
  rest = [lse_r, lse_c, gr, gc]
  mosaic, interpret = _mosaic_for("bwd", xr, yc, "infonce", precision)
  if mosaic and not masked:
    out = _mosaic_tiles.nce_ds(
      xr, yc, *scales, *rest, need_sums=need_sums, need_a=need_a, interpret=interpret, like=xr
    )
  else:
    call = _program(
      _nce_ds_kernel, "bwd", precision, xr, yc, vec_in, outs, masked, need_sums, need_a
    )
    biases = [_bias(rid, f32), _bias(cid, f32)] if masked else []
    out = call(xr, yc, *scales, *biases, *rest)
  dx, dy, res = _grad_update(dx, dy, out, need_sums, xr, yc, precision, centre, xr_op)
  if need_a:
    dar, dac = summed_into(dar, res[0]), summed_into(dac, res[1])
  return (dx, dar), (dy, dac)


# ---------------------------------------------------------------------------------------------
# Max-margin: the same programs with the hinge in place of the exponentials.


def _hinge_keep(rid, cid):
  """Off-diagonal pairs of real samples (ids < 0 are padding)."""
  return (rid[:, None] != cid[None, :]) & (rid[:, None] >= 0) & (cid[None, :] >= 0)


def _mm_stats_kernel(
  cfg, tf32, x_ref, y_ref, rr_ref, qc_ref, ro_ref, co_ref, ri_ref, ci_ref, *refs
):
  """Row hinge sums and counts over the program's columns; column ones per sub-tile."""
  rs_ref, rn_ref, cs_ref, cn_ref = refs
  rr, ro, rid = rr_ref[...], ro_ref[...], ri_ref[...]

  def body(cols, carry):
    s = _sub_matmul(cfg, tf32, x_ref, y_ref, cols) * rr[:, None] * qc_ref[cols][None, :]
    keep = _hinge_keep(rid, ci_ref[cols])
    hr = jnp.where(keep, jnp.maximum(ro[:, None] + s, 0.0), 0.0)
    hc = jnp.where(keep, jnp.maximum(co_ref[cols][None, :] + s, 0.0), 0.0)
    cs_ref[cols] = jnp.sum(hc, axis=0)
    cn_ref[cols] = jnp.sum(jnp.where(hc > 0, 1.0, 0.0), axis=0)
    rsum, rcnt = carry
    return rsum + jnp.sum(hr, axis=1), rcnt + jnp.sum(jnp.where(hr > 0, 1.0, 0.0), axis=1)

  zero = jnp.zeros((cfg.bm,), jnp.float32)
  rsum, rcnt = _over_columns(cfg, body, (zero, zero))
  rs_ref[...] = rsum
  rn_ref[...] = rcnt


def _mm_ds_kernel(
  cfg, tf32, need_sums, x_ref, y_ref, rr_ref, qc_ref, ro_ref, co_ref, ri_ref, ci_ref, *refs
):
  """`dS r q^T` of the program's sub-tiles (what the gradient products take) and its float32
  row / column sums if asked."""
  gr_ref, gc_ref, ds_ref = refs[:3]
  dr_ref, dc_ref = refs[3:] if need_sums else _ABSENT
  rr, ro, rid, gr = rr_ref[...], ro_ref[...], ri_ref[...], gr_ref[...]

  def body(cols, dr):
    qc = qc_ref[cols]
    s = _sub_matmul(cfg, tf32, x_ref, y_ref, cols) * rr[:, None] * qc[None, :]
    keep = _hinge_keep(rid, ci_ref[cols])
    ds = jnp.where(keep & (ro[:, None] + s > 0), gr[:, None], 0.0) + jnp.where(
      keep & (co_ref[cols][None, :] + s > 0), gc_ref[cols][None, :], 0.0
    )
    dsw = ds * rr[:, None] * qc[None, :]
    ds_ref[:, cols] = dsw.astype(ds_ref.dtype)
    if need_sums:
      dc_ref[cols] = jnp.sum(dsw, axis=0)
      dr = dr + jnp.sum(dsw, axis=1)
    return dr

  dr = _over_columns(cfg, body, jnp.zeros((cfg.bm,), jnp.float32))
  if need_sums:
    dr_ref[...] = dr


def mm_fwd_tile(precision, padded, r, c, rs, cs):
  """The fused form of `blockwise._mm_fwd_tile` (its arguments after `padded`: whether the
  loss's tiles hold padding; same result)."""
  xr, rr, ro, rid = r
  yc, qc, co, cid = c
  f32 = jnp.float32
  vecs = (rr.astype(f32), qc.astype(f32), ro.astype(f32), co.astype(f32), rid, cid)
  mosaic, interpret = _mosaic_for("fwd", xr, yc, "max_margin", precision)
  if mosaic and not padded:
    rsum, rcnt, csum, ccnt = _mosaic_tiles.mm_stats(xr, yc, *vecs, interpret=interpret, like=xr)
  else:
    call = _program(
      _mm_stats_kernel,
      "fwd",
      precision,
      xr,
      yc,
      "rcrcrc",
      [("rowpart", f32), ("rowpart", f32), ("colpart", f32), ("colpart", f32)],
    )
    rsum, rcnt, csum, ccnt = call(xr, yc, *vecs)
  (rs0, rn0), (cs0, cn0) = rs, cs
  return (
    (summed_into(rs0, rsum), summed_into(rn0, rcnt)),
    (summed_into(cs0, csum), summed_into(cn0, ccnt)),
  )


def mm_bwd_tile(precision, padded, r, c, rs, cs, *, centre=None, xr_op=None):
  """The fused form of `blockwise._mm_bwd_tile` (its arguments after `padded`, as for
  `mm_fwd_tile`; same result)."""
  xr, rr, ro, rid, gr = r
  yc, qc, co, cid, gc = c
  f32 = jnp.float32
  op = jnp.result_type(xr, yc)
  need_sums = jnp.finfo(op).bits < 32
  rr_, qc_, ro_, co_, gr_, gc_ = (v.astype(f32) for v in (rr, qc, ro, co, gr, gc))
  vecs = (rr_, qc_, ro_, co_, rid, cid, gr_, gc_)
  mosaic, interpret = _mosaic_for("bwd", xr, yc, "max_margin", precision)
  if mosaic and not padded:
    res = _mosaic_tiles.mm_ds(xr, yc, *vecs, need_sums=need_sums, interpret=interpret, like=xr)
  else:
    parts = [("rowpart", f32), ("colpart", f32)]
    outs = [("tile", op)] + (parts if need_sums else [])
    call = _program(_mm_ds_kernel, "bwd", precision, xr, yc, "rcrcrcrc", outs, need_sums)
    res = call(xr, yc, *vecs)
  dx, dy, _ = _grad_update(rs, cs, res, need_sums, xr, yc, precision, centre, xr_op)
  return dx, dy


# ---------------------------------------------------------------------------------------------
# Sigmoid (SigLIP): the same programs with the per-pair terms of `_sigmoid_pairs` (the
# expressions the XLA tiles of `blockwise_sigmoid` use). No normaliser across pairs: the forward
# program adds its sub-tiles' terms to per-anchor sums,
#   rows: sum_j softplus(-u^r_ij),  columns: sum_i softplus(-u^c_ij),
# and the backward program writes dS = w^r_i p^r_ij + w^c_j p^c_ij with the per-anchor sums of
# p s and p (the gradients of 1/tau and of the bias), p = -z sigma(-u). `softplus_fast` and
# `sigmoid_fast` evaluate them in the multi-function unit's ex2 / lg2 / rcp (the terms of far
# negatives, ~e^-10 and smaller, keep log1p's accuracy through its small-argument branch);
# `FAST_SIGMOID[0] = False` switches to JAX's libdevice functions.


def _sig_stats_kernel(
  cfg, tf32, x_ref, y_ref, ar_ref, ac_ref, cr_ref, cc_ref, ri_ref, ci_ref, rs_ref, cs_ref
):
  """Row sums of the terms over the program's columns; column sums per sub-tile."""
  ar, cr, rid = ar_ref[...], cr_ref[...], ri_ref[...]

  def body(cols, rsum):
    s = _sub_matmul(cfg, tf32, x_ref, y_ref, cols)
    fn = _sig_fns()["softplus"]
    lr, lc = pair_losses(s, rid, ci_ref[cols], ar, cr, ac_ref[cols], cc_ref[cols], softplus=fn)
    cs_ref[cols] = jnp.sum(lc, axis=0)
    return rsum + jnp.sum(lr, axis=1)

  rs_ref[...] = _over_columns(cfg, body, jnp.zeros((cfg.bm,), jnp.float32))


def _sig_ds_kernel(
  cfg, tf32, need_sums, x_ref, y_ref, ar_ref, ac_ref, cr_ref, cc_ref, ri_ref, ci_ref, *refs
):
  """dS of the program's sub-tiles, its float32 row / column sums if asked, and the row /
  column sums of `p s` and `p`. Vectors: 1/tau, biases, indices, then `w = g / tau`."""
  wr_ref, wc_ref, ds_ref = refs[:3]
  refs = refs[3:]
  dr_ref, dc_ref = refs[:2] if need_sums else _ABSENT
  sr_ref, sc_ref, qr_ref, qc_ref = refs[-4:]
  ar, cr, rid, wr = ar_ref[...], cr_ref[...], ri_ref[...], wr_ref[...]

  def body(cols, carry):
    s = _sub_matmul(cfg, tf32, x_ref, y_ref, cols)
    fn = _sig_fns()["sigmoid"]
    pr, pc = pair_slopes(s, rid, ci_ref[cols], ar, cr, ac_ref[cols], cc_ref[cols], sigmoid=fn)
    ds = pair_cotangent(pr, pc, wr, wc_ref[cols])
    ds_ref[:, cols] = ds.astype(ds_ref.dtype)
    dr, sr, qr = carry
    if need_sums:
      # float32 row / column sums of dS for the centred bf16 gradient products (_traversal.Centre).
      dc_ref[cols] = jnp.sum(ds, axis=0)
      dr = dr + jnp.sum(ds, axis=1)
    sc_ref[cols] = jnp.sum(pc * s, axis=0)
    qc_ref[cols] = jnp.sum(pc, axis=0)
    return dr, sr + jnp.sum(pr * s, axis=1), qr + jnp.sum(pr, axis=1)

  zero = jnp.zeros((cfg.bm,), jnp.float32)
  dr, sr, qr = _over_columns(cfg, body, (zero, zero, zero))
  if need_sums:
    dr_ref[...] = dr
  sr_ref[...] = sr
  qr_ref[...] = qr


def _sig_vectors(ar, ac, cr, cc):
  f32 = jnp.float32
  return ar.astype(f32), ac.astype(f32), cr.astype(f32), cc.astype(f32)


def sig_fwd_tile(precision, r, c, rs, cs):
  """The fused form of `blockwise_sigmoid._fwd_tile` (same arguments, same result)."""
  xr, ar, cr, rid = r
  yc, ac, cc, cid = c
  f32 = jnp.float32
  call = _program(
    _sig_stats_kernel,
    "fwd",
    precision,
    xr,
    yc,
    "rcrcrc",
    [("rowpart", f32), ("colpart", f32)],
    table=SIGMOID_CONFIGS,
  )
  rsum, csum = call(xr, yc, *_sig_vectors(ar, ac, cr, cc), rid, cid)
  return summed_into(rs, rsum), summed_into(cs, csum)


def sig_bwd_tile(precision, r, c, rs, cs, *, centre=None, xr_op=None):
  """The fused form of `blockwise_sigmoid._bwd_tile` (same arguments, same result)."""
  xr, ar, cr, rid, gr = r
  yc, ac, cc, cid, gc = c
  dx, sr, qr = rs
  dy, sc, qc = cs
  f32 = jnp.float32
  op = jnp.result_type(xr, yc)
  need_sums = jnp.finfo(op).bits < 32
  parts = [("rowpart", f32), ("colpart", f32)]
  outs = [("tile", op)] + (parts if need_sums else []) + parts + parts
  call = _program(
    _sig_ds_kernel, "bwd", precision, xr, yc, "rcrcrcrc", outs, need_sums, table=SIGMOID_CONFIGS
  )
  vecs = _sig_vectors(ar, ac, cr, cc)
  res = call(xr, yc, *vecs, rid, cid, (gr * ar).astype(f32), (gc * ac).astype(f32))
  dx, dy, res = _grad_update(dx, dy, res, need_sums, xr, yc, precision, centre, xr_op)
  dsr, dsc, dqr, dqc = res
  sr, sc, qr, qc = (summed_into(v, p) for v, p in ((sr, dsr), (sc, dsc), (qr, dqr), (qc, dqc)))
  return (dx, sr, qr), (dy, sc, qc)
