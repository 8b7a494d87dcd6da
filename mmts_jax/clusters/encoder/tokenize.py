"""Tokenisation through Hugging Face `tokenizers` (or `transformers` when there is no
`tokenizer.json`), and the length buckets that bound how many shapes get compiled.

Sentences are stripped of surrounding whitespace (as sentence-transformers does) and truncated
to `max_length` tokens including `[CLS]` and `[SEP]`.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["Tokenizer", "bucket_length"]


def bucket_length(n: int, max_length: int) -> int:
  """The padded length for a batch whose longest sequence has `n` tokens.

  Exact up to 16 tokens, then steps of 1/16 of the next power of two (2 up to 32, 4 up to 64,
  ..., 32 up to 512), capped at `max_length`:

    bucket(n) = n                                   if n <= 16
              = ceil(n / s) * s,  s = 2^(ceil(log2 n) - 4)   otherwise

  so padding adds less than 1/8 of `n` (short captions, the common case, get none: the encoder
  is compute-bound on CPU and every padded token costs as much as a real one), while a dataset
  compiles at most 16 + 8 shapes per octave of lengths.

  Example:
    >>> [bucket_length(n, 256) for n in (2, 9, 17, 64, 65, 200, 300)]
    [2, 9, 18, 64, 72, 208, 256]
  """
  if n < 1:
    raise ValueError(f"sequence length must be >= 1, got {n}")
  step = 1 if n <= 16 else 1 << ((n - 1).bit_length() - 4)
  return min(-(-n // step) * step, max_length)


class Tokenizer:
  """A fast WordPiece tokenizer that returns unpadded id arrays.

  Example:
    >>> # the packaged all-MiniLM-L6-v2
    >>> from mmts_jax.clusters.encoder.encoder import default_model_dir
    >>> tok = Tokenizer(default_model_dir(), max_length=256)
    >>> tok(["pick up container"])[0]
    array([  101,  4060,  2039, 11661,   102], dtype=int32)
  """

  def __init__(self, model_dir: str | os.PathLike, max_length: int, lowercase: bool = False):
    if max_length < 2:
      raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}")
    model_dir = os.fspath(model_dir)
    file = os.path.join(model_dir, "tokenizer.json")
    if os.path.isfile(file):
      from tokenizers import Tokenizer as HfTokenizer

      backend = HfTokenizer.from_file(file)
    else:
      # A vocab.txt-only checkpoint: transformers builds the same fast tokenizer from it.
      from transformers import AutoTokenizer

      backend = AutoTokenizer.from_pretrained(model_dir, local_files_only=True).backend_tokenizer
    backend.no_padding()
    backend.enable_truncation(max_length=max_length)
    self._backend = backend
    self.max_length = max_length
    self.lowercase = lowercase
    pad = backend.token_to_id("[PAD]")
    self.pad_id = 0 if pad is None else pad

  def __call__(self, sentences) -> list[np.ndarray]:
    texts = []
    for i, s in enumerate(sentences):
      if not isinstance(s, str):
        raise TypeError(f"sentence {i} is {type(s).__name__} ({s!r}), expected str")
      s = s.strip()
      texts.append(s.lower() if self.lowercase else s)
    encodings = self._backend.encode_batch(texts, add_special_tokens=True)
    return [np.asarray(e.ids, np.int32) for e in encodings]
