"""CLIP towers exactly as OpenAI CLIP / OpenCLIP compute them, their checkpoint converter and
the CLIP BPE tokenizer. See docs/clip.md. Names are imported on first use (PEP 562): the shapes in
`config` need no JAX.

Example:
  >>> from mmts_jax.models import clip
  >>> clip.variant_config("ViT-B/16").patch_size
  16
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what a type checker sees; at run time __getattr__ imports them on first use
  from mmts_jax.models.clip.config import VARIANTS, CLIPConfig, variant_config
  from mmts_jax.models.clip.model import CLIP

_WHERE = {"CLIPConfig": "config", "VARIANTS": "config", "variant_config": "config", "CLIP": "model"}
# Spelled out (sorted(_WHERE)) so that type checkers can read it.
__all__ = ["CLIP", "CLIPConfig", "VARIANTS", "variant_config"]


def __getattr__(name: str):
  if name in _WHERE:
    return getattr(importlib.import_module(f"mmts_jax.models.clip.{_WHERE[name]}"), name)
  raise AttributeError(f"module 'mmts_jax.models.clip' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
