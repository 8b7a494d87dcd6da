r"""Fused multi-head self-attention for short sequences (L <= 256), forward and backward as
Pallas kernels on Triton.

For q, k, v of shape `(B, L, H, D)` (the layout of `attention.attend`), per batch row b and
head h, with scale c = 1/sqrt(D) and the mask M (0 where a key is visible, -inf elsewhere):

.. math::
  S = c\,q k^\top + M,\qquad P = \mathrm{softmax}_{\text{rows}}(S),\qquad o = P v,

  dP = dO\,v^\top,\quad \delta_i = \textstyle\sum_d dO_{id}\,o_{id},\quad
  dS = P \odot (dP - \delta),\quad dq = c\,dS\,k,\quad dk = c\,dS^\top q,\quad dv = P^\top dO.

Masks (the semantics of `attention.even_length_attention`): `lengths` (int `(B,)`, clipped to
`[1, L]`; none: L) hides keys `j >= lengths[b]` and zeroes the output of the padded query rows
`i >= lengths[b]` (which then take no part in any gradient); `causal` hides keys `j > i`.

At these lengths a whole key/value row of one (b, h) fits on chip (L is padded to the next
power of two Lp on chip, rows >= L masked), so no online softmax is needed:

* forward, one program per `(b, h, block of block_q queries)`: the logits against all Lp keys
  in base 2, `s = c log2(e) q k^T`, their row maximum m, `p = 2^(s - m)`, `l = sum p`,
  `o = (p v) / l`; it writes o in q's dtype and the base-2 log-sum-exp `lse = m + log2 l`
  (float32 `(B, H, L)`) for the backward;
* backward, two programs without atomics (FlashAttention-2's split): per `(b, h, query
  block)` with all of K and V, `delta = rowsum(dO o)` (written for the second kernel) and
  `dq = c (p (dP - delta)) k`, with `p = 2^(s - lse)` recomputed; per `(b, h, key block of
  block_k)`, a loop over the query blocks (from the first one the causal mask lets see the
  block, up to the last real query row) accumulating `dv += p^T dO` and `dk += c dS^T q`.

Matrix products take the inputs' dtype (bfloat16 products accumulate in float32; p and dS are
rounded to bfloat16 for them, as in every flash attention) and float32 inputs take IEEE
float32 products; the softmax is float32. `AttentionConfig.fast_math` (on GPUs) takes 2^x as
one `ex2.approx.ftz.f32`; the interpreter always takes the exact `jnp.exp2`.

The kernels index the `(B, L, H, D)` arrays in place (block `(L or block, D)` of one (b, h),
row stride H D): no transposes. `set_pallas_attention` chooses: None (the kernels on GPUs,
the default), False (`use_pallas_attention` says no: callers take XLA), "interpret" (the
kernels through the Pallas interpreter, any backend: slow, for tests on the CPU). The choice
is read at trace time.

Sharding: both passes are `row_partitioning.row_partitioned` calls (`batch(rank)` arrays)
whose batch axis keeps its sharding
(over any mesh axes, if B splits evenly over them; else replicated) with L, H and D
replicated, so under a multi-device `jit` each device runs the kernels on its own rows.
Checked through the interpreter on the 8-device simulated CPU mesh
(tests/test_pallas_attention.py); the sharded form is not run on several GPUs yet.

Speed on one H200 (benchmarks/attention_kernel_bench.py, run 21, bf16, forward + backward):
0.197 ms against cuDNN's 0.253 at a CLIP text tower's (256, 78, 8, 64), causal with lengths,
but 1.165 against 0.941 at ViT-B/16's (256, 198, 12, 64): use them for the text tower
(docs/training.md).

Example:
  >>> import jax, jax.numpy as jnp
  >>> q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 5, 3, 16))
  >>> want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  >>> set_pallas_attention("interpret")
  >>> got = pallas_attention(q, k, v, causal=True)
  >>> set_pallas_attention(None)
  >>> got.shape, bool(jnp.allclose(got, want, atol=1e-5))
  ((2, 5, 3, 16), True)
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mmts_jax.losses._pallas_tiles import check_powers_of_two, ptx_unary
from mmts_jax.models._row_blocks import pl_modules as _pl
from mmts_jax.models.kernel_switch import KernelSwitch
from mmts_jax.models.row_partitioning import ROW, batch, row_partitioned

__all__ = [
  "MAX_LENGTH",
  "AttentionConfig",
  "attention_config",
  "pallas_attention",
  "set_attention_config",
  "set_pallas_attention",
  "supported",
  "use_pallas_attention",
]

MAX_LENGTH = 256  # a whole key row of one (b, h) on chip
_LOG2E = math.log2(math.e)
_KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))

# ---------------------------------------------------------------------------------------------
# Switch and block shapes.

_SWITCH = KernelSwitch("set_pallas_attention", _KERNEL_DTYPES)


def set_pallas_attention(mode) -> None:
  """Chooses the path: None (the kernels on GPUs, the default), False (no kernels: callers
  take XLA) or "interpret" (the kernels through the Pallas interpreter, any backend).

  Example:
    >>> set_pallas_attention("interpret"); use_pallas_attention(jnp.float32)
    True
    >>> set_pallas_attention(None); use_pallas_attention(jnp.float32)  # on the CPU
    False
  """
  _SWITCH.set(mode)


def use_pallas_attention(dtype) -> bool:
  """Whether inputs of `dtype` take the kernels now (`set_pallas_attention`).

  Example:
    >>> use_pallas_attention(jnp.float16)
    False
  """
  return _SWITCH.on(dtype)


def supported(shape: tuple[int, ...], dtype) -> bool:
  """Whether the kernels take q of `shape` `(B, L, H, D)` and `dtype`: float32 or bfloat16,
  1 <= L <= 256, D a power of two in [16, 256].

  Example:
    >>> supported((256, 198, 12, 64), jnp.bfloat16), supported((2, 300, 12, 64), jnp.bfloat16)
    (True, False)
  """
  if len(shape) != 4 or jnp.dtype(dtype) not in _KERNEL_DTYPES:
    return False
  _, length, _, d = shape
  return 1 <= length <= MAX_LENGTH and 16 <= d <= 256 and d & (d - 1) == 0


class AttentionConfig(NamedTuple):
  """Block shapes and Triton settings. `block_q`: query rows per forward program (it holds a
  `(block_q, Lp)` float32 logit tile: 64 x 256 is 64 values per thread over 8 warps);
  `bwd_block_q` / `bwd_block_k`: the query rows of the dq program and the key rows of the
  dk / dv program (and the query block it steps over). Blocks larger than Lp shrink to it.
  `fast_math`: 2^x as `ex2.approx` on GPUs."""

  block_q: int = 64
  bwd_block_q: int = 64
  bwd_block_k: int = 64
  num_warps: int = 4
  bwd_num_warps: int = 4
  num_stages: int = 2
  fast_math: bool = True


_DEFAULT = AttentionConfig()
_CONFIG: list = [_DEFAULT]


def attention_config() -> AttentionConfig:
  """The `AttentionConfig` the kernels use.

  Example:
    >>> attention_config().block_q
    64
  """
  return _CONFIG[0]


def set_attention_config(cfg: AttentionConfig | None) -> None:
  """Sets (None: resets) the kernels' `AttentionConfig`; blocks powers of two >= 16, warps
  powers of two.

  Example:
    >>> set_attention_config(AttentionConfig(block_q=32)); attention_config().block_q
    32
    >>> set_attention_config(None); attention_config().block_q
    64
  """
  if cfg is None:
    _CONFIG[0] = _DEFAULT
    return
  who = "set_attention_config"
  check_powers_of_two(who, cfg, ("block_q", "bwd_block_q", "bwd_block_k"), at_least=16)
  check_powers_of_two(who, cfg, ("num_warps", "bwd_num_warps"))
  if cfg.num_stages < 1:
    raise ValueError(f"{who}: num_stages must be >= 1, got {cfg.num_stages}")
  _CONFIG[0] = cfg


def _pow2_at_least(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


# ---------------------------------------------------------------------------------------------
# Kernels. Refs of one (b, h): `(rows, D)` blocks of the (B, L, H, D) arrays, `(rows,)` blocks
# of the (B, H, L) statistics, `(1,)` of the lengths.


def _exp2(x, fast: bool):
  return ptx_unary("ex2.approx.ftz.f32", x) if fast else jnp.exp2(x)


def _dot(a, b, contract: tuple[int, int]):
  """float32 `a . b` contracting `a`'s axis `contract[0]` with `b`'s `contract[1]`; float32
  operands in IEEE float32 (not tf32), bfloat16 ones accumulated in float32."""
  prec = lax.Precision.HIGHEST
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return lax.dot_general(a, b, dims, precision=(prec, prec), preferred_element_type=jnp.float32)


def _rows(start, n: int):
  return start + jnp.arange(n)


def _load_rows(ref, rows, length: int):
  """`ref`'s `(n, D)` block, rows >= `length` read as 0 (on-chip padding)."""
  _, plgpu = _pl()
  ok = jnp.broadcast_to((rows < length)[:, None], ref.shape)
  return plgpu.load(ref, mask=ok, other=0)


