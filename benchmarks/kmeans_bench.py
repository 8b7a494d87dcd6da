"""K-Means time and inertia: JAX on the local devices vs scikit-learn on the host, one run, the
same data, k=200, one greedy k-means++ init each, the same `tol`.

    python benchmarks/kmeans_bench.py --out benchmarks/results            # N: 1M on GPU, 100k CPU
    python benchmarks/kmeans_bench.py --out DIR --n 100000 --embeddings x.npy

Data: a long-tailed mixture of 2,000 overlapping Gaussian clusters on the unit sphere in 384-d
(cluster weights ~ 1/rank, like caption embeddings: a continuum with dense heads), generated
with a fixed seed; or `--embeddings` (rows are cycled/truncated to `--n`). The JAX time is the
second, compiled call; the first call's time (with compilation) is reported too.
Writes `kmeans_<platform>_<n>.json` under `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing mmts_jax (the GPU machine)


def long_tail_mixture(
  n: int, d: int, clusters: int = 2000, seed: int = 0, noise: float = 0.35
) -> np.ndarray:
  """`(n, d)` float32 unit vectors from a Zipf-weighted mixture of Gaussian clusters."""
  rng = np.random.default_rng(seed)
  centers = rng.standard_normal((clusters, d), dtype=np.float32)
  centers /= np.linalg.norm(centers, axis=1, keepdims=True)
  weights = 1.0 / np.arange(1, clusters + 1)
  labels = rng.choice(clusters, size=n, p=weights / weights.sum())
  x = np.empty((n, d), np.float32)
  for start in range(0, n, 262144):  # in blocks: bounded temporary memory
    stop = min(n, start + 262144)
    block = rng.standard_normal((stop - start, d), dtype=np.float32)
    block *= noise / np.sqrt(d)
    block += centers[labels[start:stop]]
    block /= np.linalg.norm(block, axis=1, keepdims=True)
    x[start:stop] = block
  return x


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument(
    "--n", type=int, default=0, help="samples (default 1M on an accelerator, 100k on CPU)"
  )
  p.add_argument("--d", type=int, default=384)
  p.add_argument("--k", type=int, default=200)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--embeddings", help=".npy embeddings instead of the synthetic mixture")
  p.add_argument("--skip-sklearn", action="store_true")
  p.add_argument("--precision", default="highest")
  args = p.parse_args(argv)

  import jax

  from mmts_jax.clusters.kmeans import kmeans_jax, kmeans_sklearn

  backend = jax.default_backend()
  n = args.n or (1_000_000 if backend != "cpu" else 100_000)
  t = time.perf_counter()
  if args.embeddings:
    src = np.load(args.embeddings, mmap_mode="r")
    x = np.ascontiguousarray(src[np.arange(n) % src.shape[0]], np.float32)
  else:
    x = long_tail_mixture(n, args.d, seed=args.seed)
  print(f"data {x.shape} in {time.perf_counter() - t:.1f}s; devices: {jax.devices()}", flush=True)

  t = time.perf_counter()
  first = kmeans_jax(x, args.k, seed=args.seed, precision=args.precision)
  jax_first_s = time.perf_counter() - t
  t = time.perf_counter()
  res = kmeans_jax(x, args.k, seed=args.seed, precision=args.precision)
  jax_s = time.perf_counter() - t
  print(
    f"jax: {jax_s:.2f}s (first call {jax_first_s:.2f}s), inertia {res.inertia:.6g}, "
    f"{res.n_iter} iterations",
    flush=True,
  )
  result = {
    "benchmark": f"K-Means k={args.k}, one k-means++ init, tol 1e-4",
    "n": n,
    "d": int(x.shape[1]),
    "k": args.k,
    "seed": args.seed,
    "data": args.embeddings or "long-tail mixture of 2000 clusters on the unit sphere",
    "platform": backend,
    "device": getattr(jax.devices()[0], "device_kind", backend),
    "num_devices": jax.device_count(),
    "host": platform.node(),
    "cpu_count": os.cpu_count(),
    "load_avg_1m": os.getloadavg()[0],
    "jax": jax.__version__,
    "precision": args.precision,
    "jax_seconds": jax_s,
    "jax_first_call_seconds": jax_first_s,
    "jax_inertia": res.inertia,
    "jax_iterations": res.n_iter,
    "jax_first_inertia": first.inertia,
  }
  if not args.skip_sklearn:
    import sklearn
    from threadpoolctl import threadpool_info

    t = time.perf_counter()
    ref = kmeans_sklearn(x, args.k, seed=args.seed)
    sk_s = time.perf_counter() - t
    print(f"sklearn: {sk_s:.2f}s, inertia {ref.inertia:.6g}, {ref.n_iter} iterations", flush=True)
    result.update(
      sklearn=sklearn.__version__,
      sklearn_seconds=sk_s,
      sklearn_inertia=ref.inertia,
      sklearn_iterations=ref.n_iter,
      sklearn_threads=max((i.get("num_threads", 0) for i in threadpool_info()), default=None),
      speedup_vs_sklearn=sk_s / jax_s,
      inertia_ratio_jax_over_sklearn=res.inertia / ref.inertia,
      seconds_per_iteration_jax=jax_s / res.n_iter,
      seconds_per_iteration_sklearn=sk_s / ref.n_iter,
    )
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"kmeans_{backend}_{n}.json")
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=1)
  os.replace(path + ".tmp", path)
  print(
    json.dumps(
      {
        k: v
        for k, v in result.items()
        if k
        in (
          "n",
          "device",
          "jax_seconds",
          "sklearn_seconds",
          "speedup_vs_sklearn",
          "inertia_ratio_jax_over_sklearn",
        )
      }
    )
  )
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
