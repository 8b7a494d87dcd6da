"""The card's bf16 matrix-product rate: C = A B with A, B (N, N) bfloat16 (PyTorch / cuBLAS),
2 N^3 FLOP per product, mean of `--reps` timed products after 3 warm-ups (CUDA events).

  python benchmarks/matmul_rate.py            # one JSON line: {"bf16_tflops": ...}

The train-step table divides each side's model FLOP rate by this number.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--n", type=int, default=8192)
  p.add_argument("--reps", type=int, default=20)
  args = p.parse_args(argv)
  if args.n <= 0 or args.reps <= 0:
    p.error(f"--n and --reps must be positive, got {args.n}, {args.reps}")
  import torch

  a = torch.randn(args.n, args.n, device="cuda", dtype=torch.bfloat16)
  b = torch.randn(args.n, args.n, device="cuda", dtype=torch.bfloat16)
  for _ in range(3):
    a @ b
  start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
  torch.cuda.synchronize()
  start.record()
  for _ in range(args.reps):
    a @ b
  end.record()
  torch.cuda.synchronize()
  seconds = start.elapsed_time(end) / 1e3 / args.reps
  print(
    json.dumps(
      {
        "n": args.n,
        "reps": args.reps,
        "device": torch.cuda.get_device_name(),
        "bf16_tflops": 2 * args.n**3 / seconds / 1e12,
      }
    )
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