def _visible(qi, kj, n, causal: bool):
  """`(len(qi), len(kj))`: key j visible to query i (j < n, and j <= i if causal)."""
  ok = (kj < n)[None, :]
  if causal:
    ok = ok & (kj[None, :] <= qi[:, None])
  return jnp.broadcast_to(ok, (qi.shape[0], kj.shape[0]))


def _fwd_kernel(length, lp, bq, causal, fast, c2, q_ref, k_ref, v_ref, n_ref, o_ref, lse_ref):
  """o and the base-2 lse of one (b, h, query block) against all of K and V."""
  pl, plgpu = _pl()
  qi = _rows(pl.program_id(2) * bq, bq)
  kj = _rows(0, lp)
  n = n_ref[0]
  q = _load_rows(q_ref, qi, length)
  k = _load_rows(k_ref, kj, length)
  v = _load_rows(v_ref, kj, length)
  s = jnp.where(_visible(qi, kj, n, causal), _dot(q, k, (1, 1)) * c2, -jnp.inf)
  m = jnp.max(s, axis=1)  # key 0 is visible to every row: finite
  p = _exp2(s - m[:, None], fast)
  l_sum = jnp.sum(p, axis=1)
  o = _dot(p.astype(v.dtype), v, (1, 0)) / l_sum[:, None]
  real = qi < jnp.minimum(n, length)  # padded query rows give 0 (even_length_attention)
  o = jnp.where(real[:, None], o, 0.0)
  plgpu.store(o_ref, o.astype(o_ref.dtype), mask=jnp.broadcast_to((qi < length)[:, None], o.shape))
  plgpu.store(lse_ref, m + jnp.log2(l_sum), mask=qi < length)


