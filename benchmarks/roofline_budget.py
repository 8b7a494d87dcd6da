"""Where one fused loss call's time goes, against issue 13's 70% targets, from committed profiles.

  python benchmarks/roofline_budget.py \\
      --profile benchmarks/results/loss_h200_session20/loss_profile12_32k.json \\
      --profile benchmarks/results/loss_h200_session20/loss_profile13_131k.json \\
      --sweep benchmarks/results/loss_h200_session20/loss_h200_session20.json \\
      --out budget.json

Reads `profile_tiles.py loss` outputs (kernels per call, the stream's idle time, each timed
call's host dispatch and wait) and the matmul rates of one `loss_bench.py` sweep; runs nothing
on a GPU. Per profiled case, a call splits into

- the tile programs (Mosaic GPU kernels): the forward's and dS's similarity products, 4 B^2 D
  of the 8 B^2 D FLOP, each with its epilogue;
- the gradient products `dS Y`, `dS^T X` (cuBLAS, or XLA's own GEMM): the other 4 B^2 D;
- XLA's other kernels around the tiles (glue), the stream's idle time between kernels, and the
  host's dispatch before the first kernel and wait after the last (medians over timed calls).

For each target (issue 13's figure, and 70% of the sweep's measured rate) it gives the time
left to the tile programs if every other part stays as measured, and the fraction of the rate
the programs would then have to reach on their 4 B^2 D (`programs_rate_needed`), beside the
fraction they reach now; `..._if_no_overhead` assumes glue, idle and host time all gone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loss_bench import write_json  # noqa: E402

# Issue 13's targets on one H200 (ms): 70% of the rates it measured (bf16 739, tf32 395).
ISSUE_TARGETS_MS = {
  (32768, "bf16"): 8.6,
  (32768, "f32"): 16.0,
  (131072, "bf16"): 136.0,
  (131072, "f32"): 254.0,
  (1048576, "bf16"): 8700.0,
}
_PRODUCT_MARKERS = ("nvjet", "xmma", "gemm", "cutlass")
# The feature width every `profile_tiles.py loss` case runs at (`mosaic_tiles_bench.compiled`).
D = 512


def kernel_part(name: str) -> str:
  """Which part of the call a device kernel belongs to: "programs", "products" or "glue".

  Example:
    >>> kernel_part("body_mosaic_gpu_kernel"), kernel_part("nvjet_sm90_tss_128x128_64x6")
    ('programs', 'products')
    >>> kernel_part("gemm_fusion_dot_general_5"), kernel_part("loop_dynamic_slice_fusion_3")
    ('products', 'glue')
  """
  if "mosaic_gpu" in name:
    return "programs"
  if any(m in name for m in _PRODUCT_MARKERS):
    return "products"
  return "glue"


def budget(
  parts_ms: dict[str, float], b: int, d: int, rate_tflops: float, target_ms: float
) -> dict[str, float]:
  """The time `target_ms` leaves the tile programs, the other parts as measured, and the
  fraction of `rate_tflops` the programs then need on their 4 B^2 D FLOP (and with no glue,
  idle or host time). `parts_ms`: "programs", "products", "glue", "idle", "host".

  Example (B = 1,024, D = 512: 4 B^2 D = 2.15 GFLOP, 2.15 ms at 1 TFLOP/s):
    >>> r = budget(dict(programs=4.0, products=2.5, glue=1.0, idle=0.5, host=1.0),
    ...            1024, 512, 1.0, 10.0)
    >>> r["programs_ms_left"], round(r["programs_rate_now"], 4), round(r["programs_rate_needed"], 4)
    (5.0, 0.5369, 0.4295)
    >>> r["programs_ms_left_if_no_overhead"], round(r["programs_rate_needed_if_no_overhead"], 4)
    (7.5, 0.2863)
  """
  ideal_ms = 4 * b * b * d / (rate_tflops * 1e12) * 1e3  # the programs' FLOP at the rate
  overhead = parts_ms["glue"] + parts_ms["idle"] + parts_ms["host"]
  left = target_ms - parts_ms["products"] - overhead
  bare = target_ms - parts_ms["products"]

  def need(ms):
    return ideal_ms / ms if ms > 0 else float("inf")

  return {
    "target_ms": target_ms,
    "programs_ms_left": round(left, 3),
    "programs_rate_now": ideal_ms / parts_ms["programs"],
    "programs_rate_needed": need(left),
    "programs_ms_left_if_no_overhead": round(bare, 3),
    "programs_rate_needed_if_no_overhead": need(bare),
  }


def case_parts(case: dict[str, Any]) -> dict[str, float]:
  """One `profile_tiles.py loss` case -> the call's parts in ms (host: the median over the
  timed calls of dispatch + wait; idle: the stream's idle time per call)."""
  parts = {"programs": 0.0, "products": 0.0, "glue": 0.0}
  for k in case["kernels"]:
    parts[kernel_part(k["name"])] += k["ms_per_call"]
  (gaps,) = case["gaps"].values()  # one compute stream
  parts["idle"] = gaps["idle_ms_per_call"]
  host = [(c["dispatch_us"] + c["tail_us"]) / 1e3 for c in case["calls"]]
  parts["host"] = statistics.median(host)
  return {k: round(v, 3) for k, v in parts.items()}


