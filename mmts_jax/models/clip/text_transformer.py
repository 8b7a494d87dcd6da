"""CLIP's causal text tower: tokens + positions -> causal pre-LN transformer -> ln_final ->
the features at the end-of-text token -> `text_projection`.

  h = ln_final(transformer(E[t] + P, causal)),   z_b = h[b, argmax_l t[b, l]] @ text_projection

The end-of-text token (49407 in CLIP's BPE) has the largest id in the vocabulary, so `argmax` of
the token ids finds it (the first occurrence on ties, as `torch.argmax`); with the causal mask the
features there have seen the whole caption and none of the padding. The output is not normalised.

Example (`jax.eval_shape` traces the model without compiling it: the shapes, in milliseconds):
  >>> import jax, jax.numpy as jnp
  >>> tower = CLIPTextTransformer(context_length=5, vocab_size=10, width=8, layers=1, heads=2,
  ...                             output_dim=4)
  >>> t = jnp.array([[8, 3, 9, 0, 0]])
  >>> jax.eval_shape(lambda t: tower.apply(tower.init(jax.random.PRNGKey(0), t), t), t).shape
  (1, 4)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmts_jax.models.clip.layers import Transformer

__all__ = ["CLIPTextTransformer"]


class CLIPTextTransformer(nn.Module):
  context_length: int
  vocab_size: int
  width: int
  layers: int
  heads: int
  output_dim: int
  act: str = "quick_gelu"
  ln_eps: float = 1e-5
  remat: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """(B, context_length) int token ids -> (B, output_dim) unnormalised features."""
    if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
      raise ValueError(
        f"CLIP text: tokens must be (B, {self.context_length}), got shape {tuple(tokens.shape)}"
      )
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"CLIP text: tokens must be integer ids, got dtype {tokens.dtype}")
    x = nn.Embed(
      self.vocab_size,
      self.width,
      embedding_init=nn.initializers.normal(0.02),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="token_embedding",
    )(tokens)
    pos = self.param(
      "positional_embedding",
      nn.initializers.normal(0.01),
      (self.context_length, self.width),
      self.param_dtype,
    )
    x = x + pos.astype(self.dtype)
    causal = nn.make_causal_mask(tokens, dtype=jnp.bool_)  # (B, 1, L, L)
    x = Transformer(
      self.width,
      self.layers,
      self.heads,
      act=self.act,
      ln_eps=self.ln_eps,
      remat=self.remat,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="transformer",
    )(x, causal)
    x = nn.LayerNorm(
      epsilon=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="ln_final"
    )(x)
    eot = jnp.argmax(tokens, axis=-1)
    pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    proj = self.param(
      "text_projection",
      nn.initializers.normal(self.width**-0.5),
      (self.width, self.output_dim),
      self.param_dtype,
    )
    return pooled @ proj.astype(self.dtype)
