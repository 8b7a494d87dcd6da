"""An in-memory trainer source over a features file: whole batches by fancy indexing.

`mmts_jax.data.trainer_source:features` reads a features file record by record through grain
(the same shuffling and sharding as image datasets); for small precomputed features that per-record
work dominates the step (1.3k against 500k examples/s on a loaded 2-core host,
`benchmarks/feature_source_bench.py`). This source
loads the arrays once and serves each global batch as one slice of a seeded permutation
(`mmts_jax.data.sources.ArraySource`: deterministic, resumable at any batch, per-process rows),
and carries the file's fingerprint so a cluster table is checked against it.

  config.data.name = "features_in_memory"   (registered in `mmts_jax.data.sources.SOURCES`)
  config.data.path = "data/ek100/train_features.npz"

Example:
  >>> import tempfile, ml_collections
  >>> from mmts_jax.data.features import save_features
  >>> p = tempfile.mkdtemp() + "/f.npz"
  >>> save_features(p, image_features=np.ones((8, 4)), text_features=np.ones((8, 3)),
  ...               index=np.arange(8), fingerprint="sha256:" + "ab" * 32)
  >>> src = in_memory(ml_collections.ConfigDict({"path": p}), global_batch_size=4, seed=0)
  >>> next(src.iterate(0))["image_features"].shape, src.fingerprint[:9]
  ((4, 4), 'sha256:ab')
"""

from __future__ import annotations

import numpy as np

from mmts_jax.data.features import FeatureSource

__all__ = ["in_memory"]


def in_memory(cfg, *, global_batch_size: int, seed: int):
  """`config.data` (`path`, optional `shuffle`) -> an `ArraySource` with the file's
  fingerprint."""
  from mmts_jax.data.sources import ArraySource

  path = cfg.get("path") if hasattr(cfg, "get") else getattr(cfg, "path", None)
  if not path:
    raise ValueError("config.data.path (a features .npz) is required")
  features = FeatureSource(path)
  arrays = {k: v for k, v in features.arrays.items() if k != "label"}
  n = len(features)
  if features.num_records is not None and features.num_records != n:
    # The trainer sizes the shift table by the number of examples: a subset of a dataset's
    # records cannot be served with indices into the full table here.
    raise ValueError(
      f"{path} holds {n} of {features.num_records} records; use "
      f"mmts_jax.data.trainer_source:features for a subset"
    )
  if not np.array_equal(np.sort(arrays["index"]), np.arange(n)):
    raise ValueError(f"{path}: index must be a permutation of 0..{n - 1}")
  return ArraySource(
    arrays,
    global_batch_size=global_batch_size,
    seed=seed,
    shuffle=bool(cfg.get("shuffle", True)),
    fingerprint=features.fingerprint,
  )
