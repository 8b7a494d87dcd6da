"""Tunes the fused InfoNCE tile kernels (`mmts_jax.losses._pallas_tiles.TileConfig`) on one GPU.

In one process (one compile per variant, no process start per row): a GPU correctness check of
every variant against the float32 dense loss (values and gradients, a ragged batch, per-anchor
temperatures down to 0.005), then forward-only and forward+backward times of each variant at
`--B`, and the matmul shapes the tiles run, so forward and backward can be told apart and set
against what cuBLAS does on the same shapes. Writes one json (atomically, after every row, so a
kill keeps what ran) whose "best" entry holds the fastest forward and backward configuration per
dtype; `loss_bench.py one --tile-configs FILE` reads it.

  python benchmarks/loss_tune.py --out /tmp/tune.json --deadline 120
  # only the GPU check of the default fused tiles of each loss (InfoNCE, max-margin, sigmoid)
  python benchmarks/loss_tune.py --out /tmp/check.json --check-only infonce,max_margin,sigmoid
  # the same check on CPU through the Pallas interpreter, small batches (a smoke test)
  python benchmarks/loss_tune.py --out /tmp/check.json --check-only sigmoid --interpret \
      --check-sizes 200,256 --check-block 128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loss_bench import _inputs, _timeit, write_json  # noqa: E402

# (bm, bn, bk, j, num_warps, num_stages[, "libdevice"]): the last marks the A/B row whose
# exponentials are libdevice's exp2f instead of one ex2.approx each.
VARIANTS = {
  "bfloat16": [
    (128, 128, 64, 1, 8, 3),  # the program shape of the previous kernel
    (128, 128, 64, 1, 8, 3, "libdevice"),
    (128, 128, 32, 1, 4, 4),
    (128, 256, 64, 1, 8, 3),
    (256, 128, 64, 1, 8, 3),
    (128, 128, 64, 4, 8, 3),
    (128, 128, 64, 2, 4, 3),
    (64, 128, 64, 1, 4, 3),
    (64, 256, 64, 1, 4, 3),
    (128, 64, 64, 2, 4, 4),
    (128, 256, 64, 1, 8, 4),
  ],
  "float32": [
    (128, 128, 32, 1, 8, 3),
    (128, 128, 32, 1, 4, 4),
    (64, 128, 32, 1, 4, 3),
    (128, 64, 32, 1, 4, 3),
    (128, 128, 16, 4, 8, 4),
  ],
}


CHECK_SIZES = (2000, 2048)  # check_all: a ragged batch and whole tiles of 1024
CHECK_LOSSES = ("infonce", "max_margin", "sigmoid")
_MODE = "always"  # how the fused tiles run: "always" (GPU) or "interpret" (smoke test on CPU)


def _rel(a, b):
  import numpy as np

  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _set(pt, dtype, cfg_fwd, cfg_bwd):
  for kind, cfg in (("fwd", cfg_fwd), ("bwd", cfg_bwd)):
    pt.set_tile_config(kind, dtype, pt.TileConfig(*cfg[:6]) if cfg else None)
  # One switch for both passes: a pair of configurations differing in it is not timed.
  pt.FAST_EXP[0] = not (cfg_fwd and len(cfg_fwd) > 6)


def check(pt, dtype, cfg):
  """Fused (this config) vs float32 dense HIGHEST on the same rounded inputs: rel. errors.

  B = 2000 in tiles of 1024 (a ragged last tile row and column), temperatures 0.005 to 0.105.
  """
  import jax
  import jax.numpy as jnp

  from mmts_jax.losses import blockwise, dense

  hi = jax.lax.Precision.HIGHEST
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(7), 3)
  b, d = 2000, 512  # tiles of 1024: a ragged last row and column of tiles
  x = jax.random.normal(k1, (b, d))
  x = (x / jnp.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)
  y = jax.random.normal(k2, (b, d))
  y = (y / jnp.linalg.norm(y, axis=1, keepdims=True)).astype(dtype)
  t = 0.005 + 0.1 * jax.random.uniform(k3, (b,))
  ref = jax.jit(jax.value_and_grad(dense.infonce_dense, argnums=(0, 1, 2)), static_argnums=3)
  v0, g0 = ref(x.astype(jnp.float32), y.astype(jnp.float32), t, hi)
  _set(pt, dtype, cfg, cfg)
  fn = jax.jit(
    jax.value_and_grad(
      lambda x, y, t: blockwise.infonce_blockwise(x, y, t, block_size=1024), argnums=(0, 1, 2)
    )
  )
  v, g = fn(x, y, t)
  out = {"loss_rel": _rel(v, v0)}
  out.update({f"grad{i}_rel": _rel(a, b_) for i, (a, b_) in enumerate(zip(g, g0, strict=True))})
  out["finite"] = bool(all(jnp.all(jnp.isfinite(a.astype(jnp.float32))) for a in g))
  return out


def _check_inputs(loss, b, d=512):
  """The check's inputs of `loss` at batch `b`: embeddings (float32), temperatures or margins
  0.005 to 0.105 and, for the sigmoid loss, per-anchor biases around SigLIP's -10."""
  import jax
  import jax.numpy as jnp

  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(b), 4)
  x = jax.random.normal(k1, (b, d))
  y = jax.random.normal(k2, (b, d))
  t = 0.005 + 0.1 * jax.random.uniform(k3, (b,))
  if loss == "max_margin":
    x = x * (0.5 + 1.5 * jax.random.uniform(k4, (b, 1))) / jnp.sqrt(float(d))
    return x, y / jnp.sqrt(float(d)), t, ()
  x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
  y = y / jnp.linalg.norm(y, axis=1, keepdims=True)
  extra = (-10.0 + 4.0 * jax.random.normal(k4, (b,)),) if loss == "sigmoid" else ()
  return x, y, t, extra


