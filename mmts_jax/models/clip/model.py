"""The CLIP model (Radford et al. 2021) as a trainer model: an image tower, a causal text tower
and the learned temperature `logit_scale`, returning unit-norm embeddings.

  z_img = normalize(visual(x)),   z_txt = normalize(text(t)),   tau = exp(-min(s, log(1/tau_min)))

where `s` is `logit_scale` (CLIP multiplies the cosine logits by `exp(s)`, clamped at 100, i.e.
`tau >= 0.01`). The parameter tree is always `{"visual", "text", "logit_scale"}`, so a converted
checkpoint restores into it whatever the temperature policy. With `learnable_temperature=True`
the output carries `"temperature"` and the loss trains `logit_scale` (starting from the
checkpoint's value); with a fixed or MM-TS schedule the policy replaces it and `logit_scale` is
carried unused (it gets a zero gradient).

Example (`jax.eval_shape` traces the model without compiling it: the shapes, in milliseconds):
  >>> import jax, jax.numpy as jnp
  >>> from mmts_jax.models.clip.config import CLIPConfig
  >>> cfg = CLIPConfig(embed_dim=8, image_size=32, vision_width=64, vision_layers=(1,),
  ...                  vision_heads=2, patch_size=16, context_length=5, vocab_size=10,
  ...                  text_width=16, text_heads=2, text_layers=1)
  >>> model = CLIP(cfg, learnable_temperature=True)
  >>> batch = {"image": jnp.zeros((2, 32, 32, 3)), "text": jnp.array([[8, 9, 0, 0, 0]] * 2)}
  >>> variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)
  >>> out = jax.eval_shape(model.apply, variables, batch)
  >>> out["image"].shape, out["text"].shape, out["temperature"].shape
  ((2, 8), (2, 8), ())
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmts_jax.losses import cosine_normalize
from mmts_jax.models.clip.config import CLIPConfig
from mmts_jax.models.clip.modified_resnet import ModifiedResNet
from mmts_jax.models.clip.text_transformer import CLIPTextTransformer
from mmts_jax.models.clip.vision_transformer import VisionTransformer

__all__ = ["CLIP"]


class CLIP(nn.Module):
  """CLIP with OpenAI / OpenCLIP's exact towers (see `CLIPConfig`).

  Attributes:
    config: the shapes (`CLIPConfig`).
    image_key, text_key: the batch keys of the (B, H, W, 3) preprocessed images and the
      (B, context_length) int token ids.
    learnable_temperature: output `"temperature"` from `logit_scale` (CLIP's own policy).
    init_temperature: `logit_scale`'s initial value is `log(1 / init_temperature)` (a converted
      checkpoint overrides it).
    min_temperature: the clamp (CLIP: 0.01, a logit scale of 100).
    remat: recompute transformer blocks in the backward pass.
  """

  config: CLIPConfig
  image_key: str = "image"
  text_key: str = "text"
  learnable_temperature: bool = False
  init_temperature: float = 0.07
  min_temperature: float = 0.01
  remat: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def embed_dim(self) -> int:
    return self.config.embed_dim

  def setup(self):
    c = self.config
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if c.vision_kind == "vit":
      self.visual = VisionTransformer(
        c.image_size,
        c.patch_size,
        c.vision_width,
        c.vision_layers[0],
        c.vision_heads,
        c.embed_dim,
        act=c.act,
        ln_eps=c.ln_eps,
        remat=self.remat,
        **common,
      )
    else:
      self.visual = ModifiedResNet(
        c.vision_layers,
        c.embed_dim,
        c.vision_heads,
        image_size=c.image_size,
        width=c.vision_width,
        **common,
      )
    self.text = CLIPTextTransformer(
      c.context_length,
      c.vocab_size,
      c.text_width,
      c.text_layers,
      c.text_heads,
      c.embed_dim,
      act=c.act,
      ln_eps=c.ln_eps,
      remat=self.remat,
      **common,
    )
    if not 0 < self.init_temperature:
      raise ValueError(f"CLIP: init_temperature must be > 0, got {self.init_temperature}")
    self.logit_scale = self.param(
      "logit_scale", nn.initializers.constant(math.log(1 / self.init_temperature)), (), jnp.float32
    )

  def encode_image(self, image: jax.Array, *, train: bool = False) -> jax.Array:
    """(B, H, W, 3) -> (B, embed_dim) unit-norm float32 embeddings."""
    del train  # no dropout; BatchNorm is frozen
    return cosine_normalize(self.visual(image).astype(jnp.float32))

  def encode_text(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
    """(B, context_length) int ids -> (B, embed_dim) unit-norm float32 embeddings."""
    del train
    return cosine_normalize(self.text(tokens).astype(jnp.float32))

  def temperature(self) -> jax.Array:
    """`exp(-min(logit_scale, log(1 / min_temperature)))`, CLIP's clamped temperature."""
    return jnp.exp(-jnp.minimum(self.logit_scale, math.log(1.0 / self.min_temperature)))

  def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = False) -> dict:
    """`batch` -> `{"image": (B, D), "text": (B, D)[, "temperature": ()]}`."""
    for key in (self.image_key, self.text_key):
      if key not in batch:
        raise KeyError(f"CLIP: batch has no {key!r} (keys: {sorted(batch)})")
    out = {
      "image": self.encode_image(batch[self.image_key], train=train),
      "text": self.encode_text(batch[self.text_key], train=train),
    }
    # Touch logit_scale on every path so that init always creates it.
    temperature = self.temperature()
    if self.learnable_temperature:
      out["temperature"] = temperature
    return out
