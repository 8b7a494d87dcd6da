"""Fixed-length tokenisation for the input pipeline: caption -> int32 ids of length L.

Loads a tokenizer *directory* offline: `tokenizer.json` through the `tokenizers` library (fast,
no transformers import), else whatever `transformers.AutoTokenizer` finds there (vocab files).
Sequences are truncated to L (keeping the closing special token, as the tokenizer's own
post-processor does) and right-padded with the tokenizer's pad id, so a text encoder recovers its
attention mask as `ids != pad_id`.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

__all__ = ["TextTokenizer"]


def _pad_token(path: pathlib.Path) -> str | None:
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    f = path / name
    if f.is_file():
      tok = json.loads(f.read_text()).get("pad_token")
      if isinstance(tok, dict):
        tok = tok.get("content")
      if tok:
        return tok
  return None


class TextTokenizer:
  """`tok(caption) -> (L,) int32`, `tok.batch(captions) -> (B, L) int32`.

  Picklable (it keeps only the path and re-loads in a worker process).

  Example:
    >>> # the packaged all-MiniLM-L6-v2
    >>> from mmts_jax.clusters.encoder.encoder import default_model_dir
    >>> tok = TextTokenizer(default_model_dir(), max_length=8)
    >>> tok("pick up container")
    array([  101,  4060,  2039, 11661,   102,     0,     0,     0], dtype=int32)
  """

  def __init__(self, path: str | os.PathLike, max_length: int):
    if not isinstance(max_length, int) or max_length < 2:
      raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    self.path = pathlib.Path(path)
    if not self.path.is_dir():
      raise FileNotFoundError(f"tokenizer directory {self.path} does not exist")
    self.max_length = max_length
    self._load()

  def _load(self) -> None:
    tok_json = self.path / "tokenizer.json"
    pad = _pad_token(self.path)
    if tok_json.is_file():
      from tokenizers import Tokenizer

      tok = Tokenizer.from_file(str(tok_json))
      pad_id = tok.token_to_id(pad) if pad is not None else None
      if pad_id is None:
        pad_id = (tok.padding or {}).get("pad_id", 0)
        pad = (tok.padding or {}).get("pad_token", "[PAD]")
      tok.enable_truncation(max_length=self.max_length)
      tok.enable_padding(length=self.max_length, pad_id=pad_id, pad_token=pad)
      self._encode_batch = lambda texts: [e.ids for e in tok.encode_batch(list(texts))]
    else:
      from transformers import AutoTokenizer

      tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
      pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
      self._encode_batch = lambda texts: tok(
        list(texts),
        max_length=self.max_length,
        truncation=True,
        padding="max_length",
        return_attention_mask=False,
      )["input_ids"]
    self.pad_id = int(pad_id)

  def __getstate__(self):
    return {"path": self.path, "max_length": self.max_length}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._load()

  def batch(self, texts: Sequence[str]) -> np.ndarray:
    if isinstance(texts, str):
      raise TypeError("batch() takes a sequence of captions, got one str")
    ids = np.asarray(self._encode_batch(texts), dtype=np.int32).reshape(len(texts), -1)
    if ids.shape[1] != self.max_length:
      raise ValueError(
        f"tokenizer at {self.path} produced length {ids.shape[1]}, expected {self.max_length}"
      )
    return ids

  def __call__(self, text: str) -> np.ndarray:
    if not isinstance(text, str):
      raise TypeError(f"caption must be str, got {type(text).__name__}")
    return self.batch([text])[0]

  def __repr__(self) -> str:
    return f"TextTokenizer({str(self.path)!r}, max_length={self.max_length})"
