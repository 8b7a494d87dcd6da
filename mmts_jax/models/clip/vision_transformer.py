"""CLIP's ViT image tower: patches -> [class token; patches] + positions -> ln_pre -> pre-LN
transformer -> ln_post(class token) -> `proj`.

  tokens = [c; conv1(x)] + P,   z = ln_post(transformer(ln_pre(tokens))[0]) @ proj

`conv1` is a bias-free `patch x patch` convolution with stride `patch`; `proj` maps the width to
`embed_dim` without a bias. The output is not normalised.

Example (`jax.eval_shape` traces the model without compiling it: the shapes, in milliseconds):
  >>> import jax, jax.numpy as jnp
  >>> tower = VisionTransformer(image_size=32, patch_size=16, width=64, layers=1, heads=2,
  ...                           output_dim=8)
  >>> x = jnp.zeros((2, 32, 32, 3))
  >>> jax.eval_shape(lambda x: tower.apply(tower.init(jax.random.PRNGKey(0), x), x), x).shape
  (2, 8)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmts_jax.models.clip.layers import Transformer

__all__ = ["VisionTransformer"]


class VisionTransformer(nn.Module):
  image_size: int
  patch_size: int
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
  def __call__(self, image: jax.Array) -> jax.Array:
    """(B, H, W, 3) preprocessed pixels -> (B, output_dim) unnormalised features."""
    size = (self.image_size, self.image_size)
    if image.ndim != 4 or tuple(image.shape[1:]) != size + (3,):
      raise ValueError(
        f"CLIP ViT: image must be (B, {self.image_size}, {self.image_size}, 3), "
        f"got shape {tuple(image.shape)}"
      )
    p = self.patch_size
    x = nn.Conv(
      self.width,
      (p, p),
      strides=(p, p),
      padding="VALID",
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="conv1",
    )(image.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, self.width)
    scale = self.width**-0.5
    cls = self.param(
      "class_embedding", nn.initializers.normal(scale), (self.width,), self.param_dtype
    )
    pos = self.param(
      "positional_embedding",
      nn.initializers.normal(scale),
      (x.shape[1] + 1, self.width),
      self.param_dtype,
    )
    cls = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, self.width))
    x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)
    ln = lambda name: nn.LayerNorm(
      epsilon=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    x = ln("ln_pre")(x)
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
    )(x)
    pooled = ln("ln_post")(x[:, 0])
    proj = self.param(
      "proj", nn.initializers.normal(scale), (self.width, self.output_dim), self.param_dtype
    )
    return pooled @ proj.astype(self.dtype)