def _dq_kernel(
  length, lp, bq, causal, fast, c2, q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, n_ref,
  dq_ref, delta_ref,
):  # fmt: skip
  """delta = rowsum(dO o) and dq of one (b, h, query block), with all of K and V."""
  pl, plgpu = _pl()
  qi = _rows(pl.program_id(2) * bq, bq)
  kj = _rows(0, lp)
  n = n_ref[0]
  q = _load_rows(q_ref, qi, length)
  do = _load_rows(do_ref, qi, length)
  k = _load_rows(k_ref, kj, length)
  v = _load_rows(v_ref, kj, length)
  delta = jnp.sum(do.astype(jnp.float32) * _load_rows(o_ref, qi, length).astype(jnp.float32), 1)
  lse = plgpu.load(lse_ref, mask=qi < length, other=0.0)
  vis = _visible(qi, kj, n, causal) & (qi < n)[:, None]
  p = jnp.where(vis, _exp2(_dot(q, k, (1, 1)) * c2 - lse[:, None], fast), 0.0)
  ds = p * (_dot(do, v, (1, 1)) - delta[:, None])
  dq = _dot(ds.astype(k.dtype), k, (1, 0)) * (c2 / _LOG2E)
  plgpu.store(
    dq_ref, dq.astype(dq_ref.dtype), mask=jnp.broadcast_to((qi < length)[:, None], dq.shape)
  )
  plgpu.store(delta_ref, delta, mask=qi < length)


