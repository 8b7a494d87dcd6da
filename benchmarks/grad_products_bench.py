"""The backward's two gradient products of one tile, `dS Y_c` and `dS^T X_r`, in each operand
layout XLA can be handed, timed side by side on one GPU.

  PYTHONPATH=$PWD python3 benchmarks/grad_products_bench.py --dtype f32 --out products.json

Hopper's tf32 `wgmma` reads both operands K-major only (16-bit types may also be MN-major), so
for float32 the layout of what the blockwise backward hands cuBLAS decides which kernel it gets.
`dS` is `(rows, cols)` row-major, as the dS program writes it; `X_r` `(rows, D)` and `Y_c`
`(cols, D)` row-major are MN-major in both products (the contraction runs over their rows).
The forms (`FORMS`): the products as the loss writes them ("plain"), and with the embeddings'
blocks transposed first ("xt", "yt", "both": `(D, rows)` arrays, materialised behind an
`optimization_barrier` so XLA cannot fold the transpose back into the dot). Each form's time is
the median of `--reps` calls of `--tiles` tiles in one executable (`lax.map`, launches
amortised), per tile; each form's device kernels (names and ms per tile) come from one
`jax.profiler` trace, and each form's products are checked against the plain ones.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loss_bench import write_json  # noqa: E402

FORMS = ("plain", "xt", "yt", "both")


def products(form: str):
  """`(ds, xr, yc) -> (dS Y_c, dS^T X_r)` in `form` (see the module docstring)."""
  from jax import lax

  def dot(a, b, dims):
    return lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=a.dtype)

  def fn(ds, xr, yc):
    if form in ("yt", "both"):
      yct = lax.optimization_barrier(yc.T)  # (D, cols): K-major for dS Y_c
      dx = dot(ds, yct, ((1,), (1,)))
    else:
      dx = dot(ds, yc, ((1,), (0,)))
    if form in ("xt", "both"):
      xrt = lax.optimization_barrier(xr.T)  # (D, rows): K-major for dS^T X_r
      dy = dot(ds, xrt, ((0,), (1,)))
    else:
      dy = dot(ds, xr, ((0,), (0,)))
    return dx, dy

  return fn


def run(rows: int, cols: int, d: int, dtype: str, tiles: int, reps: int, out: str) -> dict:
  import jax
  import jax.numpy as jnp
  from jax import lax
  from profile_attribution import device_kernel_times

  dt = {"f32": jnp.float32, "bf16": jnp.bfloat16}[dtype]
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  ds = (jax.random.normal(k[0], (rows, cols)) * 1e-4).astype(dt)
  xr = jax.random.normal(k[1], (rows, d)).astype(dt)
  yc = jax.random.normal(k[2], (cols, d)).astype(dt)
  flop = 2 * 2 * rows * cols * d
  result = {
    "jax": jax.__version__,
    "device": jax.devices()[0].device_kind,
    "argv": sys.argv,
    "shape": {"rows": rows, "cols": cols, "d": d, "dtype": dtype, "tiles": tiles},
  }
  ref = None
  for form in FORMS:
    fn = products(form)
    # `tiles` tiles per call, each a different scaling of dS so XLA cannot share the work.
    many = jax.jit(
      lambda ds, xr, yc, fn=fn: lax.map(lambda s: fn(ds * s, xr, yc), jnp.arange(1, tiles + 1))
    )
    got = jax.block_until_ready(jax.jit(fn)(ds, xr, yc))
    if ref is None:
      ref = got
    err = [
      float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32))))
      / float(jnp.max(jnp.abs(r.astype(jnp.float32))))
      for g, r in zip(got, ref, strict=True)
    ]
    jax.block_until_ready(many(ds, xr, yc))
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(many(ds, xr, yc))
      times.append((time.perf_counter() - t0) * 1e3 / tiles)
    with tempfile.TemporaryDirectory() as tmp:
      jax.profiler.start_trace(tmp)
      jax.block_until_ready(many(ds, xr, yc))
      jax.profiler.stop_trace()
      lines = device_kernel_times(tmp) or {}
    kernels = {}
    for total, count in lines.values():
      for name, ns in total.items():
        kernels[name] = {"ms_per_tile": round(ns / 1e6 / tiles, 4), "launches": count[name]}
    med = statistics.median(times)
    result[form] = {
      "ms_per_tile": round(med, 4),
      "range": [round(min(times), 4), round(max(times), 4)],
      "tflops": round(flop / med / 1e9, 1),
      "rel_err_vs_plain": err,
      "kernels": dict(sorted(kernels.items(), key=lambda kv: -kv[1]["ms_per_tile"])[:6]),
    }
    print(form, {k: v for k, v in result[form].items() if k != "kernels"}, flush=True)
    for name, v in result[form]["kernels"].items():
      print("   ", name[:100], v, flush=True)
    write_json(out, result)
  return result


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
  ap.add_argument("--rows", type=int, default=16384)
  ap.add_argument("--cols", type=int, default=8192)
  ap.add_argument("--d", type=int, default=512)
  ap.add_argument("--dtype", choices=("f32", "bf16"), default="f32")
  ap.add_argument("--tiles", type=int, default=8)
  ap.add_argument("--reps", type=int, default=9)
  ap.add_argument("--out", default="grad_products.json")
  a = ap.parse_args(argv)
  run(a.rows, a.cols, a.d, a.dtype, a.tiles, a.reps, a.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
