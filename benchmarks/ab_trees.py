"""Two source trees of mmts_jax side by side: `loss_bench.py one` run in alternating processes,
one tree after the other, round after round, so both see the same machine and the same drift.

A change the code cannot switch at run time (the layout of the sweep's states, say) is measured
against its parent commit this way: export the parent's package into a folder, then

  git archive <parent> mmts_jax | tar -x -C /tmp/parent
  python benchmarks/ab_trees.py --tree parent=/tmp/parent --tree new=. --rounds 3 \\
      --out ab.json -- --impl blockwise --loss infonce --B 131072 --dtype bf16

Each tree's package is put first on PYTHONPATH; the benchmark script itself is this
checkout's. Every process's JSON line is kept (with its tree and round); the summary gives each
tree's median and range over rounds. The json is written atomically after every process, so a
run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from loss_bench import write_json  # noqa: E402


def parse_trees(specs: list[str]) -> dict[str, str]:
  """`name=path` pairs -> {name: absolute path}; each path must hold an `mmts_jax` package.

  Example:
    >>> parse_trees(["new=."])["new"] == os.path.abspath(".")
    True
  """
  trees = {}
  for spec in specs:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
      raise ValueError(f"--tree must be name=path, got {spec!r}")
    if name in trees:
      raise ValueError(f"--tree {name!r} given twice")
    if not (pathlib.Path(path) / "mmts_jax" / "__init__.py").is_file():
      raise ValueError(f"--tree {spec!r}: no mmts_jax package under {path!r}")
    trees[name] = os.path.abspath(path)
  if len(trees) < 2:
    raise ValueError(f"need at least two --tree, got {len(trees)}")
  return trees


def summary(lines: list[dict]) -> dict:
  """Per tree: the median of its rounds' `ms`, their range and count."""
  out = {}
  for name in dict.fromkeys(r["tree"] for r in lines):
    ms = sorted(r["ms"] for r in lines if r["tree"] == name and "ms" in r)
    if ms:
      out[name] = {"median_ms": ms[len(ms) // 2], "min_ms": ms[0], "max_ms": ms[-1], "n": len(ms)}
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
  ap.add_argument("--tree", action="append", required=True, help="name=path (two or more)")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--timeout", type=int, default=240, help="seconds per process")
  ap.add_argument("--deadline", type=float, default=None, help="no new process after this (s)")
  ap.add_argument("--out", required=True)
  ap.add_argument("one_args", nargs=argparse.REMAINDER, help="-- then loss_bench.py one's args")
  args = ap.parse_args(argv)
  trees = parse_trees(args.tree)
  one = args.one_args[1:] if args.one_args[:1] == ["--"] else args.one_args
  start, lines = time.time(), []
  res = {"argv": sys.argv, "trees": trees, "one": one, "lines": lines}
  for rnd in range(args.rounds):
    for name, path in trees.items():
      if args.deadline is not None and time.time() - start > args.deadline:
        break
      env = dict(os.environ, PYTHONPATH=os.pathsep.join([path, os.environ.get("PYTHONPATH", "")]))
      cmd = [sys.executable, str(HERE / "loss_bench.py"), "one", *one]
      r: dict[str, Any]
      try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        last = (p.stdout.strip().splitlines() or ["{}"])[-1]
        r = json.loads(last) if p.returncode == 0 else {"error": p.stderr[-2000:]}
      except subprocess.TimeoutExpired:
        r = {"error": f"timeout after {args.timeout} s"}
      r.update(tree=name, round=rnd)
      lines.append(r)
      print(json.dumps(r), flush=True)
      res["summary"] = summary(lines)
      write_json(args.out, res)
  print(json.dumps(res.get("summary", {}), indent=1))


if __name__ == "__main__":
  main()
