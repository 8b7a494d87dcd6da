"""Atomic artifact writes on local disks and object stores: a reader sees the old file or the new
one, never a partial one.

Every path the project reads or writes is an `etils.epath.Path` (what orbax uses), so the same
code serves `/local/dir`, `gs://bucket/dir` (through `gcsfs`) and any other fsspec/`tf.io.gfile`
store. How the all-or-nothing guarantee is kept depends on the store:

* Local filesystem: the bytes go to a temporary file in the target's directory
  (`.NAME.XXXX.tmp`), are fsync'ed, and `os.replace` renames the file onto `NAME`. POSIX rename
  within a directory is atomic; a crash leaves the old file (and at worst a stray `.tmp`).
* Object stores (any `scheme://` path, e.g. `gs://`): an object store has no atomic rename (GCS
  "rename" is copy + delete), but a single object upload is atomic: readers see the previous
  generation until the upload completes, then the new one, never a prefix. So the bytes are
  built in memory and the final name is written once, with one upload. Nothing partial is ever
  visible under `NAME`; a crash mid-upload leaves the previous object.

Directories on object stores are implicit (a prefix of object names), so `mkdir` is harmless and
`exists()` on a directory means "some object has this prefix".

Example:
  >>> import tempfile
  >>> p = epath.Path(tempfile.mkdtemp()) / "sub" / "a.json"
  >>> atomic_write_json(p, {"b": 1})
  >>> p.read_text()
  '{\\n  "b": 1\\n}'
  >>> is_object_store(p), is_object_store("gs://bucket/a.json")
  (False, True)
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any, BinaryIO

from etils import epath

__all__ = [
  "atomic_write",
  "atomic_write_bytes",
  "atomic_write_text",
  "atomic_write_json",
  "is_object_store",
  "as_path",
  "read_bytes",
]


def is_object_store(path: epath.PathLike) -> bool:
  """Whether `path` names an object in a store (`scheme://...`) rather than a local file."""
  return "://" in os.fspath(path)


def as_path(path: epath.PathLike) -> epath.Path:
  """`path` as an `epath.Path`; local paths are made absolute (orbax requires it), object-store
  URIs are kept as they are (`pathlib` would collapse `gs://b` into `gs:/b`)."""
  if is_object_store(path):
    return epath.Path(os.fspath(path))
  return epath.Path(os.path.abspath(os.fspath(path)))


def read_bytes(path: epath.PathLike) -> bytes:
  """The whole content of a local file or an object (e.g. to hand to `np.load(io.BytesIO(.))`)."""
  return epath.Path(path).read_bytes()


def _write_local(path: str, write: Callable[[BinaryIO], Any]) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(
    dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp"
  )
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; an artifact gets the usual mode
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write(path: epath.PathLike, write: Callable[[BinaryIO], Any]) -> None:
  """Calls `write(file)` with a binary file and publishes what it wrote at `path` atomically.

  Local: temp file beside `path`, fsync, `os.replace`. Object store: `write` fills an in-memory
  buffer, then `path` is uploaded once (one atomic object write). If `write` raises, `path` is
  left as it was.
  """
  if not is_object_store(path):
    _write_local(os.fspath(path), write)
    return
  buf = io.BytesIO()
  write(buf)
  target = epath.Path(os.fspath(path))
  # No-op on object stores (prefixes are implicit) but keeps fsspec's directory cache coherent.
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_bytes(buf.getvalue())


def atomic_write_bytes(path: epath.PathLike, data: bytes) -> None:
  """`atomic_write` of a bytes payload."""
  atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: epath.PathLike, text: str) -> None:
  """`atomic_write` of a UTF-8 text payload."""
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: epath.PathLike, obj: Any, *, indent: int = 2) -> None:
  """`obj` as sorted, indented JSON (non-JSON values via `str`), written atomically."""
  atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True, default=str))
