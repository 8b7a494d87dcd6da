"""EPIC-KITCHENS-100 multi-instance retrieval (MIR): mAP and nDCG, as the official evaluation.

The official evaluation (EPIC-KITCHENS-100 MIR challenge, JPoSE / MI-MM `mAP.py`, `nDCG.py`) ranks
every item of the other modality for every query with a full `argsort` of the similarity matrix.
This module computes the same numbers from one 64-bit key sort per query block, in parallel
threads, and touches only the relevant items after that:

* mAP (per query, items ranked by descending similarity, rank `k` from 1):
  :math:`AP = \\frac{1}{|\\{j: r_j = 1\\}|}
  \\sum_{k:\\, r_{(k)} = 1} \\frac{1}{k}\\sum_{l \\le k} r_{(l)}`.
  Only items with relevancy exactly 1 are "relevant" positions, but the running sum in the
  numerator adds the *relevancy values* of every item ranked so far, partial ones included: this
  is what the official code computes (`cumsum` of the ranked relevancy, masked by `== 1`).
* nDCG: :math:`DCG = \\sum_{k \\le K} r_{(k)} / \\log_2(k + 1)` with `K = |\\{j: r_j > 0\\}|` (the
  official "k-counts": only the first K retrieved items count), divided by the same sum over the
  relevancy sorted in descending order (IDCG).
* Both are computed for video->text (rows of the similarity matrix), text->video (columns), and
  their average.

Ties (equal similarities) are ordered as the official expressions order them under a stable sort:
mAP ranks `argsort(-s)`, so tied items come by ascending index; nDCG ranks `argsort(s)[::-1]`, so
tied items come by *descending* index. (The official code uses numpy's default, unstable sort, so
its order among ties is an implementation detail of numpy; without ties the numbers agree.)

Example (video 1 ranks its caption second, caption 0 its video second):
  >>> s = np.array([[0.9, 0.1], [0.95, 0.8]], np.float32)
  >>> mir_map(s, np.eye(2, dtype=np.float32))
  MirScore(video_to_text=0.75, text_to_video=0.75, average=0.75)
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import NamedTuple

import numpy as np

__all__ = ["MirScore", "MirPerQuery", "mir_map", "mir_ndcg", "mir_metrics", "mir_per_query"]

# Rows per work item. Bounds the working set (8 bytes x rows x items of the other modality) and
# gives each thread several items, so that uneven rows balance out.
_BLOCK_ROWS = 256


class MirScore(NamedTuple):
  """One metric in both directions and their mean (a 3-tuple, as the official code reports)."""

  video_to_text: float
  text_to_video: float
  average: float


class _Direction(NamedTuple):
  """Per-query sums of one direction (rows of the matrix it was computed on)."""

  ap: np.ndarray  # (n,) average precision
  ndcg: np.ndarray  # (n,) DCG / IDCG
  num_full: np.ndarray  # (n,) items with relevancy == 1 (0: AP undefined)
  num_relevant: np.ndarray  # (n,) items with relevancy > 0 (0: nDCG undefined)


def _check_inputs(similarity, relevancy, fn: str) -> tuple[np.ndarray, np.ndarray]:
  """Validates shapes and values before any work; returns float32 similarity and the relevancy."""
  for name, x in (("similarity", similarity), ("relevancy", relevancy)):
    if not hasattr(x, "shape"):
      raise TypeError(f"{fn}: {name} must be an array, got {type(x).__name__}")
  sim = np.asarray(similarity)
  rel = np.asarray(relevancy)
  if sim.ndim != 2:
    raise ValueError(f"{fn}: similarity must be (videos, captions), got shape {sim.shape}")
  if rel.shape != sim.shape:
    raise ValueError(
      f"{fn}: similarity and relevancy must have the same shape (videos, captions), got "
      f"{sim.shape} and {rel.shape}"
    )
  if min(sim.shape) < 1:
    raise ValueError(f"{fn}: empty similarity matrix, shape {sim.shape}")
  if max(sim.shape) > _MAX_ITEMS:
    raise ValueError(f"{fn}: at most {_MAX_ITEMS} items per side, got shape {sim.shape}")
  for name, x in (("similarity", sim), ("relevancy", rel)):
    if not (
      np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer) or x.dtype == bool
    ):
      raise TypeError(f"{fn}: {name} must be numeric, got dtype {x.dtype}")
  if np.issubdtype(sim.dtype, np.floating) and sim.dtype.itemsize > 4:
    as32 = sim.astype(np.float32)
    # The 64-bit sort key holds a float32 score; a float64 matrix is accepted when that is
    # lossless for its order (every value representable), otherwise ranks could change.
    if not np.array_equal(as32, sim, equal_nan=True):
      raise TypeError(
        f"{fn}: similarity of dtype {sim.dtype} is not exactly representable in float32; "
        "pass float32 similarities (what an embedding dot product gives)"
      )
    sim = as32
  else:
    sim = sim.astype(np.float32, copy=False)
  # Reductions first (no temporaries); positions only when something is wrong.
  if sim.size and np.isnan(sim.min()):
    where = np.argwhere(np.isnan(sim))
    raise ValueError(
      f"{fn}: similarity has {len(where)} NaN value(s), first at (video, caption) "
      f"{[tuple(int(i) for i in w) for w in where[:5]]}"
    )
  if not np.issubdtype(rel.dtype, np.floating):
    rel = rel.astype(np.float32)
  lo, hi = rel.min(), rel.max()
  if not (lo >= 0 and hi < np.inf):  # also catches NaN, which min/max propagate
    where = np.argwhere(~np.isfinite(rel) | (rel < 0))
    raise ValueError(
      f"{fn}: relevancy must be finite and >= 0, got {len(where)} bad value(s), first at "
      f"(video, caption) {[tuple(int(i) for i in w) for w in where[:5]]}"
    )
  return np.ascontiguousarray(sim), np.ascontiguousarray(rel)


def _check_queries(
  rows: _Direction, cols: _Direction, fn: str, need_map: bool, need_ndcg: bool
) -> None:
  """Queries for which the official code returns NaN (0/0) are reported, by direction."""
  problems = []
  for d, query, other in ((rows, "video", "caption"), (cols, "caption", "video")):
    for needed, counts, rule, metric in (
      (need_map, d.num_full, "== 1", "mAP"),
      (need_ndcg, d.num_relevant, "> 0", "nDCG"),
    ):
      empty = np.flatnonzero(counts == 0) if needed else np.zeros(0, np.int64)
      if len(empty):
        problems.append(
          f"{len(empty)} {query} quer{'y has' if len(empty) == 1 else 'ies have'} no {other} "
          f"with relevancy {rule} ({metric} undefined), {query} indices {empty[:10].tolist()}"
          f"{' ...' if len(empty) > 10 else ''}"
        )
  if problems:
    raise ValueError(
      f"{fn}: "
      + "; ".join(problems)
      + " (the official code silently returns NaN for these; drop them first)"
    )


# The sort key of an item is its negated score as float64 (exact: float32 -> float64 leaves the
# low 29 mantissa bits zero) with `(index << 1) | relevant` written into those zero bits. The
# payload never changes the order of distinct scores, so one float64 sort ranks by descending
# score, and the flag marks the relevant items without another pass over the relevancy.
_PAYLOAD_BITS = 29
_MAX_ITEMS = 1 << (_PAYLOAD_BITS - 1)


def _sorted_keys(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
  """(b, m) int64 keys, sorted per row by descending score; see `_PAYLOAD_BITS`."""
  b, m = scores.shape
  key = np.empty((b, m), np.int64)
  as_float = key.view(np.float64)
  # 0 - s is exact, and maps -0.0 and 0.0 to the same +0.0 (they compare equal, so they tie).
  np.subtract(0.0, scores, out=as_float, dtype=np.float64)
  key |= np.arange(0, 2 * m, 2, dtype=np.int64)
  key |= relevant
  as_float.sort(axis=1)
  return key


def _tie_groups(flat_key: np.ndarray, at: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
  """First and last flat positions of the group of equal scores around each position in `at`.

  `flat_key` is a block of sorted keys, row after row (`m` per row). Equal scores are equal keys
  once the payload bits are dropped; groups never cross rows. A few tied items (pairs, mostly)
  grow their groups one neighbour at a time; many, or long runs, take one pass over the block.
  """
  if 16 * len(at) > len(flat_key):
    return _group_bounds(flat_key, m, at)
  score = flat_key[at] >> _PAYLOAD_BITS
  row_start = at - at % m
  bounds = []
  for step, limit in ((-1, row_start), (1, row_start + m - 1)):
    edge = at.copy()
    active = np.flatnonzero(edge != limit)
    for _ in range(8):
      nxt = edge[active] + step
      grow = flat_key[nxt] >> _PAYLOAD_BITS == score[active]
      edge[active[grow]] = nxt[grow]
      active = active[grow]
      active = active[edge[active] != limit[active]]
      if len(active) == 0:
        break
    else:
      edge[active] = _group_bounds(flat_key, m, edge[active])[0 if step < 0 else 1]
    bounds.append(edge)
  return bounds[0], bounds[1]


def _group_bounds(flat_key: np.ndarray, m: int, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`_tie_groups` by one pass: the starts of all groups, then a binary search per position."""
  same = (flat_key[1:] ^ flat_key[:-1]).view(np.uint64) < np.uint64(1 << _PAYLOAD_BITS)
  same[m - 1 :: m] = False  # the first item of a row starts a group
  starts = np.concatenate([[0], np.flatnonzero(~same) + 1])
  g = np.searchsorted(starts, at, side="right") - 1
  return starts[g], np.append(starts[1:], len(flat_key))[g] - 1


