"""Train-step time: fixed temperature vs MM-TS (schedule + per-sample shift gather), one device.

Builds the real trainer state (`mmts_jax.train.init_train_state`) and the real jitted, donated
step (`compile_train_step`) for a CLIP-style dual encoder (ViT-B/16 image tower, 12-layer
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

from mmts_jax import mesh as mesh_lib  # noqa: E402
from mmts_jax import temperature, train  # noqa: E402
from mmts_jax.models import build_model  # noqa: E402
from mmts_jax.shifts import cluster_shift  # noqa: E402

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


def _build_pair(model, batch, table_size, mesh):
  """The MM-TS state and, sharing its initial parameters (one init compile), the fixed one."""
  c, spec = _config(model, "mmts", batch)
  mmts_spec = temperature.from_config(c.temperature, c.mmts, total_steps=c.total_steps)
  fixed_spec = temperature.from_config(dict(c.temperature, mode="fixed"), c.mmts,
                                       total_steps=c.total_steps)
  sizes = np.clip(np.random.default_rng(1).zipf(1.5, size=table_size), 1, 10_000)
  table = cluster_shift(sizes.astype(np.float64), c.mmts.sh_min, c.mmts.sh_max).astype(
      np.float32)
  net = build_model(c.model)
  tx, lr = train.make_optimizer(c.optim, c.total_steps)
  loss = train.LossSpec("infonce", "auto", None, mesh)
  host_batch = _batch(spec, batch, table_size)
  state, shardings = train.init_train_state(
      net, tx, mmts_spec, loss, rng=jax.random.PRNGKey(0), sample_batch=host_batch,
      shift_table=table, mesh=mesh, lr_schedule=lr)
  dev_batch = mesh_lib.global_batch(host_batch, mesh)
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  runs = {}
  for mode, tspec in (("fixed", fixed_spec), ("mmts", mmts_spec)):
    # Each run owns its buffers: the step donates its input state.
    st = jax.tree.map(jnp.copy, state).replace(temperature=tspec)
    if mode == "fixed":
      st = st.replace(shift_table=jnp.zeros((1,), jnp.float32))
    sh = jax.tree.map(lambda x: x.sharding, st)
    t0 = time.perf_counter()
    compiled = train.compile_train_step(sh, mesh).lower(st, dev_batch).compile()
    runs[mode] = {"state": st, "step": compiled, "batch": dev_batch,
                  "compile_s": time.perf_counter() - t0, "params": params, "spec": tspec,
                  "table": table}
  del state, shardings
  return runs


def _time(run, steps: int) -> float:
  state = run["state"]
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = run["step"](state, run["batch"])
  jax.block_until_ready((state, metrics))
  run["state"] = state
  return (time.perf_counter() - t0) / steps


def _temperature_only_us(spec, table, batch: int, iters: int = 1000) -> float:
  """Per-call time of `schedule(step) + table[index]` inside one compiled loop."""
  table = jnp.asarray(table)
  index = jnp.asarray(np.random.default_rng(2).integers(0, table.shape[0], size=batch),
                      jnp.int32)

  @jax.jit
  def loop(index):
    def body(i, acc):
      return acc + jnp.sum(spec(i, (index + i) % table.shape[0], table))
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

  mesh = mesh_lib.make_mesh(1)
  runs = _build_pair(args.model, args.batch, args.table_size, mesh)
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
  t_us = _temperature_only_us(runs["mmts"]["spec"], runs["mmts"]["table"], args.batch)
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
