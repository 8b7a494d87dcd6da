"""Multi-head self-attention over `jax.nn.dot_product_attention` (fused cuDNN on GPU).

For each head h, with `q = x Wq_h + bq_h`, `k = x Wk_h + bk_h`, `v = x Wv_h + bv_h`
(head dimension d):

    head_h = softmax(q k^T / sqrt(d) + M) v,   out = concat_h(head_h) Wo + bo,

where M is 0 where `mask` is True and -inf elsewhere. The parameters are four `DenseGeneral`
layers named `query`, `key`, `value` (kernels `(width, heads, d)`) and `out` (kernel
`(heads, d, width)`), with the initialisers of Flax's `MultiHeadDotProductAttention`: the
parameter tree, hence every checkpoint, is the one that module makes, and the same key gives
the same initial values.

The attention kernel is chosen once per traced shape by `implementation` (below): cuDNN's fused
flash attention for bf16/fp16 on a GPU when no dense mask is given (the ViT; odd lengths such
as its 197 tokens are padded to even, `even_length_attention`) or when the mask is also given
in the form that kernel takes, `causal` and per-row `lengths` of trailing padding (the text
tower); XLA's softmax attention otherwise (float32, CPU/TPU, a dense mask alone), and XLA
always applies the dense `mask` when one is given. Both compute the logits and the softmax in
float32. Dropout on the attention weights (`dropout_rate > 0` while training) takes Flax's
explicit-weights path, which neither fused kernel offers.

Example:
  >>> import jax, jax.numpy as jnp
  >>> attn = SelfAttention(num_heads=2)
  >>> x = jnp.ones((1, 4, 8))
  >>> params = attn.init(jax.random.PRNGKey(0), x)
  >>> sorted(params["params"])
  ['key', 'out', 'query', 'value']
  >>> attn.apply(params, x).shape
  (1, 4, 8)
"""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from mmts_jax.models.pallas_attention import pallas_attention, supported, use_pallas_attention
from mmts_jax.models.pallas_qkv import split_qkv

Dtype = Any

_FUSED_DTYPES = (jnp.bfloat16, jnp.float16)


def implementation(
  dtype: Dtype, head_dim: int, has_mask: bool, backend: str | None = None
) -> Literal["cudnn", "xla"]:
  """The kernel for `jax.nn.dot_product_attention`: `"cudnn"` or `"xla"`.

  cuDNN's flash attention takes bf16/fp16 only, head dimensions that are multiples of 8 up to
  128, and (here) no dense mask: a boolean mask becomes an additive bias, which its training
  kernel refuses at odd sequence lengths such as CLIP's 77 tokens. Everything else runs XLA.

  Example:
    >>> implementation(jnp.bfloat16, 64, has_mask=False, backend="gpu")
    'cudnn'
    >>> implementation(jnp.float32, 64, has_mask=False, backend="gpu")
    'xla'
    >>> implementation(jnp.bfloat16, 64, has_mask=True, backend="gpu")
    'xla'
  """
  backend = jax.default_backend() if backend is None else backend
  fused = (
    backend in ("gpu", "cuda")
    and jnp.dtype(dtype) in [jnp.dtype(d) for d in _FUSED_DTYPES]
    and head_dim % 8 == 0
    and head_dim <= 128
    and not has_mask
  )
  return "cudnn" if fused else "xla"


