"""The default Mosaic kernels' timings across the tile bench's runs, and the runs where they moved.

  python benchmarks/default_history.py [--window 3] [--json history.json]

Each `mosaic_tiles_bench.py` result under `benchmarks/results/` (a file named `*run<N>.json`)
times the defaults ("auto") beside its variants. The variants are compared with the defaults
inside one run; this compares the defaults across runs, which is where a change to the default
code path shows. Per case (loss, dtype, B) and measure (`fwd_ms`, `fwd_bwd_ms`) it lists each
run's median, and flags a run whose median lies outside the pooled range of every call of the
previous `window` runs that measured the case. Runs are ordered by their number; each run's
tree is in the `ran.txt` beside it. Session 17 took run 30's max-margin forward (54.0 ms after
46.2-47.5) for an outlier in its baseline; it was a regression, flagged here at run 30, and its
fix is flagged at run 34.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MEASURES = ("fwd_ms", "fwd_bwd_ms")


def default_rows(rows) -> list[dict]:
  """The rows of one tile-bench result that time the defaults. Rows without a loss or dtype
  (the first runs, InfoNCE bf16 only, and other benches) are left out rather than guessed."""
  return [
    r
    for r in rows or []
    if isinstance(r, dict)
    and r.get("kernel") == "auto"
    and {"loss", "dtype", "B", "fwd_ms_all"} <= r.keys()
  ]


def load_runs(root: str = RESULTS) -> list[tuple[int, str, list[dict]]]:
  """`(number, path, default rows)` of every tile-bench run under `root`, by run number."""
  runs = []
  for path in glob.glob(os.path.join(root, "**", "*.json"), recursive=True):
    m = re.search(r"run(\d+)\.json$", os.path.basename(path))
    if not m:
      continue
    with open(path) as f:
      data = json.load(f)
    rows = default_rows(data.get("rows") if isinstance(data, dict) else None)
    if rows:
      runs.append((int(m.group(1)), os.path.relpath(path, root), rows))
  numbers = [n for n, _, _ in runs]
  if len(set(numbers)) != len(numbers):
    raise ValueError(f"two result files share a run number under {root}: {sorted(numbers)}")
  return sorted(runs)


def history(runs, window: int = 3) -> list[dict]:
  """One entry per (case, measure, run): the median, the calls' range, and `shift` ("up",
  "down" or None) against the pooled calls of the previous `window` runs of the case."""
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  seen: dict[tuple, list[list[float]]] = {}
  out = []
  for number, path, rows in runs:
    for row in rows:
      for measure in MEASURES:
        calls = row.get(f"{measure}_all")
        if not calls:
          continue
        key = (row["loss"], row["dtype"], row["B"], measure)
        before = [c for prev in seen.get(key, [])[-window:] for c in prev]
        median = row[measure]
        shift = None
        if before:
          shift = "up" if median > max(before) else "down" if median < min(before) else None
        out.append(
          {
            "loss": key[0],
            "dtype": key[1],
            "B": key[2],
            "measure": measure,
            "run": number,
            "file": path,
            "median": median,
            "range": [min(calls), max(calls)],
            "shift": shift,
          }
        )
        seen.setdefault(key, []).append(list(calls))
  return out


def compare(rows, root: str = RESULTS, window: int = 3) -> list[dict]:
  """`history`'s entries for a new run's `rows` (not yet under `root`), against the last
  `window` runs there: `mosaic_tiles_bench.py` prints the ones that moved."""
  runs = load_runs(root)
  number = (runs[-1][0] if runs else 0) + 1
  entries = history([*runs, (number, "this run", default_rows(rows))], window)
  return [e for e in entries if e["run"] == number]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--window", type=int, default=3)
  ap.add_argument("--root", default=RESULTS)
  ap.add_argument("--json", default="", help="also write the entries here")
  args = ap.parse_args(argv)
  entries = history(load_runs(args.root), args.window)
  for e in entries:
    mark = f"  <- {e['shift']}" if e["shift"] else ""
    lo, hi = e["range"]
    print(
      f"{e['loss']:>10} {e['dtype']:>4} B={e['B']:>7} {e['measure']:>10} run {e['run']:>3}: "
      f"{e['median']:9.3f} ({lo:.3f}-{hi:.3f}){mark}"
    )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(entries, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