def rates(sweep: dict[str, Any]) -> dict[str, float]:
  """The sweep's measured matmul rates (TFLOP/s) by dtype: bf16, and f32 at its default
  precision (tf32)."""
  for row in sweep["results"]:
    if row.get("mode") == "gemm_torch":
      return {"bf16": row["bf16_tflops"], "f32": row["tf32_tflops"]}
  raise ValueError("the sweep json has no gemm_torch row (the run's matmul rates)")


def analyse(profiles: list[dict[str, Any]], sweep: dict[str, Any]) -> list[dict[str, Any]]:
  rate = rates(sweep)
  measured = {
    (r["B"], r["dtype"], r["loss"]): r["ms"]
    for r in sweep["results"]
    if r.get("impl") == "blockwise" and "ms" in r
  }
  rows = []
  for prof in profiles:
    argv = prof["argv"]
    b = int(argv[argv.index("--size") + 1])
    for key, case in prof.items():
      if not (isinstance(case, dict) and "kernels" in case):
        continue
      loss, dtype = key.split(":")[:2]
      parts = case_parts(case)
      row = {"B": b, "D": D, "loss": loss, "dtype": dtype, "parts_ms": parts}
      row["call_ms"] = round(sum(parts.values()), 3)
      row["sweep_ms"] = measured.get((b, dtype, loss))
      ideal = 8 * b * b * D / (rate[dtype] * 1e12) * 1e3
      row["fraction_of_rate"] = round(ideal / row["call_ms"], 3)
      row["products_rate"] = round(ideal / 2 / parts["products"], 3)
      targets = {"run_70pct": ideal / 0.7}
      if (b, dtype) in ISSUE_TARGETS_MS:
        targets["issue"] = ISSUE_TARGETS_MS[(b, dtype)]
      row["budgets"] = {
        name: {k: round(v, 3) for k, v in budget(parts, b, D, rate[dtype], t).items()}
        for name, t in targets.items()
      }
      rows.append(row)
  return rows


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--profile", action="append", required=True, help="profile_tiles.py loss json")
  ap.add_argument("--sweep", required=True, help="loss_bench.py sweep json (its matmul rates)")
  ap.add_argument("--out", help="write the rows here (json)")
  args = ap.parse_args(argv)
  profiles = []
  for path in args.profile:
    with open(path) as f:
      profiles.append(json.load(f))
  with open(args.sweep) as f:
    sweep = json.load(f)
  rows = analyse(profiles, sweep)
  if args.out:
    write_json(
      args.out, {"argv": sys.argv, "profiles": args.profile, "sweep": args.sweep, "rows": rows}
    )
  for row in rows:
    print(json.dumps(row))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
