"""Reading a CLIP checkpoint from disk into a flat `{name: numpy array}` state dict.

  * `.safetensors` (one file, or a directory with `model.safetensors`, an index of shards, or a
    single `*.safetensors`): read with `safetensors` (no pickle); bfloat16 / float16 become
    float32.
  * `.npz`: `numpy.load(allow_pickle=False)`.
  * `.pt` / `.pth` / `.bin` are Python pickles (or TorchScript archives, OpenAI's `.pt`): read
    only when PyTorch is importable (`torch.load(weights_only=True)`, else `torch.jit.load`), and
    refused with an explanation otherwise. A `{"state_dict": ...}` training checkpoint is
    unwrapped.

A Hugging Face directory's `config.json` is returned too (heads, activation, LayerNorm eps).

Example:
  >>> import tempfile, os, numpy as np
  >>> path = os.path.join(tempfile.mkdtemp(), "w.npz")
  >>> np.savez(path, **{"logit_scale": np.float32(2.0)})
  >>> sd, hf_config = load_state_dict(path)
  >>> float(sd["logit_scale"]), hf_config
  (2.0, None)
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

__all__ = ["load_state_dict", "TORCH_SUFFIXES"]

TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError, safe_open

  try:
    with safe_open(str(path), framework="numpy") as f:
      out = {key: f.get_tensor(key) for key in f.keys()}
  except (TypeError, ValueError, SafetensorError):
    # numpy has no bfloat16: read such files through JAX (ml_dtypes) instead.
    with safe_open(str(path), framework="flax") as f:
      out = {key: np.asarray(f.get_tensor(key)) for key in f.keys()}
  return {
    k: v.astype(np.float32) if v.dtype.kind == "f" or str(v.dtype) == "bfloat16" else v
    for k, v in out.items()
  }


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch  # pyright: ignore[reportMissingImports]  # optional, for .pt files only
  except ImportError:
    raise ValueError(
      f"{path} is a PyTorch pickle and PyTorch is not installed here; this converter does "
      "not unpickle without it. Either install torch, or save the state dict as safetensors "
      "or .npz where torch is installed, e.g. `safetensors.torch.save_file(sd, 'w.safetensors')`"
    ) from None
  print(f"mmts convert: PyTorch {torch.__version__} is installed; reading {path} with torch.load")
  try:
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
  except RuntimeError:  # a TorchScript archive (OpenAI's released .pt files)
    obj = torch.jit.load(str(path), map_location="cpu").state_dict()
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
  return {
    k: v.detach().float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
    for k, v in obj.items()
    if hasattr(v, "detach")
  }


def _hf_config(directory: pathlib.Path) -> dict[str, Any] | None:
  path = directory / "config.json"
  return json.loads(path.read_text()) if path.is_file() else None


def load_state_dict(src: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict | None]:
  """A checkpoint path -> (flat state dict of numpy arrays, HF `config.json` dict or None).

  Raises:
    FileNotFoundError: `src` does not exist.
    ValueError: an unsupported file, or a PyTorch pickle without PyTorch.
  """
  path = pathlib.Path(src)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {src!r} does not exist")
  if path.is_dir():
    index = path / "model.safetensors.index.json"
    if index.is_file():
      shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
      sd = {}
      for shard in shards:
        sd.update(_read_safetensors(path / shard))
      return sd, _hf_config(path)
    files = (
      [path / "model.safetensors"]
      if (path / "model.safetensors").is_file()
      else sorted(path.glob("*.safetensors"))
    )
    if len(files) != 1:
      raise ValueError(
        f"{path}: expected one .safetensors file (or model.safetensors / an "
        f"index of shards), found {[f.name for f in files]}"
      )
    return _read_safetensors(files[0]), _hf_config(path)
  suffix = path.suffix.lower()
  if suffix == ".safetensors":
    return _read_safetensors(path), _hf_config(path.parent)
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}, None
  if suffix in TORCH_SUFFIXES:
    return _read_torch(path), _hf_config(path.parent)
  raise ValueError(
    f"{path}: unsupported checkpoint type {suffix!r}; expected .safetensors, "
    f".npz or a PyTorch file ({', '.join(TORCH_SUFFIXES)})"
  )