def _direction_block(
  sim: np.ndarray,
  rel: np.ndarray,
  lo: int,
  hi: int,
  transpose: bool,
  need_map: bool,
  need_ndcg: bool,
) -> _Direction:
  """AP and nDCG of queries `lo:hi`: rows of the matrices, or columns if `transpose`."""
  if transpose:
    s, r = sim[:, lo:hi].T, rel[:, lo:hi].T
  else:
    s, r = sim[lo:hi], rel[lo:hi]
  b, m = s.shape
  key = _sorted_keys(s, r > 0)
  flat_key = key.reshape(-1)
  # The flag is bit 0 of the lowest byte of each little-endian int64; 0/1 bytes are valid bools,
  # and nonzero on bools is numpy's fast path.
  flag = (key.view(np.uint8)[:, ::8] & 1).view(bool)
  rows, pos = np.nonzero(flag)  # row-major: queries ascending, then ranks ascending
  at = rows * m + pos
  payload = flat_key[at]
  item = (payload & (2 * _MAX_ITEMS - 1)) >> 1
  # Relevancy values of the ranked relevant items, read from the caller's (contiguous) matrix.
  if transpose:
    vals = rel.reshape(-1)[item * rel.shape[1] + (rows + lo)]
  else:
    vals = rel.reshape(-1)[(rows + lo) * rel.shape[1] + item]
  vals = vals.astype(np.float64)
  counts = np.bincount(rows, minlength=b)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  # Running relevancy of everything ranked so far, in key order; irrelevant items add 0, so the
  # running sum over the relevant items alone is the official cumsum at their ranks.
  running = np.cumsum(vals)
  running -= np.repeat(np.concatenate([[0.0], running])[starts], counts)  # restart per row
  map_pos = ndcg_pos = pos
  # Ties: within a group of equal scores the key orders items by ascending index where the
  # score is <= 0 (its negation, the float key, is >= 0) and by descending index where it is
  # > 0. mAP wants ascending and nDCG descending index, so one of the two sees the group
  # mirrored: position p in [first, last] becomes first + last - p.
  score = payload >> _PAYLOAD_BITS
  tied = (pos > 0) & (flat_key[np.maximum(at - 1, 0)] >> _PAYLOAD_BITS == score)
  tied |= (pos < m - 1) & (flat_key[np.minimum(at + 1, b * m - 1)] >> _PAYLOAD_BITS == score)
  if tied.any():
    t = np.flatnonzero(tied)
    first, last = _tie_groups(flat_key, at[t], m)
    mirrored = first + last - at[t] - rows[t] * m
    descending = payload[t] < 0  # sign bit of the float key: score > 0
    map_pos, ndcg_pos = pos.copy(), pos.copy()
    map_pos[t] = np.where(descending, mirrored, pos[t])
    ndcg_pos[t] = np.where(descending, pos[t], mirrored)
    # In a mirrored group the items ranked before an item (in mAP order) are the group's items
    # after it in key order: running = before the group + the group's total - the part of the
    # group before the item in key order.
    flip = t[descending]
    k_first = np.searchsorted(at, first[descending], side="left")
    k_last = np.searchsorted(at, last[descending], side="right") - 1
    before = running[k_first] - vals[k_first]
    running[flip] = before + running[k_last] - running[flip] + vals[flip]
  full = vals == 1
  num_full = np.bincount(rows[full], minlength=b)
  ap = ndcg = np.zeros(b)
  if need_map:
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 is reported by _check_queries
      ap = (
        np.bincount(rows[full], weights=running[full] / (map_pos[full] + 1), minlength=b) / num_full
      )
  if need_ndcg:
    discount = 1.0 / np.log2(np.arange(m, dtype=np.float64) + 2.0)
    in_top = ndcg_pos < counts[rows]
    dcg = np.bincount(rows[in_top], weights=vals[in_top] * discount[ndcg_pos[in_top]], minlength=b)
    # Ideal DCG: the relevant values of each row sorted in descending order, in a (b, max K)
    # table padded with zeros (which add nothing), in the relevancy's own dtype (sorts faster).
    table = np.zeros((b, int(counts.max(initial=0))), rel.dtype)
    table[rows, np.arange(len(rows)) - starts[rows]] = -vals
    table.sort(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
      ndcg = -dcg / (table @ discount[: table.shape[1]])
  return _Direction(ap, ndcg, num_full, counts)


def _direction(
  sim: np.ndarray, rel: np.ndarray, transpose: bool, need_map: bool, need_ndcg: bool, pool
) -> _Direction:
  """Per-query AP / nDCG of rows (or columns, `transpose=True`) of the matrices."""
  n = sim.shape[1] if transpose else sim.shape[0]
  parts = list(
    pool.map(
      lambda lo: _direction_block(
        sim, rel, lo, min(lo + _BLOCK_ROWS, n), transpose, need_map, need_ndcg
      ),
      range(0, n, _BLOCK_ROWS),
    )
  )
  return _Direction(*(np.concatenate(field) for field in zip(*parts, strict=True)))


def _num_threads(num_threads: int | None) -> int:
  if num_threads is None:
    return max(
      1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
  if not isinstance(num_threads, int) or num_threads < 1:
    raise ValueError(f"num_threads must be a positive int, got {num_threads!r}")
  return num_threads


def _mean(values: np.ndarray, mask, what: str) -> float:
  if mask is None:
    return float(np.mean(values))
  mask = np.asarray(mask)
  if mask.dtype != bool or mask.shape != values.shape:
    raise ValueError(
      f"{what} must be a bool mask of shape {values.shape}, got dtype "
      f"{mask.dtype} shape {mask.shape}"
    )
  if not mask.any():
    raise ValueError(f"{what} selects no query")
  return float(np.mean(values[mask]))


class MirPerQuery(NamedTuple):
  """Per-query AP and nDCG: the official metrics are their means (`scores()`)."""

  map_videos: np.ndarray  # (V,) AP of each video query (video->text)
  map_captions: np.ndarray  # (C,) AP of each caption query (text->video)
  ndcg_videos: np.ndarray  # (V,)
  ndcg_captions: np.ndarray  # (C,)

  def scores(self, video_mask=None, caption_mask=None) -> dict:
    """`{"mAP": MirScore, "nDCG": MirScore}` over all queries, or over the masked ones.

    The masks select *queries* (e.g. videos and captions of tail classes); every query is still
    ranked against all items of the other modality.
    """
    out = {}
    for name, videos, captions in (
      ("mAP", self.map_videos, self.map_captions),
      ("nDCG", self.ndcg_videos, self.ndcg_captions),
    ):
      a = _mean(videos, video_mask, "video_mask")
      b = _mean(captions, caption_mask, "caption_mask")
      out[name] = MirScore(a, b, (a + b) / 2)
    return out


def _per_query(
  similarity, relevancy, num_threads, fn: str, need_map: bool, need_ndcg: bool
) -> MirPerQuery:
  sim, rel = _check_inputs(similarity, relevancy, fn)
  with concurrent.futures.ThreadPoolExecutor(_num_threads(num_threads)) as pool:
    rows = _direction(sim, rel, False, need_map, need_ndcg, pool)
    cols = _direction(sim, rel, True, need_map, need_ndcg, pool)
  _check_queries(rows, cols, fn, need_map, need_ndcg)
  return MirPerQuery(rows.ap, cols.ap, rows.ndcg, cols.ndcg)


def mir_per_query(similarity, relevancy, *, num_threads: int | None = None) -> MirPerQuery:
  """AP and nDCG of every video and every caption query (arguments as `mir_metrics`).

  Example:
    >>> sim = np.array([[0.9, 0.1, 0.3], [0.95, 0.8, 0.2]], np.float32)
    >>> rel = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]], np.float32)
    >>> per = mir_per_query(sim, rel)
    >>> per.map_videos.round(4).tolist(), per.map_captions.round(4).tolist()
    ([1.0, 0.5833], [0.5, 1.0, 0.75])
    >>> per.scores(video_mask=np.array([True, False]))["mAP"]  # video 0's queries only
    MirScore(video_to_text=1.0, text_to_video=0.75, average=0.875)
  """
  return _per_query(similarity, relevancy, num_threads, "mir_per_query", True, True)


def mir_metrics(similarity, relevancy, *, num_threads: int | None = None) -> dict:
  """Both EK-100 MIR metrics from one ranking per direction.

  Args:
    similarity: (videos, captions) predicted similarities, float32 (or float64 values that are
      exactly float32). NaN is rejected.
    relevancy: (videos, captions) semantic relevancy in [0, 1] (see `ek100_relevancy`).
    num_threads: worker threads (numpy's sort releases the GIL); default: the usable CPUs.

  Returns:
    `{"mAP": MirScore, "nDCG": MirScore}`, each (video->text, text->video, average) in [0, 1].
    For subsets of queries use `mir_per_query(...).scores(video_mask, caption_mask)`.

  Raises:
    ValueError: shape mismatch, NaN similarity, negative / non-finite relevancy, or queries the
      official code would turn into NaN (no item with relevancy == 1 for mAP, none > 0 for nDCG),
      naming how many and which.

  Example:
    >>> sim = np.array([[0.9, 0.1, 0.3], [0.95, 0.8, 0.2]], np.float32)
    >>> rel = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]], np.float32)
    >>> m = mir_metrics(sim, rel)
    >>> round(m["mAP"].average, 4), round(m["nDCG"].average, 4)
    (0.7708, 0.6567)
  """
  return _per_query(similarity, relevancy, num_threads, "mir_metrics", True, True).scores()


def mir_map(similarity, relevancy, *, num_threads: int | None = None) -> MirScore:
  """EK-100 MIR mean average precision: (video->text, text->video, average).

  See the module docstring for the formula (official `relevancy == 1` rule, partial relevancies
  in the running sum) and `mir_metrics` for arguments and errors.

  Example:
    >>> s = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    >>> mir_map(s, np.eye(2, dtype=np.float32))
    MirScore(video_to_text=1.0, text_to_video=1.0, average=1.0)
  """
  per = _per_query(similarity, relevancy, num_threads, "mir_map", True, False)
  a, b = float(np.mean(per.map_videos)), float(np.mean(per.map_captions))
  return MirScore(a, b, (a + b) / 2)


def mir_ndcg(similarity, relevancy, *, num_threads: int | None = None) -> MirScore:
  """EK-100 MIR normalised DCG with the official k-counts: (video->text, text->video, average).

  Example:
    >>> s = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    >>> mir_ndcg(s, np.eye(2, dtype=np.float32))
    MirScore(video_to_text=1.0, text_to_video=1.0, average=1.0)
  """
  per = _per_query(similarity, relevancy, num_threads, "mir_ndcg", False, True)
  a, b = float(np.mean(per.ndcg_videos)), float(np.mean(per.ndcg_captions))
  return MirScore(a, b, (a + b) / 2)
