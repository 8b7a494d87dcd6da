"""Property-based tests (hypothesis) of the input readers and checks.

Whatever bytes or values come in, a reader returns what was written or raises the one
documented error (`UserInputError`, a `ValueError`) naming the file; it never crashes with
another exception and never returns something else.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mmts_jax import array_files, table_files
from mmts_jax.clusters.table import ClusterTable, dataset_fingerprint
from mmts_jax.errors import UserInputError
from mmts_jax.losses import _checks

# 60 examples per property in CI; MMTS_HYPOTHESIS_EXAMPLES=2000 for a longer local search.
SETTINGS = settings(
  max_examples=int(os.environ.get("MMTS_HYPOTHESIS_EXAMPLES", "60")),
  deadline=None,
  suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# Cell text: any Unicode but NUL and lone surrogates (not encodable as UTF-8); the CSV writer
# quotes what needs quoting. `\r` alone is normalised by csv, so it is left out of cells.
_cell = st.text(
  st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r"), max_size=12
)
_name = st.text("abcdefghij_", min_size=1, max_size=6)


def _tmp(suffix: str) -> str:
  fd, path = tempfile.mkstemp(suffix=suffix)
  os.close(fd)
  return path


@SETTINGS
@given(header=st.lists(_name, min_size=1, max_size=5, unique=True), data=st.data())
def test_csv_round_trip(header, data):
  rows = data.draw(
    st.lists(st.lists(_cell, min_size=len(header), max_size=len(header)), min_size=1, max_size=8)
  )
  # A row whose only cell is empty or blank is a blank line to CSV: give it content.
  rows = [r if len(r) > 1 or r[0].strip() else ["x"] for r in rows]
  path = _tmp(".csv")
  try:
    with open(path, "w", newline="", encoding="utf-8") as f:
      csv.writer(f).writerows([header] + rows)
    t = table_files.read_table(path, required=header[:1])
    assert t.columns == header
    assert [[r[c] for c in header] for r in t.rows] == rows
    assert t.lines == sorted(t.lines) and t.lines[0] >= 2
  finally:
    os.remove(path)


@SETTINGS
@given(raw=st.binary(max_size=200), suffix=st.sampled_from([".csv", ".tsv", ".jsonl"]))
def test_any_bytes_give_a_table_or_a_user_error(raw, suffix):
  path = _tmp(suffix)
  try:
    with open(path, "wb") as f:
      f.write(raw)
    try:
      t = table_files.read_table(path)
    except UserInputError as e:
      assert e.path == path and e.problem
      return
    assert t.rows and all(isinstance(r, dict) for r in t.rows)
    assert len(t.rows) == len(t.lines)
    if suffix != ".jsonl":
      assert all(len(r) == len(t.columns) for r in t.rows)
  finally:
    os.remove(path)


_json_value = st.recursive(
  st.none() | st.booleans() | st.integers() | st.text(max_size=5),
  lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_name, inner, max_size=3),
  max_leaves=6,
)


@SETTINGS
@given(values=st.lists(_json_value, min_size=1, max_size=6))
def test_jsonl_objects_accepted_others_refused_at_their_line(values):
  path = _tmp(".jsonl")
  try:
    with open(path, "w", encoding="utf-8") as f:
      f.write("".join(json.dumps(v) + "\n" for v in values))
    bad = [i for i, v in enumerate(values) if not isinstance(v, dict)]
    if bad:
      with pytest.raises(UserInputError) as e:
        table_files.read_table(path)
      assert e.value.line == bad[0] + 1 and "not an object" in e.value.problem
    else:
      assert table_files.read_table(path).rows == values
  finally:
    os.remove(path)


_labels = st.lists(st.sampled_from(["cup", "pan", "door", "7", "12"]), min_size=1, max_size=30)


@SETTINGS
@given(labels=_labels)
def test_cluster_table_round_trip(labels):
  path = _tmp(".npz")
  try:
    fp = dataset_fingerprint(range(len(labels)))
    ClusterTable.from_labels(labels, fingerprint=fp).save(path)
    t = ClusterTable.load(path)
    assert [t.cluster_names[c] for c in t.cluster_ids] == labels
    assert t.fingerprint == fp and t.validate(num_samples=len(labels), fingerprint=fp) is t
  finally:
    os.remove(path)


@SETTINGS
@given(labels=_labels, cut=st.integers(0, 4000), flip=st.integers(0, 4000))
def test_damaged_cluster_table_is_refused_by_name(labels, cut, flip):
  buf = io.BytesIO()
  path = _tmp(".npz")
  try:
    ClusterTable.from_labels(labels).save(path)
    with open(path, "rb") as f:
      data = bytearray(f.read())
    flip %= len(data)
    data[flip] ^= 0xFF
    data = data[: min(cut, len(data))] if cut < len(data) else data
    with open(path, "wb") as f:
      f.write(bytes(data))
    try:
      t = ClusterTable.load(path)
    except UserInputError as e:
      assert e.path == path
      return
    # A flip that leaves a readable table (e.g. in a timestamp) must still be consistent.
    assert t.num_samples == len(labels) == t.sizes[t.cluster_ids].size
  finally:
    os.remove(path)
    buf.close()


@SETTINGS
@given(
  arrays=st.dictionaries(
    st.sampled_from(["format", "cluster_ids", "sizes", "provenance", "x"]),
    hnp.arrays(
      st.sampled_from([np.int32, np.int64, np.float64, np.dtype("U3")]),
      hnp.array_shapes(min_dims=0, max_dims=2, max_side=4),
    ),
    max_size=5,
  )
)
def test_arbitrary_npz_is_a_table_or_refused(arrays):
  path = _tmp(".npz")
  try:
    np.savez(path, **arrays)
    with pytest.raises(UserInputError) as e:
      ClusterTable.load(path)  # no real format tag and provenance: never a table
    assert e.value.path == path
  finally:
    os.remove(path)


@SETTINGS
@given(
  x=hnp.arrays(
    st.sampled_from([np.float32, np.float64, np.int16, np.bool_]),
    hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
  )
)
def test_check_matrix_accepts_exactly_finite_nonempty_2d_numbers(x):
  ok = (
    x.ndim == 2
    and x.size > 0
    and x.dtype.kind in "biuf"
    and bool(np.all(np.isfinite(x.astype(np.float64))))
  )
  if ok:
    assert array_files.check_matrix(x, "f.npy") is x
  else:
    with pytest.raises(UserInputError, match="f.npy"):
      array_files.check_matrix(x, "f.npy")


@SETTINGS
@given(
  batch=st.integers(1, 6),
  shape=st.sampled_from(["scalar", "batch", "other"]),
  values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=7, max_size=7),
  strict=st.booleans(),
)
def test_per_anchor_check_accepts_exactly_valid_values(batch, shape, values, strict):
  v = {
    "scalar": np.float32(values[0]),
    "batch": np.asarray(values[:batch], np.float32),
    "other": np.asarray(values[: batch + 1], np.float32),
  }[shape]
  arr = np.asarray(v, np.float64)
  valid = (
    shape != "other"
    and bool(np.all(np.isfinite(arr)))
    and bool(np.all(arr > 0) if strict else np.all(arr >= 0))
  )
  if valid:
    _checks.check_per_anchor(v, batch, "tau", "loss", strictly_positive=strict)
  else:
    with pytest.raises(ValueError, match="tau"):
      _checks.check_per_anchor(v, batch, "tau", "loss", strictly_positive=strict)


@SETTINGS
@given(
  a=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4),
  b=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4),
  dtype=st.sampled_from([np.float32, np.int32]),
)
def test_pair_check_accepts_exactly_equal_2d_float_batches(a, b, dtype):
  image, text = np.zeros(a, dtype), np.zeros(b, np.float32)
  valid = len(a) == 2 and a == b and a[0] >= 1 and dtype == np.float32
  if valid:
    _checks.check_pair(image, text, "loss")
  else:
    with pytest.raises((TypeError, ValueError)):
      _checks.check_pair(image, text, "loss")
