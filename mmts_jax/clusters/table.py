"""`ClusterTable`: each training sample's cluster (or class) and the cluster sizes, with provenance.

MM-TS places every sample in the long tail once, before training: the size `K_c` of its
semantic cluster (K-Means on text embeddings) or of its class (EK-100 noun classes) becomes its
shift (Eq. 6, `mmts_jax.shifts.cluster_shift`). This module is that artifact: built on the host,
saved atomically as one `.npz`, checked against the dataset it is used with, and turned into the
`(N,)` float32 shift table that the train step gathers by sample `index`.

It imports numpy only (plus `mmts_jax.shifts`), so training can load a table without the text
or clustering stacks.

Example:
  >>> table = ClusterTable.from_labels(["cup", "cup", "pan", "cup"],
  ...                                  fingerprint=dataset_fingerprint(["a", "b", "c", "d"]))
  >>> table.per_sample_sizes().tolist()
  [3, 3, 1, 3]
  >>> shift = table.shift_table(0.05, 0.10)  # float32: round for printing
  >>> shift.dtype, [round(v, 6) for v in shift.tolist()]
  (dtype('float32'), [0.1, 0.1, 0.05, 0.1])
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from mmts_jax import array_files, shifts
from mmts_jax.atomic_io import atomic_write, read_bytes  # noqa: F401  (re-exported)
from mmts_jax.data import fingerprint
from mmts_jax.errors import UserInputError

__all__ = [
  "ClusterTable",
  "ClusterTableMismatch",
  "dataset_fingerprint",
  "atomic_write",
  "FORMAT_VERSION",
]

FORMAT_VERSION = 1
_FORMAT_NAME = "mmts_jax.ClusterTable"


class ClusterTableMismatch(ValueError):
  """The table was built for another dataset (size or fingerprint differ)."""


def dataset_fingerprint(keys: Iterable[Any]) -> str:
  """A cheap, stable identity of an ordered dataset: sha256 over N and the ordered keys.

  Keys are the captions, or stable sample ids, in dataset order (`str(key)` is hashed, each
  length-prefixed so that no two different lists collide by concatenation). Training calls
  this on its own dataset and passes the result to `ClusterTable.validate`.

  Example:
    >>> dataset_fingerprint(["open door", "take cup"])[:15]
    'sha256:569530f4'
  """
  # One hash for the whole project: the converted datasets' manifests use the same function.
  return fingerprint.dataset_fingerprint([str(k) for k in keys])


def _now() -> str:
  return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True, eq=False)
class ClusterTable:
  """Per-sample cluster ids, cluster sizes and provenance.

  Attributes:
    cluster_ids: `(N,)` int32, sample i belongs to cluster `cluster_ids[i]` in `[0, C)`.
    sizes: `(C,)` int64, `K_c` of each cluster: the number of samples in it (K-Means, labels),
      or an external class frequency (`from_frequencies`, e.g. EK-100's official noun counts).
    provenance: JSON-serialisable dict. Always has `source` ("text", "labels", "embeddings",
      "frequencies", "sizes"), `num_samples`, `num_clusters`, `fingerprint` (or None),
      `format_version`, `created`; text tables add `model`, `weights_sha256`; K-Means tables add
      `k`, `seed`, `backend`, `inertia`.
    cluster_names: optional `(C,)` names (class labels), for summaries.
  """

  cluster_ids: np.ndarray
  sizes: np.ndarray
  provenance: Mapping[str, Any]
  cluster_names: tuple[str, ...] | None = None

  def __post_init__(self):
    ids = np.asarray(self.cluster_ids)
    sizes = np.asarray(self.sizes)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(
        f"cluster_ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}"
      )
    if sizes.ndim != 1 or sizes.size == 0 or not np.issubdtype(sizes.dtype, np.number):
      raise ValueError(f"sizes must be a non-empty 1-D numeric array, got shape {sizes.shape}")
    if np.any(sizes < 0) or not np.all(np.isfinite(sizes)):
      raise ValueError(f"cluster sizes must be finite and >= 0, got min {sizes.min()}")
    if ids.size == 0:
      raise ValueError("a cluster table needs at least one sample, got 0")
    if ids.min() < 0 or ids.max() >= sizes.size:
      raise ValueError(
        f"cluster_ids must lie in [0, {sizes.size}), got range [{ids.min()}, {ids.max()}]"
      )
    if self.cluster_names is not None and len(self.cluster_names) != sizes.size:
      raise ValueError(
        f"cluster_names has {len(self.cluster_names)} entries for {sizes.size} clusters"
      )
    object.__setattr__(self, "cluster_ids", ids.astype(np.int32))
    object.__setattr__(self, "sizes", sizes.astype(np.int64))
    prov = {
      "format_version": FORMAT_VERSION,
      "created": _now(),
      "fingerprint": None,
      **dict(self.provenance),
    }
    prov.update(num_samples=int(ids.size), num_clusters=int(sizes.size))
    object.__setattr__(self, "provenance", prov)
    if self.cluster_names is not None:
      object.__setattr__(self, "cluster_names", tuple(str(n) for n in self.cluster_names))

  # ---------------------------------------------------------------- construction
  @classmethod
  def from_labels(
    cls,
    labels: Sequence[Hashable] | np.ndarray,
    *,
    fingerprint: str | None = None,
    source: str = "labels",
    **provenance,
  ) -> ClusterTable:
    """One cluster per distinct label; `K_c` = how many samples carry label c.

    Labels can be ints (class ids, K-Means assignments) or strings (class names, "verb_noun").
    Clusters are numbered in sorted label order; `cluster_names` keeps the labels.

    Example:
      >>> ClusterTable.from_labels([3, 1, 3]).sizes.tolist()
      [1, 2]
    """
    names, ids = _factorize(labels)
    sizes = np.bincount(ids, minlength=len(names))
    return cls(
      ids, sizes, {"source": source, "fingerprint": fingerprint, **provenance}, cluster_names=names
    )

  @classmethod
  def from_frequencies(
    cls,
    labels: Sequence[Hashable] | np.ndarray,
    frequencies: Mapping[Any, float],
    *,
    fingerprint: str | None = None,
    source: str = "frequencies",
    **provenance,
  ) -> ClusterTable:
    """Each sample's `K_c` is its class's count in an external frequency table.

    This is how MM-TS treats EK-100: the size of a sample's noun class is that class's count in
    the official training-set frequencies (`ek100_noun_freq.csv`), not in the caption subset.
    Keys are compared as strings, so `3` and `"3"` are the same class.

    Raises:
      ValueError: a label has no entry in `frequencies` (the message names it).

    Example:
      >>> ClusterTable.from_frequencies([0, 2, 0], {0: 3617, 2: 2457, 1: 2351}).sizes.tolist()
      [3617, 2457]
    """
    freq = {str(k): v for k, v in frequencies.items()}
    names, ids = _factorize(labels)
    missing = [n for n in names if n not in freq]
    if missing:
      raise ValueError(
        f"{len(missing)} label(s) have no entry in the frequency table, e.g. {missing[:5]}"
      )
    sizes = np.asarray([freq[n] for n in names])
    if not np.all(np.isfinite(sizes)) or np.any(sizes < 0):
      raise ValueError("frequencies must be finite and >= 0")
    return cls(
      ids,
      np.rint(sizes).astype(np.int64),
      {"source": source, "fingerprint": fingerprint, **provenance},
      cluster_names=names,
    )

  @classmethod
  def from_sizes(
    cls,
    cluster_ids,
    sizes,
    *,
    fingerprint: str | None = None,
    source: str = "sizes",
    cluster_names=None,
    **provenance,
  ) -> ClusterTable:
    """Cluster ids `(N,)` in `[0, C)` and given cluster sizes `(C,)`.

    Example:
      >>> ClusterTable.from_sizes([0, 1, 1], [10, 500]).per_sample_sizes().tolist()
      [10, 500, 500]
    """
    return cls(
      np.asarray(cluster_ids),
      np.asarray(sizes),
      {"source": source, "fingerprint": fingerprint, **provenance},
      cluster_names=cluster_names,
    )

  @classmethod
  def from_assignments(
    cls,
    cluster_ids,
    num_clusters: int,
    *,
    fingerprint: str | None = None,
    source: str,
    **provenance,
  ) -> ClusterTable:
    """K-Means output: `K_c` is counted from the assignments over `num_clusters` clusters."""
    ids = np.asarray(cluster_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= num_clusters):
      raise ValueError(
        f"cluster ids must lie in [0, {num_clusters}), got [{ids.min()}, {ids.max()}]"
      )
    return cls(
      ids,
      np.bincount(ids, minlength=num_clusters),
      {"source": source, "fingerprint": fingerprint, **provenance},
    )

  # ---------------------------------------------------------------- use
  @property
  def num_samples(self) -> int:
    return int(self.cluster_ids.size)

  @property
  def num_clusters(self) -> int:
    return int(self.sizes.size)

  @property
  def fingerprint(self) -> str | None:
    return self.provenance.get("fingerprint")

  def per_sample_sizes(self) -> np.ndarray:
    """`(N,)` int64: `K_{c_i}` for every sample."""
    return self.sizes[self.cluster_ids]

  def shift_table(self, sh_min: float, sh_max: float) -> np.ndarray:
    """`(N,)` float32 per-sample shifts, Eq. 6.

    `min K` and `max K` are taken over the clusters that occur in the dataset (the per-sample
    sizes), so an empty K-Means cluster or a frequency-table class absent from the data does not
    stretch the range.

    Example:
      >>> ClusterTable.from_sizes([0, 1, 1], [10, 500]).shift_table(0.05, 0.1).tolist()
      [0.05000000074505806, 0.10000000149011612, 0.10000000149011612]
    """
    return np.asarray(shifts.cluster_shift(self.per_sample_sizes(), sh_min, sh_max), np.float32)

  def validate(
    self, dataset=None, *, num_samples: int | None = None, fingerprint: str | None = None
  ) -> ClusterTable:
    """Checks that this table belongs to a dataset; returns `self` for chaining.

    Args:
      dataset: optional object; its `len()` is the number of samples and its `fingerprint`
        attribute (if any) the fingerprint. Explicit keywords take precedence.
      num_samples: the dataset's number of samples N.
      fingerprint: `dataset_fingerprint(...)` of the dataset, in the same key order the table
        was built from (see `provenance["fingerprint_keys"]`).

    Raises:
      ClusterTableMismatch: the sizes differ, or both fingerprints are known and differ.
    """
    if dataset is not None:
      if num_samples is None:
        num_samples = len(dataset)
      if fingerprint is None:
        fingerprint = getattr(dataset, "fingerprint", None)
    where = self.provenance.get("path", "the cluster table")
    if num_samples is not None and int(num_samples) != self.num_samples:
      raise ClusterTableMismatch(
        f"{where} was built for {self.num_samples} samples but the dataset has {num_samples}; "
        "rebuild it for this dataset with `mmts cluster`"
      )
    if fingerprint is not None and self.fingerprint is not None and fingerprint != self.fingerprint:
      raise ClusterTableMismatch(
        f"{where} was built for dataset {self.fingerprint} but this dataset is {fingerprint} "
        f"(same size {self.num_samples}, different content or order); rebuild it with "
        "`mmts cluster`"
      )
    return self

  # ---------------------------------------------------------------- storage
  def save(self, path: str | os.PathLike) -> None:
    """Writes one `.npz` atomically (`atomic_io`: temp file + rename locally, one object upload
    on `gs://`)."""
    prov = {k: v for k, v in self.provenance.items() if k != "path"}
    arrays: dict[str, Any] = {
      "format": np.array(_FORMAT_NAME),
      "cluster_ids": self.cluster_ids,
      "sizes": self.sizes,
      "provenance": np.array(json.dumps(prov, sort_keys=True)),
    }
    if self.cluster_names is not None:
      arrays["cluster_names"] = np.array(self.cluster_names, dtype=str)
    atomic_write(path, lambda f: np.savez(f, **arrays))

  @classmethod
  def load(cls, path: str | os.PathLike) -> ClusterTable:
    """Reads a table written by `save`; checks its format version and internal consistency."""
    path = os.fspath(path)
    expected = f"a cluster table written by `mmts cluster` ({_FORMAT_NAME} .npz)"
    z = array_files.read_npz(path, expected=expected)
    if "format" not in z or z["format"].dtype.kind != "U" or str(z["format"]) != _FORMAT_NAME:
      raise UserInputError(
        path,
        f"is a .npz without the {_FORMAT_NAME} format tag, arrays {sorted(z)}",
        expected=expected,
      )
    missing = [k for k in ("provenance", "cluster_ids", "sizes") if k not in z]
    if missing:
      raise UserInputError(path, f"has no array(s) {missing}", expected=expected)
    try:
      prov = json.loads(str(z["provenance"]))
    except ValueError as e:
      raise UserInputError(
        path, f"is corrupt ({type(e).__name__}: {e})", key="provenance", expected=expected
      ) from e
    ids, sizes = z["cluster_ids"], z["sizes"]
    names = tuple(z["cluster_names"].tolist()) if "cluster_names" in z else None
    if not isinstance(prov, dict):
      raise UserInputError(
        path, "provenance is not a JSON object", key="provenance", expected=expected
      )
    for key, arr in (("cluster_ids", ids), ("sizes", sizes)):
      if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise UserInputError(
          path, f"has dtype {arr.dtype} shape {arr.shape}", key=key, expected="a 1-D integer array"
        )
    version = prov.get("format_version")
    if version != FORMAT_VERSION:
      raise UserInputError(
        path,
        f"has format_version {version}",
        key="provenance",
        expected=f"format_version {FORMAT_VERSION} (rebuild with `mmts cluster`)",
      )
    if prov.get("num_samples") != ids.size:
      raise UserInputError(
        path,
        f"is corrupt: provenance says {prov.get('num_samples')} samples, it holds {ids.size}",
        expected=expected,
      )
    try:
      return cls(ids, sizes, {**prov, "path": path}, cluster_names=names)
    except ValueError as e:
      raise UserInputError(path, str(e), expected=expected) from e

  def summary(self, top: int = 5) -> dict:
    """Cluster-size statistics: quantiles, head/tail shares, largest and smallest clusters."""
    present = np.bincount(self.cluster_ids, minlength=self.num_clusters)
    occupied = np.flatnonzero(present)
    k = self.sizes[occupied]
    order = occupied[np.argsort(-k, kind="stable")]
    n_head = max(1, int(round(0.2 * occupied.size)))
    head_samples = int(present[order[:n_head]].sum())
    n_tail = max(1, occupied.size // 2)
    tail_samples = int(present[order[-n_tail:]].sum())
    names = self.cluster_names
    name = (lambda c: names[c]) if names else (lambda c: str(c))
    return {
      "num_samples": self.num_samples,
      "num_clusters": self.num_clusters,
      "occupied_clusters": int(occupied.size),
      "size_min": int(k.min()),
      "size_median": float(np.median(k)),
      "size_max": int(k.max()),
      "imbalance": float(k.max() / max(k.min(), 1)),
      "head_clusters": n_head,
      "head_share": head_samples / self.num_samples,
      "tail_clusters": n_tail,
      "tail_share": tail_samples / self.num_samples,
      "largest": [(int(c), name(c), int(self.sizes[c])) for c in order[:top]],
      "smallest": [(int(c), name(c), int(self.sizes[c])) for c in order[::-1][:top]],
    }


def _factorize(labels: Sequence[Hashable] | np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
  """Distinct labels (as str, sorted numerically when all are ints) and each sample's index."""
  labels = list(labels)
  if not labels:
    raise ValueError("labels is empty: a cluster table needs at least one sample")
  keys = [str(x) for x in labels]
  distinct = set(keys)
  try:
    names = sorted(distinct, key=int)
  except ValueError:
    names = sorted(distinct)
  index = {n: i for i, n in enumerate(names)}
  return tuple(names), np.fromiter((index[k] for k in keys), np.int32, len(keys))
