"""Reading the CSV / TSV / JSON-lines tables users pass in, with errors naming file and line.

One reader for every table the commands take (captions, labels, class frequencies, EK-100
annotations). It refuses, each with a `UserInputError` naming the file, the line and what was
expected: a missing or empty file, bytes that are not UTF-8 (a UTF-16 export, a binary file),
NUL bytes, an unterminated quote, a row with more or fewer fields than the header, a duplicate
column name, a JSON line that is not an object, and a missing required column. A UTF-8 byte
order mark is accepted.

Example:
  >>> import tempfile, os
  >>> path = os.path.join(tempfile.mkdtemp(), "t.csv")
  >>> _ = open(path, "w").write('id,caption\\n1,"a, b"\\n2,c\\n')
  >>> t = read_table(path, required=["caption"])
  >>> t.columns, [r["caption"] for r in t.rows], t.lines
  (['id', 'caption'], ['a, b', 'c'], [2, 3])
  >>> _ = open(path, "w").write('id,caption\\n1,a,extra\\n')
  >>> read_table(path)
  Traceback (most recent call last):
  ...
  mmts_jax.errors.UserInputError: ...t.csv:2: row has 3 fields but the header has 2;
  expected one field per column
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

from mmts_jax import read_access
from mmts_jax.errors import MissingFileError, UserInputError

__all__ = ["Table", "read_table", "read_text", "TABLE_SUFFIXES"]

TABLE_SUFFIXES = (".csv", ".tsv", ".tab", ".jsonl", ".json")


class Table(NamedTuple):
  """A table's file, column names, rows (dicts) and the 1-based line where each row starts."""

  path: str
  columns: list[str]
  rows: list[dict[str, Any]]
  lines: list[int]

  def where(self, i: int) -> int:
    """The line of row `i` (for error messages)."""
    return self.lines[i]


def read_text(path: str | os.PathLike, what: str = "text file") -> str:
  """A UTF-8 text file's content; refuses binary (NUL bytes) and other encodings by line.

  Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "t.csv")
    >>> _ = open(path, "wb").write(b"a\\nb\\xe9\\n")
    >>> read_text(path)
    Traceback (most recent call last):
    ...
    mmts_jax.errors.UserInputError: ...t.csv:2: is not UTF-8 (invalid continuation byte, byte 0xe9);
    expected a UTF-8 text file
  """
  path = os.fspath(path)
  if not read_access.exists(path):
    raise MissingFileError(path, "does not exist", expected=f"an existing {what}")
  if read_access.is_dir(path):
    raise UserInputError(path, "is a folder", expected=f"a {what}")
  data = read_access.read_bytes(path)
  nul = data.find(b"\x00")
  if nul >= 0:
    raise UserInputError(
      path,
      "contains a NUL byte (binary data or UTF-16 text)",
      line=data.count(b"\n", 0, nul) + 1,
      expected=f"a UTF-8 {what}",
    )
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise UserInputError(
      path,
      f"is not UTF-8 ({e.reason}, byte 0x{data[e.start]:02x})",
      line=line,
      expected=f"a UTF-8 {what}",
    ) from None


def _kind(path: str, kind: str | None) -> str:
  if kind is not None:
    return kind
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in TABLE_SUFFIXES:
    raise UserInputError(
      path,
      f"unknown table type {suffix or '(no suffix)'!r}",
      expected="a .csv, .tsv or .jsonl file",
    )
  return {".tab": "tsv", ".json": "jsonl"}.get(suffix, suffix[1:])


