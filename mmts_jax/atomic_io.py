"""Atomic artifact writes: a reader sees the old file or the new one, never a partial one."""
from __future__ import annotations

import io
import os
import tempfile
from typing import Callable

__all__ = ["atomic_write", "atomic_write_bytes"]


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> None:
  """Calls `write(file)` on a temp file beside `path`, fsyncs it, then renames it onto `path`.

  A crash or an exception leaves either the old file or none, never a partial one.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                             suffix=".tmp")
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """`atomic_write` of a bytes payload."""
  atomic_write(path, lambda f: f.write(data))
