"""benchmarks/ab_trees.py: two source trees in alternating `loss_bench.py one` processes. Each
process imports its own tree's package (a marker module only one tree has tells them apart),
every line is kept with its tree and round, and malformed trees are refused before anything runs."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "ab_trees.py"


def _ab(tmp_path, *args):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device per child: the single-device benchmark
  return subprocess.run(
    [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600
  )


def test_alternates_trees_and_keeps_every_line(tmp_path):
  # A copy of the package whose losses module is the same; a marker file shows which tree a
  # child imported (written by the copy's __init__ at import time).
  other = tmp_path / "other"
  shutil.copytree(
    ROOT / "mmts_jax", other / "mmts_jax", ignore=shutil.ignore_patterns("__pycache__")
  )
  marker = tmp_path / "imported.txt"
  init = other / "mmts_jax" / "__init__.py"
  init.write_text(
    init.read_text() + f"\nopen({str(marker)!r}, 'a').write(__file__ + '\\n')\n", encoding="utf-8"
  )
  out = tmp_path / "ab.json"
  p = _ab(
    tmp_path,
    "--tree", f"this={ROOT}", "--tree", f"other={other}", "--rounds", "2", "--out", str(out),
    "--", "--impl", "blockwise", "--B", "64", "--D", "16", "--warm", "0", "--rep", "1",
  )  # fmt: skip
  assert p.returncode == 0, p.stderr[-3000:]
  res = json.loads(out.read_text())
  assert [(r["tree"], r["round"]) for r in res["lines"]] == [
    ("this", 0), ("other", 0), ("this", 1), ("other", 1)
  ]  # fmt: skip
  assert all(r["ms"] > 0 and r["B"] == 64 for r in res["lines"]), res["lines"]
  assert set(res["summary"]) == {"this", "other"} and res["summary"]["other"]["n"] == 2
  # Only the "other" processes imported the copy: two of them.
  imported = marker.read_text().splitlines()
  assert len(imported) == 2 and all(line.startswith(str(other)) for line in imported)


@pytest.mark.parametrize(
  "trees, message",
  [
    (["this"], "must be name=path"),
    ([f"a={ROOT}"], "at least two"),
    ([f"a={ROOT}", f"a={ROOT}"], "given twice"),
    ([f"a={ROOT}", "b=/nonexistent"], "no mmts_jax package"),
  ],
)
def test_bad_trees_are_refused(tmp_path, trees, message):
  args = [a for t in trees for a in ("--tree", t)]
  p = _ab(tmp_path, *args, "--out", str(tmp_path / "x.json"), "--", "--B", "64")
  assert p.returncode != 0 and message in p.stderr, p.stderr[-2000:]
  assert not (tmp_path / "x.json").exists()
