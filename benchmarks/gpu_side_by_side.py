"""One GPU run, side by side: the project's train step vs OpenCLIP's compiled ViT-B-16 step,
the card's bf16 matmul rate, and (optionally) the Flax MiniLM vs sentence-transformers.

Compilation overlaps, timing never does. Phase 1 (untimed, in parallel): `train_step_bench.py`
compiles every batch size and waits; `encoder_bench.py` compiles its buckets, loads
sentence-transformers and waits; OpenCLIP runs once per batch size to fill the TorchInductor
cache (those runs' numbers are discarded). Phase 2 (one process on the GPU at a time): matmul
rate, our timed steps, OpenCLIP compiled per batch size (now a cache hit, timed by its own
script), the encoder's alternating passes, the matmul rate again.

  python benchmarks/gpu_side_by_side.py --out DIR --peer peer_openclip_step.py \
      --batches 256,512 [--variants base,fast --mmts base,fast --components fast \
      --profile base,fast] [--encoder --captions CSV --reference NPZ] [--deadline-s 200]

`--variants`, `--mmts`, `--components` and `--profile` go to `train_step_bench.py` (its
components and profile run after its timing, before OpenCLIP's timed run).

Writes DIR/side_by_side.json after every step (what finished survives a timeout).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent


def clip_b16_flops_per_example(image_size: int = 224, patch: int = 16, text_len: int = 77) -> float:
  """Forward + backward FLOP of one example of CLIP ViT-B/16 + its 12-layer text transformer.

  Per token and layer a pre-LN block multiplies `4 w^2` (q, k, v, out) `+ 2 w m` (MLP) weights
  and `2 L w` attention terms (q k^T, a v); a product costs 2 FLOP per multiply-add and the
  backward twice the forward, so FLOP = 3 * 2 * (sum over towers of depth * L * per-token MACs
  + patch embedding). Layer norms, softmax and the loss are left out (under 1%).

  Example:
    >>> round(clip_b16_flops_per_example() / 1e9, 1)
    123.3
  """

  def tower(width, depth, mlp, length):
    return depth * length * (4 * width**2 + 2 * width * mlp + 2 * length * width)

  patches = (image_size // patch) ** 2
  macs = (
    tower(768, 12, 3072, patches + 1)
    + patches * 3 * patch**2 * 768
    + tower(512, 12, 2048, text_len)
  )
  return 3 * 2 * macs


class Driver:
  def __init__(self, out: pathlib.Path, deadline_s: float):
    self.out, self.deadline = out, time.monotonic() + deadline_s
    self.t0 = time.monotonic()
    self.result = {"steps": [], "skipped": []}
    out.mkdir(parents=True, exist_ok=True)

  def log(self, msg):
    print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

  def save(self):
    path = self.out / "side_by_side.json"
    with open(f"{path}.tmp", "w") as f:
      json.dump(self.result, f, indent=1)
    os.replace(f"{path}.tmp", path)

  def left(self) -> float:
    return self.deadline - time.monotonic()

  def json_line(self, cmd, what, env=None, timeout=None) -> dict | None:
    """Runs `cmd`, keeps its last JSON line under `what`."""
    self.log(f"start {what}")
    t = time.monotonic()
    try:
      proc = subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout or max(self.left(), 1),
      )
    except subprocess.TimeoutExpired:
      self.result["skipped"].append(f"{what}: timed out")
      self.save()
      return None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    rec = {"what": what, "rc": proc.returncode, "wall_s": time.monotonic() - t}
    if lines:
      rec.update(json.loads(lines[-1]))
    else:
      rec["stderr_tail"] = proc.stderr[-2000:]
    self.log(f"done {what}: {json.dumps(rec)[:400]}")
    return rec


def _cpu_set(spec: str) -> set[int]:
  """ "10-15,3" -> {3, 10, 11, 12, 13, 14, 15}; "" -> set().

  Example:
    >>> sorted(_cpu_set("10-12,3"))
    [3, 10, 11, 12]
  """
  cpus = set()
  for part in filter(None, spec.split(",")):
    lo, _, hi = part.partition("-")
    if not lo.isdigit() or (hi and not hi.isdigit()):
      raise ValueError(f"--warm-cpus must look like 10-15,3, got {spec!r}")
    cpus.update(range(int(lo), int(hi or lo) + 1))
  return cpus


def _wait(paths, procs, driver, limit):
  """Blocks until every file in `paths` exists or a process in `procs` exits early."""
  while time.monotonic() < limit:
    if all(os.path.exists(p) for p in paths):
      return True
    if any(p.poll() is not None for p in procs):
      driver.log("a phase-1 process exited early")
      return all(os.path.exists(p) for p in paths)
    time.sleep(0.5)
  return False


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--peer", required=True, help="peer_openclip_step.py")
  p.add_argument("--batches", default="256,512")
  p.add_argument("--model", default="vit_b16", help="train_step_bench model ('tiny': smoke test)")
  p.add_argument("--table-size", default="2900000")
  p.add_argument("--variants", default="base", help="train_step_bench.py --variants")
  p.add_argument("--mmts", default=None, help="train_step_bench.py --mmts")
  p.add_argument("--components", default="", help="train_step_bench.py --components")
  p.add_argument("--profile", default="", help="train_step_bench.py --profile")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--deadline-s", type=float, default=200)
  p.add_argument(
    "--phase2-s",
    type=float,
    default=85,
    help="seconds kept for the timed phase: the cache fillers stop before",
  )
  p.add_argument(
    "--warm-cpus",
    default="",
    help="CPU ids (e.g. 10-15) the untimed OpenCLIP cache fillers are pinned to, leaving the "
    "other cores to our compiles",
  )
  p.add_argument("--encoder", action="store_true")
  p.add_argument("--captions")
  p.add_argument("--reference")
  p.add_argument("--jax-batch-sizes", default="256,1024")
  p.add_argument("--st-batch-sizes", default="32,128,256,512,1024")
  p.add_argument("--encoder-repeats", type=int, default=3)
  args = p.parse_args(argv)
  out = pathlib.Path(args.out)
  d = Driver(out, args.deadline_s)
  py = sys.executable
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
  batches = [int(b) for b in args.batches.split(",")]
  flops = clip_b16_flops_per_example()
  d.result.update(batches=batches, flops_per_example=flops, deadline_s=args.deadline_s)
  sig = pathlib.Path(tempfile.mkdtemp(prefix="side_by_side_"))  # not under OUT: few files back

  # Phase 1: compile everything side by side.
  jlog = open(out / "jax_train.log", "w")  # noqa: SIM115 (outlives this block: the child writes it)
  jax_proc = subprocess.Popen(
    [
      py,
      str(HERE / "train_step_bench.py"),
      "--out",
      str(out),
      "--batch",
      args.batches,
      "--model",
      args.model,
      "--table-size",
      args.table_size,
      "--variants",
      args.variants,
      *(["--mmts", args.mmts] if args.mmts is not None else []),
      "--components",
      args.components,
      "--profile",
      args.profile,
      "--deadline-s",
      str(max(d.left() - 5, 1)),
      "--compile-s",
      str(max(d.left() - args.phase2_s - 10, 1)),
      "--steps",
      str(args.steps),
      "--rounds",
      str(args.rounds),
      "--ready-file",
      str(sig / "jax_ready"),
      "--go-file",
      str(sig / "jax_go"),
    ],
    stdout=jlog,
    stderr=subprocess.STDOUT,
    env=env,
  )
  procs, ready = [jax_proc], [sig / "jax_ready"]
  enc_proc = None
  if args.encoder:
    elog = open(out / "encoder.log", "w")  # noqa: SIM115 (the child writes it)
    enc_proc = subprocess.Popen(
      [
        py,
        str(HERE / "encoder_bench.py"),
        "--out",
        str(out),
        "--captions",
        args.captions,
        "--reference",
        args.reference,
        "--batch-sizes",
        args.jax_batch_sizes,
        "--st-batch-sizes",
        args.st_batch_sizes,
        "--repeats",
        str(args.encoder_repeats),
        "--ready-file",
        str(sig / "enc_ready"),
        "--go-file",
        str(sig / "enc_go"),
      ],
      stdout=elog,
      stderr=subprocess.STDOUT,
      env=env,
    )
    procs.append(enc_proc)
    ready.append(sig / "enc_ready")
  # OpenCLIP once per batch size, in parallel: fills the TorchInductor cache; numbers discarded.
  # Killed at the phase-1 cap: a cache filler must never overlap the timed phase.
  cpus = _cpu_set(args.warm_cpus)
  warm = {
    b: subprocess.Popen(
      [py, args.peer, str(b), "compile"],
      stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL,
      text=True,
      env=dict(env, TORCHINDUCTOR_COMPILE_THREADS=str(len(cpus))) if cpus else env,
      preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    for b in batches
  }
  cap = time.monotonic() + max(d.left() - args.phase2_s, 1)
  _wait(ready, procs, d, cap)
  for path, proc in zip(
    ready, procs, strict=True
  ):  # not compiled by the cap: stopped, so that the rest
    if not os.path.exists(path):  # of the run is timed on a quiet GPU
      proc.kill()
      d.result["skipped"].append(f"{path.name}: not ready at the phase-1 cap, killed")
  d.result["openclip_warmup_untimed"] = {}
  for b, proc in warm.items():
    try:
      text, _ = proc.communicate(timeout=max(cap - time.monotonic(), 1))
      d.result["openclip_warmup_untimed"][f"b{b}"] = (
        text.strip().splitlines()[-1:] or proc.returncode
      )
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.communicate()
      d.result["openclip_warmup_untimed"][f"b{b}"] = "killed at the phase-1 cap"
  d.result["phase1_s"] = time.monotonic() - d.t0
  d.log("phase 1 done")

  # Phase 2: one timed thing at a time.
  rate = d.json_line([py, str(HERE / "matmul_rate.py")], "matmul rate (before)", env=env)
  d.result["matmul_before"] = rate
  d.save()
  (sig / "jax_go").touch()
  try:
    jax_proc.wait(timeout=max(d.left(), 1))
  except subprocess.TimeoutExpired:
    jax_proc.kill()
    d.result["skipped"].append("mmts_jax timing: deadline")
  jpath = out / f"train_step_bench_{args.model}.json"
  d.result["mmts_jax"] = json.loads(jpath.read_text()) if jpath.exists() else None
  d.save()
  d.result["openclip"] = []
  for b in batches:
    if d.left() < 20:
      d.result["skipped"].append(f"openclip b{b}: deadline")
      continue
    d.result["openclip"].append(
      d.json_line([py, args.peer, str(b), "compile"], f"openclip compiled b{b}", env=env)
    )
    d.save()
  if enc_proc is not None:
    (sig / "enc_go").touch()
    try:
      enc_proc.wait(timeout=max(d.left(), 1))
    except subprocess.TimeoutExpired:
      enc_proc.kill()
      d.result["skipped"].append("encoder: deadline")
    epath = out / "encoder_gpu.json"
    d.result["encoder"] = json.loads(epath.read_text()) if epath.exists() else None
    d.save()
  if d.left() > 10:
    d.result["matmul_after"] = d.json_line(
      [py, str(HERE / "matmul_rate.py")], "matmul rate (after)", env=env
    )
  _summary(d.result)
  d.save()
  print(json.dumps(d.result.get("summary"), indent=1))
  return 0


def _summary(r: dict):
  """Examples/s, step ms, peak GiB and fraction of the bf16 matmul rate, both sides."""
  rates = [
    x["bf16_tflops"]
    for x in (r.get("matmul_before"), r.get("matmul_after"))
    if x and "bf16_tflops" in x
  ]
  tflops = max(rates) if rates else None
  rows = []
  ours = r.get("mmts_jax") or {}
  for key, v in ours.items():
    if isinstance(v, dict) and "step_ms_median" in v:
      rows.append(
        {
          "side": f"mmts_jax {key}",
          "variant": key.rsplit("_", 2)[0],
          "batch": v["batch"],
          "step_ms": v["step_ms_median"],
          "examples_per_s": v["examples_per_sec"],
          "peak_gib": v.get("xla_step_gib"),
        }
      )
  for v in r.get("openclip") or []:
    if v and "step_ms_median" in v:
      rows.append(
        {
          "side": v["peer"],
          "batch": v["batch"],
          "step_ms": v["step_ms_median"],
          "examples_per_s": v["examples_per_sec"],
          "peak_gib": v["peak_gib"],
        }
      )
  for row in rows:
    row["fraction_of_bf16_matmul"] = (
      row["examples_per_s"] * r["flops_per_example"] / 1e12 / tflops if tflops else None
    )
  ratios = {}  # examples/s of ours over OpenCLIP compiled's, per variant (fixed temperature)
  for row in rows:
    if row["side"].startswith("open_clip"):
      for x in rows:
        if x["side"].startswith("mmts_jax") and x["side"].endswith(f"_fixed_b{row['batch']}"):
          key = f"{x['variant']}_b{row['batch']}"
          ratios[key] = x["examples_per_s"] / row["examples_per_s"]
  r["summary"] = {"bf16_tflops": tflops, "rows": rows, "mmts_jax_over_openclip": ratios}


if __name__ == "__main__":
  sys.exit(main())