def _check_fns(loss, block):
  """`(blockwise, dense)` of `loss` as `f(x, y, t, *extra)` (the sigmoid loss's bias is its
  one extra argument); the dense one at HIGHEST precision."""
  import jax

  from mmts_jax.losses import blockwise, blockwise_sigmoid, dense

  hi = jax.lax.Precision.HIGHEST
  tiled, ref = {
    "infonce": (blockwise.infonce_blockwise, dense.infonce_dense),
    "max_margin": (blockwise.max_margin_blockwise, dense.max_margin_dense),
    "sigmoid": (blockwise_sigmoid.sigmoid_blockwise, dense.sigmoid_dense),
  }[loss]

  def kw(extra):
    return {"bias": extra[0]} if extra else {}

  return (
    lambda x, y, t, *e: tiled(x, y, t, block_size=block, **kw(e)),
    lambda x, y, t, *e: ref(x, y, t, precision=hi, **kw(e)),
  )


def check_all(pt, names=CHECK_LOSSES, sizes=CHECK_SIZES, block=1024):
  """GPU check of the fused kernels with their default configurations, each loss and dtype,
  against the float32 dense loss at HIGHEST on the same rounded inputs: B = 2000 (a ragged
  last tile row and column: the masked kernels) and 2048 (whole tiles), tiles of 1024,
  temperatures / margins 0.005 to 0.105, embeddings of norms 0.5 to 2 for max-margin, per-anchor
  biases around -10 for the sigmoid loss (its gradient checked too: the last `grad` entry)."""
  import jax
  import jax.numpy as jnp

  out = []
  for b in sizes:
    for loss in names:
      x, y, t, extra = _check_inputs(loss, b)
      fused, ref_fn = _check_fns(loss, block)
      argnums = tuple(range(3 + len(extra)))
      for dtype in (jnp.bfloat16, jnp.float32):
        xd, yd = x.astype(dtype), y.astype(dtype)
        ref = jax.jit(jax.value_and_grad(ref_fn, argnums=argnums))
        v0, g0 = ref(xd.astype(jnp.float32), yd.astype(jnp.float32), t, *extra)
        fn = jax.jit(jax.value_and_grad(fused, argnums=argnums))
        row = {"check": loss, "B": b, "dtype": jnp.dtype(dtype).name}
        try:
          v, g = fn(xd, yd, t, *extra)
          row["loss_rel"] = _rel(v, v0)
          row.update(
            {f"grad{i}_rel": _rel(a, c) for i, (a, c) in enumerate(zip(g, g0, strict=True))}
          )
          row["finite"] = bool(all(jnp.all(jnp.isfinite(a.astype(jnp.float32))) for a in g))
        except Exception as e:
          row["error"] = type(e).__name__ + ": " + str(e)[:300]
        out.append(row)
        print(json.dumps(row), flush=True)
  return out


