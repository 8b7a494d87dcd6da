"""Dual encoder: an image tower and a text tower, each followed by a linear projection head to a
shared `embed_dim`, with L2-normalised float32 outputs (CLIP, Radford et al. 2021).

  z_img = normalize(W_img f_img(x)),  z_txt = normalize(W_txt f_txt(t)),  s_ij = <z_img_i, z_txt_j>

With `learnable_temperature=True` it also owns CLIP's learnable temperature, parametrised as
`log(1/tau)` (init `log(1/init_temperature)`). `tau >= min_temperature` is kept by clamping the
parameter itself after each optimizer update (`mmts_jax.train.optim.clamp_parameter`), as OpenCLIP
clamps its logit scale at 100: a forward `minimum` would zero the gradient at the bound, and the
temperature could never move back from it.

With `learnable_bias=True` (the sigmoid / SigLIP loss) it also owns the scalar logit bias `b`
of `log sigmoid(z_ij (s_ij / tau + b))`, parameter `logit_bias` (init `init_bias`, SigLIP's
-10), returned as `out["bias"]`. SigLIP's temperature parameter `t'` (`t = exp(t')`, init
`log 10`) is `log_inv_temperature` itself: `t' = log(1/tau)`, so `init_temperature=0.1` is
SigLIP's initialisation.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from mmts_jax.models import FeatureTower
  >>> model = DualEncoder(FeatureTower((16,)), FeatureTower((16,)), embed_dim=8,
  ...                     image_key="image_features", text_key="text_features")
  >>> batch = {"image_features": jnp.ones((2, 4)), "text_features": jnp.ones((2, 6))}
  >>> out = model.apply(model.init(jax.random.PRNGKey(0), batch), batch)
  >>> out["image"].shape, out["text"].shape
  ((2, 8), (2, 8))
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmts_jax.normalize import cosine_normalize


class DualEncoder(nn.Module):
  image_tower: nn.Module
  text_tower: nn.Module
  embed_dim: int = 512
  image_key: str = "image"
  text_key: str = "text"
  learnable_temperature: bool = False
  init_temperature: float = 0.07
  min_temperature: float = 0.01
  learnable_bias: bool = False
  init_bias: float = -10.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    dense = lambda name: nn.Dense(
      self.embed_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    self.image_proj = dense("image_proj")
    self.text_proj = dense("text_proj")
    if self.learnable_temperature:
      init = math.log(1.0 / self.init_temperature)
      self.log_inv_temperature = self.param(
        "log_inv_temperature", nn.initializers.constant(init), (), jnp.float32
      )
    if self.learnable_bias:
      self.logit_bias = self.param(
        "logit_bias", nn.initializers.constant(self.init_bias), (), jnp.float32
      )

  def encode_image(self, x, *, train: bool = False):
    """(B, ...) image input -> (B, embed_dim) unit-norm float32 embeddings."""
    return cosine_normalize(self.image_proj(self.image_tower(x, train=train)))

  def encode_text(self, t, *, train: bool = False):
    """(B, ...) text input -> (B, embed_dim) unit-norm float32 embeddings."""
    return cosine_normalize(self.text_proj(self.text_tower(t, train=train)))

  def temperature(self):
    """CLIP's temperature `exp(-log_inv_tau)` (the optimizer keeps it >= min_temperature)."""
    if not self.learnable_temperature:
      raise ValueError("DualEncoder.temperature: learnable_temperature is False")
    return jnp.exp(-self.log_inv_temperature)

  def bias(self):
    """The sigmoid loss's learned logit bias `b` (a float32 scalar)."""
    if not self.learnable_bias:
      raise ValueError("DualEncoder.bias: learnable_bias is False")
    return self.logit_bias

  def __call__(self, batch, *, train: bool = False):
    """`batch` dict -> `{"image": (B, D), "text": (B, D)[, "temperature": ()][, "bias": ()]}`."""
    for key in (self.image_key, self.text_key):
      if key not in batch:
        raise KeyError(f"DualEncoder: batch has no {key!r} (keys: {sorted(batch)})")
    out = {
      "image": self.encode_image(batch[self.image_key], train=train),
      "text": self.encode_text(batch[self.text_key], train=train),
    }
    if self.learnable_temperature:
      out["temperature"] = self.temperature()
    if self.learnable_bias:
      out["bias"] = self.bias()
    return out
