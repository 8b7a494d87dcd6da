"""Hugging Face safetensors weights -> the Flax parameter tree of `BertEncoder`, without PyTorch.

PyTorch `nn.Linear` stores `(out, in)` matrices; Flax `Dense` kernels are `(in, out)`, so every
linear weight is transposed. Heads that a sentence encoder does not use (`pooler`, `cls`, MLM
heads) are ignored; a missing encoder weight is an error naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from mmts_jax.clusters.encoder.config import BertConfig

__all__ = ["load_params", "weights_files", "weights_sha256", "hf_names"]

_PREFIXES = ("bert.", "distilbert.", "model.", "0.auto_model.")


def weights_files(model_dir: str | os.PathLike) -> list[str]:
  """The safetensors file(s) of a model directory (a single file or an indexed shard set)."""
  model_dir = os.fspath(model_dir)
  single = os.path.join(model_dir, "model.safetensors")
  index = os.path.join(model_dir, "model.safetensors.index.json")
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(model_dir, s) for s in shards]
  if os.path.isfile(os.path.join(model_dir, "pytorch_model.bin")):
    raise FileNotFoundError(
      f"{model_dir!r} has only PyTorch pickle weights (pytorch_model.bin); this loader reads "
      "safetensors only, so that PyTorch is not needed. Convert it once with "
      "`safetensors.torch.save_file`."
    )
  raise FileNotFoundError(f"no model.safetensors in model directory {model_dir!r}")


def weights_sha256(model_dir: str | os.PathLike) -> str:
  """sha256 over the bytes of the weight file(s), in order: the model's identity in provenance."""
  h = hashlib.sha256()
  for file in weights_files(model_dir):
    with open(file, "rb") as f:
      for block in iter(lambda: f.read(1 << 22), b""):
        h.update(block)
  return h.hexdigest()


def _linear(src: str) -> dict:
  return {"kernel": (src + ".weight", True), "bias": (src + ".bias", False)}


def _norm(src: str) -> dict:
  return {"scale": (src + ".weight", False), "bias": (src + ".bias", False)}


def hf_names(config: BertConfig) -> dict:
  """Nested dict mirroring the Flax params; leaves are `(hf_name, transpose)`."""
  if config.model_type == "bert":
    layer_fmt = "encoder.layer.{i}."
    names = {
      "query": "attention.self.query",
      "key": "attention.self.key",
      "value": "attention.self.value",
      "out": "attention.output.dense",
      "attention_norm": "attention.output.LayerNorm",
      "ffn_in": "intermediate.dense",
      "ffn_out": "output.dense",
      "ffn_norm": "output.LayerNorm",
    }
  else:
    layer_fmt = "transformer.layer.{i}."
    names = {
      "query": "attention.q_lin",
      "key": "attention.k_lin",
      "value": "attention.v_lin",
      "out": "attention.out_lin",
      "attention_norm": "sa_layer_norm",
      "ffn_in": "ffn.lin1",
      "ffn_out": "ffn.lin2",
      "ffn_norm": "output_layer_norm",
    }
  tree = {
    "word_embeddings": {"embedding": ("embeddings.word_embeddings.weight", False)},
    "position_embeddings": {"embedding": ("embeddings.position_embeddings.weight", False)},
    "embeddings_norm": _norm("embeddings.LayerNorm"),
  }
  if config.type_vocab_size:
    tree["token_type_embeddings"] = {
      "embedding": ("embeddings.token_type_embeddings.weight", False)
    }
  for i in range(config.num_layers):
    p = layer_fmt.format(i=i)
    tree[f"layer_{i}"] = {
      "attention": {k: _linear(p + names[k]) for k in ("query", "key", "value", "out")},
      "attention_norm": _norm(p + names["attention_norm"]),
      "ffn_in": _linear(p + names["ffn_in"]),
      "ffn_out": _linear(p + names["ffn_out"]),
      "ffn_norm": _norm(p + names["ffn_norm"]),
    }
  return tree


def _strip(name: str) -> str:
  for prefix in _PREFIXES:
    if name.startswith(prefix):
      return name[len(prefix) :]
  return name


def _canonical(name: str) -> str:
  name = _strip(name)
  # Old TF-converted checkpoints call the LayerNorm parameters gamma/beta.
  if name.endswith("LayerNorm.gamma"):
    return name[: -len("gamma")] + "weight"
  if name.endswith("LayerNorm.beta"):
    return name[: -len("beta")] + "bias"
  return name


def _read_tensors(model_dir) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  tensors = {}
  for file in weights_files(model_dir):
    for name, value in load_file(file).items():
      tensors[_canonical(name)] = value
  return tensors


def load_params(model_dir: str | os.PathLike, config: BertConfig) -> dict:
  """Reads the safetensors weights of `model_dir` into `{"params": ...}` for `BertEncoder`.

  Returns float32 numpy arrays (the caller places them on devices).

  Raises:
    KeyError: an encoder weight is missing; the message names it and the directory.
    ValueError: a weight has the wrong shape for `config`.
  """
  tensors = _read_tensors(model_dir)

  def convert(node):
    if isinstance(node, dict):
      return {k: convert(v) for k, v in node.items()}
    name, transpose = node
    if name not in tensors:
      raise KeyError(
        f"weight {name!r} not found in {os.fspath(model_dir)!r} (model_type={config.model_type!r})"
      )
    value = np.asarray(tensors[name], np.float32)
    return np.ascontiguousarray(value.T) if transpose else value

  params = convert(hf_names(config))
  _check_shapes(params, config)
  return {"params": params}


def _check_shapes(params: dict, config: BertConfig) -> None:
  h, f = config.hidden_size, config.intermediate_size
  expected = {
    ("word_embeddings", "embedding"): (config.vocab_size, h),
    ("position_embeddings", "embedding"): (config.max_position_embeddings, h),
    ("layer_0", "ffn_in", "kernel"): (h, f),
    ("layer_0", "ffn_out", "kernel"): (f, h),
  }
  for path, shape in expected.items():
    node: Any = params  # nested dicts down to an array
    for key in path:
      node = node[key]
    if node.shape != shape:
      raise ValueError(f"weight {'/'.join(path)} has shape {node.shape}, config implies {shape}")
