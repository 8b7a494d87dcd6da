"""`build_model(config.model)`: the towers and the dual encoder a config names.

Towers map their input to `(B, width)` features; `DualEncoder` projects and L2-normalises them.
All modules compute in `dtype` (e.g. bfloat16) with float32 parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from mmts_jax.models.dual_encoder import DualEncoder
from mmts_jax.models.feature_tower import FeatureTower
from mmts_jax.models.lean_layer_norm import check_lean
from mmts_jax.models.pallas_qkv import check_split_backward
from mmts_jax.models.resnet import ResNet
from mmts_jax.models.text_transformer import TextTransformer
from mmts_jax.models.transformer import gelu_option, remat_policy
from mmts_jax.models.vit import ViT

__all__ = ["build_model", "build_tower", "parse_dtype", "DTYPES"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
IMAGE_TOWERS = ("vit", "resnet", "features")
TEXT_TOWERS = ("transformer", "features")


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
  value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
  return default if value is None else value


def parse_dtype(name) -> Any:
  if name not in DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {name!r}")
  return DTYPES[name]


def _remat(cfg: Mapping[str, Any]) -> bool | str:
  """`remat`: a bool or a policy name of `transformer.REMAT_POLICIES` (ValueError otherwise)."""
  value = _get(cfg, "remat", False)
  value = value if isinstance(value, str) else bool(value)
  remat_policy(value)  # raises before any tracing
  return value


def _bool_or_name(cfg: Mapping[str, Any], key: str, check) -> bool | str:
  """`cfg[key]` (default False) as a bool, or a name `check` accepts (ValueError otherwise):
  `lean_layer_norm` (`lean_layer_norm.check_lean`), `lean_gelu` (`transformer.gelu_option`) and
  `split_qkv_backward` (`pallas_qkv.check_split_backward`)."""
  value = _get(cfg, key, False)
  return check(value if isinstance(value, str) else bool(value))


def _speed(cfg: Mapping[str, Any]) -> dict:
  """The transformer towers' speed options (`mmts_jax.models.transformer`): same maths."""
  attention = str(_get(cfg, "attention", "auto"))
  if attention not in ("auto", "xla", "pallas"):
    raise ValueError(f"model.*.attention must be 'auto', 'xla' or 'pallas', got {attention!r}")
  return dict(
    fused_qkv=bool(_get(cfg, "fused_qkv", False)),
    attention=attention,
    even_length=bool(_get(cfg, "even_length", False)),
    lean_layer_norm=_bool_or_name(cfg, "lean_layer_norm", check_lean),
    lean_gelu=_bool_or_name(cfg, "lean_gelu", gelu_option),
    split_qkv_backward=_bool_or_name(cfg, "split_qkv_backward", check_split_backward),
    flat_residual=bool(_get(cfg, "flat_residual", False)),
  )


def build_tower(cfg: Mapping[str, Any], side: str, dtype) -> tuple[Any, str]:
  """One tower from its config section -> (module, the batch key it reads)."""
  name = _get(cfg, "name")
  allowed = IMAGE_TOWERS if side == "image" else TEXT_TOWERS
  if name not in allowed:
    raise ValueError(f"model.{side}.name must be one of {allowed}, got {name!r}")
  common = dict(dtype=dtype, param_dtype=jnp.float32)
  if name == "features":
    module = FeatureTower(
      hidden_dims=tuple(_get(cfg, "hidden_dims", (1024,))),
      dropout=float(_get(cfg, "dropout", 0.0)),
      **common,
    )
    return module, _get(cfg, "input_key", f"{side}_features")
  if name == "vit":
    overrides = {
      k: _get(cfg, k)
      for k in ("width", "depth", "mlp_dim", "num_heads")
      if _get(cfg, k) is not None
    }
    module = ViT.from_variant(
      _get(cfg, "variant", "B/16"),
      pool=_get(cfg, "pool", "cls"),
      dropout=float(_get(cfg, "dropout", 0.0)),
      remat=_remat(cfg),
      patch_embed=str(_get(cfg, "patch_embed", "conv")),
      **_speed(cfg),
      **common,
    )
    module = module.clone(**overrides) if overrides else module
  elif name == "resnet":
    module = ResNet.from_depth(
      int(_get(cfg, "depth", 50)), width=int(_get(cfg, "width", 64)), **common
    )
  else:  # transformer
    module = TextTransformer(
      vocab_size=int(_get(cfg, "vocab_size", 49408)),
      max_len=int(_get(cfg, "max_len", 77)),
      width=int(_get(cfg, "width", 512)),
      depth=int(_get(cfg, "depth", 12)),
      num_heads=int(_get(cfg, "num_heads", 8)),
      mlp_dim=int(_get(cfg, "mlp_dim", 2048)),
      pool=_get(cfg, "pool", "eot"),
      causal=bool(_get(cfg, "causal", True)),
      pad_id=int(_get(cfg, "pad_id", 0)),
      dropout=float(_get(cfg, "dropout", 0.0)),
      remat=_remat(cfg),
      causal_only_lengths=bool(_get(cfg, "causal_only_lengths", False)),
      **_speed(cfg),
      **common,
    )
  return module, _get(cfg, "input_key", side)


def build_model(
  cfg: Mapping[str, Any],
  *,
  learnable_temperature: bool = False,
  init_temperature: float = 0.07,
  learnable_bias: bool = False,
  init_bias: float = -10.0,
):
  """`config.model` -> `DualEncoder`, or `mmts_jax.models.clip.CLIP` when `model.name` is
  "clip" (see `mmts_jax.models.clip.build`).

  `learnable_bias` gives the dual encoder the sigmoid loss's logit bias (init `init_bias`);
  the CLIP model has none, so asking it for one raises ValueError.

  Example:
    >>> import ml_collections
    >>> cfg = ml_collections.ConfigDict({"embed_dim": 8, "dtype": "float32",
    ...     "image": {"name": "features", "hidden_dims": (16,)},
    ...     "text": {"name": "features", "hidden_dims": (16,)}})
    >>> build_model(cfg).embed_dim
    8
  """
  if learnable_bias and not math.isfinite(float(init_bias)):
    raise ValueError(f"the initial logit bias must be finite, got {init_bias}")
  if _get(cfg, "name") == "clip":  # OpenAI / OpenCLIP's exact towers (docs/clip.md)
    if learnable_bias:
      raise ValueError(
        "model.name 'clip' has no logit bias for loss 'sigmoid': train the "
        "sigmoid loss with a DualEncoder config (model.image / model.text)"
      )
    from mmts_jax.models.clip.build import build_clip

    return build_clip(
      cfg, learnable_temperature=learnable_temperature, init_temperature=init_temperature
    )
  dtype = parse_dtype(_get(cfg, "dtype", "float32"))
  image, image_key = build_tower(cfg["image"], "image", dtype)
  text, text_key = build_tower(cfg["text"], "text", dtype)
  embed_dim = int(_get(cfg, "embed_dim", 512))
  if embed_dim <= 0:
    raise ValueError(f"model.embed_dim must be > 0, got {embed_dim}")
  return DualEncoder(
    image,
    text,
    embed_dim=embed_dim,
    image_key=image_key,
    text_key=text_key,
    learnable_temperature=learnable_temperature,
    init_temperature=init_temperature,
    learnable_bias=learnable_bias,
    init_bias=float(init_bias),
    dtype=dtype,
    param_dtype=jnp.float32,
  )
