"""The dataset fingerprint: one sha256 over the ordered captions (or ids) of a converted dataset.

A cluster table assigns a cluster to each record number, so it is only valid for the dataset
whose record `i` is the caption it clustered as `i`. Conversion stores this fingerprint in the
dataset's manifest; the cluster-table stage and the trainer recompute or compare it and refuse a
table built for another dataset (or another order of the same one).

Each item is hashed as `len(utf8) as 8-byte little-endian || utf8`, so the digest is a function of
the exact sequence: `["ab", "c"]` and `["a", "bc"]` differ, and so does any reordering.
"""
from __future__ import annotations

import hashlib
import struct
from typing import Iterable

__all__ = ["dataset_fingerprint", "Fingerprinter"]


class Fingerprinter:
  """Incremental form of `dataset_fingerprint`, for writers that stream records.

  Example:
    >>> f = Fingerprinter()
    >>> for c in ["a dog", "a cat"]:
    ...   f.update(c)
    >>> f.hexdigest() == dataset_fingerprint(["a dog", "a cat"])
    True
  """

  def __init__(self):
    self._h = hashlib.sha256()
    self.count = 0

  def update(self, item: str | bytes | int) -> None:
    if isinstance(item, bool) or not isinstance(item, (str, bytes, int)):
      raise TypeError(f"fingerprint items must be str, bytes or int, got {type(item).__name__}: "
                      f"{item!r:.80}")
    data = item if isinstance(item, bytes) else str(item).encode("utf-8")
    self._h.update(struct.pack("<Q", len(data)))
    self._h.update(data)
    self.count += 1

  def hexdigest(self) -> str:
    return self._h.hexdigest()


def dataset_fingerprint(captions: Iterable[str | bytes | int]) -> str:
  """sha256 (64 hex characters) over the ordered captions; ints (ids) hash as their decimal text.

  Example:
    >>> dataset_fingerprint(["a dog", "a cat"]) != dataset_fingerprint(["a cat", "a dog"])
    True
  """
  f = Fingerprinter()
  for c in captions:
    f.update(c)
  return f.hexdigest()
