"""OpenAI CLIP's modified ResNet image tower (RN50 and kin).

Differences from the torchvision ResNet: a stem of three 3x3 convolutions (the first with stride
2) and a 2x2 average pool instead of one 7x7 convolution and a max pool; anti-aliased strides (a
2x2 average pool before the last 1x1 convolution of a strided block and before its shortcut
convolution, instead of strided convolutions); and an attention pool instead of the global
average pool: the mean of the final feature map is prepended as a query token, a positional
embedding is added, and one multi-head attention layer (`q_proj, k_proj, v_proj, c_proj`) reads
the query's output:

  T = [mean(F); F] + P,   z = c_proj(MHA(q=T_0, k=T, v=T))

BatchNorm is frozen: CLIP checkpoints are fine-tuned with their inference statistics, so each
BatchNorm is stored as the per-channel affine map it computes, `y = x * scale + bias` with
`scale = gamma / sqrt(var + eps)` and `bias = beta - mean * scale` (the converter folds the four
PyTorch tensors into these two). There is no `batch_stats` collection to carry.

Example (`jax.eval_shape` traces the model without compiling it: the shapes, in milliseconds):
  >>> import jax, jax.numpy as jnp
  >>> tower = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=8, heads=2, image_size=32,
  ...                        width=8)
  >>> x = jnp.zeros((2, 32, 32, 3))
  >>> jax.eval_shape(lambda x: tower.apply(tower.init(jax.random.PRNGKey(0), x), x), x).shape
  (2, 8)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmts_jax.models.clip.layers import MultiHeadAttention

__all__ = ["FrozenBatchNorm", "Bottleneck", "AttentionPool", "ModifiedResNet"]


class FrozenBatchNorm(nn.Module):
  """Inference-mode BatchNorm as the affine map `x * scale + bias` it computes (per channel)."""

  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (self.features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    return x * scale.astype(self.dtype) + bias.astype(self.dtype)


def _avg_pool(x: jax.Array, stride: int) -> jax.Array:
  return nn.avg_pool(x, (stride, stride), strides=(stride, stride)) if stride > 1 else x


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> [avg-pool] -> 1x1 (x4 channels), shortcut [avg-pool -> 1x1 conv -> BN]."""

  planes: int
  stride: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda n, k, name: nn.Conv(
      n,
      (k, k),
      padding=((k // 2, k // 2),) * 2,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )
    bn = lambda n, name: FrozenBatchNorm(
      n, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    out = nn.relu(bn(self.planes, "bn1")(conv(self.planes, 1, "conv1")(x)))
    out = nn.relu(bn(self.planes, "bn2")(conv(self.planes, 3, "conv2")(out)))
    out = _avg_pool(out, self.stride)
    out = bn(self.planes * 4, "bn3")(conv(self.planes * 4, 1, "conv3")(out))
    identity = x
    if self.stride > 1 or x.shape[-1] != self.planes * 4:
      identity = _avg_pool(x, self.stride)
      identity = bn(self.planes * 4, "downsample_bn")(
        conv(self.planes * 4, 1, "downsample_conv")(identity)
      )
    return nn.relu(out + identity)


class AttentionPool(nn.Module):
  """`[mean(F); F] + P` -> one attention layer with the mean token as the only query."""

  num_tokens: int
  width: int
  heads: int
  output_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    if x.shape[1] != self.num_tokens:
      raise ValueError(
        f"CLIP attention pool: expected {self.num_tokens} feature-map cells, "
        f"got {x.shape[1]} (the input size differs from image_size)"
      )
    x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
    pos = self.param(
      "positional_embedding",
      nn.initializers.normal(self.width**-0.5),
      (self.num_tokens + 1, self.width),
      self.param_dtype,
    )
    x = x + pos.astype(self.dtype)
    out = MultiHeadAttention(
      self.width,
      self.heads,
      out_features=self.output_dim,
      proj_names=("q_proj", "k_proj", "v_proj", "c_proj"),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="attn",
    )(x[:, :1], x)
    return out[:, 0]


class ModifiedResNet(nn.Module):
  layers: Sequence[int]
  output_dim: int
  heads: int
  image_size: int = 224
  width: int = 64
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array) -> jax.Array:
    """(B, H, W, 3) preprocessed pixels -> (B, output_dim) unnormalised features."""
    size = (self.image_size, self.image_size)
    if image.ndim != 4 or tuple(image.shape[1:]) != size + (3,):
      raise ValueError(
        f"CLIP ResNet: image must be (B, {self.image_size}, {self.image_size}, 3),"
        f" got shape {tuple(image.shape)}"
      )
    conv = lambda n, stride, name: nn.Conv(
      n,
      (3, 3),
      strides=(stride, stride),
      padding=((1, 1), (1, 1)),
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )
    bn = lambda n, name: FrozenBatchNorm(
      n, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    half = self.width // 2
    x = image.astype(self.dtype)
    x = nn.relu(bn(half, "bn1")(conv(half, 2, "conv1")(x)))
    x = nn.relu(bn(half, "bn2")(conv(half, 1, "conv2")(x)))
    x = nn.relu(bn(self.width, "bn3")(conv(self.width, 1, "conv3")(x)))
    x = _avg_pool(x, 2)
    for stage, blocks in enumerate(self.layers):
      for j in range(blocks):
        x = Bottleneck(
          self.width * 2**stage,
          stride=2 if stage > 0 and j == 0 else 1,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f"layer{stage + 1}_{j}",
        )(x)
    side = self.image_size // 32
    return AttentionPool(
      side * side,
      self.width * 32,
      self.heads,
      self.output_dim,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="attnpool",
    )(x)
