"""The fused sigmoid (SigLIP) tiles against the XLA tiles, side by side in one process.

  python benchmarks/sigmoid_tiles_bench.py --out sigmoid_tiles.json [--sizes 32768,131072]

1. Check: `loss_tune.check_all` on the sigmoid loss (the fused default tiles, fast math, against
   the float32 dense loss at B = 2,000 (ragged) and 2,048: values and all four gradients).
2. Time the blockwise sigmoid loss (bias -10, D = 512, bf16 and f32, default 8,192 tiles),
   forward+backward w.r.t. both embeddings, for every variant: the XLA tiles, the fused tiles
   with JAX's libdevice softplus / sigmoid ("precise"), and with `softplus_fast` /
   `sigmoid_fast` in several Triton program shapes, and the default dispatch ("auto"); each
   compiled once, then alternating rounds; medians and all calls.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loss_bench import add_round_args, alternating_ms, write_json  # noqa: E402

# name: (fast math, TileConfig fields of both passes; None: `_pallas_tiles.SIGMOID_CONFIGS`'s
# defaults, "infonce": the InfoNCE-tuned `CONFIGS`). "auto" (the dispatch's own choice) and
# "xla" (the XLA tiles) are timed beside them.
VARIANTS = {
  "fused_precise": (False, None),
  "fused_fast": (True, None),
  "fused_fast_infonce_shapes": (True, "infonce"),
  "fused_fast_128x128_w8": (True, (128, 128, 64, 1, 8, 3)),
}


def use(pt, name):
  """Sets the kernels of variant `name` ("xla", "auto" or a `VARIANTS` key; None resets)."""
  pt.SIGMOID_CONFIGS.clear()
  pt.SIGMOID_CONFIGS.update(pt._SIGMOID_TUNED)
  pt.FAST_SIGMOID[0] = True
  pt.set_fused_tiles(None)
  if name in (None, "auto"):
    return
  if name == "xla":
    pt.set_fused_tiles(False)
    return
  fast, cfg = VARIANTS[name]
  pt.set_fused_tiles("always")
  pt.FAST_SIGMOID[0] = fast
  if cfg == "infonce":
    pt.SIGMOID_CONFIGS.clear()
  elif cfg:
    for kind in ("fwd", "bwd"):
      for dt in ("bfloat16", "float32"):
        pt.SIGMOID_CONFIGS[(kind, dt)] = pt.TileConfig(*cfg)


def compiled(pt, name, b, dtype):
  import jax
  from loss_bench import _inputs

  from mmts_jax import losses

  x, y, tau = _inputs(b, 512, dtype)
  use(pt, name)
  try:
    loss = lambda x, y: losses.sigmoid(x, y, tau, impl="blockwise", bias=-10.0)  # noqa: E731
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, y).compile()
  finally:
    use(pt, None)
  return x, y, fn


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_round_args(ap, deadline=300.0)
  args = ap.parse_args(argv)
  import jax
  import loss_tune

  from mmts_jax.losses import _pallas_tiles as pt

  t0 = time.perf_counter()
  result = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "argv": sys.argv}

  def write():
    write_json(args.out, result)

  try:
    pt.set_fused_tiles("always")
    result["check_fast"] = loss_tune.check_all(pt, ("sigmoid",))
  except Exception:
    result["check_fast"] = {"error": traceback.format_exc()[-2000:]}
  finally:
    pt.set_fused_tiles(None)
  print(json.dumps(result["check_fast"])[:1500], flush=True)
  write()
  rows = result["rows"] = []
  sizes = [int(v) for v in args.sizes.split(",")]
  plan = [(b, "bf16") for b in sizes] + [(sizes[0], "f32")]
  for b, dtype in plan:
    fns = {}
    for name in ("xla", "auto", *VARIANTS):
      if time.perf_counter() - t0 > args.deadline:
        break
      try:
        fns[name] = compiled(pt, name, b, dtype)
        x, y, fn = fns[name]
        v = jax.block_until_ready(fn(x, y))
        rows.append({"B": b, "dtype": dtype, "kernel": name, "loss_value": float(v[0])})
      except Exception as e:
        rows.append(
          {"B": b, "dtype": dtype, "kernel": name, "error": f"{type(e).__name__}: {e}"[:400]}
        )
      write()
    calls = {
      name: functools.partial(lambda f, x, y: jax.block_until_ready(f(x, y)), fn, x, y)
      for name, (x, y, fn) in fns.items()
    }
    times = alternating_ms(calls, args.rounds, args.rep)
    for row in rows:
      if row["B"] == b and row["dtype"] == dtype and row["kernel"] in times:
        row["fwd_bwd_ms"], row["fwd_bwd_ms_all"] = times[row["kernel"]]
    write()
    fns.clear()
  for row in rows:
    print(json.dumps({k: v for k, v in row.items() if not k.endswith("_all")}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