def time_variant(pt, dtype_name, cfg_fwd, cfg_bwd, b, rep=5, ref=None):
  """Forward-only and forward+backward medians; with `ref` (value, grads of the XLA tiles on
  the same inputs) also the relative differences to it."""
  import jax

  from mmts_jax import losses

  x, y, tau = _inputs(b, 512, dtype_name)
  _set(pt, x.dtype, cfg_fwd, cfg_bwd)
  loss = lambda x, y: losses.infonce(x, y, tau, impl="blockwise")  # noqa: E731
  fwd = jax.jit(loss)
  both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  out = {}
  jax.block_until_ready(fwd(x, y))
  out["fwd_ms"] = round(_timeit(lambda: jax.block_until_ready(fwd(x, y)), 1, rep) * 1e3, 3)
  r = jax.block_until_ready(both(x, y))
  out["fwd_bwd_ms"] = round(_timeit(lambda: jax.block_until_ready(both(x, y)), 1, rep) * 1e3, 3)
  out["loss_value"] = float(r[0])
  if ref is not None:
    out["vs_xla_loss_rel"] = _rel(r[0], ref[0])
    out["vs_xla_grad_rel"] = max(_rel(a, b_) for a, b_ in zip(r[1], ref[1], strict=True))
  return out


def xla_reference(pt, dtype_name, b):
  """Value, gradients and fwd+bwd time of the XLA tiles on the timing inputs."""
  import jax

  from mmts_jax import losses

  x, y, tau = _inputs(b, 512, dtype_name)
  pt.set_fused_tiles(False)
  try:
    f = jax.jit(
      jax.value_and_grad(lambda x, y: losses.infonce(x, y, tau, impl="blockwise"), argnums=(0, 1))
    )
    r = jax.block_until_ready(f(x, y))
    ms = _timeit(lambda: jax.block_until_ready(f(x, y)), 1, 5) * 1e3
  finally:
    pt.set_fused_tiles(_MODE)
  return r, round(ms, 3)