def _read_delimited(
  path: str, text: str, delimiter: str, quoting: Literal[0, 1, 2, 3], header: bool
):
  reader = csv.reader(
    io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True
  )
  head, rows, lines = None, [], []
  start = 1
  try:
    for row in reader:
      line, start = start, reader.line_num + 1
      if not row or (len(row) == 1 and not row[0].strip() and head is not None):
        continue  # blank line
      if head is None and header:
        head = [c.strip() for c in row]
        dup = sorted({c for c in head if head.count(c) > 1})
        if dup or "" in head:
          raise UserInputError(
            path,
            f"header {row} has {'duplicate' if dup else 'empty'} column name(s) {dup or ['']}",
            line=line,
            expected="distinct, non-empty column names",
          )
        continue
      if head is None:
        head = [str(i) for i in range(len(row))]
      if len(row) != len(head):
        raise UserInputError(
          path,
          f"row has {len(row)} fields but the header has {len(head)}",
          line=line,
          expected="one field per column",
        )
      rows.append(dict(zip(head, row, strict=True)))
      lines.append(line)
  except csv.Error as e:
    raise UserInputError(
      path,
      f"malformed {'TSV' if delimiter == chr(9) else 'CSV'} ({e})",
      line=reader.line_num or 1,
      expected='quotes that close ("..." and "" inside)',
    ) from None
  return head or [], rows, lines


def _read_jsonl(path: str, text: str):
  if path.lower().endswith(".json") and text.lstrip().startswith("["):  # one list of objects
    try:
      items = json.loads(text)
    except json.JSONDecodeError as e:
      raise UserInputError(
        path,
        f"not valid JSON ({e.msg}, column {e.colno})",
        line=e.lineno,
        expected="a JSON list of objects",
      ) from None
    numbered = [(None, item) for item in items]
  else:
    numbered = []
    for line_no, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          numbered.append((line_no, json.loads(line)))
        except json.JSONDecodeError as e:
          raise UserInputError(
            path,
            f"not valid JSON ({e.msg}, column {e.colno})",
            line=line_no,
            expected="one JSON object per line",
          ) from None
  columns: dict[str, None] = {}
  rows, lines = [], []
  for i, (line_no, item) in enumerate(numbered):
    if not isinstance(item, dict):
      raise UserInputError(
        path,
        f"is a JSON {type(item).__name__}, not an object",
        line=line_no if line_no is not None else i + 1,
        expected='one JSON object per line, e.g. {"caption": "..."}',
      )
    columns.update(dict.fromkeys(item))
    rows.append(item)
    lines.append(line_no if line_no is not None else i + 1)
  return list(columns), rows, lines


def read_table(
  path: str | os.PathLike,
  required: Sequence[str] = (),
  *,
  kind: str | None = None,
  delimiter: str | None = None,
  quoting: Literal[0, 1, 2, 3] = csv.QUOTE_MINIMAL,
  header: bool = True,
  allow_empty: bool = False,
) -> Table:
  """Reads a `.csv`, `.tsv`/`.tab` or `.jsonl`/`.json` table; see the module docstring.

  Args:
    required: columns that must exist (checked against the header, or every JSON row).
    kind: "csv", "tsv" or "jsonl"; default from the suffix.
    delimiter: overrides the kind's delimiter (comma for csv, tab for tsv).
    quoting: a `csv.QUOTE_*` constant (`QUOTE_NONE` for TSV files whose captions hold `"`).
    header: False when the first row is data (columns are then "0", "1", ...).
    allow_empty: accept a table without rows.

  Raises:
    UserInputError: naming the file, the line and what was expected.
  """
  path = os.fspath(path)
  kind = _kind(path, kind)
  text = read_text(path, f"{kind.upper()} table")
  if kind == "jsonl":
    columns, rows, lines = _read_jsonl(path, text)
    for i, row in enumerate(rows):
      missing = [c for c in required if c not in row]
      if missing:
        raise UserInputError(
          path,
          f"object has no key(s) {missing}",
          line=lines[i],
          expected=f"every object to have {list(required)}",
        )
  else:
    delim = delimiter or ("\t" if kind == "tsv" else ",")
    columns, rows, lines = _read_delimited(path, text, delim, quoting, header)
    missing = [c for c in required if c not in columns]
    if missing:
      raise UserInputError(
        path,
        f"has no column(s) {missing}, only {columns}",
        line=1,
        expected=f"a header with {list(required)}",
      )
  if not rows and not allow_empty:
    raise UserInputError(
      path,
      "has no rows" if columns or text.strip() else "is empty",
      expected="a header and at least one row",
    )
  return Table(path, columns, rows, lines)