def attend(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array | None = None,
  *,
  causal: bool = False,
  lengths: jax.Array | None = None,
  kernel: str = "auto",  # "auto" | "xla" | "pallas", checked below (a module field passes a str)
) -> jax.Array:
  """`softmax(q k^T / sqrt(d) + M) v` for `(B, L, heads, d)` inputs, through the kernel that
  `implementation` picks (`kernel="xla"` forces XLA); falls back to XLA (with a log line) if
  cuDNN refuses the shape while tracing. `kernel="pallas"`: the fused short-sequence kernels
  of `pallas_attention` where they apply (on GPUs or under `set_pallas_attention
  ("interpret")`, float32 / bfloat16, L <= 256, d a power of two, no dense mask alone),
  else as `"auto"`.

  `causal` and `lengths` (int `(B,)`: row b's keys `j < lengths[b]` are real, the rest trailing
  padding) state the mask in the fused kernel's form. With a dense `mask` as well they must
  describe the same mask on the real positions: cuDNN then runs the structured form and XLA
  the dense mask. The two differ only on the padded query rows, which no real position reads
  (causal: a real query sees only earlier keys; otherwise padding keys are masked).

  Example:
    >>> q = jnp.ones((1, 3, 2, 4))
    >>> attend(q, q, q).shape
    (1, 3, 2, 4)
    >>> attend(q, q, q, causal=True, lengths=jnp.array([2])).shape
    (1, 3, 2, 4)
  """
  if kernel not in ("auto", "xla", "pallas"):
    raise ValueError(f"attend: kernel must be 'auto', 'xla' or 'pallas', got {kernel!r}")
  if mask is not None and mask.dtype != jnp.bool_:
    mask = mask.astype(jnp.bool_)  # Flax's make_attention_mask gives float 0/1
  structured = causal or lengths is not None
  if kernel == "pallas":
    if pallas_applies(q, k, v, mask is not None and not structured):
      return pallas_attention(q, k, v, causal=causal, lengths=lengths)
    kernel = "auto"
  impl = implementation(q.dtype, q.shape[-1], mask is not None and not structured)
  if impl == "cudnn" and kernel == "auto":
    try:
      return even_length_attention(q, k, v, "cudnn", causal=causal, lengths=lengths)
    except (NotImplementedError, RuntimeError) as e:  # shape/version checks run at trace time
      logging.warning("cuDNN attention refused %s %s (%s); using XLA", q.shape, q.dtype, e)
  if mask is None and structured:
    return even_length_attention(q, k, v, "xla", causal=causal, lengths=lengths)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def pallas_applies(q: jax.Array, k: jax.Array, v: jax.Array, dense_mask_only: bool) -> bool:
  """Whether `attend(..., kernel="pallas")` takes `pallas_attention`: the kernels are on
  (`use_pallas_attention`: GPUs, or the interpreter), q, k, v share a supported shape and
  dtype, and the mask, if any, is also given as `causal` / `lengths`.

  Example:
    >>> q = jnp.ones((1, 3, 2, 16))
    >>> pallas_applies(q, q, q, False)  # on the CPU, the kernels are off
    False
  """
  return (
    not dense_mask_only
    and q.shape == k.shape == v.shape
    and q.dtype == k.dtype == v.dtype
    and use_pallas_attention(q.dtype)
    and supported(q.shape, q.dtype)
  )


def even_length_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  kernel: Literal["cudnn", "xla"] = "cudnn",
  *,
  causal: bool = False,
  lengths: jax.Array | None = None,
) -> jax.Array:
  """Self-attention `(B, L, heads, d)` computed at an even length, optionally causal and with
  trailing padding (`lengths`, int `(B,)`: keys `j >= lengths[b]` of row b are hidden).

  cuDNN's fused backward refuses odd sequence lengths (ViT-B/16 has 197 tokens, CLIP's text
  77). An odd L is padded to L + 1 with a zero query row, sliced off the output, and a zero
  key that the kernel's own padding mask (`query_seq_lengths = key_value_seq_lengths = L`, or
  `lengths`; no bias tensor) hides: every real query attends to exactly its keys, so the
  result equals unpadded attention. `lengths` below 1 count as 1 (a row of padding alone still
  attends to its first position, as the dense masks here let every position see itself).

  Example:
    >>> q = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 2, 8))
    >>> full = jax.nn.dot_product_attention(q, q, q)
    >>> bool(jnp.allclose(even_length_attention(q, q, q, "xla"), full, atol=1e-6))
    True
  """
  length = q.shape[1]
  if length % 2 == 0 and lengths is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=kernel)
  if length % 2:
    pad = ((0, 0), (0, 1), (0, 0), (0, 0))
    q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
  if lengths is None:
    lengths = jnp.full((q.shape[0],), length, jnp.int32)
  lengths = jnp.clip(lengths.astype(jnp.int32), 1, length)
  y = jax.nn.dot_product_attention(
    q,
    k,
    v,
    is_causal=causal,
    query_seq_lengths=lengths,
    key_value_seq_lengths=lengths,
    implementation=kernel,
  )
  return y[:, :length]


