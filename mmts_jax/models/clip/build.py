"""`config.model` with `name="clip"` -> a `CLIP` model.

Keys (all optional but one of `variant` / `config_file`):
  variant: "ViT-B/32" | "ViT-B/16" | "ViT-L/14" | "RN50" (`VARIANTS`).
  config_file: a converted checkpoint directory (its `clip_config.json`) or such a json file;
    takes precedence over `variant`, so the model matches the checkpoint it will restore.
  any `CLIPConfig` field (e.g. `act`, `image_size`, `context_length`): overrides.
  dtype: "float32" | "bfloat16" | "float16" compute dtype (parameters stay float32).
  remat: recompute transformer blocks in the backward pass (default False).
  image_key / text_key: batch keys (default "image" / "text").

Example:
  >>> import ml_collections
  >>> cfg = ml_collections.ConfigDict({"name": "clip", "variant": "ViT-B/16", "act": "gelu"})
  >>> model = build_clip(cfg)
  >>> model.config.patch_size, model.config.act, model.embed_dim
  (16, 'gelu', 512)
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from mmts_jax.models.clip.config import CLIPConfig, variant_config
from mmts_jax.models.clip.model import CLIP

__all__ = ["build_clip", "clip_config_from"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_MODEL_KEYS = ("name", "variant", "config_file", "dtype", "remat", "image_key", "text_key")


def _get(cfg, key, default=None):
  value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
  return default if value is None else value


def clip_config_from(cfg: Mapping[str, Any]) -> CLIPConfig:
  """The `CLIPConfig` a `config.model` section describes (see the module docstring)."""
  fields = {f.name for f in dataclasses.fields(CLIPConfig)}
  keys = list(cfg.keys()) if hasattr(cfg, "keys") else []
  unknown = sorted(set(keys) - fields - set(_MODEL_KEYS))
  if unknown:
    raise ValueError(
      f"model (name='clip'): unknown keys {unknown}; known: {sorted(fields | set(_MODEL_KEYS))}"
    )
  overrides = {k: _get(cfg, k) for k in fields if _get(cfg, k) is not None}
  source = _get(cfg, "config_file")
  if source:
    path = pathlib.Path(source)
    path = path / "clip_config.json" if path.is_dir() else path
    if not path.is_file():
      raise ValueError(
        f"model.config_file={source!r}: no such file (expected a converted "
        "checkpoint directory or its clip_config.json)"
      )
    data = json.loads(path.read_text())
    base = CLIPConfig.from_dict(data.get("config", data))
    return dataclasses.replace(base, **overrides) if overrides else base
  variant = _get(cfg, "variant")
  if variant is None:
    raise ValueError(
      "model (name='clip') needs model.variant (e.g. 'ViT-B/16') or "
      "model.config_file (a converted checkpoint directory)"
    )
  return variant_config(variant, **overrides)


def build_clip(
  cfg: Mapping[str, Any], *, learnable_temperature: bool = False, init_temperature: float = 0.07
) -> CLIP:
  """`config.model` -> `CLIP` (the temperature arguments as in `build_model`)."""
  dtype_name = _get(cfg, "dtype", "float32")
  if dtype_name not in _DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {dtype_name!r}")
  return CLIP(
    clip_config_from(cfg),
    image_key=_get(cfg, "image_key", "image"),
    text_key=_get(cfg, "text_key", "text"),
    learnable_temperature=learnable_temperature,
    init_temperature=init_temperature,
    remat=bool(_get(cfg, "remat", False)),
    dtype=_DTYPES[dtype_name],
    param_dtype=jnp.float32,
  )
