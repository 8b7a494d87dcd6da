"""The result type shared by the K-Means back-ends."""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["KMeansResult"]


@dataclasses.dataclass(frozen=True)
class KMeansResult:
  """labels `(N,)` int32, centers `(k, D)` float32, inertia `sum_i ||x_i - c_{l_i}||^2`."""

  labels: np.ndarray
  centers: np.ndarray
  inertia: float
  n_iter: int
  backend: str
  seed: int
