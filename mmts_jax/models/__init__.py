"""Flax (linen) models: towers, the dual encoder, the CLIP towers, and `build_model(config.model)`.

Towers map their input to `(B, width)` features; `DualEncoder` projects and L2-normalises them.
All modules compute in `dtype` (e.g. bfloat16) with float32 parameters. Names are imported on
first use (PEP 562), so a config file that reads `models.clip.config` imports no JAX.

Example:
  >>> from mmts_jax import models
  >>> models.build_model.__module__
  'mmts_jax.models.build'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what a type checker sees; at run time __getattr__ imports them on first use
  from mmts_jax.models.build import DTYPES, build_model, build_tower, parse_dtype
  from mmts_jax.models.dual_encoder import DualEncoder
  from mmts_jax.models.feature_tower import FeatureTower
  from mmts_jax.models.resnet import ResNet
  from mmts_jax.models.text_transformer import TextTransformer
  from mmts_jax.models.vit import ViT

_WHERE = {
  "DualEncoder": "dual_encoder",
  "FeatureTower": "feature_tower",
  "ResNet": "resnet",
  "TextTransformer": "text_transformer",
  "ViT": "vit",
  "build_model": "build",
  "build_tower": "build",
  "parse_dtype": "build",
  "DTYPES": "build",
}
# Spelled out (sorted(_WHERE)) so that type checkers can read it.
__all__ = [
  "DTYPES",
  "DualEncoder",
  "FeatureTower",
  "ResNet",
  "TextTransformer",
  "ViT",
  "build_model",
  "build_tower",
  "parse_dtype",
]


def __getattr__(name: str):
  if name in _WHERE:
    return getattr(importlib.import_module(f"mmts_jax.models.{_WHERE[name]}"), name)
  raise AttributeError(f"module 'mmts_jax.models' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
