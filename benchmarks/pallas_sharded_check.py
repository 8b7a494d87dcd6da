"""The Pallas layer norm and bias + GELU with the rows sharded over every visible GPU
(`row_partitioning`), beside XLA's form of the same maths under the same sharding: errors of
both against a float32 reference, the collectives in each compiled program, and the time of one
sharded forward + backward.

  python benchmarks/pallas_sharded_check.py --out DIR        # 2+ GPUs
  python benchmarks/pallas_sharded_check.py --out /tmp/s --interpret   # simulated CPU devices

Shapes per device as the train step's at batch 256 (ViT-B/16: (50688, 768) and (50688, 3072)),
times the device count in rows. A program that gathers the (N, C) rows shows an `all-gather`
of them; the partitioned kernels should leave only `all-reduce`s of (C,) / (F,) vectors. Times:
median of `--reps` batches of 10 calls. Writes DIR/pallas_sharded_check.json.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from pallas_kernels_bench import _errors, _gelu_reference, _ln_reference, _time  # noqa: E402

from mmts_jax import atomic_io  # noqa: E402


def _collectives(compiled_text: str) -> dict:
  """Counts of each collective and the shapes it moves, from compiled HLO text."""
  out: dict = {}
  for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
    shapes = re.findall(rf"= ([^=]+?) {op}(?:-start)?\(", compiled_text)
    out[op] = sorted(set(shapes))
  return out


def _sharded(fn, mesh, specs):
  import jax
  from jax.sharding import NamedSharding

  return jax.jit(fn, in_shardings=tuple(NamedSharding(mesh, s) for s in specs))


def _case(name, make, inputs, specs, ref, names, mesh, reps) -> dict:
  out = {}
  for side in ("xla", "pallas"):
    fn = _sharded(make(side), mesh, specs)
    text = fn.lower(*inputs).compile().as_text()
    out[side] = {
      "rel_err": _errors(fn(*inputs), ref, names),
      "fwd_bwd_ms": _time(fn, inputs, reps),
      "collectives": _collectives(text),
    }
  print(
    f"{name}: xla {out['xla']['fwd_bwd_ms']:.3f} ms, pallas {out['pallas']['fwd_bwd_ms']:.3f}"
    f" ms; pallas all-gathers {out['pallas']['collectives']['all-gather']}, all-reduces "
    f"{out['pallas']['collectives']['all-reduce']}; max rel err xla "
    f"{max(out['xla']['rel_err'].values()):.2e} "
    f"pallas {max(out['pallas']['rel_err'].values()):.2e}",
    flush=True,
  )
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--interpret", action="store_true", help="interpreter, small shapes (CPU)")
  args = p.parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh
  from jax.sharding import PartitionSpec as P

  from mmts_jax.models import pallas_gelu as pg
  from mmts_jax.models import pallas_layer_norm as pln
  from mmts_jax.models.lean_layer_norm import layer_norm
  from mmts_jax.models.pallas_gelu import bias_gelu

  devices = jax.devices()
  if len(devices) < 2:
    p.error(f"needs 2 or more devices, found {len(devices)}")
  if not args.interpret and jax.default_backend() != "gpu":
    p.error(f"the kernels run on GPUs; backend is {jax.default_backend()!r} (use --interpret)")
  mode = "interpret" if args.interpret else None
  per_device, c, f = (48, 96, 384) if args.interpret else (50688, 768, 3072)
  n = per_device * len(devices)
  mesh = Mesh(np.array(devices), ("data",))
  rows, feat = P("data", None), P()
  k = jax.random.split(jax.random.PRNGKey(0), 7)
  x = (3.0 * jax.random.normal(k[0], (n, c)) + 0.5).astype(jnp.bfloat16)
  s, b = 1.0 + 0.1 * jax.random.normal(k[1], (c,)), 0.1 * jax.random.normal(k[2], (c,))
  gx = jax.random.normal(k[3], (n, c)).astype(jnp.bfloat16)
  h = (2.0 * jax.random.normal(k[4], (n, f))).astype(jnp.bfloat16)
  hb, gh = 0.2 * jax.random.normal(k[5], (f,)), jax.random.normal(k[6], (n, f)).astype(jnp.bfloat16)

  pln.set_pallas_layer_norm(mode)  # the "xla" side asks for kernel="xla" itself

  def ln(kernel):
    def both(x, s, b, g):
      y, vjp = jax.vjp(lambda x, s, b: layer_norm(x, s, b, 1e-6, x.dtype, kernel), x, s, b)
      return (y, *vjp(g))

    return both

  def gelu(side):
    pg.set_pallas_gelu(mode if side == "pallas" else False)

    def both(h, b, g):
      y, vjp = jax.vjp(bias_gelu, h, b)
      return (y, *vjp(g))

    return both

  result = {
    "devices": [str(d) for d in devices],
    "jax": jax.__version__,
    "rows_per_device": per_device,
    "layer_norm": _case(
      "layer_norm",
      ln,
      (x, s, b, gx),
      (rows, feat, feat, rows),
      _ln_reference(x, s, b, gx),
      ("y", "dx", "dscale", "dbias"),
      mesh,
      args.reps,
    ),
    "bias_gelu": _case(
      "bias_gelu",
      gelu,
      (h, hb, gh),
      (rows, feat, rows),
      _gelu_reference(h, hb, gh),
      ("y", "dh", "dbias"),
      mesh,
      args.reps,
    ),
  }
  pln.set_pallas_layer_norm(None)
  pg.set_pallas_gelu(None)
  os.makedirs(args.out, exist_ok=True)
  atomic_io.atomic_write_json(os.path.join(args.out, "pallas_sharded_check.json"), result, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
