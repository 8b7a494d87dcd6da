"""MM-TS InfoNCE, max-margin and sigmoid forward+backward on GPU: mmts_jax's dense, blockwise
and ring losses beside the peers of ../shared/peers/peer_loss_bench.py, in one run.

Every measurement runs in its own process (a clean peak-memory counter, an OOM kills only
itself) and prints one JSON line; `sweep` runs a plan, writes all lines to one json file
(atomically) and prints a markdown table.

  # one measurement
  python benchmarks/loss_bench.py one --impl blockwise --B 131072 --dtype f32
  # the benchmark of benchmarks/BENCHMARKS.md (one H100)
  python benchmarks/loss_bench.py sweep --plan h100 --peers ../shared/peers/peer_loss_bench.py \
      --out benchmarks/results/loss_h100.json
  # the ring on all local GPUs against one of them, global B=262,144
  python benchmarks/loss_bench.py sweep --plan ring --out benchmarks/results/loss_ring.json
  # the side-by-side run of benchmarks/BENCHMARKS.md on one H200 (three losses, both dtypes,
  # both tile kernels at B=32,768, the fused sigmoid tiles, the peers and the matmul rates)
  python benchmarks/loss_bench.py sweep --plan h200 --peers ../shared/peers/peer_loss_bench.py \
      --out benchmarks/results/loss_h200_side_by_side.json
  # the sigmoid loss: fused tiles beside XLA tiles, B = 32,768 and 131,072, both dtypes
  python benchmarks/loss_bench.py sweep --plan sigmoid --peers ../shared/peers/peer_loss_bench.py \
      --out benchmarks/results/loss_h200_sigmoid.json
  # a CPU smoke test of the fused tiles through the Pallas interpreter
  python benchmarks/loss_bench.py one --loss sigmoid --B 256 --block 128 128 --tiles interpret \
      --warm 0 --rep 1
  # the table again from saved results
  python benchmarks/loss_bench.py table benchmarks/results/loss_h100.json

The table's "roofline" column is the fraction of the run's measured matmul rate (the peer
script's 8192^3 torch matmul: tf32 for f32 inputs, bf16 for bf16) that the loss reaches,
counting 8 B^2 D FLOP for forward + backward (one tile product forward, three backward).

Inputs: L2-normalised Gaussian embeddings (f32, or those cast to bf16), per-anchor temperatures
`0.05 + 0.05 * U(0, 1)`, as the peers; the sigmoid loss takes bias -10 (SigLIP's init). Time:
median of `--rep` timed calls of the jitted `value_and_grad` w.r.t. both embeddings after
`--warm` calls; memory: the device allocator's
`peak_bytes_in_use` of the process (inputs, gradients and temporaries).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

GIB = 2**30


def _timeit(fn, warm, rep):
  for _ in range(warm):
    fn()
  ts = []
  for _ in range(rep):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  ts.sort()
  return ts[len(ts) // 2]


def _inputs(b, d, dtype, n_dev=1):
  import jax
  import jax.numpy as jnp

  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)

  def norm(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

  img = norm(jax.random.normal(k1, (b, d)))
  txt = norm(jax.random.normal(k2, (b, d)))
  tau = 0.05 + 0.05 * jax.random.uniform(k3, (b,))
  dt = {"f32": jnp.float32, "bf16": jnp.bfloat16}[dtype]
  return img.astype(dt), txt.astype(dt), tau


def run_one(args) -> dict:
  """One (impl, loss, B, dtype) measurement in this process."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from mmts_jax import losses
  from mmts_jax.losses import _pallas_tiles

  res = {
    "impl": args.impl,
    "loss": args.loss,
    "B": args.B,
    "D": args.D,
    "dtype": args.dtype,
    "block": args.block,
    "devices": 1,
    "tiles": args.tiles,
  }
  if args.tiles == "fused-triton":  # the fused tiles, Triton's for every pass
    _pallas_tiles.set_fused_tiles("always")
    _pallas_tiles.set_tile_kernel("triton")
  elif args.tiles != "auto":
    modes = {"xla": False, "fused": "always", "interpret": "interpret"}
    _pallas_tiles.set_fused_tiles(modes[args.tiles])
  if args.no_centre:
    from mmts_jax.losses import _traversal

    _traversal.CENTRE_LOW_PRECISION = False
    res["centre"] = False
  if args.triton:
    sub, sub_k, warps, stages = args.triton
    cfg = _pallas_tiles.TileConfig(sub, sub, sub_k, 1, warps, stages)
    for kind in ("fwd", "bwd"):
      for dt in ("float32", "bfloat16"):
        _pallas_tiles.set_tile_config(kind, dt, cfg)
    res["triton"] = args.triton
  if args.tile_configs:
    # {"dtype/kind": [bm, bn, bk, j, warps, stages]}, the "best" entry of loss_tune.py's json.
    with open(args.tile_configs) as f:
      best = json.load(f).get("best", {})
    for key, cfg in best.items():
      dt, kind = key.split("/")
      _pallas_tiles.set_tile_config(kind, dt, _pallas_tiles.TileConfig(*cfg[:6]))
      if len(cfg) > 6:  # tuned with libdevice's exp2f (the fast exponential failed there)
        _pallas_tiles.FAST_EXP[0] = False
    res["tile_configs"] = best
  try:
    img, txt, tau = _inputs(args.B, args.D, args.dtype)
    block = tuple(args.block) if args.block else None
    kw = {"bias": -10.0} if args.loss == "sigmoid" else {}
    mesh = None
    if args.impl in ("ring", "gather"):
      from jax.sharding import Mesh, NamedSharding
      from jax.sharding import PartitionSpec as P

      devs = jax.devices()
      res["devices"] = len(devs)
      mesh = Mesh(np.array(devs), ("batch",))
      shard = NamedSharding(mesh, P("batch"))
      img, txt, tau = (jax.device_put(a, shard) for a in (img, txt, tau))
    fn = losses.get(args.loss, impl=args.impl, block_size=block, mesh=mesh)

    def loss(x, y):
      return fn(x, y, tau, **kw)

    g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    t0 = time.perf_counter()
    out = jax.block_until_ready(g(img, txt))
    res["first_call_s"] = round(time.perf_counter() - t0, 2)
    t = _timeit(lambda: jax.block_until_ready(g(img, txt)), args.warm, args.rep)
    res["ms"] = round(t * 1e3, 2)
    res["loss_value"] = float(out[0])
    res["grad_finite"] = bool(jnp.all(jnp.isfinite(out[1][0].astype(jnp.float32))))
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", -1) for d in jax.devices()]
    res["peak_gib"] = round(max(peaks) / GIB, 3)
    res["device_kind"] = jax.devices()[0].device_kind
  except Exception as e:  # OOM and friends are results too
    res["error"] = type(e).__name__ + ": " + str(e).splitlines()[0][:200]
  return res


