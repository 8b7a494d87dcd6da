"""The dataset fingerprint: one sha256 over the number and the ordered captions (or ids).

A cluster table assigns a cluster to each record number, so it is only valid for the dataset
whose record `i` is the caption it clustered as `i`. Conversion stores this fingerprint in the
dataset's manifest; the cluster-table stage and the trainer compare it and refuse a table built
for another dataset (or another order of the same one).

  fingerprint = "sha256:" + hex(sha256("mmts-dataset-v1\\n{N}\\n" || for each key k:
                                        len(utf8(k)) as 8-byte little-endian || utf8(k)))

Keys are captions (str) or ids (ints hash as their decimal text). The length prefixes make the
digest a function of the exact sequence: `["ab", "c"]` and `["a", "bc"]` differ, and so does any
reordering. `mmts_jax.clusters.table.dataset_fingerprint` calls this function.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

__all__ = ["dataset_fingerprint", "Fingerprinter"]

_HEADER = "mmts-dataset-v1\n{n}\n"


class Fingerprinter:
  """Streaming form of `dataset_fingerprint` when the number of keys is known up front.

  Example:
    >>> f = Fingerprinter(2)
    >>> for c in ["a dog", "a cat"]:
    ...   f.update(c)
    >>> f.hexdigest() == dataset_fingerprint(["a dog", "a cat"])
    True
  """

  def __init__(self, num_keys: int):
    if not isinstance(num_keys, (int, np.integer)) or num_keys < 0:
      raise ValueError(f"num_keys must be an int >= 0, got {num_keys!r}")
    self.num_keys, self.count = int(num_keys), 0
    self._h = hashlib.sha256(_HEADER.format(n=self.num_keys).encode())

  def update(self, key: str | int) -> None:
    if isinstance(key, (bool, np.bool_)) or not isinstance(key, (str, int, np.integer)):
      raise TypeError(
        f"fingerprint keys must be str (captions) or int (ids), got "
        f"{type(key).__name__}: {key!r:.80}"
      )
    data = str(key).encode("utf-8")
    self._h.update(len(data).to_bytes(8, "little"))
    self._h.update(data)
    self.count += 1

  def hexdigest(self) -> str:
    if self.count != self.num_keys:
      raise ValueError(f"fingerprint announced {self.num_keys} keys but got {self.count}")
    return "sha256:" + self._h.hexdigest()


def dataset_fingerprint(captions: Iterable[str | int]) -> str:
  """`"sha256:<64 hex>"` over the number and the ordered captions (or ids) of a dataset.

  Example:
    >>> dataset_fingerprint(["open door", "take cup"])[:15]
    'sha256:569530f4'
  """
  keys = list(captions)
  f = Fingerprinter(len(keys))
  for k in keys:
    f.update(k)
  return f.hexdigest()
