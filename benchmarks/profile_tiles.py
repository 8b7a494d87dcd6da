"""Where the time of one tile program goes: hardware counters (Nsight Compute) or the Mosaic
kernels' own on-device traces.

  XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --profile-from-start off --clock-control none \\
      --set full -o tiles python benchmarks/profile_tiles.py ncu [--programs mosaic_fwd,triton_ds]
  python benchmarks/profile_tiles.py trace --dir traces --out trace_summary.json
  python benchmarks/profile_tiles.py ptxas --variants ,whole_ds --out ptxas.json
  python benchmarks/profile_tiles.py loss --cases infonce:bf16 --kernels auto,mosaic --out loss.json

`ncu` (without the preallocation flag, JAX holds most of the GPU's memory and ncu saves and
restores it for every replay pass: session 12's call ran out of time that way): compiles and
warms up each program of `mosaic_tiles_bench.tile_programs` on one
8,192^2 bf16 tile (D = 512), and the plain XLA product `X Y^T` of the same shapes, then runs each
once between `cuProfilerStart` and `cuProfilerStop`, so only those launches are profiled.

`trace`: runs the Mosaic programs once each under `_mosaic_tiles.profiling`, which records per
warpgroup when each named region ("mma": the products over D, "epilogue", and inside it "rows",
"cols", "wait") begins and ends, and summarises each kernel's trace: per CTA, the fraction of its
time in which at least one compute warpgroup is in "mma" (an upper bound on the tensor cores'
busy time: "mma" includes waiting for the copies), in which both are, and the mean length of
each region.

`ptxas`: compiles each Mosaic program per variant with `MOSAIC_GPU_DUMP_PTXAS` set and keeps
ptxas's report of it: registers per thread, and the bytes of registers spilled to local memory
(`parse_ptxas`). Spills are what ncu's "Local Memory Spilling Requests" count at run time.

`loss`: the device kernels (`jax.profiler`) of one forward+backward of the blockwise loss at
`--size`, per case and per kernel choice of `mosaic_tiles_bench.compiled`: each kernel's time
per call, so the loss's time splits into the tile programs, the gradient products and the rest;
and the stream's timeline (`gaps`): the span from the first kernel's start to the last one's end,
the idle time between consecutive kernels in it, binned by length, and the longest gaps with the
kernels on either side. `--hlo DIR` also writes each case's optimized HLO (gzipped) there, so the
small kernels can be traced back to the operations XLA fused into them.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loss_bench import write_json  # noqa: E402
from mosaic_tiles_bench import VARIANTS, compiled, tile_programs, use_variant  # noqa: E402

_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(text: str) -> dict:
  """ptxas's verbose report -> the most registers and spilled bytes of any function in it.

  Example:
    >>> parse_ptxas('''ptxas info    : Used 168 registers, used 1 barriers
    ... ptxas info    : 0 bytes stack frame, 24 bytes spill stores, 40 bytes spill loads''')
    {'registers': 168, 'spill_store_bytes': 24, 'spill_load_bytes': 40}
  """
  used = [int(m) for m in _USED.findall(text)]
  spills = [(int(a), int(b)) for a, b in _SPILL.findall(text)]
  return {
    "registers": max(used) if used else None,
    "spill_store_bytes": max((a for a, _ in spills), default=None),
    "spill_load_bytes": max((b for _, b in spills), default=None),
  }


def _intervals(events):
  """Chrome-trace begin/end events of one warpgroup -> {name: [(begin, end), ...]}."""
  out, stack = {}, []
  for e in events:
    if e["ph"] == "B":
      stack.append((e["name"], e["ts"]))
    else:
      name, begin = stack.pop()
      out.setdefault(name, []).append((begin, e["ts"]))
  return out


def _union(spans):
  total, end = 0.0, float("-inf")
  for b, e in sorted(spans):
    if e > end:
      total += e - max(b, end)
      end = e
  return total


def _both(a, b):
  """Length of the time covered by a span of `a` and a span of `b` at once."""
  total = 0.0
  for b0, e0 in a:
    for b1, e1 in b:
      total += max(0.0, min(e0, e1) - max(b0, b1))
  return total


def summarise(trace: dict, compute_wgs: int = 2, wgs_per_cta: int = 3) -> dict:
  """Per-CTA fractions of time with a compute warpgroup in "mma", averaged over the CTAs, and
  each region's mean length (microseconds) and count per warpgroup."""
  by_tid = {}
  for e in trace["traceEvents"]:
    by_tid.setdefault(e["tid"], []).append(e)
  ctas = {}
  for tid, events in by_tid.items():
    cta, wg = divmod(tid - 1, wgs_per_cta)
    ctas.setdefault(cta, {})[wg] = _intervals(sorted(events, key=lambda e: e["ts"]))
  any_mma, both_mma, lengths = [], [], {}
  for wgs in ctas.values():
    compute = [wgs.get(w, {}) for w in range(compute_wgs)]
    spans = [s for c in compute for v in c.values() for s in v]
    if not spans:
      continue
    wall = max(e for _, e in spans) - min(b for b, _ in spans)
    mma = [c.get("mma", []) for c in compute]
    any_mma.append(_union([s for m in mma for s in m]) / wall)
    if compute_wgs == 2:
      both_mma.append(_both(mma[0], mma[1]) / wall)
    for w, c in enumerate(compute):
      for name, v in c.items():
        lengths.setdefault(f"wg{w}/{name}", []).extend(e - b for b, e in v)
  mean = lambda v: round(sum(v) / len(v), 4) if v else None  # noqa: E731
  return {
    "ctas": len(any_mma),
    "fraction_any_wg_in_mma": mean(any_mma),
    "fraction_both_wgs_in_mma": mean(both_mma),
    "region_mean_us": {k: mean(v) for k, v in sorted(lengths.items())},
    "region_count": {k: len(v) for k, v in sorted(lengths.items())},
  }


