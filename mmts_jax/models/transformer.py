"""Pre-LayerNorm transformer encoder shared by the ViT and the text tower.

Each block computes `x + MHA(LN(x))` then `x + MLP(LN(x))` (the CLIP / ViT ordering), in
`dtype` (e.g. bfloat16) with float32 parameters. The attention is `attention.SelfAttention`
(fused cuDNN flash attention for bf16 on a GPU; the parameter tree of Flax's
`MultiHeadDotProductAttention`, so older checkpoints load unchanged).

Speed options, none of which changes the parameters or (beyond float rounding) the maths:
  * `remat`: False / "none" keeps every activation the backward pass needs; True / "full"
    recomputes each block's forward in the backward pass (one extra forward, least memory);
    "dots" keeps only the outputs of the matrix products without batch dimensions
    (`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`) and recomputes the cheap
    element-wise work (layer norms, GELU, residual sums) and the attention from them.
  * `fused_qkv`: q, k, v from one product (`attention.SelfAttention`).
  * `attention`: "auto" (cuDNN where `attention.implementation` allows), "xla", or "pallas"
    (`pallas_attention`'s fused short-sequence kernels where they apply, else "auto").
  * `even_length`: an odd sequence (ViT-B/16's 197 tokens, CLIP's 77) gets one zero token
    appended once, before the first block, and hidden from every query as a padding key
    (`lengths`); the output is sliced back. cuDNN's fused backward needs an even length, and
    `attention.even_length_attention` otherwise pads q, k and v in every block (3 pads and
    their slices per layer); here the whole stack carries the extra row instead.
  * `split_qkv_backward` (with `fused_qkv`): True, the fused q/k/v product's backward pass per
    q, k and v (`attention.qkv_projection`), without XLA's join of dq, dk, dv into one tensor;
    "pallas", the join and the bias gradient in one Pallas kernel (`pallas_qkv.split_qkv`).
  * `lean_layer_norm`: every layer norm (`lean_layer_norm.LeanLayerNorm`) with a hand-written
    backward that keeps x in its own dtype and two float32 numbers per row, instead of XLA's
    automatic backward (which keeps `x - mean` in float32); same parameters and formula.
    "pallas": the same with both directions in the fused Pallas kernels of
    `pallas_layer_norm` on GPUs (the XLA form elsewhere); with "pallas" `lean_gelu`, 83.4
    vs 86.3 ms per ViT-B/16 step on one H200 (BENCHMARKS.md, run 12).
    "pallas_res": as "pallas", and each block's two layer norms (`ResidualLayerNorm`) add the
    skip connection's cotangent to their dx inside the backward kernel, instead of a separate
    add per layer norm in the backward pass (`residual_layer_norm`); 83.75 vs 84.69 ms with
    "pallas" on one H200 (run 16, inside the rounds' ranges).
    "pallas_add": as "pallas_res", and each layer norm after a branch (the block's second, the
    next block's first, the final one) also adds that branch and its bias (the attention's
    output projection, fc2) to the stream in its forward kernel, and returns the bias's
    gradient from its backward kernel (`residual_layer_norm.add_layer_norm`): no separate
    residual add in the forward pass and no separate bias reduction in the backward pass. The
    stream between blocks is then a triple `(x, z, a)` (x + z + a not yet formed).
  * `lean_gelu`: True: the MLP's tanh GELU (`lean_gelu.gelu`) with a backward that
    recomputes tanh from the GELU's input instead of keeping it (one (B, L, mlp_dim) tensor
    per layer less written, held and read); same formula. "pallas": as True, and fc1's bias
    add joins the GELU in one Pallas kernel per pass (`pallas_gelu.bias_gelu`, `BiasGeluFc1`),
    whose backward also writes fc1's bias gradient (XLA off GPUs; timed with the layer
    norm's "pallas" above).
  * `flat_residual`: each block keeps the residual stream as a 2-D (B L, C) matrix (the layer
    norms, the residual sums and the MLP on it; only the attention sees (B, L, ...)). On the
    H200 (jax 0.11.2) XLA otherwise stores the (B, L, C) stream of the ViT physically as
    (L, C, B) and transposes it in every residual sum and layer norm
    (`benchmarks/profile_attribution.py`); a 2-D stream leaves it fewer layouts to pick.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from mmts_jax.models import lean_gelu
from mmts_jax.models.attention import SelfAttention
from mmts_jax.models.lean_layer_norm import make_layer_norm
from mmts_jax.models.pallas_gelu import bias_gelu
from mmts_jax.models.residual_layer_norm import ResidualLayerNorm

Dtype = Any

REMAT_POLICIES = ("none", "full", "dots")


def remat_policy(remat: bool | str) -> str:
  """`remat` as one of `REMAT_POLICIES` (True is "full", False "none").

  Example:
    >>> remat_policy(True), remat_policy(False), remat_policy("dots")
    ('full', 'none', 'dots')
  """
  if isinstance(remat, bool):
    return "full" if remat else "none"
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat must be a bool or one of {REMAT_POLICIES}, got {remat!r}")
  return remat


GELUS = (False, True, "pallas")


def gelu_option(value: bool | str) -> bool | str:
  """`lean_gelu` checked: False (Flax's GELU), True (`lean_gelu.gelu`) or "pallas"
  (`BiasGeluFc1`).

  Example:
    >>> gelu_option("pallas"), gelu_option(True)
    ('pallas', True)
  """
  if isinstance(value, str) and value == "pallas":
    return value
  if isinstance(value, bool):
    return value
  raise ValueError(f"lean_gelu must be False, True or 'pallas', got {value!r}")


class BiasGeluFc1(nn.Module):
  """`gelu(x @ kernel + bias)` with `nn.Dense`'s parameters (`kernel` (C, F), lecun normal;
  `bias` (F,), zeros; same names, shapes and initial values), the product in `dtype` without
  the bias, then `pallas_gelu.bias_gelu`: the bias add and the GELU in one kernel per pass.

  Example:
    >>> x = jnp.ones((2, 3, 4))
    >>> params = nn.Dense(8).init(jax.random.PRNGKey(0), x)
    >>> want = nn.gelu(nn.Dense(8).apply(params, x))
    >>> bool(jnp.allclose(BiasGeluFc1(8).apply(params, x), want, atol=1e-6))
    True
  """

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (x.shape[-1], self.features)
    kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    x, kernel = promote_dtype(x, kernel, dtype=self.dtype)
    h = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return bias_gelu(h, bias)


class MlpBlock(nn.Module):
  """`Dense(mlp_dim) -> GELU -> Dense(width)`; `lean_gelu` chooses the GELU (`GELUS`)."""

  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lean_gelu: bool | str = False
  # Return `(x W2, b2)`: fc2 without its bias, and the bias (as `SelfAttention.defer_out_bias`).
  defer_fc2_bias: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    width = x.shape[-1]
    dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")
    if gelu_option(self.lean_gelu) == "pallas":
      x = BiasGeluFc1(self.mlp_dim, **dense)(x)
    else:
      x = nn.Dense(self.mlp_dim, **dense)(x)
      x = lean_gelu.gelu(x) if self.lean_gelu else nn.gelu(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    fc2 = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")
    if not self.defer_fc2_bias:
      return fc2(x)
    if self.is_initializing():  # creates fc2's parameters; the values do not matter here
      return fc2(x), jnp.zeros((width,), self.param_dtype)
    p = self.variables["params"]["fc2"]
    return jnp.dot(x.astype(self.dtype), p["kernel"].astype(self.dtype)), p["bias"]


class EncoderBlock(nn.Module):
  """One pre-LN block: attention then MLP, each with a residual connection."""

  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  fused_qkv: bool = False
  attention: str = "auto"
  causal: bool = False
  lean_layer_norm: bool | str = False
  lean_gelu: bool | str = False
  split_qkv_backward: bool | str = False
  flat_residual: bool = False

  def _norm(self, name: str, x: jax.Array, branch=None) -> tuple[jax.Array, jax.Array]:
    """`(x, LN(x))`, x the stream the block adds its branch to. With "pallas_res" both come
    from `ResidualLayerNorm`, whose backward kernel adds the skip connection's cotangent to
    the layer norm's dx (no separate add); the same parameters either way. `branch` ("pallas_add"
    only): `(z, a)`, a branch before its bias and the bias, added to x first in the same
    kernel (`residual_layer_norm.add_layer_norm`), which returns the stream x + z + a."""
    if self.lean_layer_norm in ("pallas_res", "pallas_add"):
      dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
      return ResidualLayerNorm(**dt, kernel="pallas", name=name)(x, *(branch or ()))
    return x, make_layer_norm(self.lean_layer_norm, self.dtype, self.param_dtype, name)(x)

  def _branch(self, out, rows_shape, train: bool) -> jax.Array:
    """A branch's output as the value the block adds to its stream (after dropout)."""
    return nn.Dropout(self.dropout, deterministic=not train)(out.reshape(rows_shape))

  def _deferred(self, out, rows_shape, train: bool) -> tuple[jax.Array, jax.Array]:
    """A "pallas_add" branch's `(z, a)` (before its bias, and the bias) as `_norm` takes it; a
    dropout that is on makes it `(dropout(z + a), 0)`: same values, the bias added outside."""
    z, a = out
    z = z.reshape(rows_shape)
    if self.dropout > 0.0 and train:
      drop = nn.Dropout(self.dropout, deterministic=False)
      return drop(z + a.astype(z.dtype)), jnp.zeros_like(a)
    return z, a

  @property
  def deferred_bias(self) -> bool:
    return self.lean_layer_norm == "pallas_add"

  @nn.compact
  def __call__(self, x, mask=None, train: bool = False, lengths=None):
    # `train` may be positional: `nn.remat` marks it static by position. With "pallas_add"
    # the stream between blocks is a triple `(x, z, a)`, the previous block's MLP branch not
    # yet added (`x + z + a`, done by this block's first layer norm), and so is the result.
    pending = None
    if isinstance(x, tuple):
      x, *pending = x
    shape = x.shape
    if self.flat_residual:
      x = x.reshape(-1, shape[-1])
      pending = pending and [pending[0].reshape(x.shape), pending[1]]
    x, y = self._norm("ln1", x, pending)
    y = SelfAttention(
      self.num_heads,
      self.dropout,
      self.dtype,
      self.param_dtype,
      fused_qkv=self.fused_qkv,
      kernel=self.attention,
      split_qkv_backward=self.split_qkv_backward,
      defer_out_bias=self.deferred_bias,
      name="attn",
    )(y.reshape(shape), mask, deterministic=not train, causal=self.causal, lengths=lengths)
    if self.deferred_bias:
      x, y = self._norm("ln2", x, self._deferred(y, x.shape, train))
    else:
      x, y = self._norm("ln2", x + self._branch(y, x.shape, train))
    y = MlpBlock(
      self.mlp_dim,
      self.dropout,
      self.dtype,
      self.param_dtype,
      self.lean_gelu,
      defer_fc2_bias=self.deferred_bias,
      name="mlp",
    )(y, train=train)
    if self.deferred_bias:
      z, a = self._deferred(y, x.shape, train)
      return x.reshape(shape), z.reshape(shape), a
    return (x + self._branch(y, x.shape, train)).reshape(shape)


