"""Train-step time of the real trainer step, one device: speed variants side by side, fixed
temperature vs MM-TS (schedule + per-sample shift gather), the step's parts, and a profile.

Builds the real trainer state and the real jitted, donated step with `mmts_jax.train.setup`
for a CLIP-style dual encoder (`vit_b16`: ViT-B/16 image tower + CLIP's 12-layer width-512
causal text transformer, 77 tokens, 512-d embeddings; `vit_l14`: ViT-L/14 + the width-768 text
transformer, 768-d), bf16 compute, f32 parameters, AdamW with clipping, random inputs. `setup`
runs once (one parameter initialisation); every other run `VARIANT_MODE_bBATCH`, at any batch
size, is derived from it (`_build(first=...)`: a copy of the same parameters and
optimizer state, the model of its variant, the policy, shift table and policy state of its mode).
Every run is lowered on the main thread and compiled in parallel threads; each compile finished
by `--deadline-s` minus `--timing-s` is kept. The runs are then timed `--steps` steps per round
for `--rounds` rounds in alternation (clock and thermal drift hit all alike); a round that would
end past the deadline is not started. MM-TS gathers from a shift table of `--table-size` entries
(CC3M-sized). Every stage is logged on stderr with the seconds since the start and kept in the
json's `timeline`.

Variants (`VARIANTS`) change only how the same maths is computed (same parameters):
  base     the code as it was: XLA attention in the text tower, conv patch embedding
  fast     cuDNN attention in the text tower too (causal + trailing-padding lengths),
           patch embedding as one matrix product
  +qkv     fused q/k/v product; +dots: remat policy "dots"; +full: full remat;
  +even    odd token counts (197, 77) padded once per tower, not in every block (`even_length`);
  +notriton  XLA's Triton GEMM fusions off (cuBLAS); +lhs: latency-hiding scheduler
  +ln      layer norms with a hand-written backward (`lean_layer_norm`); +gelu: GELU whose
           backward recomputes tanh (`lean_gelu`); +lean: both; +split: the fused q/k/v
           product's backward per q, k, v (`split_qkv_backward`)
  +pln     the lean layer norms in the fused Pallas kernels (`lean_layer_norm="pallas"`; the
           XLA form off GPUs); +pgelu: fc1's bias add and GELU in one Pallas kernel per pass
           (`lean_gelu="pallas"`); +pln+pgelu: both; fast+qkv+even+pln+flat+lt: the plain
           GELU with cuBLASLt on (epilogue fusion of fc1's bias and GELU left to XLA)
  +plnres  as +pln, and each block's two layer norms add the skip connection's cotangent to dx
           in their backward kernel, not in a separate add (`lean_layer_norm="pallas_res"`)
  +fopt    clipping and Adam's moments on one flat vector (`optim.flatten`)
  +padd    as +plnres, and each layer norm after a branch adds the branch and its bias in its
           forward kernel and returns the bias gradient (`lean_layer_norm="pallas_add"`)
  +pqkv    the fused q/k/v product's backward join and bias gradient in one Pallas kernel
           (`split_qkv_backward="pallas"`)
  +pattn   attention in `pallas_attention`'s fused short-sequence Pallas kernels in both towers
           (`attention="pallas"`; cuDNN elsewhere); +pattni: in the image tower only; +pattnt: in
           the text tower only; +cb1, +cbconc, +nocb (after +pqkv+pattnt only): XLA's command
           buffers (CUDA graphs) from one kernel up, with concurrent commands, or off
  X+exactgelu  any variant X with the Pallas GELU kernels' exact maths (`GeluConfig.fast_math`
           False: libdevice exp2 and IEEE division instead of ex2.approx and rcp.approx)

  python benchmarks/train_step_bench.py --out DIR --variants base,fast --mmts base,fast \\
      --components fast --profile base,fast --deadline-s 300      # one H200
  python benchmarks/train_step_bench.py --out /tmp/b --model tiny --batch 32 --variants base,fast \\
      --mmts fast --steps 2 --rounds 1      # CPU smoke test

Memory: `xla_step_gib` is XLA's buffer assignment of one step's executable (arguments +
outputs + temporaries - donated buffers: parameters, optimizer state, activations, the batch),
the number comparable to PyTorch's `max_memory_allocated`; `peak_gib_process` is the allocator's
peak over the whole process (every run's state resident). `flops` / `bytes_accessed`: XLA's cost
analysis of the compiled step. Writes OUT/train_step_bench_MODEL.json after every stage (a run
cut short by `--deadline-s` keeps what finished); its `profile` holds, per profiled variant,
the device kernels of 3 steps (`jax.profiler`), grouped by category and ranked.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import os
import pathlib
import platform
import re
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from profile_attribution import category, device_kernel_times  # noqa: E402

from mmts_jax import atomic_io, temperature, train  # noqa: E402
from mmts_jax import mesh as mesh_lib  # noqa: E402
from mmts_jax.data import sources  # noqa: E402
from mmts_jax.models import attention, build_model, pallas_gelu  # noqa: E402
from mmts_jax.train import optim, setup  # noqa: E402
from mmts_jax.train.setup import state_shardings  # noqa: E402
from mmts_jax.train.step import compile_train_step  # noqa: E402


def _clip_text(width: int, heads: int) -> dict:
  return dict(
    name="transformer",
    vocab_size=49408,
    max_len=77,
    width=width,
    depth=12,
    num_heads=heads,
    mlp_dim=4 * width,
    pool="eot",
    causal=True,
  )


MODELS = {
  # ViT-B/16 at 224 px + CLIP's text transformer (77 tokens, BPE vocabulary).
  "vit_b16": dict(
    image=dict(name="vit", variant="B/16"), image_size=224, text=_clip_text(512, 8), embed_dim=512
  ),
  # ViT-L/14 at 224 px + CLIP ViT-L/14's text transformer.
  "vit_l14": dict(
    image=dict(name="vit", variant="L/14"), image_size=224, text=_clip_text(768, 12), embed_dim=768
  ),
  "tiny": dict(
    image=dict(name="vit", variant="mu/8"),
    image_size=32,
    text=dict(
      name="transformer", vocab_size=100, max_len=7, width=32, depth=1, num_heads=2, mlp_dim=64
    ),
    embed_dim=16,
  ),
}

# name -> (model options for both towers, image-only options, XLA compiler options[, text-only
# options[, `config.optim` options]]).
_FAST = dict(attention="auto")
_EVEN = {**_FAST, "fused_qkv": True, "even_length": True}
_LEAN = {"lean_layer_norm": True, "lean_gelu": True}
_DENSE = dict(patch_embed="dense")
VARIANTS = {
  "base": (dict(attention="xla"), dict(attention="auto", patch_embed="conv"), {}),
  "fast": (_FAST, dict(patch_embed="dense"), {}),
  "fast+qkv": ({**_FAST, "fused_qkv": True}, dict(patch_embed="dense"), {}),
  "fast+dots": ({**_FAST, "remat": "dots"}, dict(patch_embed="dense"), {}),
  "fast+full": ({**_FAST, "remat": "full"}, dict(patch_embed="dense"), {}),
  "fast+qkv+dots": ({**_FAST, "fused_qkv": True, "remat": "dots"}, dict(patch_embed="dense"), {}),
  "fast+qkv+even": (_EVEN, dict(patch_embed="dense"), {}),
  "fast+qkv+even+ln": ({**_EVEN, "lean_layer_norm": True}, dict(patch_embed="dense"), {}),
  "fast+qkv+even+gelu": ({**_EVEN, "lean_gelu": True}, dict(patch_embed="dense"), {}),
  "fast+qkv+even+lean": ({**_EVEN, **_LEAN}, dict(patch_embed="dense"), {}),
  "fast+qkv+even+lean+split": (
    {**_EVEN, **_LEAN, "split_qkv_backward": True},
    dict(patch_embed="dense"),
    {},
  ),
  # Session 5 candidates (run 7's attribution: layer norms and residual sums on an (L, C, B)
  # stream, the forward GELU, the text tower's cuDNN attention at 78 tokens).
  "fast+qkv+even+lean+flat": ({**_EVEN, **_LEAN, "flat_residual": True}, _DENSE, {}),
  # +pgelu: fc1's bias add and the tanh GELU in one Pallas kernel per pass, the backward
  # writing the bias gradient too (`lean_gelu="pallas"`, `pallas_gelu.bias_gelu`; XLA off GPUs).
  "fast+qkv+even+lean+flat+pgelu": (
    {**_EVEN, **_LEAN, "lean_gelu": "pallas", "flat_residual": True},
    _DENSE,
    {},
  ),
  "fast+qkv+even+gelu+cudnnln": (
    {**_EVEN, "lean_gelu": True},
    _DENSE,
    {"xla_gpu_enable_cudnn_layer_norm": True},
  ),
  "fast+qkv+even+lean+textxla": (
    {**_EVEN, **_LEAN, "attention": "xla"},
    dict(patch_embed="dense", attention="auto"),
    {},
  ),
  "fast+qkv+even+lean+lt": ({**_EVEN, **_LEAN}, _DENSE, {"xla_gpu_enable_cublaslt": True}),
  "fast+qkv+even+lean+tgany": ({**_EVEN, **_LEAN}, _DENSE, {"xla_gpu_triton_gemm_any": True}),
  "fast+qkv+even+lean+flat+textxla+lt": (
    {**_EVEN, **_LEAN, "flat_residual": True, "attention": "xla"},
    dict(patch_embed="dense", attention="auto"),
    {"xla_gpu_enable_cublaslt": True},
  ),
  # Session 5, round 2 (run 8: +flat 84.6 ms vs +lean 92.1; textxla, lt, tgany, cudnnln no gain).
  "fast+qkv+even+lean+flat+causal": (
    {**_EVEN, **_LEAN, "flat_residual": True},
    _DENSE,
    {},
    {"causal_only_lengths": True},
  ),
  "fast+even+lean+flat": (
    {**_EVEN, **_LEAN, "flat_residual": True, "fused_qkv": False},
    _DENSE,
    {},
  ),
  "fast+qkv+even+lean+flat+split": (
    {**_EVEN, **_LEAN, "flat_residual": True, "split_qkv_backward": True},
    _DENSE,
    {},
  ),
  # Session 5, round 3: the layer norms (~7.7 ms per step in run 8/9's profiles) in Pallas.
  "fast+qkv+even+lean+flat+pln": (
    {**_EVEN, **_LEAN, "lean_layer_norm": "pallas", "flat_residual": True},
    _DENSE,
    {},
  ),
  "fast+qkv+even+lean+flat+pln+pgelu": (
    {**_EVEN, "lean_layer_norm": "pallas", "lean_gelu": "pallas", "flat_residual": True},
    _DENSE,
    {},
  ),
  # Issue 17: the backward's residual adds (dx of each block's layer norms + the skip
  # connection's cotangent) inside the Pallas layer norm's backward kernel.
  "fast+qkv+even+lean+flat+plnres+pgelu": (
    {**_EVEN, "lean_layer_norm": "pallas_res", "lean_gelu": "pallas", "flat_residual": True},
    _DENSE,
    {},
  ),
  # Session 6: the plain GELU (no custom backward) with cuBLASLt on, so that XLA may put
  # fc1's bias and GELU into the product's epilogue, beside the Pallas layer norms.
  "fast+qkv+even+pln+flat+lt": (
    {**_EVEN, "lean_layer_norm": "pallas", "flat_residual": True},
    _DENSE,
    {"xla_gpu_enable_cublaslt": True},
  ),
  # Issue 17: clipping and Adam's moments on one flat vector (`optim.flatten`): the run-16
  # HLO has ~800 optimizer kernels (a norm reduction and an update per parameter).
  "fast+qkv+even+lean+flat+plnres+pgelu+fopt": (
    {**_EVEN, "lean_layer_norm": "pallas_res", "lean_gelu": "pallas", "flat_residual": True},
    _DENSE,
    {},
    {},
    {"flatten": True},
  ),
  # Issue 17: attention in `pallas_attention`'s kernels (whole key rows on chip, no online
  # softmax, no separate dO.O / dq-conversion kernels) in both towers (+pattn) or the image
  # tower only (+pattni, text on cuDNN).
  "fast+qkv+even+lean+flat+plnres+pgelu+fopt+pattn": (
    {
      **_EVEN,
      "lean_layer_norm": "pallas_res",
      "lean_gelu": "pallas",
      "flat_residual": True,
      "attention": "pallas",
    },
    _DENSE,
    {},
    {},
    {"flatten": True},
  ),
  # Both candidates of session 7 together (the q/k/v join kernel and the attention kernels).
  "fast+qkv+even+lean+flat+plnres+pgelu+fopt+pqkv+pattn": (
    {
      **_EVEN,
      "lean_layer_norm": "pallas_res",
      "lean_gelu": "pallas",
      "flat_residual": True,
      "attention": "pallas",
      "split_qkv_backward": "pallas",
    },
    _DENSE,
    {},
    {},
    {"flatten": True},
  ),
  "fast+qkv+even+lean+flat+plnres+pgelu+fopt+pattni": (
    {**_EVEN, "lean_layer_norm": "pallas_res", "lean_gelu": "pallas", "flat_residual": True},
    {**_DENSE, "attention": "pallas"},
    {},
    {},
    {"flatten": True},
  ),
  # Issue 17: each layer norm after a branch also adds the branch and its bias in its forward
  # kernel and returns the bias gradient from its backward kernel (`lean_layer_norm=
  # "pallas_add"`): no separate residual add, no separate bias reduction.
  "fast+qkv+even+lean+flat+padd+pgelu": (
    {**_EVEN, "lean_layer_norm": "pallas_add", "lean_gelu": "pallas", "flat_residual": True},
    _DENSE,
    {},
  ),
  "fast+qkv+even+lean+flat+padd+pgelu+fopt": (
    {**_EVEN, "lean_layer_norm": "pallas_add", "lean_gelu": "pallas", "flat_residual": True},
    _DENSE,
    {},
    {},
    {"flatten": True},
  ),
  # Issue 17: the fused q/k/v product's backward join of dq, dk, dv and its bias gradient in
  # one Pallas kernel (`split_qkv_backward="pallas"`; XLA's fusion ran at ~54% of the memory
  # bandwidth, 2.2 ms per step in run 19).
  "fast+qkv+even+lean+flat+plnres+pgelu+fopt+pqkv": (
    {
      **_EVEN,
      "lean_layer_norm": "pallas_res",
      "lean_gelu": "pallas",
      "flat_residual": True,
      "split_qkv_backward": "pallas",
    },
    _DENSE,
    {},
    {},
    {"flatten": True},
  ),
  "fast+notriton": (_FAST, dict(patch_embed="dense"), {"xla_gpu_enable_triton_gemm": False}),
  "fast+lhs": (
    _FAST,
    dict(patch_embed="dense"),
    {"xla_gpu_enable_latency_hiding_scheduler": True},
  ),
}


# Run 21: the attention kernels beat cuDNN on the text tower's shape (0.197 vs 0.253 ms
# forward + backward, L=77 causal) but not on the image tower's (1.165 vs 0.941, L=198), so
# +pqkv with the text tower alone on them.
_PQKV = VARIANTS["fast+qkv+even+lean+flat+plnres+pgelu+fopt+pqkv"]
VARIANTS["fast+qkv+even+lean+flat+plnres+pgelu+fopt+pqkv+pattnt"] = (
  *_PQKV[:3],
  {"attention": "pallas"},
  _PQKV[4],
)

# Run 22's fastest (+pqkv+pattnt: 80.45 ms, 3.8 ms of it with no kernel running in 1,415
# kernels per step) under XLA's command-buffer (CUDA graph) settings: graphs from 1 kernel up
# (default 5), independent commands of a graph run concurrently (default: in the scheduled
# order), no command buffers at all (the control).
_RUN22_BEST = "fast+qkv+even+lean+flat+plnres+pgelu+fopt+pqkv+pattnt"
_COMMAND_BUFFER_FLAGS = {
  "+cb1": {"xla_gpu_graph_min_graph_size": 1},
  "+cbconc": {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"},
  "+nocb": {"xla_gpu_enable_command_buffer": ""},
}
for _suffix, _flags in _COMMAND_BUFFER_FLAGS.items():
  _towers, _image, _xla, _text, _optim = VARIANTS[_RUN22_BEST]
  VARIANTS[_RUN22_BEST + _suffix] = (_towers, _image, {**_xla, **_flags}, _text, _optim)

# A suffix on any variant: the same model with the Pallas GELU kernels' exact maths (libdevice
# exp2 and IEEE division instead of ex2.approx / rcp.approx, `GeluConfig.fast_math=False`), set
# while that variant is traced (the kernels read their settings at trace time).
EXACT_GELU = "+exactgelu"


def _base(variant: str) -> str:
  return variant.removesuffix(EXACT_GELU)


def _parts(variant: str) -> tuple[dict, dict, dict, dict, dict]:
  """`VARIANTS[variant]` with its optional text-only and optimizer options filled in."""
  towers, image_only, xla, *rest = VARIANTS[_base(variant)]
  rest = rest + [{}] * (2 - len(rest))
  return towers, image_only, xla, rest[0], rest[1]


def _config(model: str, variant: str, mode: str, batch: int):
  spec = MODELS[model]
  towers, image_only, _, text_only, optim = _parts(variant)
  c = train.default_config()
  c.total_steps, c.batch_size = 10_000, batch
  c.model.update(embed_dim=spec["embed_dim"], dtype="bfloat16")
  c.model.image = {**spec["image"], **towers, **image_only}
  c.model.text = {**spec["text"], **towers, **text_only}
  c.temperature.update(mode=mode, value=0.07)
  c.mmts.update(alpha=0.04, sh_min=0.05, sh_max=0.10)
  c.optim.update(lr=1e-4, warmup_steps=100, **optim)
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


def _derive(first, c):
  """The `Setup` of config `c` (same model structure and data as `first`, any batch size)
  without initialising parameters again: `first`'s state with the policy, shift table and
  policy state that `setup` builds for `c`'s temperature mode (`temperature.from_config`,
  `setup.resolve_shift_table`, `Policy.init_state`, `setup.state_shardings`), the same
  parameters, optimizer state, loss and schedule (the loss and optimizer settings of the
  variants and modes here are equal; neither the state nor the step depends on the batch
  size, only the batch the step is given)."""
  policy = temperature.from_config(
    c.temperature,
    c.mmts,
    total_steps=int(c.total_steps),
    loss=c.loss.name,
    isogclr=c.get("isogclr"),
  )
  if policy.learnable != first.policy.learnable:
    raise ValueError(
      f"mode {policy.name!r} has a learnable temperature and {first.policy.name!r} not: "
      f"their parameter trees differ, build it with its own setup"
    )
  if policy.name == first.policy.name and c.batch_size == first.config.batch_size:
    return first
  table = train.resolve_shift_table(c, first.source, policy)
  policy_state = policy.init_state(first.source.num_examples, table)
  shardings = state_shardings(
    jax.eval_shape(lambda: first.state.replace(policy_state=policy_state)),
    first.mesh,
    c.mesh.param_sharding,
    policy,
  )
  state = jax.tree.map(jnp.copy, first.state).replace(
    policy_state=jax.device_put(policy_state, shardings.policy_state)
  )
  return dataclasses.replace(
    first,
    config=c,
    policy=policy,
    state=state,
    shardings=shardings,
    shift_table=table,
    shift_table_id=train.table_fingerprint(table),
    global_batch_size=int(c.batch_size),
    step_fn=None,
    _first=None,
  )


def _build(model, variant, mode, batch, table_size, host_batch, sizes, first=None):
  """One run, lowered. `first` None: `mmts_jax.train.setup` builds it. Otherwise `first` is
  the `setup` of another run at this batch (another variant and/or mode): its parameters and
  optimizer state are copied (the variants only compute differently, the modes differ only in
  the temperature policy), `_derive` gives the policy and policy state of `mode`, the model of
  `variant`'s config (`build_model`, as `setup` calls it) replaces `apply_fn`, and the step is
  `compile_train_step` with that policy and `first`'s loss and schedule: what `setup` would
  build for this config, without initialising the parameters again."""
  c, _ = _config(model, variant, mode, batch)
  c.mesh.num_devices = 1
  if first is None:
    name = f"train_step_bench_{batch}"
    sources.SOURCES[name] = lambda cfg, **kw: _FixedBatchSource(host_batch, sizes)
    c.data.name = name
    t0 = time.perf_counter()
    run = setup(c)
    jax.block_until_ready(run.state)
    state, step_fn = run.state, run.step_fn
    _progress(
      f"setup of {variant} {mode} b{batch} (parameters initialised): "
      f"{time.perf_counter() - t0:.1f} s"
    )
  else:
    t0 = time.perf_counter()
    c.data.name = first.config.data.name
    run = _derive(first, c)
    net = build_model(c.model, learnable_temperature=run.policy.learnable)
    state = run.state if run is not first else jax.tree.map(jnp.copy, first.state)
    state = state.replace(apply_fn=net.apply)
    shardings = run.shardings.replace(apply_fn=net.apply)
    if c.optim.to_dict() != first.config.optim.to_dict():
      # Another optimizer layout (+fopt): its own optimizer state for the same parameters,
      # as `setup` would initialise it.
      tx, _ = optim.make_optimizer(c.optim, int(c.total_steps))
      state = state.replace(tx=tx, opt_state=jax.jit(tx.init)(state.params))
      shardings = shardings.replace(
        tx=tx,
        opt_state=mesh_lib.tree_shardings(state.opt_state, run.mesh, c.mesh.param_sharding),
      )
    step_fn = compile_train_step(
      shardings,
      run.mesh,
      policy=run.policy,
      loss_fn=run.loss_fn,
      lr_fn=run.lr_fn,
      skip_nonfinite=True,
      flat_grad_norm=bool(c.optim.flatten),
    )
    _progress(
      f"derived {variant} {mode} b{batch} from the first run's state (no new "
      f"initialisation): {time.perf_counter() - t0:.1f} s"
    )
  dev_batch = run.to_device(host_batch)
  t0 = time.perf_counter()
  if variant.endswith(EXACT_GELU):
    pallas_gelu.set_gelu_config(pallas_gelu.gelu_config()._replace(fast_math=False))
  try:
    lowered = step_fn.lower(state, dev_batch)
  finally:
    pallas_gelu.set_gelu_config(None)
  _progress(f"lowering of {variant} {mode} b{batch}: {time.perf_counter() - t0:.1f} s")
  text = lowered.as_text()
  return {
    "setup": run,
    "state": state,
    "batch": dev_batch,
    "lowered": lowered,
    "compiler_options": _parts(variant)[2],
    "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)),
    "cudnn_attention_calls": len(re.findall(r"cudnn\$fmha", text)),
    # Every Pallas (Triton) kernel of the step: the fused loss tiles, and with +pln the layer
    # norms (a forward and a backward per norm), so the variants' difference shows the norms.
    "pallas_triton_calls": text.count("__gpu$xla.gpu.triton"),
  }


_T0 = time.monotonic()
TIMELINE: list[tuple[float, str]] = []  # (seconds since start, event): the json's "timeline"


def _progress(msg: str):
  """A timestamped line on stderr (clock time and seconds since the start), also kept in
  `TIMELINE`: where a slow run spends its time."""
  t = time.monotonic() - _T0
  TIMELINE.append((round(t, 1), msg))
  print(
    f"[train_step_bench {time.strftime('%H:%M:%S')} {t:6.1f} s] {msg}", file=sys.stderr, flush=True
  )


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  if not cost:
    return {}
  return {k: float(cost[k]) for k in ("flops", "bytes accessed") if k in cost}


def _compile(key, run):
  """Compiles one lowered step; XLA's memory analysis of the executable: arguments + outputs +
  temporaries - donated (aliased) bytes, i.e. the device memory one step needs."""
  t0 = time.perf_counter()
  try:
    opts = run["compiler_options"] or None
    run["step"] = (
      run["lowered"].compile(compiler_options=opts) if opts else run["lowered"].compile()
    )
  except Exception as e:  # noqa: BLE001 (an unknown XLA flag: that variant is reported, not fatal)
    run["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    _progress(f"{key} failed to compile: {run['error']}")
    return
  run["compile_s"] = time.perf_counter() - t0
  _progress(f"{key} compiled in {run['compile_s']:.1f} s")
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
  try:
    run["cost"] = _cost(run["step"])
  except Exception as e:  # noqa: BLE001 (cost analysis is optional information)
    run["cost"] = {"error": str(e)[:200]}


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


def _median_ms(fn, *args, reps: int = 10) -> float:
  jax.block_until_ready(fn(*args))  # warm-up
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts) * 1e3


def component_jobs(run) -> dict:
  """The step's parts, each its own lowered executable with its arguments, on the run's state
  and batch: image tower forward + backward (to a fixed cotangent of the embeddings), text tower
  likewise, the temperature policy + loss forward + backward w.r.t. the embeddings, and the
  optimizer update (clipping, AdamW, apply) from a gradient of the parameters' shapes. Their
  sum leaves out what the whole step fuses across parts and the non-finite guard."""
  s, state, batch = run["setup"], run["state"], run["batch"]
  apply, params = state.apply_fn, state.params
  b = batch["index"].shape[0]
  key = jax.random.PRNGKey(5)
  cot = jax.random.normal(key, (b, s.model.embed_dim), jnp.float32)

  def tower(method):
    def f(p, x):
      z = apply({"params": p}, x, train=True, method=method)
      return jnp.sum(z * cot)

    return jax.jit(jax.grad(f))

  z = jax.random.normal(key, (2, b, s.model.embed_dim), jnp.float32)
  z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)

  @jax.jit
  def loss(zi, zt):
    def f(zi, zt):
      value, _, _ = s.policy.loss(
        state.policy_state,
        zi,
        zt,
        step=state.step,
        index=batch["index"],
        loss_fn=s.loss_fn,
        model_temperature=None,
      )
      return value

    return jax.grad(f, argnums=(0, 1))(zi, zt)

  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

  @jax.jit
  def update(params, opt_state, grads):
    updates, opt_state = state.tx.update(grads, opt_state, params)
    return jax.tree.map(jnp.add, params, updates), opt_state

  # Arguments are read when timed: the timed steps donate (delete) the state they were given.
  jobs = {
    "image_tower_fwd_bwd_ms": (
      tower("encode_image"),
      lambda: (run["state"].params, batch["image"]),
    ),
    "text_tower_fwd_bwd_ms": (tower("encode_text"), lambda: (run["state"].params, batch["text"])),
    "loss_fwd_bwd_ms": (loss, lambda: (z[0], z[1])),
    "optimizer_update_ms": (
      update,
      lambda: (run["state"].params, run["state"].opt_state, grads),
    ),
  }
  return {
    name: {"lowered": fn.lower(*args()), "args": args, "compiler_options": {}}
    for name, (fn, args) in jobs.items()
  }


def components(jobs) -> dict:
  """Median ms of each compiled part of `component_jobs`, and their sum."""
  out = {
    name: _median_ms(job["step"], *job["args"]()) for name, job in jobs.items() if "step" in job
  }
  out["sum_of_parts_ms"] = sum(out.values())
  return out


def profile(run, name: str, steps: int = 3, top: int = 40) -> dict:
  """Device kernels of `steps` steps (`jax.profiler` trace): per GPU line the total time, the
  `top` kernels by total time and the time per category (matmul, attention, ...), in ms."""
  _time(run, 1)
  trace_dir = tempfile.mkdtemp(prefix=f"trace_{name}_")
  jax.profiler.start_trace(trace_dir)
  _time(run, steps)
  jax.profiler.stop_trace()
  summary = {"variant": name, "steps": steps, "lines": {}}
  lines = device_kernel_times(trace_dir)
  if lines is None:
    summary["error"] = "no xplane.pb written"
    return summary
  for line_name, (total, count) in lines.items():
    if not total:
      continue
    cats = collections.Counter()
    for k, v in total.items():
      cats[category(k)] += v
    summary["lines"][line_name] = {
      "total_ms_per_step": sum(total.values()) / 1e6 / steps,
      "events_per_step": sum(count.values()) / steps,
      "by_category_ms_per_step": {k: v / 1e6 / steps for k, v in cats.most_common()},
      "top": [
        {"name": k[:160], "ms_per_step": v / 1e6 / steps, "calls_per_step": count[k] / steps}
        for k, v in total.most_common(top)
      ],
    }
  return summary


def _peak_gib():
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
  return stats["peak_bytes_in_use"] / 2**30 if stats and "peak_bytes_in_use" in stats else None


def _write_json(path: pathlib.Path, obj) -> None:
  obj["timeline"] = [{"s": t, "event": e} for t, e in TIMELINE]
  atomic_io.atomic_write_json(path, obj)


def _row(run, times, batch) -> dict:
  med = statistics.median(times)
  return {
    "batch": batch,
    "step_ms_median": med * 1e3,
    "step_ms_min": min(times) * 1e3,
    "step_ms_max": max(times) * 1e3,
    "step_ms_all": [t * 1e3 for t in times],
    "examples_per_sec": batch / med,
    "compile_s": run.get("compile_s"),
    "params": run["params"],
    "xla_step_gib": run.get("xla_step_gib"),
    "xla_temp_gib": run.get("xla_temp_gib"),
    "cost": run.get("cost"),
    "cudnn_attention_calls_in_hlo": run["cudnn_attention_calls"],
    "pallas_triton_calls_in_hlo": run["pallas_triton_calls"],
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
  p.add_argument("--out", required=True, help="directory for train_step_bench_MODEL.json")
  p.add_argument("--model", choices=sorted(MODELS), default="vit_b16")
  p.add_argument("--batch", default="256", help="batch sizes, comma separated")
  p.add_argument("--variants", default="base", help=f"comma separated, of {sorted(VARIANTS)}")
  p.add_argument(
    "--later-variants",
    default=None,
    help="variants run at the batch sizes after the first (default: all of --variants)",
  )
  p.add_argument(
    "--mmts",
    default=None,
    help="variants also run with MM-TS at the first batch size (default: the first variant)",
  )
  p.add_argument(
    "--modes", default=None, help="old spelling: 'fixed,mmts' = --mmts FIRST, 'fixed' = none"
  )
  p.add_argument("--steps", type=int, default=10, help="timed steps per round")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--table-size", type=int, default=2_900_000, help="shift-table entries (CC3M)")
  p.add_argument("--components", default="", help="variant whose parts are timed")
  p.add_argument("--profile", default="", help="variants profiled (comma separated)")
  p.add_argument(
    "--hlo",
    default="",
    help="variants whose optimised HLO (the compiled step's text) is written, gzipped, to "
    "OUT/hlo_VARIANT.txt.gz, + as _ (the profile's kernel names are its fusion names)",
  )
  p.add_argument("--deadline-s", type=float, default=1e9, help="skips later stages past it")
  p.add_argument(
    "--timing-s",
    type=float,
    default=45.0,
    help="seconds kept for warm-up and timing: runs not compiled by --deadline-s minus this "
    "are dropped",
  )
  p.add_argument(
    "--compile-s",
    type=float,
    default=1e9,
    help="optional earlier cut: runs not compiled this long after the start are dropped",
  )
  p.add_argument("--ready-file", help="touched once everything is compiled")
  p.add_argument("--go-file", help="timing starts once this file exists")
  args = p.parse_args(argv)
  global _T0
  _T0 = t_start = time.monotonic()
  TIMELINE.clear()
  left = lambda: args.deadline_s - (time.monotonic() - t_start)  # noqa: E731
  batches = [int(b) for b in args.batch.split(",")]
  variants = args.variants.split(",")
  if args.modes is not None:
    args.mmts = variants[0] if "mmts" in args.modes.split(",") else ""
  mmts = [v for v in (variants[0] if args.mmts is None else args.mmts).split(",") if v]
  later = variants if args.later_variants is None else args.later_variants.split(",")
  unknown = {_base(v) for v in variants + mmts} - set(VARIANTS)
  if (
    any(b <= 0 for b in batches)
    or unknown
    or not set(mmts) <= set(variants)
    or not set(later) <= set(variants)
  ):
    p.error(
      f"--batch must be positive integers, --variants of {sorted(VARIANTS)} and --mmts and "
      f"--later-variants subsets of them: {args.batch!r} {args.variants!r} {args.mmts!r} "
      f"{args.later_variants!r}"
    )
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"train_step_bench_{args.model}.json"
  spec = MODELS[args.model]
  sizes = np.clip(np.random.default_rng(1).zipf(1.5, size=args.table_size), 1, 10_000)
  result = {
    "bench": "train_step",
    "model": args.model,
    "batches": batches,
    "variants": {
      v: dict(zip(("towers", "image", "xla", "text", "optim"), _parts(v), strict=True))
      for v in variants
    },
    "dtype": "bfloat16",
    "steps_per_round": args.steps,
    "rounds": args.rounds,
    "table_size": args.table_size,
    "device": jax.devices()[0].device_kind,
    "platform": jax.devices()[0].platform,
    "jax": jax.__version__,
    "python": platform.python_version(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "attention_picked": {
      "vit": attention.implementation(jnp.bfloat16, spec["image"].get("head_dim", 64), False),
      "text_base": attention.implementation(jnp.bfloat16, 64, has_mask=True),
      "text_fast": attention.implementation(jnp.bfloat16, 64, has_mask=False),
    },
    "skipped": [],
  }

  runs, first = {}, None
  for i, b in enumerate(batches):
    # One `setup` (one parameter initialisation, 88 s on the H200 host for ViT-B/16) for the
    # whole process; every other run, at any batch size, is derived from it
    # (`_build(first=...)`).
    host_batch = _batch(spec, b, args.table_size)
    for v in variants if i == 0 else later:
      for mode in ("fixed", "mmts") if (i == 0 and v in mmts) else ("fixed",):
        key = f"{v}_{mode}_b{b}"
        runs[key] = _build(args.model, v, mode, b, args.table_size, host_batch, sizes, first)
        first = first or runs[key]["setup"]
        _progress(f"set up and lowered {key}")
  comp_key = f"{args.components}_fixed_b{batches[0]}"
  comp_jobs = component_jobs(runs[comp_key]) if comp_key in runs else {}
  # XLA compiles outside the GIL: the executables compile side by side.
  todo = {**runs, **{f"component {k}": j for k, j in comp_jobs.items()}}
  # Daemon threads: a compile still running at the cut does not hold the process at exit.
  threads = [threading.Thread(target=_compile, args=(k, r), daemon=True) for k, r in todo.items()]
  _progress(f"compiling {len(threads)} executables in parallel threads")
  for t in threads:
    t.start()
  # The cut: the deadline minus the time the timing needs (`--timing-s`), or `--compile-s`
  # after the start if that is earlier. Every compile finished by then is kept.
  compile_end = t_start + min(args.compile_s, args.deadline_s - args.timing_s)
  result["compile_cut_s"] = compile_end - t_start
  for t in threads:  # a compile still running past `compile_end` is left behind, unused
    t.join(timeout=max(compile_end - time.monotonic(), 0.1))
  _progress(f"compile cut at {time.monotonic() - t_start:.1f} s")
  for key in [k for k, r in runs.items() if "step" not in r]:
    why = runs[key].get("error", f"not compiled by the cut ({result['compile_cut_s']:.0f} s)")
    result["skipped"].append(f"{key}: {why}")
    _progress(f"dropped {key}: {why}")
    del runs[key]
  for v in [v for v in args.hlo.split(",") if v]:
    key = f"{v}_fixed_b{batches[0]}"
    if key in runs:
      with gzip.open(out / f"hlo_{v.replace('+', '_')}.txt.gz", "wt") as f:
        f.write(runs[key]["step"].as_text())
  result["peak_gib_after_compile"] = _peak_gib()
  _write_json(path, result)
  _wait_for(args.go_file, args.ready_file)
  _progress("timing (go)")
  for run in runs.values():
    _time(run, 3)  # warm-up (allocator, autotuning)
  _progress("warmed up")
  times = {key: [] for key in runs}
  round_s = 0.0
  for r in range(args.rounds):  # alternate, so that clock and thermal drift hit all alike
    if r and left() < round_s + 5:  # another round would end past the deadline
      result["skipped"].append(f"rounds after {r}: deadline")
      break
    t0 = time.monotonic()
    for key, run in runs.items():
      times[key].append(_time(run, args.steps))
    round_s = time.monotonic() - t0
    _progress(f"round {r + 1}/{args.rounds} timed in {round_s:.1f} s")
  for key, ts in times.items():
    result[key] = _row(runs[key], ts, int(key.rsplit("_b", 1)[1]))
  b0 = batches[0]
  for v in mmts:
    fixed, mm = result.get(f"{v}_fixed_b{b0}"), result.get(f"{v}_mmts_b{b0}")
    if fixed and mm:
      result[f"{v}_mmts_overhead_pct"] = (
        (mm["step_ms_median"] - fixed["step_ms_median"]) / fixed["step_ms_median"] * 100
      )
  if mmts and f"{mmts[0]}_mmts_b{b0}" in runs:
    run = runs[f"{mmts[0]}_mmts_b{b0}"]
    t_us = _temperature_only_us(run["setup"].policy, run["setup"].shift_table, b0)
    result["temperature_only_us"] = t_us
    fixed = result.get(f"{mmts[0]}_fixed_b{b0}")
    if fixed:
      result["temperature_only_pct_of_step"] = t_us / 1e3 / fixed["step_ms_median"] * 100
  result["peak_gib_process"] = _peak_gib()
  _write_json(path, result)
  _progress("timed")

  if comp_jobs and left() > 30:
    result["components"] = {"variant": args.components, "batch": b0, **components(comp_jobs)}
    _write_json(path, result)
    _progress("components timed")
  elif args.components:
    result["skipped"].append(f"components {args.components}: not run (deadline or not compiled)")
  result["profile"] = {}
  for v in [v for v in args.profile.split(",") if v]:
    key = f"{v}_fixed_b{b0}"
    if key not in runs or left() < 25:
      result["skipped"].append(f"profile {v}: not run (deadline or not compiled)")
      continue
    try:
      result["profile"][v] = profile(runs[key], v)
    except Exception as e:  # noqa: BLE001 (the profile is optional information)
      result["profile"][v] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    _write_json(path, result)
    _progress(f"profiled {v}")
  print(json.dumps({k: v for k, v in result.items() if k != "profile"}))
  return 0


def _exit(code: int) -> None:
  """Exits with `code`; past a compile cut, without tearing the interpreter down.

  A compile thread still inside XLA when Python finalises crashed the process (segmentation
  fault, rc 139, run 24) after every result had been written: with such threads alive the
  streams are flushed and the process ends at once.
  """
  if any(t.is_alive() for t in threading.enumerate() if t is not threading.main_thread()):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


if __name__ == "__main__":
  _exit(main())
