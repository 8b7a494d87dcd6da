"""Input throughput of the two trainer sources over one features file (host only, no device).

  python benchmarks/feature_source_bench.py --features data/ek100/train_features.npz \
      [--batch-size 256] [--batches 200] [--out benchmarks/results/feature_source_cpu.json]

`mmts_jax.data.trainer_source:features` (grain, record by record) against
`mmts_jax.projects.ek100_features.feature_source:in_memory` (one fancy-index per batch).
Reports examples/s of
wall time and of process CPU time (the latter is robust on a shared host), after one warm-up batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import ml_collections


def _measure(factory, path: str, batch_size: int, batches: int) -> dict:
  src = factory(ml_collections.ConfigDict({"path": path}), global_batch_size=batch_size, seed=0)
  it = src.iterate(0)
  next(it)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  n = batches * batch_size
  return {
    "examples_per_sec_wall": n / wall,
    "examples_per_sec_cpu": n / max(cpu, 1e-9),
    "batches": batches,
    "batch_size": batch_size,
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--features", required=True)
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--batches", type=int, default=200)
  p.add_argument("--out", default="benchmarks/results/feature_source_cpu.json")
  args = p.parse_args()
  from mmts_jax.data import trainer_source
  from mmts_jax.projects.ek100_features import feature_source

  results = {
    "host": {
      "cpus": os.cpu_count(),
      "machine": platform.machine(),
      "loadavg_1m": os.getloadavg()[0],
    },
    "features": os.path.basename(args.features),
  }
  for name, factory in (
    ("grain_features", trainer_source.features),
    ("in_memory", feature_source.in_memory),
  ):
    results[name] = _measure(factory, args.features, args.batch_size, args.batches)
    print(
      f"{name:<16} {results[name]['examples_per_sec_wall']:>10.0f} examples/s wall "
      f"{results[name]['examples_per_sec_cpu']:>10.0f} examples/s CPU"
    )
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.out)), suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(results, f, indent=2)
  os.replace(tmp, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
