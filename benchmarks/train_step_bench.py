"""Train-step time: fixed temperature vs MM-TS (schedule + per-sample shift gather), one device.

Builds the real trainer state and the real jitted, donated step with `mmts_jax.train.setup`
for a CLIP-style dual encoder (ViT-B/16 image tower, 12-layer
width-512 text transformer, 512-d embeddings, bf16 compute, f32 parameters, AdamW) and times
`--steps` steps per round, alternating the two configurations for `--rounds` rounds so that
clock and thermal drift hit both alike. MM-TS gathers from a shift table of `--table-size`
entries (CC3M-sized by default). Also times the per-sample temperature alone (Eq. 8: schedule
+ gather) in a 1000-iteration on-device loop.

  python benchmarks/train_step_bench.py --out benchmarks/results            # H100, < 3 min
  python benchmarks/train_step_bench.py --out DIR --batch 256,512 --modes fixed,mmts
  python benchmarks/train_step_bench.py --out /tmp/b --model tiny --batch 32  # CPU smoke test

Several batch sizes compile side by side (threads) and time in alternation; the MM-TS mode runs
at the first size only. Memory: `xla_step_gib` is XLA's analysis of one step's executable
(arguments + outputs + temporaries - donated buffers), `peak_gib_process` the allocator's peak
over the whole process (all runs' states resident). Writes OUT/train_step_bench_MODEL.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mmts_jax import train  # noqa: E402
from mmts_jax.data import sources  # noqa: E402
from mmts_jax.models import attention  # noqa: E402
from mmts_jax.train import setup  # noqa: E402

MODELS = {
  # ViT-B/16 at 224 px + CLIP's text transformer (77 tokens, BPE vocabulary).
  "vit_b16": dict(
    image=dict(name="vit", variant="B/16"),
    image_size=224,
    text=dict(
      name="transformer",
      vocab_size=49408,
      max_len=77,
      width=512,
      depth=12,
      num_heads=8,
      mlp_dim=2048,
      pool="eot",
      causal=True,
    ),
    embed_dim=512,
  ),
  "tiny": dict(
    image=dict(name="vit", variant="mu/8"),
    image_size=32,
    text=dict(
      name="transformer", vocab_size=100, max_len=8, width=32, depth=1, num_heads=2, mlp_dim=64
    ),
    embed_dim=16,
  ),
}


def _config(model: str, mode: str, batch: int):
  spec = MODELS[model]
  c = train.default_config()
  c.total_steps, c.batch_size = 10_000, batch
  c.model.update(embed_dim=spec["embed_dim"], dtype="bfloat16")
  c.model.image = spec["image"]
  c.model.text = spec["text"]
  c.temperature.update(mode=mode, value=0.07)
  c.mmts.update(alpha=0.04, sh_min=0.05, sh_max=0.10)
  c.optim.update(lr=1e-4, warmup_steps=100)
  return c, spec


def _batch(spec, batch: int, table_size: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  s, t = spec["image_size"], spec["text"]
  tokens = rng.integers(1, t["vocab_size"], size=(batch, t["max_len"])).astype(np.int32)
  return {
    "image": rng.normal(size=(batch, s, s, 3)).astype(np.float32),
    "text": tokens,
    "index": rng.integers(0, table_size, size=batch).astype(np.int32),
  }


class _FixedBatchSource:
  """The trainer's source protocol over one host batch (shapes are what the step sees; the data
  does not matter for timing); its cluster sizes give the CC3M-sized shift table."""

  def __init__(self, batch, sizes):
    self.batch, self.cluster_sizes = batch, sizes
    self.num_examples, self.fingerprint = len(sizes), None

  def iterate(self, start_batch=0, process_index=0, process_count=1):
    while True:
      yield self.batch


def _build(model, batch, table_size, modes):
  """The runs of `modes` from `mmts_jax.train.setup` (same seed, same parameters), not compiled."""
  c, spec = _config(model, "mmts", batch)
  sizes = np.clip(np.random.default_rng(1).zipf(1.5, size=table_size), 1, 10_000)
  host_batch = _batch(spec, batch, table_size)
  name = f"train_step_bench_{batch}"
  sources.SOURCES[name] = lambda cfg, **kw: _FixedBatchSource(host_batch, sizes)
  c.data.name = name
  c.mesh.num_devices = 1
  runs = {}
  for mode in modes:
    c.temperature.mode = mode
    run = setup(c)
    runs[mode] = {
      "state": run.state,
      "fn": run.step_fn,
      "batch": run.to_device(host_batch),
      "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.state.params)),
      "policy": run.policy,
      "table": run.shift_table,
    }
  return runs


def _progress(msg: str):
  """A timestamped line on stderr: where a slow run spends its time."""
  print(f"[train_step_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _compile(run):
  """Lowers and compiles one run's step; XLA's memory analysis of the executable: arguments +
  outputs + temporaries - donated (aliased) bytes, i.e. the device memory one step needs."""
  t0 = time.perf_counter()
  run["step"] = run["fn"].lower(run["state"], run["batch"]).compile()
  run["compile_s"] = time.perf_counter() - t0
  _progress(f"compiled in {run['compile_s']:.1f} s")
  mem = run["step"].memory_analysis()
  if mem is not None:
    need = (
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      + mem.temp_size_in_bytes
      - mem.alias_size_in_bytes
    )
    run["xla_step_gib"] = need / 2**30
    run["xla_temp_gib"] = mem.temp_size_in_bytes / 2**30


def _wait_for(path: str | None, ready: str | None):
  """Signals `ready` (touches the file) and blocks until `path` exists: lets a driver keep other
  GPU work out of the timed section."""
  if ready:
    pathlib.Path(ready).touch()
  while path and not os.path.exists(path):
    time.sleep(0.2)


def _time(run, steps: int) -> float:
  state = run["state"]
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = run["step"](state, run["batch"])
  jax.block_until_ready((state, metrics))
  run["state"] = state
  return (time.perf_counter() - t0) / steps


def _temperature_only_us(policy, table, batch: int, iters: int = 1000) -> float:
  """Per-call time of `schedule(step) + table[index]` inside one compiled loop."""
  table = jnp.asarray(table)
  state = {"shift_table": table}
  index = jnp.asarray(np.random.default_rng(2).integers(0, table.shape[0], size=batch), jnp.int32)

  @jax.jit
  def loop(index):
    def body(i, acc):
      return acc + jnp.sum(
        policy.values(state, step=i, index=(index + i) % table.shape[0], model_temperature=None)
      )

    return jax.lax.fori_loop(0, iters, body, jnp.float32(0))

  jax.block_until_ready(loop(index))
  t0 = time.perf_counter()
  jax.block_until_ready(loop(index))
  return (time.perf_counter() - t0) / iters * 1e6


def _peak_gib():
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
  return stats["peak_bytes_in_use"] / 2**30 if stats and "peak_bytes_in_use" in stats else None


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="directory for train_step_bench_MODEL.json")
  p.add_argument("--model", choices=sorted(MODELS), default="vit_b16")
  p.add_argument("--batch", default="256", help="batch sizes, comma separated")
  p.add_argument(
    "--modes",
    default="fixed,mmts",
    help="temperature modes at the first batch size (later sizes: the first mode)",
  )
  p.add_argument("--steps", type=int, default=10, help="timed steps per round")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--table-size", type=int, default=2_900_000, help="shift-table entries (CC3M)")
  p.add_argument("--ready-file", help="touched once everything is compiled")
  p.add_argument("--go-file", help="timing starts once this file exists")
  args = p.parse_args(argv)
  batches = [int(b) for b in args.batch.split(",")]
  modes = args.modes.split(",")
  if any(b <= 0 for b in batches) or not set(modes) <= {"fixed", "mmts"}:
    p.error(
      f"--batch must be positive integers and --modes fixed/mmts: {args.batch!r} {args.modes!r}"
    )

  runs = {}
  for i, b in enumerate(batches):
    for mode, run in _build(args.model, b, args.table_size, modes if i == 0 else modes[:1]).items():
      runs[f"{mode}_b{b}"] = run
      _progress(f"set up {mode}_b{b}")
  # XLA compiles outside the GIL: the executables compile side by side.
  threads = [threading.Thread(target=_compile, args=(run,)) for run in runs.values()]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  compile_peak = _peak_gib()
  _wait_for(args.go_file, args.ready_file)
  _progress("timing")
  for run in runs.values():
    _time(run, 3)  # warm-up (allocator, autotuning)
  times = {key: [] for key in runs}
  for _ in range(args.rounds):  # alternate, so that clock and thermal drift hit all alike
    for key, run in runs.items():
      times[key].append(_time(run, args.steps))
  result = {
    "bench": "train_step",
    "model": args.model,
    "batches": batches,
    "dtype": "bfloat16",
    "steps_per_round": args.steps,
    "rounds": args.rounds,
    "table_size": args.table_size,
    "device": jax.devices()[0].device_kind,
    "platform": jax.devices()[0].platform,
    "jax": jax.__version__,
    "python": platform.python_version(),
    "attention": {
      "vit": attention.implementation(jnp.bfloat16, 64, has_mask=False),
      "text": attention.implementation(jnp.bfloat16, 64, has_mask=True),
    },
  }
  for key, ts in times.items():
    med, b = statistics.median(ts), int(key.rsplit("_b", 1)[1])
    run = runs[key]
    result[key] = {
      "batch": b,
      "step_ms_median": med * 1e3,
      "step_ms_min": min(ts) * 1e3,
      "step_ms_max": max(ts) * 1e3,
      "examples_per_sec": b / med,
      "compile_s": run["compile_s"],
      "params": run["params"],
      "xla_step_gib": run.get("xla_step_gib"),
      "xla_temp_gib": run.get("xla_temp_gib"),
    }
  b0 = batches[0]
  if {"fixed", "mmts"} <= set(modes):
    fixed, mmts = result[f"fixed_b{b0}"]["step_ms_median"], result[f"mmts_b{b0}"]["step_ms_median"]
    result["mmts_overhead_pct"] = (mmts - fixed) / fixed * 100
    run = runs[f"mmts_b{b0}"]
    t_us = _temperature_only_us(run["policy"], run["table"], b0)
    result["temperature_only_us"] = t_us
    result["temperature_only_pct_of_step"] = t_us / 1e3 / fixed * 100
  # The allocator's peak over the whole process: every run's state stays resident.
  result["peak_gib_process"] = _peak_gib()
  result["peak_gib_after_compile"] = compile_peak

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"train_step_bench_{args.model}.json"
  fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{path.name}.")
  with os.fdopen(fd, "w") as f:
    json.dump(result, f, indent=2)
  os.replace(tmp, path)
  print(json.dumps(result, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
