"""Pre-LayerNorm transformer encoder shared by the ViT and the text tower.

Each block computes `x + MHA(LN(x))` then `x + MLP(LN(x))` (the CLIP / ViT ordering), in
`dtype` (e.g. bfloat16) with float32 parameters. The attention is `attention.SelfAttention`
(fused cuDNN flash attention for bf16 on a GPU; the parameter tree of Flax's
`MultiHeadDotProductAttention`, so older checkpoints load unchanged).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmts_jax.models.attention import SelfAttention

Dtype = Any


class MlpBlock(nn.Module):
  """`Dense(mlp_dim) -> GELU -> Dense(width)`."""

  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
    x = nn.gelu(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(x)


class EncoderBlock(nn.Module):
  """One pre-LN block: attention then MLP, each with a residual connection."""

  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, train: bool = False):
    # `train` may be positional: `nn.remat` marks it static by position.
    y = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln1")(x)
    y = SelfAttention(self.num_heads, self.dropout, self.dtype, self.param_dtype, name="attn")(
      y, mask, deterministic=not train
    )
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln2")(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.param_dtype, name="mlp")(
      y, train=train
    )
    return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class Encoder(nn.Module):
  """`depth` encoder blocks and a final LayerNorm. `mask` broadcasts to (B, heads, L, L)."""

  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool = False):
    # Rematerialisation trades one extra forward per block for activation memory (large batches).
    block = nn.remat(EncoderBlock, static_argnums=(3,)) if self.remat else EncoderBlock
    for i in range(self.depth):
      blk = block(
        self.num_heads, self.mlp_dim, self.dropout, self.dtype, self.param_dtype, name=f"block_{i}"
      )
      x = blk(x, mask, train)
    return nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln_final")(x)
