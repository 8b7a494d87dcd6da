"""benchmarks/default_history.py: the defaults' medians across the tile bench's runs, and the
runs where a median left the pooled range of the previous runs' calls."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import default_history  # noqa: E402


def _series(entries, loss, measure, b=131072, dtype="bf16"):
  return {
    e["run"]: e
    for e in entries
    if (e["loss"], e["dtype"], e["B"], e["measure"]) == (loss, dtype, b, measure)
  }


def test_flags_the_max_margin_regression_and_its_fix_in_the_committed_runs():
  # Runs 25-29 (session 17) timed the bf16 max-margin forward at 46.2-47.5 ms, runs 30-33 at
  # 53.8-54.0 (the ping-pong commit's index arithmetic), run 34 at 47.7 with it undone.
  entries = default_history.history(default_history.load_runs(), window=3)
  mm = _series(entries, "max_margin", "fwd_ms")
  assert mm[30]["shift"] == "up" and mm[34]["shift"] == "down"
  assert [mm[n]["shift"] for n in (26, 27, 28, 29, 31, 32, 33)] == [None] * 7
  assert 53.5 < mm[30]["median"] < 54.5 and 47 < mm[34]["median"] < 48.5
  # InfoNCE's forward moved in none of these runs.
  nce = _series(entries, "infonce", "fwd_ms")
  assert all(nce[n]["shift"] is None for n in range(26, 35))


def _run(path, number, fwd_calls):
  path.mkdir(parents=True, exist_ok=True)
  calls = sorted(fwd_calls)
  row = {
    "loss": "infonce",
    "dtype": "bf16",
    "B": 1024,
    "kernel": "auto",
    "fwd_ms": calls[len(calls) // 2],
    "fwd_ms_all": fwd_calls,
  }
  other = dict(row, kernel="auto:variant", fwd_ms=0.1, fwd_ms_all=[0.1])
  (path / f"run{number}.json").write_text(json.dumps({"rows": [row, other]}))


def test_shift_is_against_the_previous_windows_pooled_calls(tmp_path):
  _run(tmp_path / "a", 1, [10.0, 11.0, 12.0])
  _run(tmp_path / "a", 2, [10.5, 11.5, 13.0])
  _run(tmp_path / "b", 3, [13.5, 14.0, 14.5])  # median 14.0 > 13.0: up
  _run(tmp_path / "b", 4, [12.0, 12.5, 15.0])  # inside runs 2-3's 10.5-14.5
  # Window 2: below runs 3-4's 12.0 -> down (inside all four runs' 10.0-15.0).
  _run(tmp_path / "b", 10, [10.8, 11.0, 20.0])
  entries = default_history.history(default_history.load_runs(str(tmp_path)), window=2)
  got = {e["run"]: e["shift"] for e in entries}
  assert got == {1: None, 2: None, 3: "up", 4: None, 10: "down"}
  # Only the defaults are read; the variant's 0.1 ms never enters a range.
  assert min(e["range"][0] for e in entries) == 10.0


def test_refuses_a_bad_window_and_duplicate_run_numbers(tmp_path):
  with pytest.raises(ValueError, match="window must be >= 1, got 0"):
    default_history.history([], window=0)
  _run(tmp_path / "a", 5, [1.0])
  _run(tmp_path / "b", 5, [2.0])
  with pytest.raises(ValueError, match="two result files share a run number"):
    default_history.load_runs(str(tmp_path))


def test_a_new_runs_defaults_are_compared_with_the_last_committed_runs(tmp_path):
  # What mosaic_tiles_bench.py stores under "default_vs_history" at the end of a run.
  _run(tmp_path / "a", 7, [10.0, 10.5, 11.0])
  _run(tmp_path / "a", 8, [10.2, 10.4, 11.5])
  new = [
    {
      "loss": "infonce",
      "dtype": "bf16",
      "B": 1024,
      "kernel": "auto",
      "fwd_ms": 12.5,
      "fwd_ms_all": [12.2, 12.5, 13.0],
    },
    {
      "loss": "infonce",
      "dtype": "bf16",
      "B": 1024,
      "kernel": "auto:x",
      "fwd_ms": 1.0,
      "fwd_ms_all": [1.0],
    },
  ]
  (got,) = default_history.compare(new, str(tmp_path), window=2)
  assert (got["run"], got["file"], got["shift"]) == (9, "this run", "up")
  new[0]["fwd_ms"] = 10.9
  assert default_history.compare(new, str(tmp_path))[0]["shift"] is None
  assert default_history.compare(new, str(tmp_path / "none")) == [
    dict(got, run=1, median=10.9, shift=None)
  ]
