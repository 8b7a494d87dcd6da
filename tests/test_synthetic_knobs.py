"""Synthetic task knobs: near-duplicates in head classes, imbalance, a validation split."""

import hashlib

import numpy as np
import pytest

from mmts_jax.longtail.generator import (
  GeneratorConfig,
  duplicate_fraction,
  make_dataset,
)


def _digest(ds) -> str:
  m = hashlib.sha256()
  for split in (ds.train, ds.test):
    for a in (split.image, split.tokens, split.label, split.latent):
      m.update(np.ascontiguousarray(a).tobytes())
    m.update("\n".join(split.captions).encode())
  return m.hexdigest()[:16]


# Digests of the data as generated before the knobs existed (commit aa11a51); the committed
# benchmark results (benchmarks/results/synthetic_*.json) were trained on the first one.
_ORIGINAL = {"default": "2e5fac0ef3ff1f73", "small": "b1db82aa14e7b0b6"}
_SMALL = dict(num_classes=8, head_size=200, imbalance=100, seed=3)


def test_defaults_reproduce_the_original_data():
  assert _digest(make_dataset(GeneratorConfig())) == _ORIGINAL["default"]
  assert _digest(make_dataset(GeneratorConfig(**_SMALL))) == _ORIGINAL["small"]
  # Zero near-duplicates and a validation split leave train and test as they were.
  ds = make_dataset(GeneratorConfig(**_SMALL, head_duplicates=0.0, val_per_class=5))
  assert _digest(ds) == _ORIGINAL["small"]
  assert len(ds.val) == 5 * 8 and np.bincount(ds.val.label).tolist() == [5] * 8
  assert make_dataset(GeneratorConfig(**_SMALL)).val is None


def _duplicated_rows(split, c):
  """Samples of class c whose per-sample latent is within 0.2 of another sample's."""
  z = split.latent[split.label == c].astype(np.float64)
  d = np.linalg.norm(z[:, None] - z[None], axis=-1) + np.eye(len(z)) * 1e9
  return int(np.sum(d.min(axis=1) < 0.2))


def test_near_duplicates_grow_in_head_classes_only():
  base = make_dataset(GeneratorConfig(**_SMALL))
  dup = make_dataset(GeneratorConfig(**_SMALL, head_duplicates=0.5, duplicate_jitter=0.01))
  head, tail = 0, 7
  n_head = int(base.class_sizes[head])
  # f_1 = 0.5: about half the head class copies another sample (the copy and its source both
  # count as near-duplicate rows); the smallest class gets none.
  assert _duplicated_rows(dup.train, head) >= n_head // 2
  assert _duplicated_rows(base.train, head) < n_head // 10
  assert _duplicated_rows(dup.train, tail) == _duplicated_rows(base.train, tail)
  np.testing.assert_array_equal(dup.train.label, base.train.label)
  # Near-duplicates share the caption: fewer distinct head captions.
  distinct = lambda ds: len(
    {c for c, y in zip(ds.train.captions, ds.train.label, strict=True) if y == head}
  )
  assert distinct(dup) < distinct(base)
  np.testing.assert_allclose(duplicate_fraction(base.class_sizes, 0.5)[[0, -1]], [0.5, 0.0])


def test_imbalance_knob_and_bad_values():
  ds = make_dataset(GeneratorConfig(**{**_SMALL, "imbalance": 10}))
  assert ds.class_sizes.max() / ds.class_sizes.min() >= 10
  assert ds.class_sizes.max() / ds.class_sizes.min() < 100
  with pytest.raises(ValueError, match="head_duplicates must be in \\[0, 1\\).*1.5"):
    GeneratorConfig(head_duplicates=1.5)
  with pytest.raises(ValueError, match="val_per_class must be >= 0, got -1"):
    GeneratorConfig(val_per_class=-1)
