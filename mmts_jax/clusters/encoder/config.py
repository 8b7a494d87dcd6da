"""The architecture of a BERT-family encoder, read from a Hugging Face `config.json`.

BERT, MiniLM and Sentence-BERT checkpoints use `model_type: bert`; DistilBERT uses its own key
names (`dim`, `n_layers`, ...) and has no token-type embedding. Both map onto one `BertConfig`,
so a single Flax module serves them.
"""

from __future__ import annotations

import dataclasses
import json
import os

__all__ = ["BertConfig", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("bert", "distilbert")
_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyper-parameters of a post-LayerNorm BERT encoder.

  `type_vocab_size == 0` means the checkpoint has no token-type embedding (DistilBERT).

  Example:
    >>> cfg = BertConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
    ...                  intermediate_size=64)
    >>> cfg.head_dim
    8
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  model_type: str = "bert"

  def __post_init__(self):
    for name in (
      "vocab_size",
      "hidden_size",
      "num_layers",
      "num_heads",
      "intermediate_size",
      "max_position_embeddings",
    ):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"BertConfig.{name} must be a positive int, got {value!r}")
    if self.hidden_size % self.num_heads:
      raise ValueError(
        f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
      )
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(
        f"hidden_act={self.hidden_act!r} is not supported; use one of {_ACTIVATIONS}"
      )
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
        f"model_type={self.model_type!r} is not supported; use one of {SUPPORTED_MODEL_TYPES}"
      )

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_hf_dict(cls, d: dict) -> BertConfig:
    """From the parsed `config.json` of a `bert` or `distilbert` checkpoint."""
    model_type = d.get("model_type", "bert")
    if model_type == "bert":
      return cls(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        intermediate_size=d["intermediate_size"],
        max_position_embeddings=d.get("max_position_embeddings", 512),
        type_vocab_size=d.get("type_vocab_size", 2),
        layer_norm_eps=d.get("layer_norm_eps", 1e-12),
        hidden_act=d.get("hidden_act", "gelu"),
        model_type="bert",
      )
    if model_type == "distilbert":
      # A sinusoidal position table (`sinusoidal_pos_embds`) is stored in the weights all the
      # same, so it loads like a learned one.
      return cls(
        vocab_size=d["vocab_size"],
        hidden_size=d["dim"],
        num_layers=d["n_layers"],
        num_heads=d["n_heads"],
        intermediate_size=d["hidden_dim"],
        max_position_embeddings=d.get("max_position_embeddings", 512),
        type_vocab_size=0,
        layer_norm_eps=1e-12,
        hidden_act=d.get("activation", "gelu"),
        model_type="distilbert",
      )
    raise ValueError(
      f"model_type={model_type!r} is not supported; use one of {SUPPORTED_MODEL_TYPES}"
    )

  @classmethod
  def from_model_dir(cls, path: str | os.PathLike) -> BertConfig:
    """Reads `<path>/config.json`."""
    file = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(file):
      raise FileNotFoundError(f"no config.json in model directory {os.fspath(path)!r}")
    with open(file, encoding="utf-8") as f:
      return cls.from_hf_dict(json.load(f))
