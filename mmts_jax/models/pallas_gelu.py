r"""The MLP's bias add and tanh GELU in one pass, forward and backward (Pallas on Triton).

For `h (N, F)` (the first product of the MLP without its bias) and the bias `b (F,)`:

.. math::
  x = h + b,\quad u = \sqrt{2/\pi}\,(x + 0.044715\,x^3),\quad t = \tanh u,\quad
  y = \tfrac12\,x\,(1 + t),

  \frac{dy}{dx} = \tfrac12 (1 + t)
    + \tfrac12\,x\,(1 - t^2)\,\sqrt{2/\pi}\,(1 + 3 \cdot 0.044715\,x^2),
  \qquad dh = g \frac{dy}{dx},\qquad db = \sum_{\text{rows}} dh .

The kernels evaluate the same function through `(1 + tanh u) / 2 = sigmoid(2u)`:

.. math::
  s = \frac{1}{1 + 2^{-2u \log_2 e}},\qquad y = x\,s,\qquad
  \frac{dy}{dx} = s + 2\sqrt{2/\pi}\,x\,s\,(1 - s)\,(1 + 3 \cdot 0.044715\,x^2),

which on a GPU is one `ex2.approx` and one `rcp.approx` per element (`GeluConfig.fast_math`)
instead of libdevice's tanh; the XLA path below keeps `jnp.tanh`.

`bias_gelu(h, b)` computes y in h's dtype with the arithmetic in float32. Its backward pass
keeps only h and b (not t, not x: x and t are recomputed from h in float32, as in
`lean_gelu.gelu`) and returns dh in h's dtype and db in b's dtype. On a GPU each pass is one
Pallas kernel over a grid of `(rows, columns)` blocks: the forward reads h and b and writes y;
the backward reads g, h and b, writes dh and, per program, the float32 sum of its rows of dh
(`(programs along N, F)`, no atomics), whose sum over programs is db, so the bias gradient
costs no second read of dh. That is the traffic XLA's fusions already have on issue 17's H200
profile (the forward fusion adds the bias inside the GELU; the backward one reduces db inside
the GELU's backward), at 53% and 59% of the memory bandwidth; what the kernels may change is
how near the bandwidth that traffic runs. On an H200 (bfloat16, `benchmarks/
pallas_kernels_bench.py`) forward + backward take 0.501 ms at (50688, 3072) against 0.741 ms for
XLA's form alone (3.1 against 2.1 TB/s), the forward alone the same (0.26 ms); six block
shapes stay within 0.49-0.62 ms, the default among the fastest.

`_xla_forward` / `_xla_backward` are the same maths in plain `jax.numpy` (the reference, and the
path on CPUs and TPUs, and on GPUs with the kernels switched off); both sides share `_gelu` and
`_slope`. `set_pallas_gelu` chooses: None (default: the kernels on GPUs for float32 and bfloat16
h, XLA otherwise), False (XLA everywhere), "interpret" (the kernels through the Pallas
interpreter on any backend: slow, for tests on the CPU). The choice is read at trace time.

Sharding: both kernels are `row_partitioning.row_partitioned` calls, so under a multi-device
`jit` the rows of h stay split over whichever mesh axes they are sharded on and F is replicated
(a sharded F is gathered first); db is each device's sum, all-reduced over the rows' axes. Rows
that do not split evenly are replicated for the call. Checked on the 8-device simulated CPU mesh
through the interpreter (values, gradients, and no all-gather in the compiled HLO:
tests/test_pallas_sharding.py); not run on GPUs: the Triton lowering of the per-device body is
checked from the CPU (lowered for CUDA inside a `shard_map`), the partitioned program was not
compiled for a GPU.

Example:
  >>> import jax, jax.numpy as jnp
  >>> h = jnp.linspace(-4.0, 4.0, 12).reshape(3, 4)
  >>> b = jnp.array([0.0, 0.5, -0.5, 1.0])
  >>> want = jax.nn.gelu(h + b, approximate=True)
  >>> bool(jnp.allclose(bias_gelu(h, b), want, atol=1e-6))
  True
  >>> set_pallas_gelu("interpret")  # the Pallas kernels, interpreted on the CPU
  >>> dh, db = jax.grad(lambda h, b: bias_gelu(h, b).sum(), argnums=(0, 1))(h, b)
  >>> set_pallas_gelu(None)
  >>> dh_ref, db_ref = jax.grad(lambda h, b: jax.nn.gelu(h + b).sum(), argnums=(0, 1))(h, b)
  >>> bool(jnp.allclose(dh, dh_ref, atol=1e-6)), bool(jnp.allclose(db, db_ref, atol=1e-5))
  (True, True)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mmts_jax.losses._pallas_tiles import check_powers_of_two, ptx_unary
from mmts_jax.models._row_blocks import edges as _edges
from mmts_jax.models._row_blocks import load as _load
from mmts_jax.models._row_blocks import pl_modules as _pl
from mmts_jax.models._row_blocks import store as _store
from mmts_jax.models._row_blocks import sub_block as _sub_block
from mmts_jax.models.kernel_switch import KernelSwitch
from mmts_jax.models.row_partitioning import FEATURES, ROWS, SUM, row_partitioned

__all__ = [
  "GeluConfig",
  "bias_gelu",
  "gelu_config",
  "set_gelu_config",
  "set_pallas_gelu",
  "use_pallas_gelu",
]

_C = math.sqrt(2.0 / math.pi)
_A = 0.044715
_K = 2.0 * _C / math.log(2.0)  # 2u log2(e) = _K (x + _A x^3)


def _gelu(x: jax.Array) -> jax.Array:
  """`x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2` of float32 `x`."""
  return 0.5 * x * (1.0 + jnp.tanh(_C * (x + _A * x * x * x)))


def _slope(x: jax.Array) -> jax.Array:
  """`d gelu / dx` of float32 `x`, with tanh recomputed from x."""
  t = jnp.tanh(_C * (x + _A * x * x * x))
  return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _C * (1.0 + 3.0 * _A * x * x)


# ---------------------------------------------------------------------------------------------
# Switch and block shapes.

_SWITCH = KernelSwitch("set_pallas_gelu", (jnp.bfloat16, jnp.float32))


def set_pallas_gelu(mode) -> None:
  """Chooses `bias_gelu`'s path: None (the kernels on GPUs, the default), False (XLA
  everywhere) or "interpret" (the kernels through the Pallas interpreter, any backend).

  Example:
    >>> set_pallas_gelu("interpret"); use_pallas_gelu(jnp.float32)
    True
    >>> set_pallas_gelu(None); use_pallas_gelu(jnp.float32)  # on the CPU
    False
  """
  _SWITCH.set(mode)


def use_pallas_gelu(dtype) -> bool:
  """Whether `bias_gelu` of an h of `dtype` takes the Pallas kernels (`set_pallas_gelu`).

  Example:
    >>> use_pallas_gelu(jnp.float64)
    False
  """
  return _SWITCH.on(dtype)


class GeluConfig(NamedTuple):
  """One program's block and its Triton settings: `steps` sub-blocks of `(bm, bn)`, one after
  the other down the rows (the bias gradient's column sums stay on chip across them), so a
  program covers `bm * steps` rows and `bn` columns. The default keeps a sub-block at 16
  float32 values per thread and array (16 x 256 over 8 warps; the backward holds about five
  such arrays), and the partial sums at 1/128 of the rows (1.6% of dh's bytes in bfloat16); on
  an H200 at (50688, 3072) it is within 1.5% of the fastest of six block shapes
  (`benchmarks/pallas_kernels_bench.py`, 0.501 vs 0.493 ms forward + backward)."""

  bm: int = 16
  bn: int = 256
  steps: int = 8
  num_warps: int = 8
  num_stages: int = 2
  # The kernels' GELU as x * sigmoid(2u) (module docstring): True, 2^x and 1/x as one
  # multi-function-unit instruction each (`ex2.approx`, `rcp.approx`) on GPUs; False, libdevice
  # exp2 and an IEEE division (the A/B switch). The interpreter always takes the exact form.
  fast_math: bool = True


_DEFAULT = GeluConfig()
_CONFIG: list = [_DEFAULT]


def gelu_config() -> GeluConfig:
  """The `GeluConfig` the kernels use.

  Example:
    >>> gelu_config().bn
    256
  """
  return _CONFIG[0]


def set_gelu_config(cfg: GeluConfig | None) -> None:
  """Sets (None: resets) the kernels' `GeluConfig`; `bm` and `bn` powers of two >= 16.

  Example:
    >>> set_gelu_config(GeluConfig(bm=32, steps=2)); gelu_config().bm
    32
    >>> set_gelu_config(None); gelu_config().bm
    16
  """
  if cfg is None:
    _CONFIG[0] = _DEFAULT
    return
  check_powers_of_two("set_gelu_config", cfg, ("bm", "bn"), at_least=16)
  if cfg.steps < 1:
    raise ValueError(f"set_gelu_config: steps must be >= 1, got {cfg.steps}")
  _CONFIG[0] = cfg


def _pow2_at_least(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _fit(cfg: GeluConfig, n: int, f: int) -> GeluConfig:
  """`cfg` shrunk to small inputs: blocks no larger than the next power of two of N and F
  (at least 16), no more sub-blocks than N has."""
  bm = max(16, min(cfg.bm, _pow2_at_least(n)))
  bn = max(16, min(cfg.bn, _pow2_at_least(f)))
  return cfg._replace(bm=bm, bn=bn, steps=max(1, min(cfg.steps, -(-n // bm))))


# ---------------------------------------------------------------------------------------------
# Kernels.


def _sigmoid_2u(x, fast: bool):
  """`sigmoid(2u) = (1 + tanh u) / 2` of float32 `x`, as `1 / (1 + 2^(-2u log2 e))`; `fast`:
  with `ex2.approx` and `rcp.approx` (absolute error of a few 1e-7, below float32's rounding of
  the GELU's other terms). Saturates cleanly: 2^(+inf) = inf gives 0, 2^(-inf) = 0 gives 1."""
  z = -_K * (x + _A * x * x * x)
  if fast:
    return ptx_unary("rcp.approx.ftz.f32", 1.0 + ptx_unary("ex2.approx.ftz.f32", z))
  return 1.0 / (1.0 + jnp.exp2(z))


def _kernel_math(cfg, interpret: bool):
  """The kernels' sigmoid: fast on GPUs when `cfg.fast_math`, exact in the interpreter."""
  fast = cfg.fast_math and not interpret
  return lambda x: _sigmoid_2u(x, fast)


def _fwd_kernel(cfg, sig, n, f, h_ref, b_ref, y_ref):
  """`y = x sigmoid(2u)` (= gelu(x), x = h + b) of the program's `steps` sub-blocks, in
  float32."""
  col_ok, row_ok = _edges(cfg, n, f)
  b = _load(b_ref, col_ok).astype(jnp.float32)

  def body(k, carry):
    rows, mask = _sub_block(cfg, k), row_ok(k)
    x = _load(h_ref.at[rows, :], mask).astype(jnp.float32) + b[None, :]
    _store(y_ref.at[rows, :], (x * sig(x)).astype(y_ref.dtype), mask)
    return carry

  lax.fori_loop(0, cfg.steps, body, 0)


def _bwd_kernel(cfg, sig, n, f, g_ref, h_ref, b_ref, dh_ref, db_ref):
  """`dh = g gelu'(h + b)` of the program's sub-blocks and the float32 sum of its rows. Rows
  and columns past the edges load g = h = 0, so they add 0 to the sum. With s = sigmoid(2u),
  gelu' = s + 2 sqrt(2/pi) x s (1 - s) (1 + 3 * 0.044715 x^2) (module docstring)."""
  col_ok, row_ok = _edges(cfg, n, f)
  b = _load(b_ref, col_ok).astype(jnp.float32)

  def body(k, acc):
    rows, mask = _sub_block(cfg, k), row_ok(k)
    x = _load(h_ref.at[rows, :], mask).astype(jnp.float32) + b[None, :]
    s = sig(x)
    slope = s + (2.0 * _C) * x * s * (1.0 - s) * (1.0 + (3.0 * _A) * x * x)
    dx = _load(g_ref.at[rows, :], mask).astype(jnp.float32) * slope
    _store(dh_ref.at[rows, :], dx.astype(dh_ref.dtype), mask)
    return acc + jnp.sum(dx, axis=0)

  db = lax.fori_loop(0, cfg.steps, body, jnp.zeros((cfg.bn,), jnp.float32))
  _store(db_ref, db, col_ok)


def _call(kernel, h, n_in: int, outs, interpret: bool | None = None, cfg: GeluConfig | None = None):
  """`pallas_call` of `kernel(cfg, sigmoid, N, F, *refs)` over h's `(N, F)` grid: `n_in`
  (N, F) inputs then the bias; outputs `(kind, dtype)`, kind "nf" (N, F) or "parts" (programs
  along N, F). `interpret` and `cfg` default to the module's settings now."""
  pl, plgpu = _pl()
  n, f = h.shape
  interpret = _SWITCH.interpret if interpret is None else interpret
  cfg = _fit(gelu_config() if cfg is None else cfg, n, f)
  rows = cfg.bm * cfg.steps
  grid = (pl.cdiv(n, rows), pl.cdiv(f, cfg.bn))
  block = pl.BlockSpec((rows, cfg.bn), lambda i, j: (i, j))
  specs = {
    "nf": ((n, f), block),
    "parts": ((grid[0], f), pl.BlockSpec((None, cfg.bn), lambda i, j: (i, j))),
  }
  params = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
  return pl.pallas_call(
    lambda *refs: kernel(cfg, _kernel_math(cfg, interpret), n, f, *refs),
    out_shape=[jax.ShapeDtypeStruct(specs[k][0], dt) for k, dt in outs],
    grid=grid,
    in_specs=[block] * n_in + [pl.BlockSpec((cfg.bn,), lambda i, j: (j,))],
    out_specs=[specs[k][1] for k, _ in outs],
    compiler_params=None if interpret else plgpu.CompilerParams(**params),
    interpret=interpret,
  )


def _fwd_local(interpret, cfg, h, b):
  """The forward kernel on the rows it is given (all of them, or one device's)."""
  return tuple(_call(_fwd_kernel, h, 1, [("nf", h.dtype)], interpret, cfg)(h, b))


def _bwd_local(interpret, cfg, g, h, b):
  """The backward kernel on the rows it is given: dh and the sum of dh over those rows."""
  outs = [("nf", h.dtype), ("parts", jnp.float32)]
  dh, parts = _call(_bwd_kernel, h, 2, outs, interpret, cfg)(g, h, b)
  return dh, jnp.sum(parts, axis=0)


# Rows sharded as h's, features replicated; db all-reduced over the row axes.
_fwd_rows = row_partitioned(_fwd_local, (ROWS, FEATURES), (ROWS,), 2)
_bwd_rows = row_partitioned(_bwd_local, (ROWS, ROWS, FEATURES), (ROWS, SUM), 2)


def _settings() -> tuple[bool, GeluConfig]:
  """The mode and blocks now, passed on as static arguments: the partitioned calls are built
  when the program compiles, and must see the settings of the trace."""
  return _SWITCH.interpret, gelu_config()


def _pallas_forward(h, b):
  (y,) = _fwd_rows(*_settings(), h, b)
  return y


def _pallas_backward(g, h, b):
  return _bwd_rows(*_settings(), g, h, b)


# ---------------------------------------------------------------------------------------------
# XLA reference and the custom_vjp.


def _xla_forward(h, b):
  return _gelu(h.astype(jnp.float32) + b.astype(jnp.float32)).astype(h.dtype)


def _xla_backward(g, h, b):
  dx = g.astype(jnp.float32) * _slope(h.astype(jnp.float32) + b.astype(jnp.float32))
  return dx.astype(h.dtype), jnp.sum(dx, axis=0)


def _kernels(h) -> bool:
  return h.size > 0 and use_pallas_gelu(h.dtype)


@jax.custom_vjp
def _bias_gelu_2d(h, b):
  if _kernels(h):
    return _pallas_forward(h, b.astype(jnp.float32))
  return _xla_forward(h, b)


def _fwd(h, b):
  return _bias_gelu_2d(h, b), (h, b)


def _bwd(res, g):
  h, b = res
  if _kernels(h):
    dh, db = _pallas_backward(g.astype(h.dtype), h, b.astype(jnp.float32))
  else:
    dh, db = _xla_backward(g, h, b)
  return dh, db.astype(b.dtype)


_bias_gelu_2d.defvjp(_fwd, _bwd)


def bias_gelu(h: jax.Array, b: jax.Array) -> jax.Array:
  """`gelu_tanh(h + b)` in h's dtype (float32 arithmetic) for h `(..., F)` and b `(F,)`, with
  the fused backward pass of the module docstring. Leading axes of h are flattened to rows.

  Example:
    >>> h = jnp.ones((2, 3, 4), jnp.bfloat16)
    >>> y = bias_gelu(h, jnp.zeros((4,)))
    >>> y.shape, y.dtype, round(float(y[0, 0, 0]), 2)
    ((2, 3, 4), dtype(bfloat16), 0.84)
  """
  if not jnp.issubdtype(h.dtype, jnp.floating) or h.ndim < 1:
    raise ValueError(f"bias_gelu: h must be a floating array (..., F), got {h.dtype} {h.shape}")
  if not jnp.issubdtype(b.dtype, jnp.floating) or b.shape != h.shape[-1:]:
    raise ValueError(
      f"bias_gelu: b must be a floating (F,) = {h.shape[-1:]} vector, got {b.dtype} {b.shape}"
    )
  f = h.shape[-1]
  return _bias_gelu_2d(h.reshape(-1, f), b).reshape(h.shape)
