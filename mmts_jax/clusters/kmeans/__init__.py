"""K-Means for the cluster table: scikit-learn on the host, or JAX on the accelerator.

Example:
  >>> import numpy as np
  >>> from mmts_jax.clusters.kmeans import kmeans
  >>> x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
  >>> kmeans(x, 4, seed=0, backend="jax").labels.shape
  (300,)
"""

from __future__ import annotations

from mmts_jax.clusters.kmeans.checks import check_k, check_points
from mmts_jax.clusters.kmeans.jax_kmeans import kmeans_jax
from mmts_jax.clusters.kmeans.result import KMeansResult
from mmts_jax.clusters.kmeans.sklearn_kmeans import kmeans_sklearn

__all__ = [
  "kmeans",
  "kmeans_jax",
  "kmeans_sklearn",
  "KMeansResult",
  "check_points",
  "check_k",
  "BACKENDS",
]

BACKENDS = ("sklearn", "jax")


def kmeans(
  x,
  k: int = 200,
  *,
  seed: int = 0,
  backend: str = "sklearn",
  n_init: int = 1,
  progress: bool | None = False,
  **kwargs,
) -> KMeansResult:
  """K-Means with the named back-end ("sklearn" on the host, "jax" on the local devices)."""
  if backend == "sklearn":
    return kmeans_sklearn(x, k, seed=seed, n_init=n_init, progress=progress, **kwargs)
  if backend == "jax":
    return kmeans_jax(x, k, seed=seed, n_init=n_init, progress=progress, **kwargs)
  raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