# ---------------------------------------------------------------------------------------------
# Plans: lists of measurements, each a command line run in a fresh process.


def _ours(
  impl,
  b,
  dtype,
  block=None,
  loss="infonce",
  warm=2,
  rep=5,
  env=None,
  tiles="auto",
  triton=None,
  centre=True,
  configs=None,
):
  cmd = [
    sys.executable,
    os.path.abspath(__file__),
    "one",
    "--impl",
    impl,
    "--B",
    str(b),
    "--dtype",
    dtype,
    "--loss",
    loss,
    "--warm",
    str(warm),
    "--rep",
    str(rep),
    "--tiles",
    tiles,
  ]
  if block:
    cmd += ["--block", str(block[0]), str(block[1])]
  if triton:
    cmd += ["--triton"] + [str(v) for v in triton]
  if not centre:
    cmd += ["--no-centre"]
  if configs:
    cmd += ["--tile-configs", configs]
  return {"cmd": cmd, "env": env or {}}


def _peers_and_1m(peers) -> list:
  """The rows that close the h200_mosaic plans: the peers at 32,768 (Inf-CL also at 131,072),
  then ours in bf16 at 1,048,576."""
  p = []
  if peers:
    for mode in ("jax_naive", "infcl", "torch_naive"):
      p.append(_peer(peers, mode, 32768))
    p.append(_peer(peers, "infcl", 131072))
  return p + [_ours("blockwise", 1048576, "bf16", warm=0, rep=1)]


