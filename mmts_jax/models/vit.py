"""Vision Transformer image tower (Dosovitskiy et al. 2021), as used by CLIP ViT-B/16.

`image (B, H, W, 3) -> patches (B, HW/p^2, width) + position -> pre-LN encoder`
`-> pooled (B, width)`.
Pooling is the class token (`pool="cls"`, CLIP) or the mean over patches (`pool="gap"`).

Example (`jax.eval_shape` traces the model without compiling it: the shapes, in milliseconds):
  >>> import jax, jax.numpy as jnp
  >>> vit = ViT.from_variant("mu/8")           # a 2-layer, width-32 test size
  >>> x = jnp.zeros((2, 16, 16, 3))
  >>> params = jax.eval_shape(vit.init, jax.random.PRNGKey(0), x)
  >>> jax.eval_shape(vit.apply, params, x).shape
  (2, 32)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmts_jax.models.transformer import Encoder

# name -> (width, depth, mlp_dim, heads). "mu" is a test size; the rest are the ViT paper's.
VIT_SIZES = {
  "mu": (32, 2, 64, 2),
  "Ti": (192, 12, 768, 3),
  "S": (384, 12, 1536, 6),
  "B": (768, 12, 3072, 12),
  "L": (1024, 24, 4096, 16),
}


def parse_variant(variant: str) -> tuple[str, int]:
  """`"B/16"` -> `("B", 16)`; raises ValueError naming the variant otherwise."""
  size, sep, patch = str(variant).partition("/")
  if not sep or size not in VIT_SIZES or not patch.isdigit() or int(patch) <= 0:
    raise ValueError(
      f"ViT variant must be SIZE/PATCH with SIZE in {sorted(VIT_SIZES)}, got {variant!r}"
    )
  return size, int(patch)


class ViT(nn.Module):
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int = 16
  pool: str = "cls"
  dropout: float = 0.0
  remat: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @classmethod
  def from_variant(cls, variant: str, **kwargs) -> ViT:
    size, patch = parse_variant(variant)
    width, depth, mlp_dim, heads = VIT_SIZES[size]
    return cls(
      width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch_size=patch, **kwargs
    )

  @nn.compact
  def __call__(self, image, *, train: bool = False):
    if image.ndim != 4 or image.shape[-1] != 3:
      raise ValueError(f"ViT: image must be (B, H, W, 3), got shape {tuple(image.shape)}")
    if self.pool not in ("cls", "gap"):
      raise ValueError(f"ViT: pool must be 'cls' or 'gap', got {self.pool!r}")
    p = self.patch_size
    if image.shape[1] % p or image.shape[2] % p:
      raise ValueError(f"ViT: image size {image.shape[1:3]} is not a multiple of patch {p}")
    x = nn.Conv(
      self.width,
      (p, p),
      strides=(p, p),
      padding="VALID",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="patch_embed",
    )(image.astype(self.dtype))
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    if self.pool == "cls":
      cls_tok = self.param("cls", nn.initializers.zeros, (1, 1, c), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls_tok.astype(x.dtype), (b, 1, c)), x], axis=1)
    pos = self.param(
      "pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], c), self.param_dtype
    )
    x = x + pos.astype(x.dtype)
    x = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln_pre")(x)
    x = Encoder(
      self.depth,
      self.num_heads,
      self.mlp_dim,
      self.dropout,
      self.remat,
      self.dtype,
      self.param_dtype,
      name="encoder",
    )(x, train=train)
    return x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
