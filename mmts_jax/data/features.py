"""Precomputed embeddings (npz) + `index`, for feature-level fine-tuning with the same pipeline.

File layout (`np.savez`, written atomically): `image_features` (N, Di) and `text_features`
(N, Dt) floats, `index` (N,) int (the record numbers of the dataset the features came from, so
the cluster table's shifts still apply), optional `label` (N,) int, and the provenance of that
dataset as 0-d arrays `num_records` and `fingerprint` (see `records.Manifest`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from mmts_jax import array_files
from mmts_jax.data.pipeline import Pipeline, make_pipeline
from mmts_jax.data.records import atomic_write_bytes
from mmts_jax.errors import UserInputError

__all__ = ["save_features", "FeatureSource", "feature_pipeline"]

_REQUIRED = ("image_features", "text_features", "index")


def save_features(
  path: str | os.PathLike,
  *,
  image_features,
  text_features,
  index,
  label=None,
  num_records: int | None = None,
  fingerprint: str | None = None,
) -> None:
  """Validates and writes a features file (see the module docstring).

  Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "feats.npz")
    >>> img, txt = np.ones((4, 8), np.float32), np.ones((4, 6), np.float32)
    >>> save_features(path, image_features=img, text_features=txt, index=np.arange(len(img)))
    >>> src = FeatureSource(path)
    >>> len(src), {k: v.shape for k, v in src[0].items()}
    (4, {'image_features': (8,), 'text_features': (6,), 'index': ()})
  """
  arrays: dict[str, Any] = {
    "image_features": np.asarray(image_features),
    "text_features": np.asarray(text_features),
    "index": np.asarray(index),
  }
  if label is not None:
    arrays["label"] = np.asarray(label)
  n = len(arrays["index"])
  for name in ("image_features", "text_features"):
    a = arrays[name]
    if a.ndim != 2 or a.shape[0] != n or not np.issubdtype(a.dtype, np.floating):
      raise ValueError(f"{name} must be a float (N={n}, D) array, got {a.dtype} {a.shape}")
    if not np.all(np.isfinite(a)):
      raise ValueError(f"{name} has non-finite values")
  for name in ("index", "label"):
    if name in arrays:
      a = arrays[name]
      if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be an int (N={n},) array, got {a.dtype} {a.shape}")
  idx = arrays["index"]
  if n == 0 or idx.min() < 0 or len(np.unique(idx)) != n:
    raise ValueError("index must be non-empty, >= 0 and without duplicates")
  if num_records is not None:
    if idx.max() >= num_records:
      raise ValueError(f"index max {idx.max()} >= num_records {num_records}")
    arrays["num_records"] = np.asarray(num_records, np.int64)
  if fingerprint is not None:
    arrays["fingerprint"] = np.asarray(str(fingerprint))
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  atomic_write_bytes(path, buf.getvalue())


class FeatureSource(Sequence):
  """Random access to a features file.

  `source[i]` = {image_features, text_features, index[, label]}.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = epath.Path(os.fspath(path))  # local or gs://
    expected = f"a features .npz with {list(_REQUIRED)} (mmts_jax.data.features.save_features)"
    z = array_files.read_npz(self.path, expected=expected)
    missing = [k for k in _REQUIRED if k not in z]
    if missing:
      raise UserInputError(
        self.path, f"has no array(s) {missing}, only {sorted(z)}", expected=expected
      )
    self.arrays = {k: z[k] for k in (*_REQUIRED, "label") if k in z}
    self.num_records = int(z["num_records"]) if "num_records" in z else None
    self.fingerprint = str(z["fingerprint"]) if "fingerprint" in z else None
    n = len(self.arrays["index"])
    for key, x in self.arrays.items():
      array_files.check_numeric(x, self.path, key)
      if x.ndim == 0 or x.shape[0] != n:
        raise UserInputError(
          self.path, f"has shape {x.shape}", key=key, expected=f"{n} rows, one per entry of 'index'"
        )
      if key.endswith("features"):
        array_files.check_matrix(x.reshape(n, -1) if x.ndim > 2 else x, self.path, key)
      elif x.dtype.kind not in "iu" or x.ndim != 1:
        raise UserInputError(
          self.path, f"has dtype {x.dtype} shape {x.shape}", key=key, expected="a 1-D integer array"
        )
    self.arrays["index"] = self.arrays["index"].astype(np.int32)
    if "label" in self.arrays:
      self.arrays["label"] = self.arrays["label"].astype(np.int32)

  def __len__(self) -> int:
    return len(self.arrays["index"])

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {k: v[int(i)] for k, v in self.arrays.items()}


def _identity(record: Mapping[str, Any], rng) -> Mapping[str, Any]:
  return record


def feature_pipeline(
  source: FeatureSource | str | os.PathLike,
  *,
  global_batch_size: int,
  seed: int = 0,
  train: bool = True,
  num_epochs: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Pipeline:
  """`make_pipeline` over a features file: same shuffling, sharding and resume as images."""
  if not isinstance(source, FeatureSource):
    source = FeatureSource(source)
  return make_pipeline(
    source,
    _identity,
    global_batch_size=global_batch_size,
    seed=seed,
    train=train,
    num_epochs=num_epochs,
    process_index=process_index,
    process_count=process_count,
  )