def matmul_shapes():
  """cuBLAS (through XLA) on the tile's shapes: S = X Y^T (8192 x 8192 x 512) and dS Y."""
  import jax
  import jax.numpy as jnp

  from mmts_jax.losses._traversal import Centre, grad_products

  out = {}
  k = jax.random.PRNGKey(1)
  for name, dt in (("bf16", jnp.bfloat16), ("f32", jnp.float32)):
    a = jax.random.normal(k, (8192, 512)).astype(dt)
    s = jax.random.normal(k, (8192, 8192)).astype(dt)
    f_s = jax.jit(lambda a, b: jnp.matmul(a, b.T, preferred_element_type=jnp.float32))
    f_g = jax.jit(lambda s, a: jnp.matmul(s, a, preferred_element_type=jnp.float32))
    sq = jax.random.normal(k, (8192, 8192)).astype(dt)
    f_q = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    centre = Centre(jnp.ones((512,)), jnp.ones((512,))) if name == "bf16" else None
    # The backward tile's two gradient products as the fused path runs them (centred for bf16).
    f_gm = jax.jit(lambda ds, x, y, centre=centre: grad_products(ds, x, y, None, centre))
    for tag, f, args, flop in (
      ("S_8192x8192x512", f_s, (a, a), 2 * 8192 * 8192 * 512),
      ("dSY_8192x512x8192", f_g, (s, a), 2 * 8192 * 8192 * 512),
      ("square_8192", f_q, (sq, sq), 2 * 8192**3),
      ("grad_products_8192", f_gm, (s, a, a), 4 * 8192 * 8192 * 512),
    ):
      jax.block_until_ready(f(*args))
      t = _timeit(lambda f=f, args=args: jax.block_until_ready(f(*args)), 2, 10)
      out[f"{name}_{tag}"] = {"us": round(t * 1e6, 1), "tflops": round(flop / t / 1e12, 1)}
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--B", type=int, default=32768)
  ap.add_argument("--big", type=int, default=131072, help="B of the confirmation runs")
  ap.add_argument("--deadline", type=float, default=150.0, help="seconds; no new row after it")
  ap.add_argument(
    "--check-only",
    nargs="?",
    const=",".join(CHECK_LOSSES),
    default=None,
    help="only the GPU check of the default kernels, of these losses (comma-separated, among "
    f"{', '.join(CHECK_LOSSES)}; all of them without a value)",
  )
  ap.add_argument(
    "--check-sizes",
    default=",".join(map(str, CHECK_SIZES)),
    help="batch sizes of --check-only (comma-separated; a small one with --interpret on CPU)",
  )
  ap.add_argument("--check-block", type=int, default=1024, help="tile edge of --check-only")
  ap.add_argument(
    "--interpret",
    action="store_true",
    help="CPU smoke test: the Pallas interpreter, no cuBLAS shapes (use a small --B)",
  )
  args = ap.parse_args(argv)
  names = tuple(args.check_only.split(",")) if args.check_only else ()
  bad = [n for n in names if n not in CHECK_LOSSES]
  if bad:
    ap.error(f"--check-only: unknown loss {bad[0]!r}; choose among {', '.join(CHECK_LOSSES)}")
  sizes = tuple(int(v) for v in args.check_sizes.split(","))
  t_start = time.time()

  import jax
  import jax.numpy as jnp

  from mmts_jax.losses import _pallas_tiles as pt

  global _MODE
  _MODE = "interpret" if args.interpret else "always"
  pt.set_fused_tiles(_MODE)
  res = {"device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "B": args.B}
  res["rows"] = []

  def left():
    return args.deadline - (time.time() - t_start)

  def save():
    write_json(args.out, res)

  if args.check_only:
    res.update(tiles=_MODE, check_sizes=list(sizes), check_block=args.check_block)
    res["checks"] = check_all(pt, names, sizes, args.check_block)
    save()
    return 0
  try:
    res["matmul"] = {} if args.interpret else matmul_shapes()
  except Exception as e:  # a result too
    res["matmul"] = {"error": repr(e)[:300]}
  save()
  print("matmul", json.dumps(res["matmul"]), flush=True)
  best, best_lib = {}, {}
  share = {"bfloat16": 0.55, "float32": 0.8}  # of the deadline: when each dtype's sweep stops
  for dname, variants in VARIANTS.items():
    short = "bf16" if dname == "bfloat16" else "f32"
    try:
      ref, xla_ms = xla_reference(pt, short, args.B)
      res["rows"].append({"dtype": dname, "tiles": "xla", "B": args.B, "fwd_bwd_ms": xla_ms})
    except Exception as e:
      ref = None
      res["rows"].append({"dtype": dname, "tiles": "xla", "error": repr(e)[:300]})
    print(json.dumps(res["rows"][-1]), flush=True)
    for cfg in variants:
      if time.time() - t_start > share[dname] * args.deadline:
        break
      row = {"dtype": dname, "cfg": cfg}
      try:
        row.update(time_variant(pt, short, cfg, cfg, args.B, ref=ref))
        row["bwd_ms"] = round(row["fwd_bwd_ms"] - row["fwd_ms"], 3)
        tol = 1e-3 if dname == "bfloat16" else 1e-4
        ok = ref is not None and row["vs_xla_loss_rel"] < tol and row["vs_xla_grad_rel"] < 3e-2
        row["ok"] = bool(ok)
        if ok:
          table = best_lib if len(cfg) > 6 else best
          for kind, key in (("fwd", "fwd_ms"), ("bwd", "bwd_ms")):
            cur = table.get((dname, kind))
            if cur is None or row[key] < cur[1]:
              table[(dname, kind)] = (cfg, row[key])
      except Exception as e:
        row["error"] = type(e).__name__ + ": " + str(e)[:400]
      res["rows"].append(row)
      save()
      print(json.dumps(row), flush=True)
  if not best:  # the fast exponential failed everywhere: the libdevice rows
    best = best_lib
  res["best"] = {f"{d}/{k}": list(v[0]) for (d, k), v in best.items()}
  save()
  # The chosen pair per dtype at B and at the big B.
  for dname in VARIANTS:
    fb, bb = best.get((dname, "fwd")), best.get((dname, "bwd"))
    if not fb or not bb:
      continue
    for b in (args.B, args.big):
      if left() < (25 if b == args.big else 8):
        continue
      row = {"dtype": dname, "chosen": [list(fb[0]), list(bb[0])], "B": b}
      try:
        if b == args.B:
          row["check_fwd_cfg"] = check(pt, jnp.dtype(dname), fb[0])
          row["check_bwd_cfg"] = check(pt, jnp.dtype(dname), bb[0])
        row.update(
          time_variant(pt, "bf16" if dname == "bfloat16" else "f32", fb[0], bb[0], b, rep=3)
        )
      except Exception as e:
        row["error"] = type(e).__name__ + ": " + str(e)[:400]
      res["rows"].append(row)
      save()
      print(json.dumps(row), flush=True)
  res["elapsed_s"] = round(time.time() - t_start, 1)
  save()
  print("best", json.dumps(res["best"]), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