def _dkv_kernel(
  length, bq, bk, causal, fast, c2, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, n_ref,
  dk_ref, dv_ref,
):  # fmt: skip
  """dk and dv of one (b, h, key block), stepping over the query blocks that see it."""
  pl, plgpu = _pl()
  kj = _rows(pl.program_id(2) * bk, bk)
  n = jnp.minimum(n_ref[0], length)
  k = _load_rows(k_ref, kj, length)
  v = _load_rows(v_ref, kj, length)
  d = k.shape[1]

  def body(t, carry):
    dk, dv = carry
    start = pl.multiple_of(t * bq, bq)
    qi = _rows(start, bq)
    rows = pl.ds(start, bq)
    q = _load_rows(q_ref.at[rows, :], qi, length)
    do = _load_rows(do_ref.at[rows, :], qi, length)
    lse = plgpu.load(lse_ref.at[rows], mask=qi < length, other=0.0)
    delta = plgpu.load(delta_ref.at[rows], mask=qi < length, other=0.0)
    # Transposed tiles (keys x queries): visible where j < n, i < n (a real query) and j <= i.
    vis = (kj < n)[:, None] & (qi < n)[None, :]
    if causal:
      vis = vis & (kj[:, None] <= qi[None, :])
    pt = jnp.where(vis, _exp2(_dot(k, q, (1, 1)) * c2 - lse[None, :], fast), 0.0)
    dv = dv + _dot(pt.astype(do.dtype), do, (1, 0))
    dst = pt * (_dot(v, do, (1, 1)) - delta[None, :])
    dk = dk + _dot(dst.astype(q.dtype), q, (1, 0))
    return dk, dv

  first = (pl.program_id(2) * bk) // bq if causal else 0
  last = (n + bq - 1) // bq  # query blocks past the last real row add nothing
  zero = jnp.zeros((bk, d), jnp.float32)
  dk, dv = lax.fori_loop(first, last, body, (zero, zero))
  ok = jnp.broadcast_to((kj < length)[:, None], dk.shape)
  plgpu.store(dk_ref, (dk * (c2 / _LOG2E)).astype(dk_ref.dtype), mask=ok)
  plgpu.store(dv_ref, dv.astype(dv_ref.dtype), mask=ok)


# ---------------------------------------------------------------------------------------------
# pallas_calls over (B, H, blocks).


def _specs(pl, b_l_h_d, block, index):
  """BlockSpecs: `(block, D)` of one (b, h) of a (B, L, H, D) array at `index(b, h, i)` (in
  blocks along L), `(block,)` of a (B, H, L) statistic, `(1,)` of the lengths."""
  d = b_l_h_d[3]
  rows = pl.BlockSpec((None, block, None, d), lambda b, h, i: (b, index(i), h, 0))
  stat = pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, index(i)))
  return rows, stat, pl.BlockSpec((1,), lambda b, h, i: (b,))


def _call(kernel, grid, in_specs, out_specs, out_shape, cfg, warps, interpret):
  pl, plgpu = _pl()
  params = {"num_warps": warps, "num_stages": cfg.num_stages}
  return pl.pallas_call(
    kernel,
    out_shape=out_shape,
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    compiler_params=None if interpret else plgpu.CompilerParams(**params),
    interpret=interpret,
  )


def _fit(block: int, lp: int) -> int:
  return min(block, lp)


def _fwd_local(causal, interpret, cfg, q, k, v, n):
  pl, _ = _pl()
  bsz, length, heads, d = q.shape
  lp = max(16, _pow2_at_least(length))
  bq = _fit(cfg.block_q, lp)
  fast = cfg.fast_math and not interpret
  c2 = _LOG2E / math.sqrt(d)
  blk_q, stat_q, lens = _specs(pl, q.shape, bq, lambda i: i)
  blk_all, _, _ = _specs(pl, q.shape, lp, lambda i: 0)
  kernel = functools.partial(_fwd_kernel, length, lp, bq, causal, fast, c2)
  out_shape = [
    jax.ShapeDtypeStruct(q.shape, q.dtype),
    jax.ShapeDtypeStruct((bsz, heads, length), jnp.float32),
  ]
  grid = (bsz, heads, pl.cdiv(length, bq))
  call = _call(
    kernel, grid, [blk_q, blk_all, blk_all, lens], [blk_q, stat_q], out_shape, cfg,
    cfg.num_warps, interpret,
  )  # fmt: skip
  o, lse = call(q, k, v, n)
  return o, lse


