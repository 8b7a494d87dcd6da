r"""Long-tail retrieval report: R@K, mAP and nDCG split by cluster-size bucket (head/middle/tail).

A retrieval result (a `(Q, M)` similarity matrix: rows are image / video queries, columns are
captions) is scored per query and then averaged inside three buckets of the query's semantic
cluster (a K-Means cluster of size `K_c`, or a class with its training frequency):

* **Buckets by cumulative share of samples** (`scheme="share"`, default). Clusters are ordered by
  size, largest first; the share of samples in clusters *strictly larger* than cluster `c` is
  :math:`S_c = \sum_{c': K_{c'} > K_c} K_{c'} / \sum_{c'} K_{c'}`. Cluster `c` is *head* if
  :math:`S_c < 1/3`, *tail* if :math:`S_c \ge 2/3`, *middle* otherwise: the head holds (about)
  the first third of the samples, the tail the last third, and clusters of equal size always
  share a bucket.
* **Terciles of K** (`scheme="terciles"`): with :math:`q_1, q_2` the 1/3 and 2/3 quantiles of the
  cluster sizes (one value per cluster), *tail* if :math:`K_c \le q_1`, *head* if
  :math:`K_c > q_2`, *middle* otherwise.

Metrics, per query (both directions; a caption query takes its own cluster, given separately):

* instance R@K: `1` if one of the query's instance positives (`positives`, by default the
  identity: caption `i` belongs to image `i`) is among the K most similar items (rank = number
  of items strictly more similar than the best positive);
* mAP and nDCG: the EK-100 MIR definitions (`mmts_jax.eval.ek100_mir.mir_per_query`) on a graded
  `relevancy`, e.g. `label_relevancy` (`[class equal]`, single-label data) or
  `eval.class_relevancy` (`0.5 [verb equal] + 0.5 IoU(nouns)`, EK-100).

Every bucket also reports its number of queries; an empty bucket is left out.

Example (two classes, class 0 three times as frequent; the tail caption is ranked second):
  >>> labels = np.array([0, 0, 0, 1])
  >>> sim = np.array([[.9, .1, .1, .0], [.1, .9, .1, .0], [.1, .1, .9, .0], [.0, .0, .9, .5]],
  ...                np.float32)
  >>> rep = longtail_report(sim, label_relevancy(labels, labels), image_clusters=labels,
  ...                       text_clusters=labels, cluster_sizes=np.bincount(labels), ks=(1,))
  >>> rep["head"]["i2t/R@1"], rep["tail"]["i2t/R@1"], rep["tail"]["num_queries"]
  (1.0, 0.0, 1)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmts_jax.eval.ek100_mir import mir_per_query

__all__ = [
  "BUCKETS",
  "SCHEMES",
  "cluster_buckets",
  "format_longtail",
  "label_relevancy",
  "longtail_report",
  "recall_per_query",
]

BUCKETS = ("head", "middle", "tail")
SCHEMES = ("share", "terciles")


def cluster_buckets(cluster_sizes, scheme: str = "share") -> np.ndarray:
  """`(C,)` int bucket of every cluster: 0 head, 1 middle, 2 tail (see the module docstring).

  Args:
    cluster_sizes: `(C,)` sample count `K_c` of every cluster (or class frequency), >= 0.
    scheme: "share" (cumulative share of samples) or "terciles" (of the cluster sizes).

  Example:
    >>> cluster_buckets(np.array([60, 20, 10, 6, 4])).tolist()
    [0, 1, 2, 2, 2]
    >>> cluster_buckets(np.array([60, 20, 10, 6, 4]), "terciles").tolist()
    [0, 0, 1, 2, 2]
  """
  if scheme not in SCHEMES:
    raise ValueError(f"cluster_buckets: scheme must be one of {SCHEMES}, got {scheme!r}")
  sizes = np.asarray(cluster_sizes)
  if sizes.ndim != 1 or sizes.size == 0:
    raise ValueError(
      f"cluster_buckets: cluster_sizes must be a non-empty (C,) array, got shape {sizes.shape}"
    )
  if not np.issubdtype(sizes.dtype, np.number) or not np.all(np.isfinite(sizes)):
    raise ValueError(f"cluster_buckets: cluster_sizes must be finite numbers, got {sizes[:5]}")
  if np.any(sizes < 0) or sizes.sum() <= 0:
    raise ValueError(
      f"cluster_buckets: cluster_sizes must be >= 0 with a positive total, got "
      f"min {sizes.min()}, total {sizes.sum()}"
    )
  sizes = sizes.astype(np.float64)
  if scheme == "share":
    # Samples in strictly larger clusters: sort ascending, sum of everything after the last
    # equal size.
    order = np.sort(sizes)
    suffix = np.concatenate([np.cumsum(order[::-1])[::-1], [0.0]])
    larger = suffix[np.searchsorted(order, sizes, side="right")]
    share = larger / sizes.sum()
    return np.where(share < 1 / 3, 0, np.where(share >= 2 / 3, 2, 1)).astype(np.int32)
  q1, q2 = np.quantile(sizes, [1 / 3, 2 / 3])
  return np.where(sizes > q2, 0, np.where(sizes <= q1, 2, 1)).astype(np.int32)


def label_relevancy(labels_a, labels_b) -> np.ndarray:
  """`(A, B)` float32 `[labels_a[i] == labels_b[j]]`: the relevancy of single-label data.

  Example:
    >>> label_relevancy([0, 1], [1, 1, 0]).tolist()
    [[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
  """
  a, b = np.asarray(labels_a), np.asarray(labels_b)
  if a.ndim != 1 or b.ndim != 1:
    raise ValueError(f"label_relevancy: labels must be 1-D, got shapes {a.shape} and {b.shape}")
  return (a[:, None] == b[None, :]).astype(np.float32)


def recall_per_query(similarity, positives) -> np.ndarray:
  """`(Q,)` int rank (0 = first) of each row's best positive: items strictly more similar.

  Example:
    >>> recall_per_query(np.array([[0.9, 0.1], [0.8, 0.2]]), np.eye(2, dtype=bool)).tolist()
    [0, 1]
  """
  s, p = np.asarray(similarity), np.asarray(positives, bool)
  if s.ndim != 2 or s.shape != p.shape:
    raise ValueError(
      f"recall_per_query: similarity and positives must be equal 2-D shapes, got "
      f"{s.shape} and {p.shape}"
    )
  missing = np.flatnonzero(~p.any(axis=1))
  if len(missing):
    raise ValueError(
      f"recall_per_query: {len(missing)} queries have no positive, e.g. rows "
      f"{missing[:10].tolist()}"
    )
  best = np.where(p, s, -np.inf).max(axis=1)
  return np.sum(s > best[:, None], axis=1)


def _query_buckets(clusters, sizes_bucket, n: int, what: str) -> np.ndarray:
  c = np.asarray(clusters)
  if c.shape != (n,) or not np.issubdtype(c.dtype, np.integer):
    raise ValueError(
      f"longtail_report: {what} must be ({n},) ints, got dtype {c.dtype} shape {c.shape}"
    )
  bad = (c < 0) | (c >= len(sizes_bucket))
  if bad.any():
    raise ValueError(
      f"longtail_report: {what} must be cluster ids in [0, {len(sizes_bucket)}), "
      f"got {c[bad][:5].tolist()}"
    )
  return sizes_bucket[c]


def longtail_report(
  similarity,
  relevancy,
  *,
  image_clusters,
  text_clusters,
  cluster_sizes,
  positives=None,
  ks: Sequence[int] = (1, 5, 10),
  scheme: str = "share",
  num_threads: int | None = None,
) -> dict[str, dict[str, float]]:
  """Per bucket (`all`, `head`, `middle`, `tail`): instance R@K, mAP and nDCG, both directions.

  Args:
    similarity: `(Q, M)` similarities, image (video) queries x caption items (float32).
    relevancy: `(Q, M)` graded relevancy in [0, 1]; every query needs an item of relevancy 1.
    image_clusters: `(Q,)` cluster id of every image; `text_clusters`: `(M,)` of every caption.
    cluster_sizes: `(C,)` size `K_c` (or class frequency) of every cluster id.
    positives: `(Q, M)` bool instance positives; default the identity (needs `Q == M`).
    ks: the K of R@K (each in `[1, min(Q, M)]`).
    scheme: bucket edges, see `cluster_buckets`.
    num_threads: for `mir_per_query`.

  Returns:
    `{bucket: {"i2t/R@K", "t2i/R@K", "R@K" (mean of both), "i2t/mAP", "t2i/mAP", "mAP",
    "i2t/nDCG", "t2i/nDCG", "nDCG", "num_queries" (images), "num_text_queries"}}`, fractions
    in [0, 1]; buckets without image or caption queries are left out.
  """
  sim = np.asarray(similarity)
  if sim.ndim != 2:
    raise ValueError(f"longtail_report: similarity must be (Q, M), got shape {sim.shape}")
  q, m = sim.shape
  if positives is None:
    if q != m:
      raise ValueError(
        f"longtail_report: the default positives (identity) need a square "
        f"similarity, got {sim.shape}; pass positives"
      )
    positives = np.eye(q, dtype=bool)
  positives = np.asarray(positives, bool)
  if positives.shape != sim.shape:
    raise ValueError(
      f"longtail_report: positives must have shape {sim.shape}, got {positives.shape}"
    )
  ks = tuple(int(k) for k in ks)
  if not ks or any(not 1 <= k <= min(q, m) for k in ks):
    raise ValueError(f"longtail_report: every K must be in [1, {min(q, m)}], got {ks}")
  per_cluster = cluster_buckets(cluster_sizes, scheme)
  img_b = _query_buckets(image_clusters, per_cluster, q, "image_clusters")
  txt_b = _query_buckets(text_clusters, per_cluster, m, "text_clusters")
  per = mir_per_query(sim, relevancy, num_threads=num_threads)
  rank_i2t = recall_per_query(sim, positives)
  rank_t2i = recall_per_query(sim.T, positives.T)
  out: dict[str, dict[str, float]] = {}
  for name, code in (("all", None),) + tuple(zip(BUCKETS, range(3), strict=True)):
    mi = np.ones(q, bool) if code is None else img_b == code
    mt = np.ones(m, bool) if code is None else txt_b == code
    if not mi.any() or not mt.any():
      continue
    row: dict[str, float] = {}
    for k in ks:
      a, b = float(np.mean(rank_i2t[mi] < k)), float(np.mean(rank_t2i[mt] < k))
      row.update({f"i2t/R@{k}": a, f"t2i/R@{k}": b, f"R@{k}": (a + b) / 2})
    for metric, v, t in (
      ("mAP", per.map_videos, per.map_captions),
      ("nDCG", per.ndcg_videos, per.ndcg_captions),
    ):
      a, b = float(np.mean(v[mi])), float(np.mean(t[mt]))
      row.update({f"i2t/{metric}": a, f"t2i/{metric}": b, metric: (a + b) / 2})
    row.update(num_queries=int(mi.sum()), num_text_queries=int(mt.sum()))
    out[name] = row
  return out


def format_longtail(report: dict[str, dict[str, float]], ks: Sequence[int] = (1, 5, 10)) -> str:
  """The report as a table: one line per bucket, R@K / mAP / nDCG (means of both directions, %).

  Example:
    >>> print(format_longtail({"all": {"R@1": 0.5, "mAP": 0.25, "nDCG": 0.75, "num_queries": 4}},
    ...                       ks=(1,)))
    bucket       R@1     mAP    nDCG  queries
    all        50.00   25.00   75.00        4
  """
  cols = [f"R@{k}" for k in ks] + ["mAP", "nDCG"]
  lines = [f"{'bucket':<8}" + "".join(f"{c:>8}" for c in cols) + f"{'queries':>9}"]
  for bucket, row in report.items():
    lines.append(
      f"{bucket:<8}" + "".join(f"{100 * row[c]:8.2f}" for c in cols) + f"{row['num_queries']:9d}"
    )
  return "\n".join(lines)
