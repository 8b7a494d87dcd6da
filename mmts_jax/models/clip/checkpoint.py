"""A converted CLIP checkpoint on disk: an orbax directory holding `{"params": <CLIP params>}`
plus `clip_config.json` (the `CLIPConfig` and where the weights came from).

  DIR/                    orbax StandardCheckpointer directory of {"params": {...}}
  DIR/clip_config.json    {"config": CLIPConfig.to_dict(), "source": ..., "format": ...,
                           "logit_scale": s, "temperature": exp(-s)}

`save_converted` writes it into a temporary sibling and renames it into place, so a reader sees
a complete checkpoint or none. `load_converted` restores exactly the tree `CLIP(config).init`
builds (shapes and dtypes checked by orbax against that target).

Example:
  >>> import tempfile, os, jax, jax.numpy as jnp
  >>> from mmts_jax.models.clip.config import CLIPConfig
  >>> from mmts_jax.models.clip.model import CLIP
  >>> cfg = CLIPConfig(embed_dim=4, image_size=32, vision_width=64, vision_layers=(1,),
  ...                  vision_heads=1, patch_size=16, context_length=5, vocab_size=10,
  ...                  text_width=64, text_heads=1, text_layers=1)
  >>> batch = {"image": jnp.zeros((1, 32, 32, 3)), "text": jnp.zeros((1, 5), jnp.int32)}
  >>> shapes = jax.eval_shape(CLIP(cfg).init, jax.random.PRNGKey(0), batch)["params"]
  >>> params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # no compilation
  >>> out = os.path.join(tempfile.mkdtemp(), "ckpt")
  >>> save_converted(out, params, cfg, source="random")
  >>> cfg2, variables = load_converted(out)
  >>> cfg2 == cfg, sorted(variables["params"])
  (True, ['logit_scale', 'text', 'visual'])
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mmts_jax.atomic_io import atomic_write_bytes
from mmts_jax.models.clip.config import CLIPConfig
from mmts_jax.models.clip.model import CLIP

__all__ = ["CONFIG_FILE", "save_converted", "load_converted", "read_config", "abstract_params"]

CONFIG_FILE = "clip_config.json"


def abstract_params(cfg: CLIPConfig) -> Any:
  """The `jax.ShapeDtypeStruct` tree of `CLIP(cfg)`'s params (no FLOPs, no memory)."""
  batch = {
    "image": jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32),
    "text": jax.ShapeDtypeStruct((1, cfg.context_length), jnp.int32),
  }
  return jax.eval_shape(lambda b: CLIP(cfg).init(jax.random.PRNGKey(0), b), batch)["params"]


def save_converted(
  directory: str | os.PathLike,
  params: Any,
  cfg: CLIPConfig,
  *,
  source: str = "",
  fmt: str = "",
  overwrite: bool = False,
) -> None:
  """Writes `{"params": params}` with orbax and `clip_config.json` into `directory`.

  Raises:
    FileExistsError: `directory` exists and `overwrite` is False.
  """
  directory = pathlib.Path(directory).absolute()
  if directory.exists() and not overwrite:
    raise FileExistsError(f"{directory} exists; pass overwrite=True (--overwrite) to replace it")
  directory.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
  try:
    tree = jax.tree.map(np.asarray, {"params": params})
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(staging / "ckpt", tree)
    checkpointer.wait_until_finished()
    logit_scale = float(np.asarray(params["logit_scale"]))
    meta = {
      "config": cfg.to_dict(),
      "source": str(source),
      "format": fmt,
      "logit_scale": logit_scale,
      "temperature": math.exp(-logit_scale),
    }
    atomic_write_bytes(
      staging / "ckpt" / CONFIG_FILE, json.dumps(meta, indent=2, sort_keys=True).encode()
    )
    if directory.exists():
      shutil.rmtree(directory)
    os.replace(staging / "ckpt", directory)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def read_config(directory: str | os.PathLike) -> tuple[CLIPConfig, dict]:
  """`clip_config.json` of a converted checkpoint -> (config, the whole json)."""
  path = pathlib.Path(directory) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: is {directory} a `mmts convert clip` output?")
  meta = json.loads(path.read_text())
  return CLIPConfig.from_dict(meta["config"]), meta


def load_converted(directory: str | os.PathLike) -> tuple[CLIPConfig, dict]:
  """A converted checkpoint -> (config, `{"params": ...}` restored into `CLIP(config)`'s tree)."""
  cfg, _ = read_config(directory)
  target = {"params": abstract_params(cfg)}
  restored = ocp.StandardCheckpointer().restore(pathlib.Path(directory).absolute(), target)
  return cfg, restored