def run_ncu(names):
  import jax
  import jax.numpy as jnp

  programs, x, y, _ = tile_programs()
  programs["xla_product"] = lambda x, y: jnp.dot(x, y.T, preferred_element_type=jnp.float32).astype(
    x.dtype
  )
  fns = {name: jax.jit(programs[name]) for name in names}
  for fn in fns.values():
    jax.block_until_ready(fn(x, y))
  cuda = ctypes.CDLL("libcuda.so.1")
  cuda.cuProfilerStart()
  for name, fn in fns.items():
    jax.block_until_ready(fn(x, y))
    print("profiled", name, flush=True)
  cuda.cuProfilerStop()


def run_trace(directory, names, variants, out):
  import jax

  from mmts_jax.losses import _mosaic_tiles as mt

  programs, x, y, _ = tile_programs()
  result = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "argv": sys.argv}
  os.makedirs(directory, exist_ok=True)
  for variant, name in ((v, n) for v in variants for n in names):
    use_variant(variant or None)
    key = f"{name}:{variant}" if variant else name
    before = set(glob.glob(os.path.join(directory, "*.json")))
    try:
      with mt.profiling(directory):
        # A new function, so no trace cached outside the profiler is reused.
        fn = jax.jit(lambda x, y, f=programs[name]: f(x, y))
        jax.block_until_ready(fn(x, y))
    except Exception as e:
      result[key] = {"error": f"{type(e).__name__}: {str(e)[-400:]}"}
      continue
    time.sleep(0.5)
    new = sorted(set(glob.glob(os.path.join(directory, "*.json"))) - before)
    # The copy warpgroup comes after the compute ones (both walks).
    wgs = mt.config("bwd" if "_ds" in name else "fwd").wgs
    try:
      with open(new[-1]) as f:
        result[key] = summarise(json.load(f), compute_wgs=wgs, wgs_per_cta=wgs + 1)
    except Exception as e:  # a trace that did not come is a result too
      result[key] = {"error": f"{type(e).__name__}: {str(e)[:400]}", "files": new}
    print(key, json.dumps(result[key]), flush=True)
    write_json(out, result)
  use_variant(None)


class _CapturedOutput:
  """Everything written to file descriptors 1 and 2 inside (ptxas's report comes from C++)."""

  def __enter__(self):
    sys.stdout.flush()
    sys.stderr.flush()
    self.file = tempfile.TemporaryFile(mode="w+b")
    self.saved = [os.dup(1), os.dup(2)]
    for fd in (1, 2):
      os.dup2(self.file.fileno(), fd)
    return self

  def __exit__(self, *exc):
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, saved in zip((1, 2), self.saved, strict=True):
      os.dup2(saved, fd)
      os.close(saved)
    self.file.seek(0)
    self.text = self.file.read().decode(errors="replace")
    self.file.close()


def run_ptxas(names, variants, out):
  import jax

  os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"
  programs, x, y, _ = tile_programs()
  result = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "argv": sys.argv}
  for variant, name in ((v, n) for v in variants for n in names):
    use_variant(variant or None)
    key = f"{name}:{variant}" if variant else name
    try:
      with _CapturedOutput() as cap:
        fn = jax.jit(lambda x, y, f=programs[name]: f(x, y))
        jax.block_until_ready(fn(x, y))
      result[key] = {**parse_ptxas(cap.text), "report": cap.text[-1500:]}
    except Exception as e:
      result[key] = {"error": f"{type(e).__name__}: {str(e)[-400:]}"}
    print(key, json.dumps({k: v for k, v in result[key].items() if k != "report"}), flush=True)
    write_json(out, result)
  use_variant(None)


