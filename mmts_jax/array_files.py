"""Reading `.npy` / `.npz` files that users pass in, safely and with errors that name the file.

Every array file the project reads from a user goes through here: pickle is never loaded
(`allow_pickle=False`; object arrays are refused), a file that is not what its suffix says (a
PNG passed as embeddings, a truncated download) is recognised by its first bytes, and every
failure is a `UserInputError` naming the file, the array key and what was expected.

Example:
  >>> import tempfile, os
  >>> path = os.path.join(tempfile.mkdtemp(), "emb.npz")
  >>> np.savez(path, image_emb=np.eye(2, dtype=np.float32))
  >>> load_npz_array(path, "image_emb").shape
  (2, 2)
  >>> check_matrix(np.array([[1.0, np.nan]]), path, "image_emb")
  Traceback (most recent call last):
  ...
  mmts_jax.errors.UserInputError: ...emb.npz['image_emb']: 1 non-finite value(s), first at row 0;
  expected finite numbers
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from typing import Literal, overload

import numpy as np

from mmts_jax import read_access
from mmts_jax.errors import MissingFileError, UserInputError

__all__ = [
  "sniff",
  "load_npy",
  "open_npz",
  "read_npz",
  "load_npz_array",
  "check_matrix",
  "check_numeric",
]

# What numpy and zipfile raise for a damaged archive: bad CRCs, truncated members, header fields
# out of range ("zip file version 21.0" is a NotImplementedError), broken deflate streams.
_DAMAGED = (
  ValueError,
  OSError,
  EOFError,
  zipfile.BadZipFile,
  KeyError,
  NotImplementedError,
  struct.error,
  zlib.error,
  OverflowError,
)

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_KNOWN = (
  (b"\x89PNG", "a PNG image"),
  (b"\xff\xd8\xff", "a JPEG image"),
  (b"GIF8", "a GIF image"),
  (b"\x80", "a Python pickle"),
  (b"\x1f\x8b", "a gzip file"),
  (b"%PDF", "a PDF"),
  (b"BM", "a BMP image"),
)


def sniff(path: str | os.PathLike) -> str:
  """What a file looks like from its first bytes: "npy", "npz", or a description.

  Example:
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.npy")
    >>> _ = open(p, "wb").write(b"\\x89PNG\\r\\n\\x1a\\n")
    >>> sniff(p)
    'a PNG image'
  """
  path = _check_file(path)
  head = read_access.read_head(path, 16)
  if not head:
    return "an empty file"
  if head.startswith(_NPY_MAGIC):
    return "npy"
  if head.startswith(_ZIP_MAGICS):
    return "npz"
  for magic, name in _KNOWN:
    if head.startswith(magic):
      return name
  try:
    head.decode("utf-8")
    return "a text file"
  except UnicodeDecodeError:
    return "an unknown binary file"


def _check_file(path) -> str:
  path = os.fspath(path)
  if not read_access.exists(path):
    raise MissingFileError(path, "does not exist", expected="an existing file")
  if read_access.is_dir(path):
    raise UserInputError(path, "is a folder", expected="a file")
  return path


def _np_load(path: str, mmap: bool = False):
  """`np.load` without pickle; an object in a store is read whole (no memory map)."""
  if read_access.is_object_store(path):
    return np.load(io.BytesIO(read_access.read_bytes(path)), allow_pickle=False)
  return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)


def _expect(path: str, kind: str, expected: str) -> None:
  found = sniff(path)
  if found != kind:
    name = {"npy": "a .npy array", "npz": "a .npz archive"}.get(found, found)
    raise UserInputError(path, f"is {name}, not a .{kind} file", expected=expected)


def _reading(path: str, key: str | None, expected: str, e: Exception) -> UserInputError:
  text = str(e)
  if "allow_pickle" in text or "Object arrays" in text or "Python objects" in text:
    return UserInputError(
      path, "holds Python objects (pickled data is never loaded)", key=key, expected=expected
    )
  return UserInputError(
    path, f"is truncated or corrupt ({type(e).__name__}: {text})", key=key, expected=expected
  )


def load_npy(
  path: str | os.PathLike,
  *,
  expected: str = "a .npy array written by numpy.save",
  mmap: bool = False,
) -> np.ndarray:
  """An array from a `.npy` file, without pickle; UserInputError names the file if it is not one.

  Example:
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.npy")
    >>> np.save(p, np.arange(3))
    >>> load_npy(p).tolist()
    [0, 1, 2]
  """
  path = _check_file(path)
  _expect(path, "npy", expected)
  try:
    return _np_load(path, mmap)
  except _DAMAGED as e:
    raise _reading(path, None, expected, e) from e


def open_npz(path: str | os.PathLike, *, expected: str = "a .npz archive written by numpy.savez"):
  """`np.load` of a `.npz` without pickle (use as a context manager); checks it is a zip first."""
  path = _check_file(path)
  _expect(path, "npz", expected)
  try:
    return _np_load(path)
  except _DAMAGED as e:
    raise _reading(path, None, expected, e) from e


def read_npz(
  path: str | os.PathLike, *, expected: str = "a .npz archive written by numpy.savez"
) -> dict[str, np.ndarray]:
  """Every array of a `.npz`, read now (for small files: tables, features, test sets).

  A damaged member (bad CRC, truncated, inconsistent headers) is a `UserInputError` naming the
  file and the member, whichever member it is.

  Example:
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.npz")
    >>> np.savez(p, a=np.arange(2))
    >>> {k: v.tolist() for k, v in read_npz(p).items()}
    {'a': [0, 1]}
  """
  out = {}
  with open_npz(path, expected=expected) as z:
    for key in z.files:
      try:
        out[key] = z[key]
      except _DAMAGED as e:
        raise _reading(os.fspath(path), key, expected, e) from e
  return out


@overload
def load_npz_array(
  path: str | os.PathLike,
  key: str,
  *,
  required: Literal[True] = ...,
  expected: str | None = None,
  hint: str = "",
) -> np.ndarray: ...
@overload
def load_npz_array(
  path: str | os.PathLike, key: str, *, required: bool, expected: str | None = None, hint: str = ""
) -> np.ndarray | None: ...
def load_npz_array(
  path: str | os.PathLike,
  key: str,
  *,
  required: bool = True,
  expected: str | None = None,
  hint: str = "",
) -> np.ndarray | None:
  """The array `key` of a `.npz`; a missing key lists the keys the file has (plus `hint`)."""
  expected = expected or f"a .npz archive with an array {key!r}"
  with open_npz(path, expected=expected) as z:
    if key not in z.files:
      if not required:
        return None
      raise UserInputError(
        path, f"has no array {key!r}, only {sorted(z.files)}{hint}", expected=expected
      )
    try:
      return z[key]
    except _DAMAGED as e:
      raise _reading(os.fspath(path), key, expected, e) from e


def check_numeric(x: np.ndarray, path, key: str | None = None) -> np.ndarray:
  """Refuses non-numeric arrays (strings, structured, object) naming the file and key.

  Example:
    >>> check_numeric(np.array(["a"]), "x.npz", "labels")
    Traceback (most recent call last):
    ...
    mmts_jax.errors.UserInputError: x.npz['labels']: has dtype <U1;
    expected a numeric (int or float) array
  """
  if x.dtype.kind not in "biuf":
    raise UserInputError(
      path, f"has dtype {x.dtype}", key=key, expected="a numeric (int or float) array"
    )
  return x


def check_matrix(
  x: np.ndarray, path, key: str | None = None, *, rows: int | None = None, finite: bool = True
) -> np.ndarray:
  """A 2-D numeric array with `rows` rows (if given) and only finite values."""
  check_numeric(x, path, key)
  if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
    raise UserInputError(
      path, f"has shape {x.shape}", key=key, expected="a non-empty 2-D (rows, dim) array"
    )
  if rows is not None and x.shape[0] != rows:
    raise UserInputError(path, f"has {x.shape[0]} rows", key=key, expected=f"{rows} rows")
  if finite and x.dtype.kind == "f":
    bad = ~np.isfinite(x)
    if bad.any():
      first = int(np.argwhere(bad)[0][0])
      raise UserInputError(
        path,
        f"{int(bad.sum())} non-finite value(s), first at row {first}",
        key=key,
        expected="finite numbers",
      )
  return x
