"""Embed a whole array with the trainer's jitted `embed(variables, batch)` in fixed-size chunks.

Every chunk has the same shape (the last one is padded by repeating its final row), so `embed`
compiles once per input shape however many items there are, and device memory stays at one
chunk. Padded rows are dropped before returning.

Example:
  >>> calls = []
  >>> def embed(variables, batch):  # stands in for `make_embed_fn(model)`
  ...   calls.append(batch["image_features"].shape)
  ...   return {"image": batch["image_features"] @ variables}
  >>> feats = np.arange(10, dtype=np.float32).reshape(5, 2)
  >>> emb = embed_array(embed, np.eye(2, 3), "image_features", feats, "image", chunk=2)
  >>> emb.shape, emb.dtype, calls  # 3 calls of one shape; the padded row is dropped
  ((5, 3), dtype('float32'), [(2, 2), (2, 2), (2, 2)])
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["embed_array", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 1024


def embed_array(
  embed: Callable,
  variables,
  input_key: str,
  array: np.ndarray,
  output: str,
  *,
  chunk: int = DEFAULT_CHUNK,
) -> np.ndarray:
  """`embed(variables, {input_key: rows})[output]` over all rows of `array` -> (N, D) float32.

  Args:
    embed: `mmts_jax.train.make_embed_fn(model)` (or any function of the same signature).
    variables: the model variables (`state.variables()`).
    input_key: the batch key the tower reads (`model.image_key` / `model.text_key`).
    array: (N, ...) inputs of that tower.
    output: "image" or "text".
    chunk: rows per call.
  """
  array = np.asarray(array)
  if array.ndim < 1 or array.shape[0] == 0:
    raise ValueError(
      f"embed_array: {input_key!r} must be a non-empty (N, ...) array, got shape {array.shape}"
    )
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
    raise ValueError(f"embed_array: chunk must be a positive int, got {chunk!r}")
  n = array.shape[0]
  chunk = min(chunk, n)
  out = []
  for start in range(0, n, chunk):
    rows = array[start : start + chunk]
    if rows.shape[0] < chunk:  # same shape for every call: no recompilation for the tail
      rows = np.concatenate([rows, np.repeat(rows[-1:], chunk - rows.shape[0], axis=0)])
    emb = np.asarray(embed(variables, {input_key: rows})[output], np.float32)
    out.append(emb[: min(chunk, n - start)])
  return np.concatenate(out)
