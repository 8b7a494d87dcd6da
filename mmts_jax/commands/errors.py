"""The one place where exceptions become `mmts` error messages (exit status 2, one line).

Every command runs through `run`: an exception caused by the user's files, flags or machine
(a missing or malformed file, a path under a file, a full or read-only disk) is printed as
`mmts COMMAND: error: PATH[:LINE]: PROBLEM; expected ...` without a traceback, and the command
returns `EXIT_BAD_INPUT`. Anything else is a bug and keeps its traceback. `--debug` (anywhere on
the command line) or `MMTS_DEBUG=1` shows the traceback of user errors too.

An exception may carry its own exit status (`exit_status = 3` on a non-finite loss) and is then
printed the same way with that status.

Commands also use `check_output_path` before any work (so a bad `--out` fails in a second, not
after an hour of K-Means), `writing(path)` around a write (so a full disk names the artifact,
not a temp file) and `all_or_nothing(paths)` (a command that writes several artifacts leaves
none of them behind if it fails half-way).

Example:
  >>> describe(FileNotFoundError(2, "No such file or directory", "emb.npz"))
  'emb.npz: no such file or folder'
  >>> describe(KeyError("a bug, not an input problem")) is None
  True
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator

from mmts_jax.errors import UserInputError

__all__ = [
  "EXIT_BAD_INPUT",
  "EXIT_INTERRUPTED",
  "UserInputError",
  "describe",
  "run",
  "debug_enabled",
  "strip_debug",
  "check_output_path",
  "check_output_dir",
  "writing",
  "all_or_nothing",
]

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C

_REASONS = {
  errno.ENOENT: "no such file or folder",
  errno.ENOTDIR: "a part of the path is a file, not a folder",
  errno.EISDIR: "is a folder, not a file",
  errno.EACCES: "permission denied",
  errno.EPERM: "operation not permitted",
  errno.EEXIST: "already exists",
  errno.ENOSPC: "no space left on the device",
  errno.EROFS: "the file system is read-only",
  errno.EDQUOT: "disk quota exceeded",
  errno.ENAMETOOLONG: "the name is too long",
}

_WRITE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG)

_debug = False


def debug_enabled() -> bool:
  """True with `--debug` on the command line or `MMTS_DEBUG=1` in the environment."""
  return _debug or os.environ.get("MMTS_DEBUG", "") not in ("", "0")


def strip_debug(argv: list[str]) -> tuple[list[str], bool]:
  """`argv` without its `--debug` flags, and whether there was one."""
  rest = [a for a in argv if a != "--debug"]
  return rest, len(rest) != len(argv)


def os_reason(e: OSError) -> str:
  """A short reason for an OS error: the errno's meaning, else the system's own words."""
  if e.errno is None:
    return str(e)
  return _REASONS.get(e.errno, (e.strerror or str(e)).lower() if e.errno else str(e))


_MAX_MESSAGE = 600  # characters; a library's message can list hundreds of names


def _one_line(text: object) -> str:
  line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
  if len(line) > _MAX_MESSAGE:
    line = line[: _MAX_MESSAGE - 40].rstrip() + " ... (--debug shows the whole message)"
  return line


def describe(e: BaseException) -> str | None:
  """The one-line message of a user-caused exception, or None for a bug (keep the traceback)."""
  if isinstance(e, UserInputError):
    return _one_line(e)
  if isinstance(e, OSError) and not isinstance(e, (zipfile.BadZipFile,)):
    if e.errno is None:  # FileNotFoundError("our own sentence")
      return _one_line(e)
    name = e.filename if e.filename is not None else None
    where = f"{name}: " if name else ""
    if e.filename2:
      where = f"{name} -> {e.filename2}: "
    return _one_line(f"{where}{os_reason(e)}")
  if isinstance(e, UnicodeDecodeError):
    return _one_line(f"not UTF-8 text ({e.reason} at byte {e.start}); expected a UTF-8 file")
  if isinstance(e, json.JSONDecodeError):
    return _one_line(f"not valid JSON at line {e.lineno} column {e.colno} ({e.msg})")
  if isinstance(e, SyntaxError):  # a config file is Python
    return _one_line(f"{e.filename}:{e.lineno}: {e.msg}; expected a Python config file")
  if isinstance(e, zipfile.BadZipFile):
    return _one_line(f"not a valid .npz (zip) file ({e}); expected a file written by numpy.savez")
  if isinstance(e, tarfile.TarError):
    return _one_line(f"not a readable tar file ({e})")
  if isinstance(e, csv.Error):
    return _one_line(f"malformed CSV ({e})")
  if isinstance(e, EOFError):
    return _one_line(f"the file ends early (truncated): {e}")
  if isinstance(e, (ValueError, TypeError)):  # our checks name the bad value
    return _one_line(e)
  return None


def run(prog: str, fn: Callable[[list[str]], int | None], argv: list[str] | None) -> int:
  """Runs `fn(argv)`; user errors -> one line on stderr and `EXIT_BAD_INPUT`, bugs re-raised.

  An exception with an integer `exit_status` attribute (e.g. a non-finite loss, 3) is printed
  the same way and exits with that status; Ctrl-C prints one line and exits 130.
  """
  global _debug
  argv, debug = strip_debug(list(sys.argv[1:] if argv is None else argv))
  previous, _debug = _debug, _debug or debug
  try:
    return int(fn(argv) or 0)
  except KeyboardInterrupt:
    if debug_enabled():
      raise
    _emit(f"{prog}: interrupted")
    return EXIT_INTERRUPTED
  except Exception as e:  # noqa: BLE001 (sorted by describe; bugs are re-raised)
    status = getattr(e, "exit_status", None)
    message = _one_line(e) if isinstance(status, int) else describe(e)
    if message is None or debug_enabled():
      raise
    _emit(f"{prog}: error: {message}")
    return status if isinstance(status, int) else EXIT_BAD_INPUT
  finally:
    _debug = previous


def _emit(line: str) -> None:
  # One write with its newline: `print` writes the text and "\n" separately, and a background
  # thread (orbax, absl) printing between the two would split the one-line message.
  sys.stderr.write(line + "\n")
  sys.stderr.flush()


def _first_existing(path: str) -> str:
  p = os.path.abspath(path)
  while not os.path.lexists(p):
    parent = os.path.dirname(p)
    if parent == p:
      break
    p = parent
  return p


def check_output_path(path: str | os.PathLike, flag: str = "--out") -> str:
  """Fails fast if a file cannot be written at `path`: a parent is a file, the path is a folder,
  or the nearest existing folder is not writable. Returns the path.

  Example:
    >>> import tempfile, os
    >>> f = os.path.join(tempfile.mkdtemp(), "notes.txt")
    >>> _ = open(f, "w").write("x")
    >>> check_output_path(f + "/t.npz")
    Traceback (most recent call last):
    ...
    mmts_jax.errors.UserInputError: ...notes.txt/t.npz: cannot write --out: ...notes.txt is a file,
    not a folder; expected a path inside a folder
  """
  path = os.fspath(path)
  if "://" in path:  # an object store: no local folder to check
    return path
  if os.path.isdir(path):
    raise UserInputError(path, f"{flag} is a folder", expected="a file path")
  return _check_parents(path, flag)


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> str:
  """As `check_output_path`, for an output folder (which may already exist)."""
  path = os.fspath(path)
  if "://" in path:  # an object store: folders are prefixes
    return path
  if os.path.lexists(path) and not os.path.isdir(path):
    raise UserInputError(path, f"{flag} is a file", expected="a folder (or a new path)")
  return _check_parents(path, flag)


def _check_parents(path: str, flag: str) -> str:
  target = os.path.abspath(path)
  existing = _first_existing(os.path.dirname(target))
  if not os.path.isdir(existing):
    raise UserInputError(
      path,
      f"cannot write {flag}: {existing} is a file, not a folder",
      expected="a path inside a folder",
    )
  if not os.access(existing, os.W_OK):
    raise UserInputError(
      path,
      f"cannot write {flag}: the folder {existing} is not writable",
      expected="a writable location",
    )
  return path


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str = "") -> Iterator[None]:
  """Turns an OS error while writing `path` (disk full, read-only, ...) into one naming `path`."""
  try:
    yield
  except UserInputError:
    raise
  except OSError as e:
    # A full or read-only disk names no file (or a temp file): name the artifact. Errors that
    # carry their own file name (a missing input read on the way) keep it.
    if e.errno not in _WRITE_ERRNOS and (e.errno is None or e.filename is not None):
      raise
    label = f"{what} " if what else ""
    raise UserInputError(
      os.fspath(path),
      f"cannot write {label}({os_reason(e)})",
      expected="a writable location with free space",
    ) from e


@contextlib.contextmanager
def all_or_nothing(paths: Iterable[str | os.PathLike | None]) -> Iterator[None]:
  """On an exception, removes those of `paths` that did not exist before (partial outputs), and
  the folders that were made for them if they are empty again."""
  # Objects in a store are written in one upload each (atomic_io): nothing partial to remove.
  paths = [
    os.path.abspath(os.fspath(p)) for p in paths if p is not None and "://" not in os.fspath(p)
  ]
  fresh = [p for p in paths if not os.path.lexists(p)]
  new_dirs = set()
  for p in fresh:
    d = os.path.dirname(p)
    while not os.path.lexists(d) and os.path.dirname(d) != d:
      new_dirs.add(d)
      d = os.path.dirname(d)
  try:
    yield
  except BaseException:
    for p in fresh:
      if os.path.isfile(p) or os.path.islink(p):
        os.remove(p)
    for d in sorted(new_dirs, key=len, reverse=True):  # deepest first
      with contextlib.suppress(OSError):
        os.rmdir(d)  # only if empty: never a folder holding anything else
    raise
