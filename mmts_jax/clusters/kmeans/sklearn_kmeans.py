"""K-Means with scikit-learn (Lloyd, greedy k-means++ init): the host reference."""

from __future__ import annotations

from typing import Any

import numpy as np

from mmts_jax.clusters.kmeans.checks import check_k, check_points
from mmts_jax.clusters.kmeans.result import KMeansResult

__all__ = ["kmeans_sklearn"]


def kmeans_sklearn(
  x,
  k: int = 200,
  *,
  seed: int = 0,
  n_init: int = 1,
  max_iter: int = 300,
  tol: float = 1e-4,
  progress: bool | None = False,
) -> KMeansResult:
  """scikit-learn `KMeans(algorithm="lloyd")`, one run per init, the lowest inertia kept.

  Runs are seeded `seed, seed+1, ...` so a progress bar can follow them; `n_init=1` (the
  default) is exactly `KMeans(k, n_init=1, random_state=seed)`.

  Example:
    >>> x = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    >>> kmeans_sklearn(x, 3).labels.shape
    (100,)
  """
  from sklearn.cluster import KMeans

  x = check_points(x)
  k = check_k(k, x.shape[0])
  if n_init < 1:
    raise ValueError(f"n_init must be >= 1, got {n_init}")
  runs = range(n_init)
  if progress is not False:  # None: a bar only when stderr is a terminal (tqdm's rule)
    from tqdm.auto import tqdm

    runs = tqdm(
      runs,
      desc=f"k-means (sklearn, k={k})",
      unit="init",
      disable=None if progress is None else False,
    )
  # sklearn ships no annotations: pyright infers `n_init: str` from its "auto" default and the
  # fitted attributes (`inertia_`, `labels_`, ...) as Optional, so a fitted estimator is `Any`.
  best: Any = None
  for r in runs:
    km: Any = KMeans(
      n_clusters=k,
      n_init=1,  # pyright: ignore[reportArgumentType]
      random_state=seed + r,
      max_iter=max_iter,
      tol=tol,
      algorithm="lloyd",
    ).fit(x)
    if best is None or km.inertia_ < best.inertia_:
      best = km
  assert best is not None, "n_init >= 1 was checked, so one run was kept"
  return KMeansResult(
    labels=best.labels_.astype(np.int32),
    centers=best.cluster_centers_.astype(np.float32),
    inertia=float(best.inertia_),
    n_iter=int(best.n_iter_),
    backend="sklearn",
    seed=seed,
  )
