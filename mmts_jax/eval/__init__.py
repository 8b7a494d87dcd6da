"""Evaluation: EK-100 multi-instance retrieval (mAP, nDCG) and image-text retrieval (R@K).

`mir_map`, `mir_ndcg` and `mir_metrics` reproduce the official EPIC-KITCHENS-100 MIR evaluation;
`ek100_relevancy` builds its relevancy matrix from the annotation CSVs. The MIR metrics and the
relevancy are numpy only (they run on the host, like the official code); the retrieval metrics
run blockwise under `jax.jit`. `longtail_report` splits a result by cluster-size bucket
(head / middle / tail) with R@K, mAP and nDCG.
"""

from __future__ import annotations

from mmts_jax.eval.ek100_mir import (
  MirPerQuery,
  MirScore,
  mir_map,
  mir_metrics,
  mir_ndcg,
  mir_per_query,
)
from mmts_jax.eval.longtail import (
  cluster_buckets,
  format_longtail,
  label_relevancy,
  longtail_report,
)
from mmts_jax.eval.relevancy import (
  Ek100MirAnnotations,
  class_relevancy,
  ek100_relevancy,
  read_ek100_mir,
  video_subset,
)
from mmts_jax.eval.retrieval import (
  RetrievalRanks,
  recall_metrics,
  retrieval_metrics,
  retrieval_ranks,
)

__all__ = [
  "MirScore",
  "MirPerQuery",
  "mir_map",
  "mir_metrics",
  "mir_ndcg",
  "mir_per_query",
  "Ek100MirAnnotations",
  "class_relevancy",
  "ek100_relevancy",
  "read_ek100_mir",
  "video_subset",
  "RetrievalRanks",
  "recall_metrics",
  "retrieval_metrics",
  "retrieval_ranks",
  "cluster_buckets",
  "format_longtail",
  "label_relevancy",
  "longtail_report",
]
