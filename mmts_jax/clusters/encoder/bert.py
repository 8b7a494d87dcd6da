"""A BERT-family Transformer encoder in Flax (BERT, MiniLM, Sentence-BERT, DistilBERT).

Post-LayerNorm blocks, as in Devlin et al. (2019):

  h   = LN(E_word[ids] + E_pos[0..L) + E_type[0])
  a   = LN(h + W_o MHA(h, mask))
  out = LN(a + W_2 act(W_1 a))

The attention mask is applied as an additive bias of the dtype's most negative value, as the
reference PyTorch implementation does, so padded keys get exactly zero weight.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmts_jax.clusters.encoder.config import BertConfig

__all__ = ["BertEncoder", "activation"]


def activation(name: str):
  """The feed-forward non-linearity named in a Hugging Face config."""
  if name == "gelu":
    return functools.partial(nn.gelu, approximate=False)  # exact erf GELU, as in BERT
  if name in ("gelu_new", "gelu_pytorch_tanh"):
    return functools.partial(nn.gelu, approximate=True)
  if name == "relu":
    return nn.relu
  raise ValueError(f"unsupported activation {name!r}")


class _Configured(nn.Module):
  """Fields shared by the encoder's modules: architecture, compute dtype, matmul precision."""

  config: BertConfig
  dtype: Any = jnp.float32
  precision: Any = None

  def dense(self, features: int, name: str):
    return nn.Dense(features, dtype=self.dtype, precision=self.precision, name=name)


class SelfAttention(_Configured):
  """Multi-head scaled dot-product self-attention with an additive key mask."""

  @nn.compact
  def __call__(self, x, mask_bias):
    c = self.config
    dense = self.dense
    b, n, _ = x.shape
    split = lambda t: t.reshape(b, n, c.num_heads, c.head_dim)
    q = split(dense(c.hidden_size, name="query")(x))
    k = split(dense(c.hidden_size, name="key")(x))
    v = split(dense(c.hidden_size, name="value")(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision)
    scores = scores.astype(jnp.float32) / math.sqrt(c.head_dim) + mask_bias
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=self.precision)
    return dense(c.hidden_size, name="out")(ctx.reshape(b, n, c.hidden_size))


class TransformerLayer(_Configured):
  """One post-LN block: attention + residual + LN, feed-forward + residual + LN."""

  @nn.compact
  def __call__(self, x, mask_bias):
    c = self.config
    dense = self.dense
    norm = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps, dtype=self.dtype)
    attn = SelfAttention(c, self.dtype, self.precision, name="attention")(x, mask_bias)
    x = norm(name="attention_norm")(x + attn)
    h = activation(c.hidden_act)(dense(c.intermediate_size, name="ffn_in")(x))
    return norm(name="ffn_norm")(x + dense(c.hidden_size, name="ffn_out")(h))


class BertEncoder(_Configured):
  """Token ids `(B, L)` and attention mask `(B, L)` -> last hidden state `(B, L, H)`.

  Token-type ids are taken to be 0 (single-sentence input), as sentence encoders use them.

  Example:
    >>> cfg = BertConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
    ...                  intermediate_size=32)
    >>> ids = jnp.ones((2, 5), jnp.int32)
    >>> model = BertEncoder(cfg)
    >>> params = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids, jnp.ones_like(ids))
    >>> jax.eval_shape(model.apply, params, ids, jnp.ones_like(ids)).shape  # traced, not compiled
    (2, 5, 16)
  """

  @nn.compact
  def __call__(self, input_ids, attention_mask):
    c = self.config
    length = input_ids.shape[1]
    if length > c.max_position_embeddings:
      raise ValueError(
        f"sequence length {length} exceeds max_position_embeddings={c.max_position_embeddings}"
      )
    embed = functools.partial(nn.Embed, features=c.hidden_size, dtype=self.dtype)
    x = embed(c.vocab_size, name="word_embeddings")(input_ids)
    x = x + embed(c.max_position_embeddings, name="position_embeddings")(
      jnp.arange(length)[None, :]
    )
    if c.type_vocab_size:
      x = x + embed(c.type_vocab_size, name="token_type_embeddings")(jnp.zeros((1, 1), jnp.int32))
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="embeddings_norm")(x)
    # Masked keys get the most negative finite value, so exp() underflows to exactly 0.
    neg = jnp.finfo(jnp.float32).min
    mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, neg).astype(jnp.float32)
    for i in range(c.num_layers):
      x = TransformerLayer(c, self.dtype, self.precision, name=f"layer_{i}")(x, mask_bias)
    return x
