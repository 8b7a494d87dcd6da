"""Text tower: a transformer over token ids from a WordPiece/BPE tokenizer (`transformers` or
`tokenizers` produce the ids on the host; this module only sees int32 arrays).

`ids (B, L) -> token + position embeddings -> pre-LN encoder -> pooled (B, width)`.
Padding (`ids == pad_id`) is masked out of attention; it trails the real tokens (as tokenizers
pad, and as `"eot"` pooling assumes), so the attention mask is also given to the fused
attention kernel as per-row lengths plus `causal` (`mmts_jax.models.attention.attend`). Pooling:
  * `"eot"`: the last non-padding token (CLIP, with a causal mask),
  * `"cls"`: the first token (BERT-style WordPiece, `[CLS]`),
  * `"mean"`: the mean over non-padding tokens.

Example (`jax.eval_shape` traces the model without compiling it: the shapes, in milliseconds):
  >>> import jax, jax.numpy as jnp
  >>> tower = TextTransformer(vocab_size=100, max_len=8, width=32, depth=1, num_heads=2,
  ...                         mlp_dim=64)
  >>> ids = jnp.array([[5, 6, 7, 0, 0, 0, 0, 0]], jnp.int32)
  >>> params = jax.eval_shape(tower.init, jax.random.PRNGKey(0), ids)
  >>> jax.eval_shape(tower.apply, params, ids).shape
  (1, 32)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmts_jax.models.transformer import Encoder

POOLINGS = ("eot", "cls", "mean")


class TextTransformer(nn.Module):
  vocab_size: int
  max_len: int = 77
  width: int = 512
  depth: int = 12
  num_heads: int = 8
  mlp_dim: int = 2048
  pool: str = "eot"
  causal: bool = True
  pad_id: int = 0
  dropout: float = 0.0
  remat: bool | str = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  fused_qkv: bool = False
  attention: str = "auto"
  even_length: bool = False
  lean_layer_norm: bool | str = False
  lean_gelu: bool | str = False
  split_qkv_backward: bool | str = False
  flat_residual: bool = False
  causal_only_lengths: bool = False

  def _kernel_lengths(self, valid: jax.Array) -> jax.Array | None:
    """Per-row real lengths for the fused attention kernel, or None where the causal mask
    alone hides the trailing padding (`causal_only_lengths`): a real token sees only earlier
    tokens, all real, so the kernel needs no key-padding mask (CLIP's text tower uses the causal
    mask alone). The dense `mask` (the XLA path) is unchanged; padded rows, which no pooling
    reads, may differ between the two."""
    if self.causal and self.causal_only_lengths:
      return None
    return jnp.sum(valid, axis=1)

  @nn.compact
  def __call__(self, ids, *, train: bool = False):
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(
        f"TextTransformer: ids must be (B, L) integers, got {ids.dtype} {tuple(ids.shape)}"
      )
    if ids.shape[1] > self.max_len:
      raise ValueError(f"TextTransformer: sequence length {ids.shape[1]} > max_len {self.max_len}")
    if self.pool not in POOLINGS:
      raise ValueError(f"TextTransformer: pool must be one of {POOLINGS}, got {self.pool!r}")
    length = ids.shape[1]
    valid = ids != self.pad_id  # (B, L)
    x = nn.Embed(
      self.vocab_size,
      self.width,
      embedding_init=nn.initializers.normal(0.02),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="token_embed",
    )(ids)
    pos = self.param(
      "pos_embedding", nn.initializers.normal(0.01), (self.max_len, self.width), self.param_dtype
    )
    x = x + pos[None, :length].astype(x.dtype)
    mask = nn.make_attention_mask(valid, valid)  # (B, 1, L, L)
    if self.causal:
      mask = nn.combine_masks(mask, nn.make_causal_mask(ids))
    # A row with no valid key (an all-padding sequence) would softmax over nothing: let each
    # position always see itself.
    mask = jnp.logical_or(mask, jnp.eye(length, dtype=bool)[None, None])
    x = Encoder(
      self.depth,
      self.num_heads,
      self.mlp_dim,
      self.dropout,
      self.remat,
      self.dtype,
      self.param_dtype,
      fused_qkv=self.fused_qkv,
      attention=self.attention,
      even_length=self.even_length,
      causal=self.causal,
      lean_layer_norm=self.lean_layer_norm,
      lean_gelu=self.lean_gelu,
      split_qkv_backward=self.split_qkv_backward,
      flat_residual=self.flat_residual,
      name="encoder",
    )(x, mask, train=train, lengths=self._kernel_lengths(valid))
    if self.pool == "cls":
      return x[:, 0]
    if self.pool == "eot":
      last = jnp.maximum(jnp.sum(valid, axis=1) - 1, 0)
      return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    w = valid.astype(x.dtype)[..., None]
    return jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1)
