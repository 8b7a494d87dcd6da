"""Input checks shared by the K-Means back-ends: run before anything is compiled."""

from __future__ import annotations

import numpy as np

__all__ = ["check_points", "check_k"]


def check_points(x, name: str = "embeddings") -> np.ndarray:
  """`(N, D)` finite float32 points, or a ValueError naming the problem (and the first bad row).

  Example:
    >>> check_points([[0.0, 1.0], [1.0, 0.0]]).dtype
    dtype('float32')
  """
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {x.shape}")
  if x.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(f"{name} is empty: shape {x.shape}")
  if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
    raise TypeError(f"{name} must be real numbers, got dtype {x.dtype}")
  x = np.asarray(x, np.float32)
  finite = np.isfinite(x).all(axis=1)
  if not finite.all():
    bad = np.flatnonzero(~finite)
    raise ValueError(
      f"{name} has {bad.size} row(s) with NaN or inf values (first: row "
      f"{bad[0]}); fix or drop them before clustering"
    )
  return x


def check_k(k, num_samples: int) -> int:
  """`1 <= k <= N`, an int."""
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise TypeError(f"k must be an int, got {k!r}")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  if k > num_samples:
    raise ValueError(f"k={k} is larger than the number of samples ({num_samples}); use a smaller k")
  return int(k)
