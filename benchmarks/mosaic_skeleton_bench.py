"""How fast the Mosaic GPU tile kernels' skeleton runs with light epilogues, beside cuBLAS.

  python benchmarks/mosaic_skeleton_bench.py --out skeleton.json [--n 32768] [--rounds 3]

The InfoNCE forward (`_mosaic_tiles.nce_stats`) runs at about half the card's matmul rate. This
separates the two things it could be waiting for: the skeleton (the persistent walk, TMA loads
into the shared-memory ring, wgmma; `_mosaic_tiles._tiled_kernel`) and the epilogue. On one
`(n, n)` bf16 tile (D = 512; one launch, no sweep around it) it times, in alternating rounds:

- `max_rows:<variant>`: the skeleton with the lightest epilogue that still reads every product
  (each row's maximum; the column outputs are a copy of a column vector), per skeleton variant
  of `SKELETONS` (fields of `MosaicConfig` replaced in the forward's default);
- `nce_rows`: the InfoNCE row statistics alone (the maximum and the sum of exponentials),
  default skeleton, no column part;
- `nce_fwd`, `nce_ds`: the loss's forward and dS programs as the loss runs them;
- `cublas_max_rows`: XLA's `max(x @ y^T, axis=1)` (a cuBLAS product to float32, then a
  reduction), and `cublas_bf16`: `x @ y^T` to bf16;
and the card's matmul rate (XLA, 8,192^3) in the same process. Each row gives its median and
all calls' ms and the fraction of that rate (2 n^2 D FLOP per program; the dS program's
products are one such matmul too).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loss_bench import alternating_ms, write_json  # noqa: E402
from mosaic_tiles_bench import matmul_tflops  # noqa: E402

# Skeleton variants: `MosaicConfig` fields replaced in the bf16 forward's default. The light
# epilogue has no column reductions, so `col_chunk` is 0 in every one.
SKELETONS = {
  "default": {},
  "s4": {"stages": 4},
  "lag_s4": {"stages": 4, "lag": True},
  "m64_s5": {"tile_m": 64, "stages": 5},
  "n256_m64": {"tile_m": 64, "tile_n": 256},
  "one_wg_2cta": {"wgs": 1, "ctas_per_sm": 2, "stages": 2},
  # One compute warpgroup per SM, so its products never share the tensor cores: how fast one
  # warpgroup's 128 x 128 products run alone, the rate the ping-pong walk needs from each.
  "one_wg_s4": {"wgs": 1, "stages": 4},
  "one_wg_s6": {"wgs": 1, "stages": 6},
  # The ping-pong walk (each warpgroup its own ring, rows and columns unshared: 64 FLOP per
  # byte read where the shared ring has 85); with a light epilogue both warpgroups are mostly
  # in their products at once, so this asks whether the walk can feed them.
  "pingpong": {"pingpong": True, "stages": 2},
  "pingpong_s3": {"pingpong": True, "stages": 3},
}
# results/loss_h200_session17/skeleton2.json also has "cluster2" ({"cluster": 2}) and
# "cluster2_s4" ({"cluster": 2, "stages": 4}): two-CTA clusters multicasting the rows, an option
# of branch exp/cluster-multicast (commit 0b77386) that was no faster and is not on main.


def programs(n: int, d: int = 512):
  """`({name: (fn, variant or None)}, x, y)` on one `(n, n)` bf16 tile of unit rows."""
  import jax
  import jax.numpy as jnp

  from mmts_jax.losses import _mosaic_tiles as mt

  k = jax.random.split(jax.random.PRNGKey(3), 2)

  def unit(key):
    v = jax.random.normal(key, (n, d))
    return (v / jnp.linalg.norm(v, axis=1, keepdims=True)).astype(jnp.bfloat16)

  x, y = unit(k[0]), unit(k[1])
  f32 = jnp.float32
  a = jnp.full((n,), 1.4426950408889634 / 0.05, f32)
  lse = jnp.full((n,), 30.0, f32)
  w = jnp.full((n,), 1e-4, f32)

  def max_rows(x, y):
    def terms(s, r, c):
      return mt._Terms(None, lambda: [jnp.max(s, 1)], lambda: [c[0]()])

    return mt._pass("fwd", x, y, [a], [a], terms, 1, False, False, None)

  def nce_rows(x, y):
    def terms(s, r, c):
      def rows():
        m = r[0]() * jnp.max(s, 1)
        e = jnp.exp2(s * mt._row(r[0](), s.shape) - mt._row(m, s.shape))
        return [m, jnp.sum(e, 1)]

      return mt._Terms(None, rows, lambda: [c[0](), c[0]()])

    return mt._pass("fwd", x, y, [a], [a], terms, 2, False, False, None)

  def nce_fwd(x, y):
    return mt.nce_stats(x, y, a, a)

  def nce_ds(x, y):
    return mt.nce_ds(x, y, a, a, lse, lse, w, w, need_sums=True, need_a=False)

  def cublas_max_rows(x, y):
    return jnp.max(jnp.dot(x, y.T, preferred_element_type=f32), axis=1)

  def cublas_bf16(x, y):
    return jnp.dot(x, y.T)

  progs = {f"max_rows:{v}": (max_rows, v) for v in SKELETONS}
  progs |= {"nce_rows": (nce_rows, "default"), "nce_fwd": (nce_fwd, None)}
  progs |= {"nce_ds": (nce_ds, None), "cublas_max_rows": (cublas_max_rows, None)}
  progs["cublas_bf16"] = (cublas_bf16, None)
  return progs, x, y


def compiled(fn, variant, x, y):
  """`fn` jitted and compiled with the forward's config set to skeleton `variant` (None: the
  defaults untouched), the config reset afterwards."""
  import jax
  import jax.numpy as jnp

  from mmts_jax.losses import _mosaic_tiles as mt

  if variant is not None:
    fields = {"col_chunk": 0, **SKELETONS[variant]}
    mt.set_config("fwd", mt.config("fwd", jnp.bfloat16)._replace(**fields), jnp.bfloat16)
  try:
    return jax.jit(fn).lower(x, y).compile()
  finally:
    mt.set_config("fwd", None, jnp.bfloat16)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--n", type=int, default=32768)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--rep", type=int, default=5)
  ap.add_argument("--only", default="", help="comma-separated program names (default: all)")
  args = ap.parse_args(argv)
  import jax

  result = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "argv": sys.argv}
  rate = matmul_tflops("bf16")
  result["matmul_bf16_tflops"] = round(rate, 1)
  progs, x, y = programs(args.n)
  only = {p for p in args.only.split(",") if p}
  calls, rows = {}, {}
  for name, (fn, variant) in progs.items():
    if only and name not in only:
      continue
    try:
      f = compiled(fn, variant, x, y)
      jax.block_until_ready(f(x, y))
      calls[name] = functools.partial(lambda f: jax.block_until_ready(f(x, y)), f)
      rows[name] = {"program": name}
    except Exception:
      rows[name] = {"program": name, "error": traceback.format_exc()[-2000:]}
    print(name, "error" in rows[name], flush=True)
  result["rows"] = list(rows.values())
  write_json(args.out, result)
  flop = 2 * args.n**2 * 512
  for name, (ms, all_ms) in alternating_ms(calls, args.rounds, args.rep).items():
    rows[name] |= {"ms": ms, "ms_all": all_ms, "tflops": round(flop / ms / 1e9, 1)}
    rows[name]["of_matmul_rate"] = round(flop / ms / 1e9 / rate, 3)
  result["rows"] = list(rows.values())
  result["n"], result["d"] = args.n, 512
  write_json(args.out, result)
  for row in result["rows"]:
    print(json.dumps({k: v for k, v in row.items() if k != "ms_all"})[:600], flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
