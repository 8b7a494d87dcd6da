"""Vision Transformer image tower (Dosovitskiy et al. 2021), as used by CLIP ViT-B/16.

`image (B, H, W, 3) -> patches (B, HW/p^2, width) + position -> pre-LN encoder`
`-> pooled (B, width)`.
Pooling is the class token (`pool="cls"`, CLIP) or the mean over patches (`pool="gap"`).

The patch embedding is a `p x p` convolution with stride `p` (`patch_embed="conv"`), or the
same map as one matrix product over the flattened patches (`patch_embed="dense"`,
`PatchEmbed`: the same `patch_embed/kernel (p, p, 3, width)` and `bias` parameters, so
checkpoints are interchangeable). `remat`, `fused_qkv`, `attention`, `even_length`,
`split_qkv_backward`, `flat_residual`, `lean_layer_norm` (also used for `ln_pre`) and
`lean_gelu` go to the encoder (`mmts_jax.models.transformer`).

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
import jax
import jax.numpy as jnp

from mmts_jax.models.lean_layer_norm import make_layer_norm
from mmts_jax.models.transformer import Encoder

# name -> (width, depth, mlp_dim, heads). "mu" is a test size; the rest are the ViT paper's.
VIT_SIZES = {
  "mu": (32, 2, 64, 2),
  "Ti": (192, 12, 768, 3),
  "S": (384, 12, 1536, 6),
  "B": (768, 12, 3072, 12),
  "L": (1024, 24, 4096, 16),
}


PATCH_EMBEDS = ("conv", "dense")


class PatchEmbed(nn.Module):
  """Non-overlapping `p x p` patches, each flattened and multiplied by the kernel:

    out[b, i, j] = sum_{u, v, c} image[b, i p + u, j p + v, c] kernel[u, v, c] + bias,

  the stride-`p` `nn.Conv` with the same parameter names, shapes and initialisers (same key,
  same values), computed as one `(B h w, p p 3) x (p p 3, width)` matrix product.

  Example:
    >>> x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
    >>> conv = nn.Conv(4, (4, 4), strides=(4, 4), padding="VALID")
    >>> params = conv.init(jax.random.PRNGKey(0), x)
    >>> bool(jnp.allclose(PatchEmbed(4, 4).apply(params, x), conv.apply(params, x), atol=1e-5))
    True
  """

  features: int
  patch_size: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array) -> jax.Array:
    p, (b, height, width, c) = self.patch_size, image.shape
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (p, p, c, self.features), self.param_dtype
    )
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    h, w = height // p, width // p
    patches = image.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, h, w, p * p * c).astype(self.dtype)
    y = patches @ kernel.reshape(p * p * c, self.features).astype(self.dtype)
    return y + bias.astype(self.dtype)


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
  remat: bool | str = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  patch_embed: str = "conv"
  fused_qkv: bool = False
  attention: str = "auto"
  even_length: bool = False
  lean_layer_norm: bool | str = False
  lean_gelu: bool | str = False
  split_qkv_backward: bool | str = False
  flat_residual: bool = False

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
    if self.patch_embed not in PATCH_EMBEDS:
      raise ValueError(f"ViT: patch_embed must be one of {PATCH_EMBEDS}, got {self.patch_embed!r}")
    p = self.patch_size
    if image.shape[1] % p or image.shape[2] % p:
      raise ValueError(f"ViT: image size {image.shape[1:3]} is not a multiple of patch {p}")
    if self.patch_embed == "dense":
      embed = PatchEmbed(self.width, p, self.dtype, self.param_dtype, name="patch_embed")
    else:
      embed = nn.Conv(
        self.width,
        (p, p),
        strides=(p, p),
        padding="VALID",
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="patch_embed",
      )
    x = embed(image.astype(self.dtype))
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    if self.pool == "cls":
      cls_tok = self.param("cls", nn.initializers.zeros, (1, 1, c), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls_tok.astype(x.dtype), (b, 1, c)), x], axis=1)
    pos = self.param(
      "pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], c), self.param_dtype
    )
    x = x + pos.astype(x.dtype)
    x = make_layer_norm(self.lean_layer_norm, self.dtype, self.param_dtype, "ln_pre")(x)
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
      lean_layer_norm=self.lean_layer_norm,
      lean_gelu=self.lean_gelu,
      split_qkv_backward=self.split_qkv_backward,
      flat_residual=self.flat_residual,
      name="encoder",
    )(x, train=train)
    return x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