def _fused_projection(
  params, x: jax.Array, dtype, split_backward: bool | str = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q, k, v of `DenseGeneral`s `query`, `key`, `value` (kernels `(width, heads, d)`) as one
  product: `x [Wq Wk Wv] + [bq bk bv]`, the kernels stacked to `(width, 3, heads, d)` in
  `dtype` (one larger matrix product reads `x` once instead of three times).
  `split_backward`: True, the backward pass through `qkv_projection`'s hand-written rule;
  "pallas", XLA's product backward with the join of dq, dk, dv and the bias gradient in one
  Pallas kernel (`pallas_qkv.split_qkv`)."""
  names = ("query", "key", "value")
  kernel = jnp.stack([params[n]["kernel"] for n in names], axis=1).astype(dtype)
  bias = jnp.stack([params[n]["bias"] for n in names], axis=0)
  if split_backward == "pallas":
    # The product without its bias; the split, the bias and the backward's join of dq, dk, dv
    # (with the float32 bias gradient) in `pallas_qkv.split_qkv`.
    return split_qkv(jnp.einsum("...w,wthd->...thd", x.astype(dtype), kernel), bias)
  project = qkv_projection if split_backward else _qkv
  return project(x.astype(dtype), kernel, bias.astype(dtype))


def _qkv(x, kernel, bias):
  qkv = jnp.einsum("...w,wthd->...thd", x, kernel) + bias
  return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]


@jax.custom_vjp
def qkv_projection(
  x: jax.Array, kernel: jax.Array, bias: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(q, k, v) = x kernel[:, t] + bias[t]` for t = 0, 1, 2 from one product (`kernel`
  `(width, 3, heads, d)`, `bias` `(3, heads, d)`), with the backward pass written per t:

      dx = sum_t dq_t kernel[:, t]^T,  dkernel[:, t] = x^T dq_t,  dbias[t] = sum_rows dq_t.

  XLA's automatic backward first joins dq, dk and dv into one `(..., 3, heads, d)` tensor
  (a copy of all three, with the bias gradient fused into it) for one product with the
  stacked kernel; here each of the three feeds its own products, so the join is never written.

  Example:
    >>> x = jnp.ones((2, 4))
    >>> q, k, v = qkv_projection(x, jnp.ones((4, 3, 2, 1)), jnp.zeros((3, 2, 1)))
    >>> q.shape, float(v[0, 0, 0])
    ((2, 2, 1), 4.0)
  """
  return _qkv(x, kernel, bias)


def _qkv_fwd(x, kernel, bias):
  return _qkv(x, kernel, bias), (x, kernel)


def _qkv_bwd(residuals, grads):
  x, kernel = residuals
  rows = tuple(range(x.ndim - 1))
  dq, dk, dv = (jnp.einsum("...hd,whd->...w", g, kernel[:, t]) for t, g in enumerate(grads))
  dx = dq + dk + dv
  dkernel = jnp.stack([jnp.einsum("...w,...hd->whd", x, g) for g in grads], axis=1)
  dbias = jnp.stack([jnp.sum(g, axis=rows) for g in grads], axis=0)
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype), dbias.astype(kernel.dtype)


qkv_projection.defvjp(_qkv_fwd, _qkv_bwd)


class SelfAttention(nn.Module):
  """Multi-head self-attention with Flax `MultiHeadDotProductAttention`'s parameters.

  `mask` (bool) broadcasts to `(B, heads, L, L)`; True keeps a key. `causal` / `lengths`: the
  same mask in the fused kernel's form (`attend`). `fused_qkv`: q, k and v come from one
  `(width, 3 heads d)` product of the three kernels stacked at run time (the parameters stay
  three `DenseGeneral`s); `split_qkv_backward` (with `fused_qkv`): that product's backward
  pass per q, k, v (`qkv_projection`); `kernel`: `"auto"`, `"xla"` or `"pallas"` (`attend`).
  """

  num_heads: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  fused_qkv: bool = False
  kernel: str = "auto"
  split_qkv_backward: bool | str = False
  # Return `(y Wo, bo)`: the output projection without its bias, and the bias, for a caller
  # that adds both to its residual stream in one kernel (`residual_layer_norm.add_layer_norm`).
  defer_out_bias: bool = False

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    mask: jax.Array | None = None,
    *,
    deterministic: bool = True,
    causal: bool = False,
    lengths: jax.Array | None = None,
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(
        f"SelfAttention: width {width} is not divisible by num_heads {self.num_heads}"
      )
    head_dim = width // self.num_heads
    dense = lambda name: nn.DenseGeneral(
      (self.num_heads, head_dim), axis=-1, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    projections = [dense(name) for name in ("query", "key", "value")]
    if self.fused_qkv and not self.is_initializing():
      q, k, v = _fused_projection(
        self.variables["params"], x, self.dtype, split_backward=self.split_qkv_backward
      )
    else:
      q, k, v = (proj(x) for proj in projections)
    if self.dropout_rate > 0.0 and not deterministic:
      y = nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask,
        dropout_rng=self.make_rng("dropout"),
        dropout_rate=self.dropout_rate,
        deterministic=False,
        dtype=self.dtype,
      )
    else:
      y = attend(q, k, v, mask, causal=causal, lengths=lengths, kernel=self.kernel)
    out = nn.DenseGeneral(
      width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype, name="out"
    )
    if not self.defer_out_bias:
      return out(y)
    if self.is_initializing():  # creates `out`'s parameters; the values do not matter here
      return out(y), jnp.zeros((width,), self.param_dtype)
    p = self.variables["params"]["out"]
    z = jnp.einsum("...hd,hdw->...w", y.astype(self.dtype), p["kernel"].astype(self.dtype))
    return z, p["bias"]
