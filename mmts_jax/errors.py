"""`UserInputError`: a problem with a user's file or flag, located and explained in one line.

Library code raises it (or any `ValueError` naming the bad value) when an input file is
missing, malformed or of the wrong kind; the `mmts` command line prints it as one line and
exits with status 2 (`mmts_jax.commands.errors`). It is a `ValueError`, so callers that catch
`ValueError` keep working.

The message is `PATH[:LINE or [KEY]]: PROBLEM; expected EXPECTED`, the three parts a user needs
to fix the file without reading a traceback.

Example:
  >>> e = UserInputError("captions.csv", "row has 3 fields, the header 2", line=7,
  ...                    expected="one field per column")
  >>> str(e)
  'captions.csv:7: row has 3 fields, the header 2; expected one field per column'
  >>> str(UserInputError("emb.npz", "no such array", key="image_emb"))
  "emb.npz['image_emb']: no such array"
"""

from __future__ import annotations

import os

__all__ = ["UserInputError", "MissingFileError"]


class UserInputError(ValueError):
  """A bad input file or flag, with where it is and what was expected.

  Attributes:
    path: the file (or flag) at fault, as the user gave it; None when no file is involved.
    problem: what is wrong, e.g. "not valid JSON".
    line: 1-based line (text files) or record number; None if not applicable.
    key: the array key, column or config key; None if not applicable.
    expected: what would have been accepted, e.g. "a .npz file of (N, D) float arrays".
  """

  def __init__(
    self,
    path: str | os.PathLike | None,
    problem: str,
    *,
    line: int | None = None,
    key: str | None = None,
    expected: str | None = None,
  ):
    self.path = None if path is None else os.fspath(path)
    self.problem, self.line, self.key, self.expected = problem, line, key, expected
    super().__init__(self._format())

  def _format(self) -> str:
    where = self.path or ""
    if self.line is not None:
      where += f":{self.line}"
    if self.key is not None:
      where += f"[{self.key!r}]"
    text = f"{where}: {self.problem}" if where else self.problem
    if self.expected:
      text += f"; expected {self.expected}"
    return text

  def __reduce__(self):  # keeps the keyword fields through pickling (multiprocessing)
    return (_rebuild, (self.path, self.problem, self.line, self.key, self.expected))


def _rebuild(path, problem, line, key, expected) -> UserInputError:
  return UserInputError(path, problem, line=line, key=key, expected=expected)


class MissingFileError(UserInputError, FileNotFoundError):
  """A `UserInputError` for a file that does not exist (also a `FileNotFoundError`).

  Example:
    >>> isinstance(MissingFileError("x.csv", "no such file"), FileNotFoundError)
    True
  """

  def __reduce__(self):
    return (_rebuild_missing, (self.path, self.problem, self.line, self.key, self.expected))


def _rebuild_missing(path, problem, line, key, expected) -> MissingFileError:
  return MissingFileError(path, problem, line=line, key=key, expected=expected)
