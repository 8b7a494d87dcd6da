"""The Pallas layer norm and bias+GELU kernels at the train step's shapes, on one GPU: their
error against a float32 reference beside the XLA form's (same bfloat16 inputs), their time
forward and forward+backward beside the XLA form's and PyTorch's, and a small sweep of block
sizes (`LayerNormConfig`, `GeluConfig`) on the ViT-B/16 shape.

  python benchmarks/pallas_kernels_bench.py --out DIR            # GPU; --torch adds PyTorch
  python benchmarks/pallas_kernels_bench.py --out /tmp/k --interpret --small   # CPU smoke test

Shapes (rows = batch 256 x tokens after `even_length`): ViT-B/16 (50688, 768) and its MLP
(50688, 3072), the text tower (19968, 512) / (19968, 2048), ViT-L/14 (66048, 1024) / (66048,
4096). Inputs bfloat16, scale / bias float32 (the towers' parameters). Errors: the largest
absolute difference from the float32 formula (`jax.vjp` of it on float32 copies of the same
inputs) divided by the reference's largest magnitude, per output. Times: median over `--reps`
timed batches of 10 jitted calls each, after a warm-up; `gbps` divides the bytes the pass must
move (read x, write y: 4 bytes per element forward; read x, g, write dx: 6 backward; the row
statistics and bias partials left out) by the time. Writes DIR/pallas_kernels_bench.json.
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

SHAPES = {
  "vit_b16": (50688, 768, 3072),
  "text_b16": (19968, 512, 2048),
  "vit_l14": (66048, 1024, 4096),
}
SMALL = {"tiny": (300, 96, 384)}
LN_SWEEP = [  # (rows_fwd, rows_bwd, programs_bwd, num_warps); the first was the default
  (16, 8, 528, 8),
  (8, 8, 528, 4),
  (4, 4, 1056, 4),
  (32, 16, 528, 8),
  (16, 8, 264, 8),
  (16, 4, 1056, 4),
]
GELU_SWEEP = [  # (bm, bn, steps, num_warps[, num_stages, fast_math]); the first is the default
  (16, 256, 8, 8),
  (16, 256, 8, 8, 2, False),  # the default blocks with libdevice exp2 and IEEE division
  (32, 256, 4, 8),
  (16, 512, 8, 8),
  (32, 128, 8, 4),
  (64, 256, 2, 8),
  (16, 256, 32, 8),
]


def _time(fn, args, reps: int) -> float:
  """Median milliseconds per call over `reps` batches of 10 calls."""
  import jax

  jax.block_until_ready(fn(*args))
  out = []
  for _ in range(reps):
    t = time.perf_counter()
    for _ in range(10):
      r = fn(*args)
    jax.block_until_ready(r)
    out.append((time.perf_counter() - t) / 10 * 1e3)
  return statistics.median(out)


def _rel(a, ref) -> float:
  import numpy as np

  a, ref = np.asarray(a, np.float32), np.asarray(ref, np.float32)
  return float(np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _ln_fns(kernel: str):
  import jax

  from mmts_jax.models.lean_layer_norm import layer_norm

  f = lambda x, s, b: layer_norm(x, s, b, 1e-6, x.dtype, kernel)

  def both(x, s, b, g):
    y, vjp = jax.vjp(f, x, s, b)
    return (y, *vjp(g))

  return jax.jit(f), jax.jit(both)


def _ln_reference(x, s, b, g):
  import jax
  import jax.numpy as jnp

  def f(x, s, b):
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-6) * s + b

  y, vjp = jax.vjp(f, x.astype(jnp.float32), s, b)
  return (y, *vjp(g.astype(jnp.float32)))


def _gelu_fns():
  import jax

  from mmts_jax.models.pallas_gelu import bias_gelu

  def both(h, b, g):
    y, vjp = jax.vjp(bias_gelu, h, b)
    return (y, *vjp(g))

  return jax.jit(bias_gelu), jax.jit(both)


def _gelu_reference(h, b, g):
  import jax
  import jax.numpy as jnp

  f = lambda h, b: jax.nn.gelu(h + b, approximate=True)
  y, vjp = jax.vjp(f, h.astype(jnp.float32), b)
  return (y, *vjp(g.astype(jnp.float32)))


def _errors(outs, ref, names) -> dict:
  return {n: _rel(o, r) for n, o, r in zip(names, outs, ref, strict=True)}


def _measure(make_fns, inputs, ref, names, moved_bytes, reps) -> dict:
  """One side: errors against `ref` and times of `make_fns()`'s forward (on `inputs[:-1]`, all
  but g) and forward+backward; `moved_bytes` = (forward, backward) bytes per call."""
  fwd, both = make_fns()
  t_f, t_b = _time(fwd, inputs[:-1], reps), _time(both, inputs, reps)
  return {
    "rel_err": _errors(both(*inputs), ref, names),
    "fwd_ms": t_f,
    "fwd_bwd_ms": t_b,
    "fwd_gbps": moved_bytes[0] / t_f / 1e6,
    "fwd_bwd_gbps": sum(moved_bytes) / t_b / 1e6,
  }


def _sweep(configs, set_config, make_fns, inputs, ref, names, reps) -> list:
  """`_measure` of the Pallas side under each block config (`set_config(cfg)`), reset after."""
  out = []
  for cfg in configs:
    try:
      set_config(cfg)
      r = _measure(make_fns, inputs, ref, names, (0, 0), reps)
      err = max(r["rel_err"].values())
      out.append(
        {"config": cfg, "fwd_ms": r["fwd_ms"], "fwd_bwd_ms": r["fwd_bwd_ms"], "max_rel_err": err}
      )
    except Exception as e:  # a block that does not compile is a result of the sweep
      out.append({"config": cfg, "error": f"{type(e).__name__}: {str(e)[:300]}"})
  set_config(None)
  return out


def _layer_norm_case(n, c, reps, sweep, interpret) -> dict:
  import jax
  import jax.numpy as jnp

  from mmts_jax.models import pallas_layer_norm as pln

  k = jax.random.split(jax.random.PRNGKey(0), 4)
  x = (3.0 * jax.random.normal(k[0], (n, c)) + 0.5).astype(jnp.bfloat16)
  s = 1.0 + 0.1 * jax.random.normal(k[1], (c,))
  b = 0.1 * jax.random.normal(k[2], (c,))
  g = jax.random.normal(k[3], (n, c)).astype(jnp.bfloat16)
  inputs, ref = (x, s, b, g), _ln_reference(x, s, b, g)
  names, moved = ("y", "dx", "dscale", "dbias"), (4 * n * c, 6 * n * c)
  pln.set_pallas_layer_norm("interpret" if interpret else None)
  out: dict = {"rows": n, "features": c}
  for kernel in ("xla", "pallas"):
    out[kernel] = _measure(lambda k=kernel: _ln_fns(k), inputs, ref, names, moved, reps)
  set_config = lambda cfg: pln.set_layer_norm_config(cfg and pln.LayerNormConfig(*cfg))
  out["sweep"] = _sweep(sweep, set_config, lambda: _ln_fns("pallas"), inputs, ref, names, reps)
  pln.set_pallas_layer_norm(None)
  return out


def _gelu_case(n, f, reps, sweep, interpret) -> dict:
  import jax
  import jax.numpy as jnp

  from mmts_jax.models import pallas_gelu as pg

  k = jax.random.split(jax.random.PRNGKey(1), 3)
  h = (2.0 * jax.random.normal(k[0], (n, f))).astype(jnp.bfloat16)
  b = 0.2 * jax.random.normal(k[1], (f,))
  g = jax.random.normal(k[2], (n, f)).astype(jnp.bfloat16)
  inputs, ref = (h, b, g), _gelu_reference(h, b, g)
  names, moved = ("y", "dh", "dbias"), (4 * n * f, 6 * n * f)
  out: dict = {"rows": n, "features": f}
  for label, mode in (("xla", False), ("pallas", "interpret" if interpret else None)):
    pg.set_pallas_gelu(mode)
    out[label] = _measure(_gelu_fns, inputs, ref, names, moved, reps)
  set_config = lambda cfg: pg.set_gelu_config(cfg and pg.GeluConfig(*cfg))
  out["sweep"] = _sweep(sweep, set_config, _gelu_fns, inputs, ref, names, reps)
  pg.set_pallas_gelu(None)
  return out


def _torch_case(n, c, f, reps) -> dict:
  """PyTorch's layer norm and tanh GELU (bfloat16 in and out, as under OpenCLIP's autocast
  the weights are not; here bfloat16 weights keep one fused kernel) forward and forward+
  backward, CUDA events, median of `reps` batches of 10."""
  import torch

  def timed(fn):
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
      a, z = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      a.record()
      for _ in range(10):
        fn()
      z.record()
      torch.cuda.synchronize()
      out.append(a.elapsed_time(z) / 10)
    return statistics.median(out)

  dev, bf = "cuda", torch.bfloat16
  x = torch.randn(n, c, device=dev, dtype=bf, requires_grad=True)
  w = torch.ones(c, device=dev, dtype=bf, requires_grad=True)
  bb = torch.zeros(c, device=dev, dtype=bf, requires_grad=True)
  gx = torch.randn(n, c, device=dev, dtype=bf)
  h = torch.randn(n, f, device=dev, dtype=bf, requires_grad=True)
  hb = torch.zeros(f, device=dev, dtype=bf, requires_grad=True)
  gh = torch.randn(n, f, device=dev, dtype=bf)
  ln = lambda: torch.nn.functional.layer_norm(x, (c,), w, bb, 1e-6)
  ge = lambda: torch.nn.functional.gelu(h + hb, approximate="tanh")
  with torch.no_grad():
    ln_f, ge_f = timed(ln), timed(ge)
  ln_b = timed(lambda: torch.autograd.backward(ln(), gx))
  ge_b = timed(lambda: torch.autograd.backward(ge(), gh))
  return {
    "layer_norm": {"fwd_ms": ln_f, "fwd_bwd_ms": ln_b},
    "bias_gelu": {"fwd_ms": ge_f, "fwd_bwd_ms": ge_b},
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--torch", action="store_true", help="time PyTorch's kernels too (GPU)")
  p.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU smoke)")
  p.add_argument("--small", action="store_true", help="one tiny shape, no sweep (smoke test)")
  args = p.parse_args(argv)
  if args.reps < 1:
    p.error(f"--reps must be >= 1, got {args.reps}")
  import jax

  if not args.interpret and jax.default_backend() != "gpu":
    p.error(f"the kernels run on GPUs; backend is {jax.default_backend()!r} (use --interpret)")
  os.makedirs(args.out, exist_ok=True)
  shapes = SMALL if args.small else SHAPES
  result: dict = {"device": str(jax.devices()[0]), "jax": jax.__version__, "cases": {}}
  path = os.path.join(args.out, "pallas_kernels_bench.json")
  for name, (n, c, f) in shapes.items():
    sweep = name == "vit_b16" and not args.small
    case = {
      "layer_norm": _layer_norm_case(n, c, args.reps, LN_SWEEP if sweep else [], args.interpret),
      "bias_gelu": _gelu_case(n, f, args.reps, GELU_SWEEP if sweep else [], args.interpret),
    }
    if args.torch:
      case["torch"] = _torch_case(n, c, f, args.reps)
    result["cases"][name] = case
    atomic_io.atomic_write_json(path, result, indent=1)
    for op in ("layer_norm", "bias_gelu"):
      o = case[op]
      print(
        f"{name} {op}: fwd+bwd xla {o['xla']['fwd_bwd_ms']:.3f} ms, pallas "
        f"{o['pallas']['fwd_bwd_ms']:.3f} ms; max rel err xla "
        f"{max(o['xla']['rel_err'].values()):.2e} pallas "
        f"{max(o['pallas']['rel_err'].values()):.2e}",
        flush=True,
      )
  return 0


if __name__ == "__main__":
  sys.exit(main())
