"""GradCache vs plain gradient accumulation at a large global batch on one device.

Both runs are the real trainer step from `mmts_jax.train.setup` with
`config.train.micro_batch_size` set (`mmts_jax/train/grad_cache.py`), the same model, initial
parameters, input batch and MM-TS temperatures; only `config.train.accumulation` differs:

* `grad_cache`: embed all micro-batches, the InfoNCE loss over the whole global batch (every
  negative kept), backpropagate micro-batch by micro-batch (3 tower passes per example);
* `plain`: each micro-batch's own loss (negatives only within it), gradients averaged
  (2 passes per example): NOT the big-batch update, the usual baseline.

Model (`vit_b16`): the project's ViT-B/16 image tower at 224 px (86M parameters; cuDNN
attention, dense patch embedding, fused q/k/v) and a
one-hidden-layer MLP text tower over precomputed 512-d text features (the text side is kept
small so that the image tower, the expensive one, dominates), 512-d embeddings, bf16 compute,
f32 parameters, AdamW + clipping. The batch is random data generated on the device (float32
pixels as `data.sources.to_device` delivers them); timing does not depend on its values.

The steps (and the parts) are compiled ahead of time in parallel threads; `grad_cache` runs its
`--steps` steps as soon as it is compiled (while `plain` may still compile on the host), then
`plain`.
With `--ready-file` / `--go-file` both compile first, the file `--ready-file` is touched, and
timing waits for `--go-file` to exist (a driver keeps other GPU work out of the timed part).
`peak_gib_after` is the allocator's process-wide peak after that method's steps (so `plain`'s
includes `grad_cache`'s); `xla_*_gib` is each executable's own buffer
assignment (`compiled.memory_analysis()`), the per-method comparison.

`--parts` times, once everything is compiled and before the steps, the pieces a GradCache step
is made of (`part_fns`: one micro-batch's forward, its forward + backward, the policy + loss
over the global batch, the optimizer update) and records the step they predict
(`expected_grad_cache_step_s`); a step far slower than that points at the step's structure
rather than the towers. `--methods big` adds the one-pass `train_step` over the whole batch
(small batches only). `--memory-only` compiles the steps for an abstract batch and writes XLA's
buffer assignment, running nothing (a CPU can check the memory of the 32,768 step). No step is
started past `--deadline-s`.

  python benchmarks/grad_cache_bench.py --out DIR --parts --steps 2 --deadline-s 200  # one H200
  python benchmarks/grad_cache_bench.py --out /tmp/b --model tiny --batch 256 --micro 32 \
      --methods grad_cache,plain,big --parts --steps 5 --reps 10                       # CPU
  python benchmarks/grad_cache_bench.py --out /tmp/b --memory-only          # CPU, 32,768 / 512

Writes OUT/grad_cache_bench_MODEL.json (after each method, so a cut-short run keeps the first).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from mmts_jax import atomic_io, train
from mmts_jax.data import sources
from mmts_jax.train import grad_cache
from mmts_jax.train.step import compile_train_step

MODELS = {
  "vit_b16": dict(
    # The fastest ViT-B/16 options of train_step_bench.py on the H200 (variant fast+qkv:
    # cuDNN attention, patch embedding as one product, fused q/k/v).
    image=dict(name="vit", variant="B/16", attention="auto", patch_embed="dense", fused_qkv=True),
    image_size=224,
    text_dim=512,
    text=dict(name="features", hidden_dims=(1024,)),
    embed_dim=512,
  ),
  "tiny": dict(
    image=dict(name="vit", variant="mu/8"),
    image_size=32,
    text_dim=16,
    text=dict(name="features", hidden_dims=(32,)),
    embed_dim=16,
  ),
}
METHODS = ("grad_cache", "plain", "big")  # big: the plain `train_step` over the whole batch


def part_fns(run, micro: int):
  """The parts a GradCache step is made of, each jitted alone, on the run's state: one
  micro-batch's forward without gradients (`fwd_micro`), one micro-batch's forward + backward to
  fixed embedding cotangents (`fwd_bwd_micro`), the policy + loss forward + backward w.r.t. the
  global batch's embeddings (`loss_global`), and the optimizer update (`update`). The expected
  GradCache step is `n (fwd_micro + fwd_bwd_micro) + loss_global + update` for `n` micro-batches.
  Returns {name: (jitted fn, args builder(state, batch) -> args)}."""
  from mmts_jax.train.step import _forward

  rng = jax.random.PRNGKey(3)
  # Only `apply_fn` and the BatchNorm statistics of the state are closed over (no large
  # constant enters the executables).
  skeleton = run.state.replace(params={}, opt_state={}, policy_state={})
  tx = run.state.tx

  def fwd(params, mb):
    out, _ = _forward(skeleton, params, mb, True, rng)
    return out["image"], out["text"]

  def surrogate(params, mb, g_img, g_txt):
    image, text = fwd(params, mb)
    return jnp.sum(image.astype(jnp.float32) * g_img) + jnp.sum(text.astype(jnp.float32) * g_txt)

  def loss(image, text, index, policy_state, step):
    def f(image, text):
      value, _, _ = run.policy.loss(
        policy_state,
        image,
        text,
        step=step,
        index=index,
        loss_fn=run.loss_fn,
        model_temperature=None,
      )
      return value

    return jax.grad(f, argnums=(0, 1))(image, text)

  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return jax.tree.map(jnp.add, params, updates), opt_state

  def micro_batch(batch):
    return {k: v[:micro] for k, v in batch.items() if k != "index"}

  def cot(n, dim, seed):
    z = jax.random.normal(jax.random.PRNGKey(seed), (n, dim), jnp.float32)
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

  dim, b = run.model.embed_dim, run.global_batch_size
  return {
    "fwd_micro": (jax.jit(fwd), lambda st, bt: (st.params, micro_batch(bt))),
    "fwd_bwd_micro": (
      jax.jit(jax.grad(surrogate)),
      lambda st, bt: (st.params, micro_batch(bt), cot(micro, dim, 1), cot(micro, dim, 2)),
    ),
    "loss_global": (
      jax.jit(loss),
      lambda st, bt: (cot(b, dim, 3), cot(b, dim, 4), bt["index"], st.policy_state, st.step),
    ),
    "update": (
      jax.jit(update),
      lambda st, bt: (
        st.params,
        st.opt_state,
        jax.tree.map(lambda p: jnp.full_like(p, 1e-3), st.params),
      ),
    ),
  }


class _BroadcastSource:
  """The trainer's source protocol over a zero-copy broadcast host batch: `setup` reads only
  its shapes (the timed batch is generated on the device)."""

  def __init__(self, spec, batch, num_examples):
    s = spec["image_size"]
    self.num_examples, self.fingerprint = num_examples, None
    self.cluster_sizes = np.clip(np.random.default_rng(1).zipf(1.5, num_examples), 1, 10_000)
    self.batch = {
      "image": np.broadcast_to(np.zeros((1, s, s, 3), np.float32), (batch, s, s, 3)),
      "text_features": np.zeros((batch, spec["text_dim"]), np.float32),
      "index": np.arange(batch, dtype=np.int32) % num_examples,
    }

  def iterate(self, start_batch=0, process_index=0, process_count=1):
    while True:
      yield self.batch


def _config(spec, batch, micro, method):
  c = train.default_config()
  c.total_steps, c.batch_size = 10_000, batch
  c.model.update(embed_dim=spec["embed_dim"], dtype="bfloat16")
  c.model.image, c.model.text = spec["image"], spec["text"]
  c.temperature.mode = "mmts"
  c.optim.update(lr=1e-4, warmup_steps=100)
  c.mesh.num_devices = 1
  c.train.update(micro_batch_size=micro, accumulation=method)
  c.data.name = "grad_cache_bench"
  return c


def _device_batch(run, spec, batch):
  return jax.block_until_ready(_device_batch_fn(run, spec, batch)())


def _device_batch_fn(run, spec, batch):
  """The jitted function that makes the random device batch (float32 pixels)."""
  s, key = spec["image_size"], jax.random.PRNGKey(0)
  k1, k2 = jax.random.split(key)
  sharding = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec("data"))
  return jax.jit(
    lambda: {
      "image": jax.random.normal(k1, (batch, s, s, 3), np.float32),
      "text_features": jax.random.normal(k2, (batch, spec["text_dim"]), np.float32),
      "index": jax.numpy.arange(batch, dtype=np.int32) % run.source.num_examples,
    },
    out_shardings=sharding,
  )


def _gib(n) -> float:
  return float(n) / 2**30


def _write(out: pathlib.Path, name: str, result: dict) -> None:
  atomic_io.atomic_write_json(out / name, result)


def _median_s(fn, args, reps: int) -> float:
  jax.block_until_ready(fn(*args))  # warm-up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
  p.add_argument("--out", required=True, help="directory for grad_cache_bench_MODEL.json")
  p.add_argument("--model", choices=sorted(MODELS), default="vit_b16")
  p.add_argument("--batch", type=int, default=32_768, help="global batch")
  p.add_argument("--micro", type=int, default=512, help="micro-batch size")
  p.add_argument("--steps", type=int, default=1, help="timed steps per method")
  p.add_argument(
    "--methods",
    default="grad_cache,plain",
    help=f"comma separated, of {METHODS} (big: one pass over the whole batch; small batches)",
  )
  p.add_argument("--parts", action="store_true", help="time the step's parts first")
  p.add_argument(
    "--memory-only",
    action="store_true",
    help="compile the steps for an abstract batch and record XLA's buffer assignment; run nothing",
  )
  p.add_argument("--reps", type=int, default=3, help="timed repetitions of each part")
  p.add_argument("--table-size", type=int, default=100_000, help="shift-table entries")
  p.add_argument("--deadline-s", type=float, default=1e9, help="no step is started past it")
  p.add_argument("--ready-file", help="touched once the steps are compiled")
  p.add_argument("--go-file", help="timing starts once this file exists")
  args = p.parse_args(argv)
  methods = [m for m in args.methods.split(",") if m]
  if not methods or set(methods) - set(METHODS):
    p.error(f"--methods must be a subset of {METHODS}, got {args.methods!r}")
  spec, t_start = MODELS[args.model], time.perf_counter()
  left = lambda: args.deadline_s - (time.perf_counter() - t_start)  # noqa: E731

  def progress(what):  # stderr timestamps: where the time of a cut-short run went
    print(f"[{time.perf_counter() - t_start:7.1f} s] {what}", file=sys.stderr, flush=True)

  src = _BroadcastSource(spec, args.batch, args.table_size)
  sources.SOURCES["grad_cache_bench"] = lambda cfg, **kw: src

  # One setup (model, state, GradCache step); the other steps are bound to the same
  # dependencies and run on copies of the same state.
  run = train.setup(_config(spec, args.batch, args.micro, "grad_cache"))
  progress("setup done")
  deps: dict[str, Any] = dict(policy=run.policy, loss_fn=run.loss_fn, lr_fn=run.lr_fn)
  plain = functools.partial(
    grad_cache.micro_batch_step, micro_batch_size=args.micro, accumulation="plain", mesh=run.mesh
  )
  steps = {
    "grad_cache": run.step_fn,
    "plain": compile_train_step(run.shardings, run.mesh, step=plain, **deps),
    "big": compile_train_step(run.shardings, run.mesh, **deps),
  }
  states = {m: jax.tree.map(jnp.copy, run.state) for m in methods}
  if args.memory_only:  # shapes only: XLA's buffer assignment of each step, nothing executed
    out = {"bench": "grad_cache_memory", "model": args.model, "global_batch": args.batch}
    out.update(micro_batch=args.micro, platform=jax.devices()[0].platform, jax=jax.__version__)
    abstract = jax.eval_shape(lambda: _device_batch_fn(run, spec, args.batch)())
    for method in methods:
      mem = steps[method].lower(states[method], abstract).compile().memory_analysis()
      out[method] = {
        "xla_temp_gib": _gib(mem.temp_size_in_bytes),
        "xla_argument_gib": _gib(mem.argument_size_in_bytes),
        "xla_output_gib": _gib(mem.output_size_in_bytes),
        "xla_alias_gib": _gib(mem.alias_size_in_bytes),
      }
      progress(f"{method}: {json.dumps(out[method])}")
    _write(pathlib.Path(args.out), f"grad_cache_memory_{args.model}.json", out)
    return 0
  batch = _device_batch(run, spec, args.batch)
  progress("state and batch on the device")

  n = args.batch // args.micro
  device = jax.devices()[0]
  result = {
    "bench": "grad_cache",
    "model": args.model,
    "global_batch": args.batch,
    "micro_batch": args.micro,
    "micro_batches": n,
    "steps": args.steps,
    "methods": methods,
    "dtype": "bfloat16",
    "loss": "infonce",
    "temperature": "mmts",
    "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.state.params)),
    "batch_gib": _gib(sum(x.nbytes for x in jax.tree.leaves(batch))),
    "device": device.device_kind,
    "platform": device.platform,
    "jax": jax.__version__,
    "python": platform.python_version(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "skipped": [],
  }
  name = f"grad_cache_bench_{args.model}.json"

  def compile_one(method):
    t0 = time.perf_counter()
    compiled = steps[method].lower(states[method], batch).compile()
    progress(f"{method} compiled")
    return compiled, time.perf_counter() - t0

  def compile_part(part, fn, part_args):
    compiled = fn.lower(*part_args).compile()
    progress(f"part {part} compiled")
    return compiled

  # Everything compiles in parallel threads: the steps and the parts (small executables).
  pool = concurrent.futures.ThreadPoolExecutor(len(methods) + 4)
  futures = {m: pool.submit(compile_one, m) for m in methods}
  part_jobs = {}
  if args.parts:
    for part, (fn, make_args) in part_fns(run, args.micro).items():
      part_args = make_args(run.state, batch)
      part_jobs[part] = (pool.submit(compile_part, part, fn, part_args), part_args)
    # The parts are timed once every executable is compiled (nothing compiles beside them),
    # before any step: they are on record even if no step finishes.
    for future in [*futures.values(), *(job[0] for job in part_jobs.values())]:
      future.result()
    parts = {}
    for part, (future, part_args) in part_jobs.items():
      parts[part + "_s"] = _median_s(future.result(), part_args, args.reps)
      progress(f"part {part}: {parts[part + '_s']:.4f} s")
    parts["expected_grad_cache_step_s"] = (
      n * (parts["fwd_micro_s"] + parts["fwd_bwd_micro_s"])
      + parts["loss_global_s"]
      + parts["update_s"]
    )
    parts["expected_plain_step_s"] = n * parts["fwd_bwd_micro_s"] + parts["update_s"]
    result["parts"] = parts
    _write(pathlib.Path(args.out), name, result)
  if args.ready_file or args.go_file:
    for method in methods:
      futures[method].result()
    if args.ready_file:
      pathlib.Path(args.ready_file).touch()
    progress("compiled; waiting for the go file")
    while args.go_file and not os.path.exists(args.go_file):
      time.sleep(0.2)
  for method in methods:
    fn, compile_s = futures[method].result()
    mem = fn.memory_analysis()
    state, times = states.pop(method), []
    for i in range(args.steps):
      if times and left() < max(times):  # another step would end past the deadline
        result["skipped"].append(f"{method} steps after {i}: deadline")
        break
      t0 = time.perf_counter()
      state, metrics = fn(state, batch)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - t0)
      progress(f"{method}: step {i + 1} in {times[-1]:.3f} s")
    step_s = float(np.median(times))
    row = {
      "step_s": step_s,
      "step_s_all": times,
      "examples_per_sec": args.batch / step_s,
      "compile_s": compile_s,
      "loss": float(metrics["loss"]),
      "finite": bool(metrics["finite"]),
    }
    if mem is not None:
      row.update(
        xla_temp_gib=_gib(mem.temp_size_in_bytes),
        xla_argument_gib=_gib(mem.argument_size_in_bytes),
        xla_output_gib=_gib(mem.output_size_in_bytes),
        xla_alias_gib=_gib(mem.alias_size_in_bytes),
      )
    stats = getattr(device, "memory_stats", lambda: None)()
    if stats and "peak_bytes_in_use" in stats:
      row["peak_gib_after"] = _gib(stats["peak_bytes_in_use"])
    result[method] = row
    result["wall_s"] = time.perf_counter() - t_start
    _write(pathlib.Path(args.out), name, result)
    print(method, json.dumps(row), flush=True)
    if left() < 0:
      result["skipped"] += [f"{m}: deadline" for m in methods[methods.index(method) + 1 :]]
      break
  pool.shutdown(wait=False, cancel_futures=True)
  for m in ("plain", "big"):
    if "grad_cache" in result and m in result:
      result[f"grad_cache_over_{m}_time"] = result["grad_cache"]["step_s"] / result[m]["step_s"]
  if "parts" in result and "grad_cache" in result:
    result["grad_cache_over_expected_time"] = (
      result["grad_cache"]["step_s"] / result["parts"]["expected_grad_cache_step_s"]
    )
  _write(pathlib.Path(args.out), name, result)
  print(json.dumps(result, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