# Gap bins of `gaps`, in microseconds (upper edges; the last bin is open).
GAP_BINS_US = (1, 2, 5, 20, 100)


def gaps(events, calls: int, top: int = 8) -> dict:
  """The idle time of one stream between `calls` back-to-back calls' kernels.

  `events`: `(start_ns, end_ns, name)` of every kernel on the stream. Returns the span (first
  start to last end) and the busy and idle time per call, the gaps per call binned by length
  (`GAP_BINS_US`), and the `top` longest gaps with the kernels before and after. Overlapping
  kernels (none on one stream) count once.

  Example:
    >>> g = gaps([(0, 10_000, "a"), (13_000, 20_000, "b")], calls=1)
    >>> g["idle_ms_per_call"], g["count_per_call"]["<=5us"]
    (0.003, 1.0)
  """
  if calls < 1:
    raise ValueError(f"gaps: calls must be >= 1, got {calls}")
  ev = sorted(events)
  if not ev:
    return {"kernels_per_call": 0}
  labels = [f"<={b}us" for b in GAP_BINS_US] + [f">{GAP_BINS_US[-1]}us"]
  binned = dict.fromkeys(labels, 0.0)
  time_in = dict.fromkeys(labels, 0.0)
  longest, end, prev, busy = [], ev[0][1], ev[0][2], ev[0][1] - ev[0][0]
  for start, stop, name in ev[1:]:
    gap = start - end
    if gap > 0:
      us = gap / 1e3
      label = next(
        (lb for lb, b in zip(labels[:-1], GAP_BINS_US, strict=True) if us <= b), labels[-1]
      )
      binned[label] += 1
      time_in[label] += gap
      longest.append((gap, prev, name))
    busy += max(0, stop - max(start, end))
    if stop > end:
      end, prev = stop, name
  span = end - ev[0][0]
  longest.sort(key=lambda t: -t[0])
  return {
    "kernels_per_call": round(len(ev) / calls, 1),
    "span_ms_per_call": round(span / 1e6 / calls, 3),
    "busy_ms_per_call": round(busy / 1e6 / calls, 3),
    "idle_ms_per_call": round((span - busy) / 1e6 / calls, 3),
    "count_per_call": {k: round(v / calls, 1) for k, v in binned.items()},
    "idle_ms_per_call_by_bin": {k: round(v / 1e6 / calls, 3) for k, v in time_in.items()},
    "longest": [
      {"us": round(g / 1e3, 1), "after": a[:80], "before": b[:80]} for g, a, b in longest[:top]
    ],
  }


def _trace_planes(trace_dir: str) -> list:
  """The planes of the newest `jax.profiler` trace under `trace_dir` (none if it wrote none)."""
  from jax.profiler import ProfileData

  files = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
  return list(ProfileData.from_file(files[-1]).planes) if files else []


def stream_events(planes) -> dict[str, list]:
  """`{"plane | line": [(start_ns, end_ns, name), ...]}` of the GPU stream lines of `planes`."""
  out = {}
  for plane in planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      if "stream" in line.name.lower():
        out[f"{plane.name} | {line.name}"] = [(e.start_ns, e.end_ns, e.name) for e in line.events]
  return out


def host_events(planes, min_us: float = 20.0) -> list:
  """`(start_ns, end_ns, name)` of the host planes' events of at least `min_us`."""
  out = []
  for plane in planes:
    if plane.name.startswith("/host:"):
      for line in plane.lines:
        out += [
          (e.start_ns, e.end_ns, e.name) for e in line.events if e.duration_ns >= min_us * 1e3
        ]
  return out


def split_calls(annotations, kernels, host, top: int = 12) -> list:
  """Per timed call (`annotations`: its `(start_ns, end_ns, name)` on the host): its wall time,
  when its first kernel started after the call did (`dispatch_us`), how long after its last
  kernel ended the call returned (`tail_us`), the GPU span between, and the longest host events
  inside the call's dispatch (before its first kernel) and those that end in its tail.

  Example:
    >>> c = split_calls([(0, 100_000, "t0")], [(30_000, 90_000, "k")], [(1_000, 25_000, "launch")])
    >>> c[0]["dispatch_us"], c[0]["gpu_span_us"], c[0]["tail_us"], c[0]["dispatch_host"][0]["name"]
    (30.0, 60.0, 10.0, 'launch')
  """
  out = []
  for a0, a1, name in sorted(annotations):
    ks = [k for k in kernels if a0 <= k[0] and k[1] <= a1]
    if not ks:
      out.append({"call": name, "wall_us": round((a1 - a0) / 1e3, 1), "kernels": 0})
      continue
    k0, k1 = min(k[0] for k in ks), max(k[1] for k in ks)
    inside = sorted(
      (h for h in host if a0 <= h[0] < k0 and h[2] != name), key=lambda h: h[0] - h[1]
    )
    after = sorted(
      (h for h in host if k1 <= h[1] <= a1 and h[2] != name), key=lambda h: h[0] - h[1]
    )
    out.append(
      {
        "call": name,
        "wall_us": round((a1 - a0) / 1e3, 1),
        "kernels": len(ks),
        "dispatch_us": round((k0 - a0) / 1e3, 1),
        "gpu_span_us": round((k1 - k0) / 1e3, 1),
        "tail_us": round((a1 - k1) / 1e3, 1),
        "dispatch_host": _host_rows(inside[:top], a0),
        "tail_host": _host_rows(after[:top], a0),
      }
    )
  return out


