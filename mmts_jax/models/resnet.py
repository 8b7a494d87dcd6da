"""ResNet image tower (He et al. 2016; bottleneck v1.5, stride in the 3x3 conv), the CC3M
backbone of the MM-TS paper (ResNet-50), with BatchNorm and global average pooling.

BatchNorm statistics live in the `batch_stats` collection; under `jit` with a batch sharded over
a mesh they are computed over the global batch (XLA inserts the cross-device reduction).

Example (`jax.eval_shape` traces the model without compiling it: the shapes, in milliseconds):
  >>> import jax, jax.numpy as jnp
  >>> net = ResNet.from_depth(50)
  >>> x = jnp.zeros((1, 64, 64, 3))
  >>> variables = jax.eval_shape(net.init, jax.random.PRNGKey(0), x)
  >>> jax.eval_shape(net.apply, variables, x).shape
  (1, 2048)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# depth -> blocks per stage (bottleneck). 1/2 are small test sizes.
RESNET_STAGES = {
  1: (1,),
  2: (1, 1),
  26: (2, 2, 2, 2),
  50: (3, 4, 6, 3),
  101: (3, 4, 23, 3),
  152: (3, 8, 36, 3),
}


class Bottleneck(nn.Module):
  filters: int
  strides: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    conv = functools.partial(
      nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype
    )
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    residual = x
    y = nn.relu(norm(name="bn1")(conv(self.filters, (1, 1), name="conv1")(x)))
    y = conv(
      self.filters, (3, 3), strides=(self.strides,) * 2, padding=((1, 1), (1, 1)), name="conv2"
    )(y)
    y = nn.relu(norm(name="bn2")(y))
    # Zero-init the last BN scale: each block starts as the identity (Goyal et al. 2017).
    y = norm(name="bn3", scale_init=nn.initializers.zeros)(
      conv(self.filters * 4, (1, 1), name="conv3")(y)
    )
    if residual.shape != y.shape:
      residual = conv(self.filters * 4, (1, 1), strides=(self.strides,) * 2, name="proj")(x)
      residual = norm(name="proj_bn")(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  stage_sizes: Sequence[int]
  width: int = 64
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @classmethod
  def from_depth(cls, depth: int, **kwargs) -> ResNet:
    if depth not in RESNET_STAGES:
      raise ValueError(f"ResNet depth must be one of {sorted(RESNET_STAGES)}, got {depth!r}")
    return cls(stage_sizes=RESNET_STAGES[depth], **kwargs)

  @nn.compact
  def __call__(self, image, *, train: bool = False):
    if image.ndim != 4 or image.shape[-1] != 3:
      raise ValueError(f"ResNet: image must be (B, H, W, 3), got shape {tuple(image.shape)}")
    x = nn.Conv(
      self.width,
      (7, 7),
      strides=(2, 2),
      padding=((3, 3), (3, 3)),
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="stem_conv",
    )(image.astype(self.dtype))
    x = nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="stem_bn",
    )(x)
    # flax's max_pool is unannotated: pyright infers `padding: str` from its 'VALID' default.
    x = nn.max_pool(nn.relu(x), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pyright: ignore[reportArgumentType]
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        x = Bottleneck(
          self.width * 2**i,
          strides=2 if i > 0 and j == 0 else 1,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f"stage{i + 1}_block{j + 1}",
        )(x, train=train)
    return jnp.mean(x, axis=(1, 2))
