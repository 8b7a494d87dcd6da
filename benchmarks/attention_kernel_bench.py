"""`pallas_attention`'s fused short-sequence kernels alone at the CLIP towers' attention shapes,
beside cuDNN's flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`) and
XLA's softmax attention: forward and forward+backward times and the error of each against a
float32 reference on the same bfloat16 inputs, plus a small sweep of `AttentionConfig`s.

  python benchmarks/attention_kernel_bench.py --out DIR                     # one GPU
  python benchmarks/attention_kernel_bench.py --out /tmp/a --interpret --small --reps 1 \\
      --calls 1      # CPU smoke test (one tiny causal shape with lengths)

Shapes `(B, L, H, D)` (the towers after `even_length`): the ViT-B/16 image tower (256, 198, 12,
64) with lengths 197 (the padding token hidden), the CLIP text tower (256, 78, 8, 64), causal,
with lengths drawn uniformly in [5, 78] (seed 0). Errors: the largest absolute difference from
XLA's attention on float32 copies of the inputs (HIGHEST precision), divided by the reference's
largest magnitude, per output (o, dq, dk, dv; the cotangent is random). Times: median over
`--reps` timed batches of `--calls` (10) jitted calls each, after a warm-up. Writes DIR/
attention_kernel_bench.json.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mmts_jax import atomic_io  # noqa: E402

# name -> (B, L, H, D, causal, lengths: "full-1" (all L - 1) or "random")
SHAPES = {
  "vit_b16": (256, 198, 12, 64, False, "full-1"),
  "text_b16": (256, 78, 8, 64, True, "random"),
}
SMALL = {"tiny_text": (2, 10, 2, 16, True, "random")}
SWEEP = [  # AttentionConfig fields; the first is the default
  {},
  {"fast_math": False},
  {"block_q": 32},
  {"block_q": 128, "num_warps": 8},
  {"bwd_block_q": 32, "bwd_block_k": 32},
  {"bwd_block_k": 128, "bwd_num_warps": 8},
  {"bwd_block_q": 128, "bwd_num_warps": 8},
]


def _time(fn, args, reps: int, calls: int = 10) -> float:
  """Median milliseconds per call over `reps` batches of `calls` calls."""
  import jax

  jax.block_until_ready(fn(*args))
  out = []
  for _ in range(reps):
    t = time.perf_counter()
    for _ in range(calls):
      r = fn(*args)
    jax.block_until_ready(r)
    out.append((time.perf_counter() - t) / calls * 1e3)
  return statistics.median(out)


def _inputs(b, length, h, d, lengths_kind):
  import jax
  import jax.numpy as jnp
  import numpy as np

  q, k, v, g = jax.random.normal(jax.random.PRNGKey(0), (4, b, length, h, d), jnp.bfloat16)
  if lengths_kind == "full-1":
    n = np.full(b, length - 1)
  else:
    n = np.random.default_rng(0).integers(5, length + 1, size=b)
  return q, k, v, g, jnp.asarray(n, jnp.int32)


def _fns(side: str, causal: bool):
  """(forward, forward+backward) jitted functions of (q, k, v, g, lengths) for one side."""
  import jax

  from mmts_jax.models import pallas_attention as pa

  def attn(q, k, v, n):
    if side == "pallas":
      return pa.pallas_attention(q, k, v, causal=causal, lengths=n)
    return jax.nn.dot_product_attention(
      q,
      k,
      v,
      is_causal=causal,
      query_seq_lengths=n,
      key_value_seq_lengths=n,
      implementation=side,
    )

  def both(q, k, v, g, n):
    o, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, n), q, k, v)
    return (o, *vjp(g))

  return jax.jit(lambda q, k, v, g, n: attn(q, k, v, n)), jax.jit(both)


def _reference(q, k, v, g, n, causal):
  import jax
  import jax.numpy as jnp

  f32 = [a.astype(jnp.float32) for a in (q, k, v, g)]
  with jax.default_matmul_precision("highest"):
    return _fns("xla", causal)[1](*f32, n)


def _errors(outs, ref) -> dict:
  import numpy as np

  err = {}
  for name, a, r in zip(("o", "dq", "dk", "dv"), outs, ref, strict=True):
    a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
    err[name] = float(np.max(np.abs(a - r)) / max(np.max(np.abs(r)), 1e-30))
  return err


def _measure(side, causal, inputs, ref, reps, calls) -> dict:
  fwd, both = _fns(side, causal)
  q, k, v, g, n = inputs
  return {
    "rel_err": _errors(both(q, k, v, g, n), ref),
    "fwd_ms": _time(fwd, inputs, reps, calls),
    "fwd_bwd_ms": _time(both, inputs, reps, calls),
  }


def _case(shape, reps, calls, sides, sweep) -> dict:
  from mmts_jax.models import pallas_attention as pa

  b, length, h, d, causal, lengths_kind = shape
  inputs = _inputs(b, length, h, d, lengths_kind)
  ref = _reference(*inputs, causal)
  case = {"shape": [b, length, h, d], "causal": causal, "lengths": lengths_kind}
  for side in sides:
    try:
      case[side] = _measure(side, causal, inputs, ref, reps, calls)
    except Exception as e:  # a side that refuses the shape is recorded, not fatal
      case[side] = {"error": f"{type(e).__name__}: {e}"[:500]}
  rows = []
  for fields in sweep:
    pa.set_attention_config(pa.AttentionConfig(**fields))
    try:
      rows.append({"config": fields, **_measure("pallas", causal, inputs, ref, reps, calls)})
    except Exception as e:
      rows.append({"config": fields, "error": f"{type(e).__name__}: {e}"[:500]})
    finally:
      pa.set_attention_config(None)
  if rows:
    case["sweep"] = rows
  return case


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--calls", type=int, default=10, help="calls per timed batch")
  p.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU smoke)")
  p.add_argument("--small", action="store_true", help="tiny shapes, no sweep (smoke test)")
  args = p.parse_args(argv)
  if args.reps < 1 or args.calls < 1:
    p.error(f"--reps and --calls must be >= 1, got {args.reps}, {args.calls}")
  import jax

  from mmts_jax.models import pallas_attention as pa

  if not args.interpret and jax.default_backend() != "gpu":
    p.error(f"the kernels run on GPUs; backend is {jax.default_backend()!r} (use --interpret)")
  if args.interpret:
    pa.set_pallas_attention("interpret")
  os.makedirs(args.out, exist_ok=True)
  sides = ("pallas", "xla") if args.interpret else ("pallas", "cudnn", "xla")
  result: dict = {"device": str(jax.devices()[0]), "jax": jax.__version__, "cases": {}}
  path = os.path.join(args.out, "attention_kernel_bench.json")
  for name, shape in (SMALL if args.small else SHAPES).items():
    case = _case(shape, args.reps, args.calls, sides, [] if args.small else SWEEP)
    result["cases"][name] = case
    atomic_io.atomic_write_json(path, result, indent=1)
    line = ", ".join(
      f"{s} fwd {case[s]['fwd_ms']:.3f} fwd+bwd {case[s]['fwd_bwd_ms']:.3f} ms err "
      f"{max(case[s]['rel_err'].values()):.2e}"
      if "fwd_ms" in case[s]
      else f"{s} {case[s]['error'][:80]}"
      for s in sides
    )
    print(f"{name}: {line}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