def _host_rows(events, a0) -> list:
  return [
    {"name": h[2][:80], "at_us": round((h[0] - a0) / 1e3, 1), "us": round((h[1] - h[0]) / 1e3, 1)}
    for h in events
  ]


def call_spans(planes, streams) -> list:
  """`split_calls` of the `timed_call_*` annotations in `planes` (`streams`: their
  `stream_events`)."""
  host = host_events(planes)
  ann = [h for h in host if h[2].startswith("timed_call_")]
  return split_calls(ann, [k for v in streams.values() for k in v], host)


def run_loss(size, cases, kernels, out, calls=2, hlo_dir=None):
  import jax

  result = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "argv": sys.argv}
  for loss, dtype in cases:
    for kernel in kernels:
      key = f"{loss}:{dtype}:{kernel}"
      try:
        x, y, _, both = compiled(kernel, size, loss, dtype)
        if hlo_dir:
          os.makedirs(hlo_dir, exist_ok=True)
          with gzip.open(
            os.path.join(hlo_dir, f"{key.replace(':', '_')}_{size}.hlo.gz"), "wt"
          ) as f:
            f.write(both.as_text() or "")
        jax.block_until_ready(both(x, y))
        trace_dir = tempfile.mkdtemp(prefix="loss_trace_")
        jax.profiler.start_trace(trace_dir)
        for i in range(calls):
          with jax.profiler.TraceAnnotation(f"timed_call_{i}"):
            jax.block_until_ready(both(x, y))
        jax.profiler.stop_trace()
        planes = _trace_planes(trace_dir)
        streams = stream_events(planes)
        total, count = collections.Counter(), collections.Counter()
        lines = [name.partition(" | ")[2] for name in streams]  # the lines that hold the kernels
        for start, end, kernel in (k for v in streams.values() for k in v):
          total[kernel] += end - start
          count[kernel] += 1
        result[key] = {
          "lines": lines,
          "kernel_ms_per_call": round(sum(total.values()) / 1e6 / calls, 3),
          "kernels": [
            {
              "name": k[:120],
              "ms_per_call": round(v / 1e6 / calls, 3),
              "launches": count[k] // calls,
            }
            for k, v in total.most_common(25)
          ],
          "gaps": {k: gaps(v, calls) for k, v in streams.items()},
          "calls": call_spans(planes, streams),
        }
      except Exception as e:
        result[key] = {"error": f"{type(e).__name__}: {str(e)[-400:]}"}
      print(key, json.dumps(result[key])[:2000], flush=True)
      write_json(out, result)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("mode", choices=("ncu", "trace", "ptxas", "loss"))
  ap.add_argument("--programs", default=None, help="comma-separated names (default: all)")
  ap.add_argument("--dir", default="traces")
  ap.add_argument(
    "--variants",
    default="",
    help="trace, ptxas: comma-separated, among '' (defaults), " + ", ".join(VARIANTS),
  )
  ap.add_argument("--size", type=int, default=131072, help="loss: B")
  ap.add_argument("--cases", default="infonce:bf16", help="loss: loss:dtype pairs")
  ap.add_argument("--kernels", default="auto,mosaic", help="loss: kernel choices")
  ap.add_argument("--hlo", default=None, help="loss: folder for each case's optimized HLO")
  ap.add_argument("--out", default="trace_summary.json")
  args = ap.parse_args(argv)
  if args.mode == "ncu":
    names = (args.programs or "mosaic_fwd,triton_fwd,triton_ds,mosaic_ds,xla_product").split(",")
    run_ncu(names)
  elif args.mode == "loss":
    cases = [tuple(c.split(":")) for c in args.cases.split(",")]
    run_loss(args.size, cases, args.kernels.split(","), args.out, hlo_dir=args.hlo)
  else:
    names = (args.programs or "mosaic_fwd,mosaic_ds,mosaic_mm_fwd,mosaic_mm_ds").split(",")
    run = run_trace if args.mode == "trace" else run_ptxas
    kw = {"directory": args.dir} if args.mode == "trace" else {}
    run(names=names, variants=args.variants.split(","), out=args.out, **kw)
  return 0


if __name__ == "__main__":
  sys.exit(main())
