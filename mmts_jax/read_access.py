"""Reading an input that is a local file or an object in a store (`gs://bucket/x.npz`).

Local paths use the operating system directly (and can be memory-mapped); any `scheme://` path
goes through `etils.epath` (imported only then), which reads objects whole. The input checks in
`mmts_jax.array_files` and `mmts_jax.table_files` read through these functions, so a `gs://`
embedding file or table gets the same checks and messages as a local one.

Example:
  >>> import tempfile, os
  >>> p = os.path.join(tempfile.mkdtemp(), "a.txt")
  >>> _ = open(p, "w").write("hello")
  >>> exists(p), is_dir(p), read_head(p, 4), is_object_store("gs://b/a.txt")
  (True, False, b'hell', True)
"""

from __future__ import annotations

import os

__all__ = ["is_object_store", "exists", "is_dir", "read_bytes", "read_head"]


def is_object_store(path: str | os.PathLike) -> bool:
  """Whether `path` names an object in a store (`scheme://...`) rather than a local file."""
  return "://" in os.fspath(path)


def _epath(path):
  from etils import epath

  return epath.Path(os.fspath(path))


def exists(path: str | os.PathLike) -> bool:
  """A file, folder, object or prefix exists at `path` (a dangling local link counts)."""
  return _epath(path).exists() if is_object_store(path) else os.path.lexists(path)


def is_dir(path: str | os.PathLike) -> bool:
  """`path` is a folder (or, on an object store, a prefix of some object)."""
  return _epath(path).is_dir() if is_object_store(path) else os.path.isdir(path)


def read_bytes(path: str | os.PathLike) -> bytes:
  """The whole content of a local file or an object."""
  if is_object_store(path):
    return _epath(path).read_bytes()
  with open(path, "rb") as f:
    return f.read()


def read_head(path: str | os.PathLike, n: int) -> bytes:
  """The first `n` bytes (to recognise a file's type without reading all of it)."""
  opener = _epath(path).open if is_object_store(path) else lambda mode: open(path, mode)
  with opener("rb") as f:
    return f.read(n)
