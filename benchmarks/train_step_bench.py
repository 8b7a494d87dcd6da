"""Train-step time: fixed temperature vs MM-TS (schedule + per-sample shift gather), one device.

Builds the real trainer state and the real jitted, donated step with `mmts_jax.train.setup`
for a CLIP-style dual encoder (ViT-B/16 image tower, 12-layer
width-512 text transformer, 512-d embeddings, bf16 compute, f32 parameters, AdamW) and times
`--steps` steps per round, alternating the two configurations for `--rounds` rounds so that
clock and thermal drift hit both alike. MM-TS gathers from a shift table of `--table-size`
entries (CC3M-sized by default). Also times the per-sample temperature alone (Eq. 8: schedule
+ gather) in a 1000-iteration on-device loop.

  python benchmarks/train_step_bench.py --out benchmarks/results            # H100, < 3 min
  python benchmarks/train_step_bench.py --out /tmp/b --model tiny --batch 32  # CPU smoke test

Writes OUT/train_step_bench.json and prints it.
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
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mmts_jax import train  # noqa: E402
from mmts_jax.data import sources  # noqa: E402
from mmts_jax.train import setup  # noqa: E402

MODELS = {
    # ViT-B/16 at 224 px + CLIP's text transformer (77 tokens, BPE vocabulary).
    "vit_b16": dict(image=dict(name="vit", variant="B/16"), image_size=224,
                    text=dict(name="transformer", vocab_size=49408, max_len=77, width=512,
                              depth=12, num_heads=8, mlp_dim=2048, pool="eot", causal=True),
                    embed_dim=512),
    "tiny": dict(image=dict(name="vit", variant="mu/8"), image_size=32,
                 text=dict(name="transformer", vocab_size=100, max_len=8, width=32, depth=1,
                           num_heads=2, mlp_dim=64), embed_dim=16),
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
  return {"image": rng.normal(size=(batch, s, s, 3)).astype(np.float32), "text": tokens,
          "index": rng.integers(0, table_size, size=batch).astype(np.int32)}


class _FixedBatchSource:
  """The trainer's source protocol over one host batch (shapes are what the step sees; the data
  does not matter for timing); its cluster sizes give the CC3M-sized shift table."""

  def __init__(self, batch, sizes):
    self.batch, self.cluster_sizes = batch, sizes
    self.num_examples, self.fingerprint = len(sizes), None

  def iterate(self, start_batch=0, process_index=0, process_count=1):
    while True:
      yield self.batch


def _build_pair(model, batch, table_size):
  """The fixed and the MM-TS runs from `mmts_jax.train.setup` (same seed, same parameters)."""
  c, spec = _config(model, "mmts", batch)
  sizes = np.clip(np.random.default_rng(1).zipf(1.5, size=table_size), 1, 10_000)
  host_batch = _batch(spec, batch, table_size)
  sources.SOURCES["train_step_bench"] = lambda cfg, **kw: _FixedBatchSource(host_batch, sizes)
  c.data.name = "train_step_bench"
  c.mesh.num_devices = 1
  runs = {}
  for mode in ("fixed", "mmts"):
    c.temperature.mode = mode
    run = setup(c)
    dev_batch = run.to_device(host_batch)
    t0 = time.perf_counter()
    compiled = run.step_fn.lower(run.state, dev_batch).compile()
    runs[mode] = {"state": run.state, "step": compiled, "batch": dev_batch,
                  "compile_s": time.perf_counter() - t0,
                  "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.state.params)),
                  "policy": run.policy, "table": run.shift_table}
  return runs


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
  index = jnp.asarray(np.random.default_rng(2).integers(0, table.shape[0], size=batch),
                      jnp.int32)

  @jax.jit
  def loop(index):
    def body(i, acc):
      return acc + jnp.sum(policy.values(state, step=i, index=(index + i) % table.shape[0],
                                         model_temperature=None))
    return jax.lax.fori_loop(0, iters, body, jnp.float32(0))

  jax.block_until_ready(loop(index))
  t0 = time.perf_counter()
  jax.block_until_ready(loop(index))
  return (time.perf_counter() - t0) / iters * 1e6


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="directory for train_step_bench.json")
  p.add_argument("--model", choices=sorted(MODELS), default="vit_b16")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--steps", type=int, default=10, help="timed steps per round")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--table-size", type=int, default=2_900_000, help="shift-table entries (CC3M)")
  args = p.parse_args(argv)

  runs = _build_pair(args.model, args.batch, args.table_size)
  for run in runs.values():
    _time(run, 3)                                   # warm-up (allocator, autotuning)
  times = {mode: [] for mode in runs}
  for _ in range(args.rounds):
    for mode, run in runs.items():
      times[mode].append(_time(run, args.steps))
  result = {
      "bench": "train_step", "model": args.model, "batch": args.batch, "dtype": "bfloat16",
      "steps_per_round": args.steps, "rounds": args.rounds, "table_size": args.table_size,
      "device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
      "jax": jax.__version__, "python": platform.python_version(),
  }
  for mode, ts in times.items():
    med = statistics.median(ts)
    result[mode] = {"step_ms_median": med * 1e3, "step_ms_min": min(ts) * 1e3,
                    "step_ms_max": max(ts) * 1e3, "examples_per_sec": args.batch / med,
                    "compile_s": runs[mode]["compile_s"], "params": runs[mode]["params"]}
  fixed, mmts = result["fixed"]["step_ms_median"], result["mmts"]["step_ms_median"]
  result["mmts_overhead_pct"] = (mmts - fixed) / fixed * 100
  t_us = _temperature_only_us(runs["mmts"]["policy"], runs["mmts"]["table"], args.batch)
  result["temperature_only_us"] = t_us
  result["temperature_only_pct_of_step"] = t_us / 1e3 / fixed * 100
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
  if stats and "peak_bytes_in_use" in stats:
    result["peak_gib"] = stats["peak_bytes_in_use"] / 2 ** 30

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