def _peer(peers, mode, b, d=512):
  return {"cmd": [sys.executable, peers, mode, str(b), str(d)], "env": {}, "peer": True}


def rep_of(b):
  """Timed calls per row: fewer at the largest batches."""
  return 5 if b < 131072 else 3


def _sigmoid_fused_rows():
  """The fused sigmoid tiles at B = 32,768 (both dtypes) and 131,072 (bf16)."""
  return [
    _ours("blockwise", b, dtype, loss="sigmoid", tiles="fused", rep=rep_of(b))
    for b, dtype in ((32768, "f32"), (32768, "bf16"), (131072, "bf16"))
  ]


def plan(name, peers, configs=None):
  sizes = [8192, 32768, 65536, 131072, 262144, 524288, 1048576]
  p = []
  if name == "explore":
    for blk in [(4096, 4096), (8192, 8192), (16384, 4096), (4096, 16384), (16384, 16384)]:
      p.append(_ours("blockwise", 32768, "f32", blk))
    for blk in [(8192, 8192), (16384, 16384)]:
      p.append(_ours("blockwise", 131072, "f32", blk))
      p.append(_ours("blockwise", 131072, "bf16", blk))
    p.append(_ours("dense", 32768, "f32"))
    return p
  if name == "explore2":
    for b in (32768, 131072):
      for blk in [(8192, 8192), (4096, 16384)]:
        p.append(_ours("blockwise", b, "f32", blk))
    p.append(_ours("blockwise", 131072, "bf16", (8192, 8192)))
    for tr in [(128, 32, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3), (128, 16, 8, 4)]:
      p.append(_ours("blockwise", 32768, "f32", (8192, 8192), triton=tr))
    p.append(_ours("blockwise", 32768, "bf16", (8192, 8192), triton=(128, 64, 8, 3)))
    return p
  if name == "h100":
    if peers:
      p.append(_peer(peers, "gemm_torch", 0, 0))
      for b in (8192, 32768):
        for mode in ("torch_naive", "jax_naive", "infcl"):
          p.append(_peer(peers, mode, b))
    for b in (8192, 32768, 65536):
      p.append(_ours("dense", b, "f32"))
    for b in sizes:
      big = b >= 524288
      for dtype in ("f32", "bf16"):
        p.append(_ours("blockwise", b, dtype, warm=0 if big else 2, rep=2 if big else 5))
    # The other tile kernel of each dtype, to show why the default is what it is.
    p.append(_ours("blockwise", 131072, "f32", tiles="fused"))
    p.append(_ours("blockwise", 131072, "bf16", tiles="xla"))
    for b in (32768, 131072):
      p.append(_ours("blockwise", b, "f32", loss="max_margin"))
    return p
  if name == "h200":
    if peers:
      p.append(_peer(peers, "gemm_torch", 0, 0))
      for mode in ("jax_naive", "infcl", "torch_naive"):
        p.append(_peer(peers, mode, 32768))
    p.append(_ours("dense", 32768, "f32"))
    for b in (32768, 131072):
      for loss in ("infonce", "max_margin", "sigmoid"):
        for dtype in ("f32", "bf16"):
          p.append(_ours("blockwise", b, dtype, loss=loss, rep=5 if b < 131072 else 3))
    # The other tile kernel of each dtype, where the dispatch chooses between them.
    p.append(_ours("blockwise", 32768, "f32", tiles="fused"))
    p.append(_ours("blockwise", 32768, "bf16", tiles="xla"))
    # The sigmoid loss's fused tiles beside its XLA tiles (the rows above: the dispatch runs
    # the XLA tiles until the fused ones are measured faster).
    p += _sigmoid_fused_rows()
    p.append(_ours("blockwise", 1048576, "bf16", warm=0, rep=1))
    return p
  if name == "sigmoid":  # the sigmoid loss: fused tiles beside XLA tiles, alone (a short call)
    if peers:
      p.append(_peer(peers, "gemm_torch", 0, 0))
    for b in (32768, 131072):
      for dtype in ("bf16", "f32"):
        for tiles in ("xla", "fused"):
          p.append(_ours("blockwise", b, dtype, loss="sigmoid", tiles=tiles, rep=rep_of(b)))
    return p
  if name == "h200_tuned":  # issue 13: the tuned fused tiles (loss_tune.py) beside the peers
    if peers:
      p.append(_peer(peers, "gemm_torch", 0, 0))
    for b in (32768, 131072):
      rep = 5 if b < 131072 else 3
      for dtype in ("bf16", "f32"):
        p.append(_ours("blockwise", b, dtype, rep=rep, configs=configs))
    for tiles in ("fused", "xla"):
      p.append(_ours("blockwise", 32768, "bf16", loss="max_margin", tiles=tiles, configs=configs))
    p.append(
      _ours("blockwise", 131072, "bf16", loss="max_margin", rep=3, tiles="fused", configs=configs)
    )
    if peers:
      for mode in ("jax_naive", "infcl", "torch_naive"):
        p.append(_peer(peers, mode, 32768))
    p.append(_ours("blockwise", 1048576, "bf16", warm=0, rep=1, configs=configs))
    return p
  if name == "h200_mosaic":  # issue 13: the Mosaic GPU forward tiles beside every peer, B to 1M
    if peers:
      p.append(_peer(peers, "gemm_torch", 0, 0))
    for b in (32768, 131072):
      for dtype in ("bf16", "f32"):
        p.append(_ours("blockwise", b, dtype, rep=rep_of(b)))
    p.append(_ours("blockwise", 131072, "bf16", rep=3, tiles="fused-triton"))
    for b in (32768, 131072):
      p.append(_ours("blockwise", b, "bf16", loss="max_margin", rep=rep_of(b)))
    p += _peers_and_1m(peers)
    return p
  if name == "h200_mosaic_f32":  # issue 13, session 11: Mosaic for f32 and max-margin, + peers
    if peers:
      p.append(_peer(peers, "gemm_torch", 0, 0))
    for b in (32768, 131072):
      for loss in ("infonce", "max_margin"):
        for dtype in ("bf16", "f32"):
          p.append(_ours("blockwise", b, dtype, loss=loss, rep=rep_of(b)))
    p += _peers_and_1m(peers)
    return p
  if name == "h200_bf16":  # the cost of the centred bf16 backward, and the fused-tile shape
    if peers:
      p.append(_peer(peers, "gemm_torch", 0, 0))
    for b in (32768, 131072):
      for centre in (True, False):
        p.append(_ours("blockwise", b, "bf16", centre=centre, rep=5 if b < 131072 else 3))
    for tr in [(128, 128, 8, 3), (128, 64, 8, 4), (128, 32, 4, 4), (64, 64, 4, 3)]:
      p.append(_ours("blockwise", 32768, "bf16", triton=tr))
    return p
  if name == "max_margin":  # rerun after the 2B(B-1) > 2**31 fix
    for b in (131072, 262144):
      p.append(_ours("blockwise", b, "f32", loss="max_margin", rep=3))
    return p
  if name == "ring":
    one = {"CUDA_VISIBLE_DEVICES": "0"}
    for b in (131072, 262144):
      p.append(_ours("blockwise", b, "f32", env=one, rep=3))
      p.append(_ours("ring", b, "f32", rep=3))
    p.append(_ours("blockwise", 262144, "bf16", env=one, rep=3))
    p.append(_ours("ring", 262144, "bf16", rep=3))
    p.append(_ours("gather", 32768, "f32"))
    return p
  raise ValueError(f"unknown plan {name!r}")


