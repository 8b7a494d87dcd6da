"""An in-memory trainer source over a features file: whole batches by fancy indexing.

`mmts_jax.data.trainer_source:features` reads a features file record by record through grain
(the same shuffling and sharding as image datasets); for small precomputed features that per-record
work dominates the step (1.3k against 500k examples/s on a loaded 2-core host,
`benchmarks/feature_source_bench.py`). This source
loads the arrays once and serves each global batch as one slice of a seeded permutation
(`mmts_jax.train.ArraySource`: deterministic, resumable at any batch, per-process rows), and
carries the file's fingerprint so a cluster table is checked against it.

  config.data.name = "mmts_jax.finetune.feature_source:in_memory"
  config.data.path = "data/ek100/train_features.npz"

Example:
  >>> src = in_memory(ml_collections.ConfigDict({"path": p}), global_batch_size=256, seed=0)  # doctest: +SKIP
  >>> next(src.iterate(0))["image_features"].shape  # doctest: +SKIP
  (256, 64)
"""
from __future__ import annotations

import numpy as np

from mmts_jax.data.features import FeatureSource

__all__ = ["in_memory"]


def in_memory(cfg, *, global_batch_size: int, seed: int):
  """`config.data` (`path`, optional `shuffle`) -> `mmts_jax.train.ArraySource`."""
  from mmts_jax.train import ArraySource
  path = cfg.get("path") if hasattr(cfg, "get") else getattr(cfg, "path", None)
  if not path:
    raise ValueError("config.data.path (a features .npz) is required")
  features = FeatureSource(path)
  arrays = {k: v for k, v in features.arrays.items() if k != "label"}
  n = len(features)
  if features.num_records is not None and features.num_records != n:
    # The trainer sizes the shift table by the number of examples: a subset of a dataset's
    # records cannot be served with indices into the full table here.
    raise ValueError(f"{path} holds {n} of {features.num_records} records; use "
                     f"mmts_jax.data.trainer_source:features for a subset")
  if not np.array_equal(np.sort(arrays["index"]), np.arange(n)):
    raise ValueError(f"{path}: index must be a permutation of 0..{n - 1}")
  source = ArraySource(arrays, global_batch_size=global_batch_size, seed=seed,
                       shuffle=bool(cfg.get("shuffle", True)))
  source.fingerprint = features.fingerprint
  return source