def _bwd_local(causal, interpret, cfg, q, k, v, o, do, lse, n):
  pl, _ = _pl()
  bsz, length, heads, d = q.shape
  lp = max(16, _pow2_at_least(length))
  bq, bk = _fit(cfg.bwd_block_q, lp), _fit(cfg.bwd_block_k, lp)
  fast = cfg.fast_math and not interpret
  c2 = _LOG2E / math.sqrt(d)
  blk_q, stat_q, lens = _specs(pl, q.shape, bq, lambda i: i)
  blk_all, stat_all, _ = _specs(pl, q.shape, lp, lambda i: 0)
  blk_k, _, _ = _specs(pl, q.shape, bk, lambda i: i)
  dq_call = _call(
    functools.partial(_dq_kernel, length, lp, bq, causal, fast, c2),
    (bsz, heads, pl.cdiv(length, bq)),
    [blk_q, blk_all, blk_all, blk_q, blk_q, stat_q, lens],
    [blk_q, stat_q],
    [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(lse.shape, jnp.float32)],
    cfg, cfg.bwd_num_warps, interpret,
  )  # fmt: skip
  dq, delta = dq_call(q, k, v, o, do, lse, n)
  dkv_call = _call(
    functools.partial(_dkv_kernel, length, bq, bk, causal, fast, c2),
    (bsz, heads, pl.cdiv(length, bk)),
    [blk_all, blk_k, blk_k, blk_all, stat_all, stat_all, lens],
    [blk_k, blk_k],
    [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    cfg, cfg.bwd_num_warps, interpret,
  )  # fmt: skip
  dk, dv = dkv_call(q, k, v, do, lse, delta, n)
  return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Batch partitioning: the batch axis keeps its sharding, everything else is replicated.


# Every array leads with the batch axis, which keeps the first operand's sharding
# (`row_partitioning`); L, H and D stay replicated. Operands: q, k, v (, o, dO), (lse,) n.
_QKV, _LSE = batch(4), batch(3)
_fwd_batch = row_partitioned(_fwd_local, (_QKV, _QKV, _QKV, ROW), (_QKV, _LSE), num_static=3)
_bwd_batch = row_partitioned(
  _bwd_local, (_QKV,) * 5 + (_LSE, ROW), (_QKV, _QKV, _QKV), num_static=3
)


# ---------------------------------------------------------------------------------------------
# custom_vjp and the public function.


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, n, causal, interpret, cfg):
  return _fwd_batch(causal, interpret, cfg, q, k, v, n)[0]


def _attention_fwd(q, k, v, n, causal, interpret, cfg):
  o, lse = _fwd_batch(causal, interpret, cfg, q, k, v, n)
  return o, (q, k, v, o, lse, n)


def _attention_bwd(causal, interpret, cfg, res, do):
  q, k, v, o, lse, n = res
  dq, dk, dv = _bwd_batch(causal, interpret, cfg, q, k, v, o, do.astype(q.dtype), lse, n)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def pallas_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  causal: bool = False,
  lengths: jax.Array | None = None,
) -> jax.Array:
  """`softmax(q k^T / sqrt(D) + M) v` for `(B, L, H, D)` inputs through the kernels (module
  docstring), whatever `set_pallas_attention` says except that "interpret" runs them
  through the interpreter; callers check `use_pallas_attention` and `supported` first.

  Example:
    >>> q = jnp.ones((1, 3, 2, 16))
    >>> set_pallas_attention("interpret")
    >>> y = pallas_attention(q, q, q, lengths=jnp.array([2]))
    >>> set_pallas_attention(None)
    >>> y[0, :, 0, 0].tolist()  # the padded query row 2 gives 0
    [1.0, 1.0, 0.0]
  """
  if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
    raise ValueError(
      f"pallas_attention: q, k, v must share one (B, L, H, D) shape, got {q.shape}, {k.shape}, "
      f"{v.shape}"
    )
  if not (q.dtype == k.dtype == v.dtype) or jnp.dtype(q.dtype) not in _KERNEL_DTYPES:
    raise ValueError(
      f"pallas_attention: q, k, v must all be float32 or bfloat16, got {q.dtype}, {k.dtype}, "
      f"{v.dtype}"
    )
  bsz, length, _, d = q.shape
  if not 1 <= length <= MAX_LENGTH:
    raise ValueError(f"pallas_attention: L must be in [1, {MAX_LENGTH}], got {length}")
  if d < 16 or d > 256 or d & (d - 1):
    raise ValueError(f"pallas_attention: D must be a power of two in [16, 256], got {d}")
  if lengths is None:
    n = jnp.full((bsz,), length, jnp.int32)
  else:
    if lengths.shape != (bsz,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
      raise ValueError(
        f"pallas_attention: lengths must be int ({bsz},), got {lengths.dtype} {lengths.shape}"
      )
    n = jnp.clip(lengths.astype(jnp.int32), 1, length)
  return _attention(q, k, v, n, bool(causal), _SWITCH.interpret, attention_config())
