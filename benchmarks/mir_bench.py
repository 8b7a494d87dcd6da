"""EK-100 MIR evaluation, side by side: the official algorithm in numpy vs `mmts_jax.eval`.

The whole validation split (9,668 videos x 3,842 captions), its relevancy built from the CSVs,
a random float32 similarity (seed 0): both implementations compute mAP and nDCG in both
directions, each in its own fresh subprocess (so peak memory is its own), one after the other.
Reported per implementation: wall and CPU seconds (min and median over repeats), peak RSS of the
process, peak RSS above the loaded inputs, and tracemalloc's peak during one call (the working
memory the evaluation allocates); and the metric values, which must agree.

The baseline `official_*` below is this project's own transcription of the published algorithm
(EPIC-KITCHENS-100 MIR challenge, JPoSE / MI-MM `mAP.py` and `nDCG.py`): full argsort, ranked
relevancy, cumulative sums, per-query means. `tests/test_eval_mir.py` checks it against the
official numbers in `shared/reference/ek100_mir_small.npz` too.

  python benchmarks/mir_bench.py                 # -> benchmarks/results/mir_ek100_full.json
  python benchmarks/mir_bench.py --repeats 5 --threads 1
  python benchmarks/mir_bench.py --retrieval          # COCO-sized R@K: mir_retrieval_coco.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---- the official algorithm, step by step ------------------------------------------------------


def official_map(sim: np.ndarray, rel: np.ndarray, kind: str = "quicksort") -> float:
  """Mean over rows of AP; relevant positions are `rel == 1`, the running sum adds all of rel.

  `kind` is numpy's sort kind: the official code uses the default (unstable quicksort);
  "stable" gives the tie order that `mmts_jax.eval` documents.
  """
  order = np.argsort(-sim, axis=1, kind=kind)
  ranked = np.take_along_axis(rel, order, axis=1)
  running = np.cumsum(ranked, axis=1)
  running[ranked != 1] = 0
  ranks = np.arange(1, ranked.shape[1] + 1)
  per_query = np.sum(running / ranks, axis=1) / np.sum(ranked == 1, axis=1)
  return float(np.mean(per_query))


def _official_dcg(sim, rel, k_counts, kind):
  order = np.argsort(sim, axis=1, kind=kind)[:, ::-1]
  ranked = np.take_along_axis(rel, order, axis=1)
  return np.sum(ranked * k_counts / np.log2(np.arange(sim.shape[1]) + 2), axis=1)


def official_ndcg(sim: np.ndarray, rel: np.ndarray, kind: str = "quicksort") -> float:
  """Mean over rows of DCG / IDCG over the first K ranks, K = number of items with rel > 0."""
  k_counts = (np.sort(rel, axis=1)[:, ::-1] > 0).astype(int)
  return float(
    np.mean(_official_dcg(sim, rel, k_counts, kind) / _official_dcg(rel, rel, k_counts, kind))
  )


def official_metrics(sim: np.ndarray, rel: np.ndarray, kind: str = "quicksort") -> dict:
  """{"mAP": (v2t, t2v, avg), "nDCG": (...)}: the matrices, then their transposes."""
  out = {}
  for name, fn in (("mAP", official_map), ("nDCG", official_ndcg)):
    v2t, t2v = fn(sim, rel, kind), fn(sim.T, rel.T, kind)
    out[name] = (v2t, t2v, (v2t + t2v) / 2)
  return out


# ---- measurement ---------------------------------------------------------------------------------


def _rss_mib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker(args) -> None:
  """Runs one implementation on the saved matrices; prints one JSON line."""
  if args.worker == "mmts_jax":
    from mmts_jax.eval import mir_metrics

    def run(s, r):
      return {k: tuple(v) for k, v in mir_metrics(s, r, num_threads=args.threads).items()}
  else:
    run = official_metrics
  sim = np.load(os.path.join(args.tmp, "similarity.npy"))
  rel = np.load(os.path.join(args.tmp, "relevancy.npy"))
  loaded = _rss_mib()
  walls, cpus = [], []
  for _ in range(args.repeats):
    w, c = time.perf_counter(), time.process_time()
    values = run(sim, rel)
    walls.append(time.perf_counter() - w)
    cpus.append(time.process_time() - c)
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  tracemalloc.start()
  run(sim, rel)
  traced_peak = tracemalloc.get_traced_memory()[1] / 2**20
  tracemalloc.stop()
  print(
    json.dumps(
      {
        "implementation": args.worker,
        "repeats": args.repeats,
        "wall_s": {"min": min(walls), "median": statistics.median(walls), "all": walls},
        "cpu_s": {"min": min(cpus), "median": statistics.median(cpus), "all": cpus},
        "rss_after_inputs_mib": loaded,
        "peak_rss_mib": peak_rss,
        "peak_rss_above_inputs_mib": peak_rss - loaded,
        "tracemalloc_peak_mib": traced_peak,
        "metrics": values,
      }
    )
  )


def _retrieval_bench(args) -> int:
  """COCO-sized retrieval (5k images x 25k captions): time, peak RSS, the host never holds S."""
  import jax

  from mmts_jax.eval import retrieval_metrics

  rng = np.random.default_rng(0)
  n, per, d = args.images, 5, args.dim
  image = rng.standard_normal((n, d)).astype(np.float32)
  text = (np.repeat(image, per, axis=0) + 2.0 * rng.standard_normal((n * per, d))).astype(
    np.float32
  )
  mapping = np.arange(n * per) // per
  walls = []
  for _ in range(args.repeats + 1):  # the first call compiles
    w = time.perf_counter()
    m = retrieval_metrics(image, text, mapping)
    walls.append(time.perf_counter() - w)
  record = {
    "benchmark": f"retrieval_metrics, {n} images x {n * per} captions, D={d}, float32",
    "device": str(jax.devices()[0]),
    "first_call_s": walls[0],
    "wall_s": {"min": min(walls[1:]), "median": statistics.median(walls[1:])},
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "full_similarity_mib": n * n * per * 4 / 2**20,
    "metrics": m,
    "load_average": _load_average(),
    "command": "python benchmarks/mir_bench.py --retrieval",
  }
  print(
    f"retrieval {n} x {n * per} (D={d}) on {record['device']}: "
    f"{record['wall_s']['min']:.2f} s (first call {walls[0]:.2f} s), peak RSS "
    f"{record['peak_rss_mib']:.0f} MiB; the full matrix would be "
    f"{record['full_similarity_mib']:.0f} MiB"
  )
  _write_json(str(ROOT / "benchmarks" / "results" / "mir_retrieval_coco.json"), record)
  return 0


def _write_json(path: str, record: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".json.tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp_path, path)
  print(f"wrote {path}")


def _load_average() -> list[float]:
  return list(os.getloadavg())


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ek100"))
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--official-repeats", type=int, default=1)
  p.add_argument("--threads", type=int, default=None, help="mmts_jax threads (default: CPUs)")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mir_ek100_full.json"))
  p.add_argument("--retrieval", action="store_true", help="time retrieval_metrics instead")
  p.add_argument("--images", type=int, default=5000)
  p.add_argument("--dim", type=int, default=256)
  p.add_argument("--worker", choices=["mmts_jax", "official"], help=argparse.SUPPRESS)
  p.add_argument("--tmp", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    _worker(args)
    return 0
  if args.retrieval:
    return _retrieval_bench(args)

  from mmts_jax.eval import ek100_relevancy

  t = time.perf_counter()
  rel = ek100_relevancy(args.data)
  build_s = time.perf_counter() - t
  sim = np.random.default_rng(0).standard_normal(rel.shape).astype(np.float32)
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    np.save(os.path.join(tmp, "similarity.npy"), sim)
    np.save(os.path.join(tmp, "relevancy.npy"), rel)
    del sim
    for impl, repeats in (("mmts_jax", args.repeats), ("official", args.official_repeats)):
      cmd = [sys.executable, __file__, "--worker", impl, "--tmp", tmp, "--repeats", str(repeats)]
      if args.threads:
        cmd += ["--threads", str(args.threads)]
      load = _load_average()
      out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
      results[impl] = json.loads(out.strip().splitlines()[-1]) | {"load_average_before": load}
      r = results[impl]
      print(
        f"{impl:>9}: wall {r['wall_s']['min']:.2f} s (median {r['wall_s']['median']:.2f}), "
        f"cpu {r['cpu_s']['min']:.2f} s, peak RSS {r['peak_rss_mib']:.0f} MiB "
        f"({r['peak_rss_above_inputs_mib']:.0f} above inputs), traced peak "
        f"{r['tracemalloc_peak_mib']:.0f} MiB, load {load[0]:.1f}"
      )
  diff = max(
    abs(a - b)
    for name in ("mAP", "nDCG")
    for a, b in zip(
      results["mmts_jax"]["metrics"][name], results["official"]["metrics"][name], strict=True
    )
  )
  for name in ("mAP", "nDCG"):
    v = results["mmts_jax"]["metrics"][name]
    print(f"{name:>5} (v2t / t2v / avg, %): " + " / ".join(f"{100 * x:.2f}" for x in v))
  print(
    f"max |mmts_jax - official| = {diff:.2e}; speed-up (wall, min) "
    f"{results['official']['wall_s']['min'] / results['mmts_jax']['wall_s']['min']:.1f}x, "
    f"(cpu) {results['official']['cpu_s']['min'] / results['mmts_jax']['cpu_s']['min']:.1f}x"
  )
  record = {
    "benchmark": "EK-100 MIR mAP + nDCG, both directions, whole validation split",
    "shape": list(rel.shape),
    "similarity": "standard normal float32, seed 0",
    "relevancy_build_s": build_s,
    "max_abs_diff": diff,
    "results": results,
    "host": {
      "machine": platform.machine(),
      "cpus": os.cpu_count(),
      "python": platform.python_version(),
      "numpy": np.__version__,
    },
    "command": "python benchmarks/mir_bench.py " + " ".join(argv or sys.argv[1:]),
  }
  _write_json(args.out, record)
  return 0


if __name__ == "__main__":
  sys.exit(main())