class Encoder(nn.Module):
  """`depth` encoder blocks and a final LayerNorm. `mask` broadcasts to (B, heads, L, L);
  `causal` / `lengths` give the same mask in the fused attention kernel's form (`attention`)."""

  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  remat: bool | str = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  fused_qkv: bool = False
  attention: str = "auto"
  causal: bool = False
  even_length: bool = False
  lean_layer_norm: bool | str = False
  lean_gelu: bool | str = False
  split_qkv_backward: bool | str = False
  flat_residual: bool = False

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool = False, lengths=None):
    length = x.shape[1]
    if self.even_length and length % 2:
      x, mask, padded_lengths = pad_to_even(x, mask, lengths)
      # A causal stack without lengths needs none: the appended last token is later than
      # every real one, so the causal mask already hides it.
      lengths = None if self.causal and lengths is None else padded_lengths
    # Rematerialisation trades recomputation in the backward pass for activation memory.
    policy = remat_policy(self.remat)
    if policy == "none":
      block = EncoderBlock
    else:
      saveable = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
      block = nn.remat(
        EncoderBlock, static_argnums=(3,), policy=saveable if policy == "dots" else None
      )
    for i in range(self.depth):
      blk = block(
        self.num_heads,
        self.mlp_dim,
        self.dropout,
        self.dtype,
        self.param_dtype,
        fused_qkv=self.fused_qkv,
        attention=self.attention,
        causal=self.causal,
        lean_layer_norm=self.lean_layer_norm,
        lean_gelu=self.lean_gelu,
        split_qkv_backward=self.split_qkv_backward,
        flat_residual=self.flat_residual,
        name=f"block_{i}",
      )
      x = blk(x, mask, train, lengths)
    if isinstance(x, tuple):  # "pallas_add": the last MLP branch is added by the final norm
      dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
      _, x = ResidualLayerNorm(**dt, kernel="pallas", name="ln_final")(*x)
    else:
      x = make_layer_norm(self.lean_layer_norm, self.dtype, self.param_dtype, "ln_final")(x)
    return x[:, :length]


def pad_to_even(x: jax.Array, mask: jax.Array | None, lengths: jax.Array | None):
  """`x (B, L, C)` with L odd -> `(B, L + 1, C)` with a zero row appended, the dense `mask`
  (broadcasting to `(B, heads, L, L)`) padded so that no query sees the new key (the new query
  sees only itself: no row is empty), and `lengths` (int `(B,)`, default all L) unchanged, so
  the fused kernel hides the new key from every real query too.

  Example:
    >>> x, mask, lengths = pad_to_even(jnp.ones((2, 3, 4)), None, None)
    >>> x.shape, mask, lengths.tolist()
    ((2, 4, 4), None, [3, 3])
  """
  b, length = x.shape[0], x.shape[1]
  x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
  if lengths is None:
    lengths = jnp.full((b,), length, jnp.int32)
  if mask is not None:
    mask = jnp.pad(mask.astype(jnp.bool_), [(0, 0)] * (mask.ndim - 2) + [(0, 1), (0, 1)])
    mask = mask.at[..., length, length].set(True)
  return x, mask, lengths
