"""Retrieval recall with several correct answers, split by query group (head / tail classes).

`R@K = mean over queries q of [ any relevant item among the K most similar ]`, where item `j` is
relevant to query `q` when `relevant[q, j]`. In the synthetic benchmark a caption is relevant to
an image when it is the image's own caption *or the same string*: head classes hold exact
duplicate captions, and ranking one duplicate above another is not an error.

Example:
  >>> sim = np.array([[0.9, 0.1], [0.8, 0.2]])
  >>> recall_at_k(sim, np.eye(2, dtype=bool), (1,))
  {1: 0.5}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["recall_at_k", "same_string", "grouped_recall"]


def same_string(strings: Sequence[str]) -> np.ndarray:
  """`(N, N)` bool, `[i, j] = strings[i] == strings[j]` (the diagonal is True)."""
  _, ids = np.unique(np.asarray(strings, dtype=object), return_inverse=True)
  return ids[:, None] == ids[None, :]


def recall_at_k(
  similarity: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[int, float]:
  """Recall@K of every row of `similarity` (queries x items) against the mask `relevant`."""
  similarity, relevant = np.asarray(similarity), np.asarray(relevant, bool)
  if similarity.ndim != 2 or similarity.shape != relevant.shape:
    raise ValueError(
      f"similarity and relevant must be equal 2-D shapes, got {similarity.shape} "
      f"and {relevant.shape}"
    )
  if not similarity.shape[0]:
    return {int(k): float("nan") for k in ks}
  bad = [k for k in ks if not 1 <= int(k) <= similarity.shape[1]]
  if bad:
    raise ValueError(f"every K must be in [1, {similarity.shape[1]}], got {bad}")
  # Rank of the best relevant item = number of items scoring strictly higher than it.
  best = np.where(relevant, similarity, -np.inf).max(axis=1)
  rank = np.sum(similarity > best[:, None], axis=1)
  return {int(k): float(np.mean(rank < int(k))) for k in ks}


def grouped_recall(
  similarity: np.ndarray,
  relevant: np.ndarray,
  groups: Mapping[str, np.ndarray],
  ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
  """`{"<group>/R@<K>": value}`: recall of the queries in each boolean group mask."""
  out = {}
  for name, mask in groups.items():
    mask = np.asarray(mask, bool)
    for k, v in recall_at_k(similarity[mask], relevant[mask], ks).items():
      out[f"{name}/R@{k}"] = v
  return out