def _run(item, timeout):
  env = dict(os.environ, **item["env"])
  env.setdefault("PYTHONUNBUFFERED", "1")
  try:
    out = subprocess.run(item["cmd"], env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"cmd": " ".join(item["cmd"][2:]), "error": f"timeout after {timeout} s"}
  lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
  if not lines:
    return {
      "cmd": " ".join(item["cmd"][2:]),
      "error": (out.stderr.strip().splitlines() or ["no output"])[-1][:300],
    }
  res = json.loads(lines[-1])
  if item.get("peer"):
    res["source"] = "peer script, this run"
    res.setdefault("impl", "peer:" + res.get("mode", "?"))
  return res


def alternating_ms(calls, rounds, rep, stop=lambda: False) -> dict:
  """Times every blocking `calls[name]()` in `rounds` alternating rounds of `rep` calls each
  (`stop()` ends them early): `{name: (median ms, all ms sorted)}` for the names that ran."""
  times = {name: [] for name in calls}
  for _ in range(rounds):
    if stop():
      break
    for name, fn in calls.items():
      for _ in range(rep):
        t = time.perf_counter()
        fn()
        times[name].append((time.perf_counter() - t) * 1e3)
  out = {}
  for name, ts in times.items():
    if ts:
      ts = sorted(ts)
      out[name] = (round(ts[len(ts) // 2], 3), [round(v, 3) for v in ts])
  return out


def add_round_args(ap, deadline: float) -> None:
  """The arguments of the one-process side-by-side benches (`mosaic_tiles_bench.py`,
  `sigmoid_tiles_bench.py`): output json, batch sizes, alternating rounds, calls per round,
  and the deadline after which no new row starts."""
  ap.add_argument("--out", required=True)
  ap.add_argument("--sizes", default="32768,131072")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--rep", type=int, default=3)
  ap.add_argument("--deadline", type=float, default=deadline)


def write_json(path, obj):
  """Atomic write: a temp file in the same directory, then `os.replace`."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)


def roofline(r, rates) -> str:
  """Fraction of the run's matmul rate: 8 B^2 D FLOP over the time, against tf32 / bf16."""
  rate = rates.get({"f32": "tf32_tflops", "bf16": "bf16_tflops"}.get(r.get("dtype", "f32")))
  if not rate or "ms" not in r or not r.get("D") or r.get("devices", 1) != 1:
    return ""
  return f"{8 * r['B'] ** 2 * r['D'] / (r['ms'] * 1e-3) / (rate * 1e12):.2f}"


def table(results) -> str:
  rates = next((r for r in results if "fp32_tflops" in r), {})
  rows = [
    "| impl | tiles | loss | B | dtype | devices | ms (median) | peak GiB | roofline | "
    "loss value |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  if rates:
    rows.insert(
      0,
      f"matmul rates this run: tf32 {rates.get('tf32_tflops')}, bf16 "
      f"{rates.get('bf16_tflops')} TFLOP/s\n",
    )
  for r in results:
    if "fp32_tflops" in r:
      continue
    ms = r.get("ms", r.get("error", "")[:60])
    tiles = r.get("tiles", "") if r.get("impl") in ("blockwise", "ring") else ""
    if r.get("triton"):
      tiles += " triton=" + "/".join(str(v) for v in r["triton"])
    if r.get("centre") is False:
      tiles += " no-centre"
    lv = f"{r['loss_value']:.6f}" if "loss_value" in r else ""
    rows.append(
      f"| {r.get('impl', r.get('mode'))} | {tiles} | {r.get('loss', 'infonce')} | "
      f"{r.get('B')} | {r.get('dtype', 'f32')} | {r.get('devices', 1)} | {ms} | "
      f"{r.get('peak_gib', '')} | {roofline(r, rates)} | {lv} |"
    )
  return "\n".join(rows)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  one = sub.add_parser("one", help="one measurement in this process (one JSON line)")
  one.add_argument("--impl", default="blockwise", choices=["dense", "blockwise", "ring", "gather"])
  one.add_argument("--loss", default="infonce", choices=["infonce", "max_margin", "sigmoid"])
  one.add_argument("--B", type=int, default=8192)
  one.add_argument("--D", type=int, default=512)
  one.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
  one.add_argument("--block", type=int, nargs=2, default=None)
  one.add_argument(
    "--tiles",
    default="auto",
    choices=["auto", "xla", "fused", "fused-triton", "interpret"],
    help="xla: the XLA tiles; fused: the Pallas tiles (auto: where `_pallas_tiles.FASTEST` "
    "measured them faster); fused-triton: the Pallas tiles, Triton's kernels for every pass "
    "(no Mosaic GPU); interpret: the Pallas tiles through the interpreter (CPU smoke test, "
    "tiny --B)",
  )
  one.add_argument(
    "--triton",
    type=int,
    nargs=4,
    default=None,
    metavar=("SUB", "SUB_K", "WARPS", "STAGES"),
    help="fused-tile parameters (square sub-tiles, both passes and dtypes)",
  )
  one.add_argument(
    "--tile-configs",
    default=None,
    help="json with a 'best' entry {'dtype/kind': [bm, bn, bk, j, warps, stages]} "
    "(loss_tune.py's output): the fused tiles' configurations",
  )
  one.add_argument(
    "--no-centre",
    action="store_true",
    help="plain bf16 gradient matmuls (no per-tile centring): its cost",
  )
  one.add_argument("--warm", type=int, default=2)
  one.add_argument("--rep", type=int, default=5)
  sw = sub.add_parser("sweep", help="run a plan, one process per measurement")
  sw.add_argument(
    "--plan",
    required=True,
    choices=[
      "explore",
      "explore2",
      "h100",
      "h200",
      "h200_tuned",
      "h200_mosaic",
      "h200_mosaic_f32",
      "h200_bf16",
      "max_margin",
      "ring",
      "sigmoid",
    ],
  )
  sw.add_argument("--peers", default=None, help="path of peer_loss_bench.py (optional)")
  sw.add_argument("--tile-configs", default=None, help="loss_tune.py's json (h200_tuned)")
  sw.add_argument(
    "--deadline", type=float, default=None, help="seconds: no new measurement after this"
  )
  sw.add_argument("--out", required=True)
  sw.add_argument("--timeout", type=int, default=240)
  tb = sub.add_parser("table", help="markdown table of saved results")
  tb.add_argument("paths", nargs="+")
  args = ap.parse_args(argv)
  if args.cmd == "one":
    print(json.dumps(run_one(args)), flush=True)
    return 0
  if args.cmd == "table":
    results = []
    for p in args.paths:
      with open(p) as f:
        results += json.load(f)["results"]
    print(table(results))
    return 0
  results = []
  meta = {
    "plan": args.plan,
    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "command": " ".join(sys.argv),
  }
  t0 = time.time()
  for item in plan(args.plan, args.peers, args.tile_configs):
    if args.deadline is not None and time.time() - t0 > args.deadline:
      results.append({"cmd": " ".join(item["cmd"][2:]), "error": "not run: past --deadline"})
      write_json(args.out, {"meta": meta, "results": results})
      continue
    r = _run(item, args.timeout)
    results.append(r)
    print(json.dumps(r), flush=True)
    write_json(args.out, {"meta": meta, "results": results})  # partial results survive a kill
  print(table(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
