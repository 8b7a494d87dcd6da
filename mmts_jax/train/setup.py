"""`setup(config)`: everything a training loop needs, built and checked once.

In order, all before anything is compiled: the configuration's numbers, the temperature policy
(`mmts_jax.temperature.from_config`), the mesh, the input source (`mmts_jax.data.sources`), the
per-example shift table (checked against the source's size and fingerprint), the model, the
optimizer and the loss (`mmts_jax.losses.get`). Then the state is created directly with its
shardings, optionally restored (the latest checkpoint of `workdir`, or `config.init.checkpoint`'s
parameters for a fresh run), and the train step is bound to its dependencies and jitted.

The loop (`mmts_jax.train.loop`), the tests, `finetune` and `benchmarks/train_step_bench.py` use
the same `setup`.

Example:
  >>> from mmts_jax.config_defaults import default_config
  >>> c = default_config()
  >>> c.total_steps, c.batch_size = 10, 16
  >>> c.data.update(num_examples=64, text="features")
  >>> c.model.text = dict(name="features", hidden_dims=(16,))
  >>> c.optim.warmup_steps = 1
  >>> run = setup(c)
  >>> batch = run.to_device(next(run.batches(0)))
  >>> state, metrics = run.step_fn(run.state, batch)
  >>> int(state.step), run.policy.name
  (1, 'mmts')
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmts_jax import losses, shifts
from mmts_jax import mesh as mesh_lib
from mmts_jax import temperature as temperature_lib
from mmts_jax.data import sources
from mmts_jax.models import build_model
from mmts_jax.train import grad_cache, optim
from mmts_jax.train import state as state_lib
from mmts_jax.train.step import compile_train_step

__all__ = [
  "Setup",
  "setup",
  "resolve_shift_table",
  "table_fingerprint",
  "state_shardings",
  "validate",
]


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


def validate(config) -> dict[str, int]:
  """The loop's integer settings, checked; raises ValueError naming a bad one."""
  out = {k: _positive_int(k, config[k]) for k in ("total_steps", "batch_size", "log_every")}
  out["ckpt_every"] = _positive_int("checkpoint.every_steps", config.checkpoint.every_steps)
  out["ckpt_keep"] = _positive_int("checkpoint.keep", config.checkpoint.keep)
  if config.mesh.param_sharding not in mesh_lib.PARAM_SHARDINGS:
    raise ValueError(
      f"mesh.param_sharding must be one of {mesh_lib.PARAM_SHARDINGS}, got "
      f"{config.mesh.param_sharding!r}"
    )
  micro = config.train.get("micro_batch_size", 0)
  if micro:  # 0: one pass over the whole batch; the device count is checked in `setup`
    grad_cache.check_micro_batch(
      out["batch_size"], micro, accumulation=config.train.get("accumulation", "grad_cache")
    )
  return out


def resolve_shift_table(
  config, source, policy: temperature_lib.Policy, shift_table=None
) -> np.ndarray | None:
  """The per-example shift table `sh(c_i)` (N,) float32, or None when the policy uses none.

  In order: the `shift_table` argument; `config.mmts.cluster_table` (a `ClusterTable` artifact,
  checked against the source's size and fingerprint: a table of other data or of another row
  order is refused); `config.mmts.shift_table_path` (.npy of per-example cluster sizes or shifts,
  `config.mmts.shift_table_kind`); the source's `cluster_sizes`.
  """
  if not policy.uses_shift_table:
    return None
  m = config.mmts
  sh_min, sh_max = float(m.sh_min), float(m.sh_max)
  n = source.num_examples
  if shift_table is None and m.get("cluster_table"):
    from mmts_jax.clusters import table as ct  # built by the preprocessing stage

    table = ct.ClusterTable.load(m.cluster_table)
    # Raises ClusterTableMismatch (a ValueError) for a table of other data or another order.
    table.validate(num_samples=n, fingerprint=source.fingerprint)
    shift_table = table.shift_table(sh_min, sh_max)
  elif shift_table is None and m.get("shift_table_path"):
    arr = np.load(m.shift_table_path, allow_pickle=False)
    kind = m.get("shift_table_kind", "sizes")
    if kind not in ("sizes", "shifts"):
      raise ValueError(f"mmts.shift_table_kind must be 'sizes' or 'shifts', got {kind!r}")
    shift_table = shifts.cluster_shift(arr, sh_min, sh_max) if kind == "sizes" else arr
  elif shift_table is None and getattr(source, "cluster_sizes", None) is not None:
    shift_table = shifts.cluster_shift(np.asarray(source.cluster_sizes), sh_min, sh_max)
  if shift_table is None:
    raise ValueError(
      f"temperature mode {policy.name!r} needs per-example shifts: set "
      f"config.mmts.cluster_table or config.mmts.shift_table_path"
    )
  return temperature_lib.check_shift_table(shift_table, policy, num_examples=n)


def table_fingerprint(table: np.ndarray | None) -> str:
  """A short content hash: a checkpoint refuses to resume with another table."""
  if table is None:
    return "none"
  return hashlib.sha256(np.ascontiguousarray(table, np.float32).tobytes()).hexdigest()[:16]


def _policy_state_shardings(policy, policy_state, mesh) -> dict:
  partition = policy.state_partition()
  out = {}
  for key, value in policy_state.items():
    kind = partition.get(key, "replicated")
    if kind not in temperature_lib.PARTITIONS:
      raise ValueError(
        f"{type(policy).__name__}.state_partition()[{key!r}] must be one of "
        f"{temperature_lib.PARTITIONS}, got {kind!r}"
      )
    rows = np.shape(value)[0] if np.ndim(value) else 0
    # Rows that do not split evenly over the devices stay replicated (same numbers, more memory).
    if kind == "rows" and rows and rows % mesh.size == 0:
      out[key] = NamedSharding(mesh, P(mesh_lib.DATA_AXIS))
    else:
      out[key] = mesh_lib.replicated(mesh)
  return out


def state_shardings(
  state: state_lib.TrainState, mesh, param_sharding: str, policy: temperature_lib.Policy
) -> state_lib.TrainState:
  """Per-leaf shardings: params / optimizer / BatchNorm state by `param_sharding`; the step and
  the RNG replicated; the policy state as `policy.state_partition()` says."""
  rep = mesh_lib.replicated(mesh)
  return state.replace(
    step=rep,
    rng=rep,
    params=mesh_lib.tree_shardings(state.params, mesh, param_sharding),
    batch_stats=mesh_lib.tree_shardings(state.batch_stats, mesh, param_sharding),
    opt_state=mesh_lib.tree_shardings(state.opt_state, mesh, param_sharding),
    policy_state=_policy_state_shardings(policy, state.policy_state, mesh),
  )


def _sample_batch(local: Mapping[str, np.ndarray]) -> dict:
  """A 2-example batch with the per-example shapes: enough to initialise the model. Raw uint8
  pixels are initialised as the float32 the model will see after `to_device`; a device-crop
  batch (`crop_box`, `crop_size`) as its `crop_size x crop_size` crops."""
  out = {}
  for k, v in local.items():
    if k in ("crop_box", "crop_size"):  # consumed by to_device's crop, never seen by the model
      continue
    dtype = np.float32 if sources.is_raw_pixels(v) else np.asarray(v).dtype
    shape = np.shape(v)[1:]
    if k == "image" and "crop_box" in local:
      size = int(np.asarray(local["crop_size"]).reshape(-1)[0])
      shape = (size, size) + shape[2:]
    out[k] = np.zeros((2,) + shape, dtype)
  return out


def _copy(tree):
  return jax.tree.map(lambda x: x.copy(), tree)


@dataclasses.dataclass
class _Model:
  model: Any
  tx: Any
  lr_fn: Callable
  create: Callable  # `state.create` bound to `model` and `tx`: one object, one trace
  jitted: dict  # (parameter shardings' leaves, treedef) -> jitted create


@dataclasses.dataclass
class _Built:
  model: Any
  tx: Any
  lr_fn: Callable
  loss_fn: Callable
  jitted: dict  # (shardings' leaves, treedef) -> compiled step
  init: _Model  # shared by the configurations that differ only in the temperature policy


# What `setup` built, by the configuration it was built from: equal configurations in one
# process (a sweep, a resumed run, the test suite) share one model, optimizer, loss function and
# bound step, hence one compilation (jit caches by function identity, and these are closures).
# The model, optimizer and the compiled parameter initialisation depend on the policy only
# through `learnable` and the initial temperature (`_MODELS`): a fixed-temperature run and an
# MM-TS run of one model share them (one initialisation compile, the same initial values).
_BUILT: dict[tuple, _Built] = {}
_MODELS: dict[tuple, _Model] = {}


def _build(config, policy: temperature_lib.Policy, mesh) -> _Built:
  """The model, optimizer, schedule and loss of `config` (reused for an equal configuration)."""
  parts = {k: config[k].to_dict() for k in ("model", "optim", "loss")}
  # skip_nonfinite only steers the loop (the compiled step always masks a non-finite update).
  parts.update(
    total_steps=int(config.total_steps),
    train={k: v for k, v in config.train.to_dict().items() if k != "skip_nonfinite"},
  )
  text = json.dumps(parts, sort_keys=True, default=str)
  init_temperature = getattr(policy, "value", 0.07)
  model_key = (text, bool(policy.learnable), float(init_temperature), mesh)
  if model_key not in _MODELS:
    # The sigmoid loss's logit bias `b` is a model parameter (SigLIP: init -10), which the
    # step passes to the loss (`step.model_loss_fn`).
    model = build_model(
      config.model,
      learnable_temperature=policy.learnable,
      init_temperature=init_temperature,
      learnable_bias=config.loss.name == "sigmoid",
      init_bias=float(config.loss.get("bias_init", -10.0)),
    )
    tx, lr_fn = optim.make_optimizer(
      config.optim,
      int(config.total_steps),
      max_log_inv_temperature=(math.log(1.0 / model.min_temperature) if policy.learnable else None),
    )
    create = functools.partial(state_lib.create, model, tx)
    _MODELS[model_key] = _Model(model, tx, lr_fn, create, {})
  init = _MODELS[model_key]
  key = (text, policy, mesh)
  if key not in _BUILT:
    loss_fn = losses.get(
      config.loss.name,
      impl=config.loss.get("impl", "auto"),
      block_size=config.loss.get("block_size", None),
      mesh=mesh,
      axis_name=mesh_lib.DATA_AXIS,
    )
    _BUILT[key] = _Built(init.model, init.tx, init.lr_fn, loss_fn, {}, init)
  return _BUILT[key]


@dataclasses.dataclass
class Setup:
  """What `setup` built (see the module docstring)."""

  config: Any
  mesh: Any
  source: Any
  policy: temperature_lib.Policy
  loss_fn: Callable
  model: Any
  tx: Any
  lr_fn: Callable
  state: state_lib.TrainState
  shardings: state_lib.TrainState
  step_fn: Callable  # jitted `train_step` (or `grad_cache.micro_batch_step` when
  # `config.train.micro_batch_size`) bound to its dependencies
  shift_table: np.ndarray | None
  shift_table_id: str
  global_batch_size: int
  start_step: int = 0  # the restored checkpoint's step (0: a fresh run)
  input_position: int = 0  # global batches the restored run had consumed
  checkpoint_meta: dict = dataclasses.field(default_factory=dict)
  _first: tuple | None = None  # (iterator, its first batch), reused by `batches(0)`

  def batches(self, position: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's numpy batches from global batch `position` on (checked, see
    `sources.check_batch`)."""
    if self._first is not None and position == 0:
      it, first = self._first
      self._first = None
      it = itertools.chain([first], it)
    else:
      it = self.source.iterate(int(position), jax.process_index(), jax.process_count())
    return it

  def to_device(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """`sources.to_device` on this setup's mesh, after checking the batch."""
    sources.check_batch(local, self.source.num_examples)
    return sources.to_device(local, self.mesh)

  def device_batches(self, position: int, *, prefetch: int = 2) -> Iterator[dict]:
    """Global device batches from `position` on, `prefetch` transfers ahead."""
    return sources.prefetch_to_device(
      self.batches(position),
      self.mesh,
      size=prefetch,
      check=lambda b: sources.check_batch(b, self.source.num_examples),
    )

  def meta(self, position: int) -> dict:
    """The JSON metadata a checkpoint stores beside the arrays."""
    return {
      "input_position": int(position),
      "shift_table": self.shift_table_id,
      "batch_size": self.global_batch_size,
      "mode": self.policy.name,
    }


def _restore_latest(run: Setup, checkpointer) -> Setup:
  # The newest step that reads back: an unreadable one is warned about and the one before it
  # restored (`Checkpointer.restore_latest`).
  found = checkpointer.restore_latest(run.state.checkpoint_tree())
  if found is None:
    return run
  start, tree, meta = found
  if meta.get("shift_table") != run.shift_table_id:
    raise ValueError(
      f"checkpoint {start} in {checkpointer.directory} was trained with shift table "
      f"{meta.get('shift_table')!r} but this run's table is {run.shift_table_id!r}: a cluster "
      f"table of another dataset or setting; use a new workdir"
    )
  run.state = run.state.replace_from_checkpoint(tree)
  run.start_step, run.input_position = int(start), int(meta["input_position"])
  run.checkpoint_meta = dict(meta)
  return run


def setup(
  config,
  *,
  workdir=None,
  checkpointer=None,
  shift_table=None,
  sample_batch: Mapping[str, np.ndarray] | None = None,
) -> Setup:
  """Builds and checks everything a training run needs (see the module docstring).

  Args:
    config: the run's `ConfigDict` (`mmts_jax.config_defaults.default_config` keys).
    workdir: restore the latest checkpoint under `workdir/checkpoints` if there is one (a
      `Checkpointer` is opened and closed here unless `checkpointer` is given).
    checkpointer: an open `mmts_jax.checkpointing.Checkpointer` to restore from instead.
    shift_table: optional (N,) per-example shifts; overrides the config's table source.
    sample_batch: a process-local batch giving the input shapes (default: the source's first).

  Raises:
    ValueError / TypeError / KeyError / FileNotFoundError: a bad configuration, table, batch
      or checkpoint, before anything is compiled.
  """
  limits = validate(config)
  total, batch_size = limits["total_steps"], limits["batch_size"]
  policy = temperature_lib.from_config(
    config.temperature,
    config.mmts,
    total_steps=total,
    loss=config.loss.name,
    isogclr=config.get("isogclr"),
  )
  check_loss = getattr(policy, "check_loss", None)  # a policy that is its own objective
  if check_loss is not None:
    check_loss(config.loss.name)
  mesh_lib.initialize_distributed(config.get("distributed", "auto"))
  mesh = mesh_lib.make_mesh(config.mesh.num_devices or None)
  local_bs = mesh_lib.local_batch_size(batch_size, mesh)
  source = sources.make_source(config.data, global_batch_size=batch_size, seed=int(config.seed))
  table = resolve_shift_table(config, source, policy, shift_table)
  built = _build(config, policy, mesh)
  model, tx, lr_fn, loss_fn = built.model, built.tx, built.lr_fn, built.loss_fn

  first = None
  if sample_batch is None:
    it = source.iterate(0, jax.process_index(), jax.process_count())
    sample_batch = next(it)
    first = (it, sample_batch)
  sources.check_batch(sample_batch, source.num_examples)
  if sample_batch["index"].shape[0] != local_bs:
    raise ValueError(
      f"the source yielded {sample_batch['index'].shape[0]} examples per "
      f"process, expected batch_size / process_count = {local_bs}"
    )

  policy_state = policy.init_state(source.num_examples, table)
  # The parameters and optimizer state come from one jitted `create` (out_shardings: created
  # in place on the devices), which does not see the policy state: it compiles once per model,
  # optimizer, sample shapes and shardings, whatever the temperature mode or table size; the
  # policy state is put on the devices beside it (the same values).
  init = built.init
  args: dict[str, Any] = dict(
    rng=jax.random.PRNGKey(int(config.seed)), sample_batch=_sample_batch(sample_batch)
  )
  # Shapes through `jax.jit(init.create)`: the jitted create below (same function, same
  # arguments) reuses this trace instead of tracing the model's init a second time.
  shapes = jax.jit(init.create).eval_shape(**args).replace(policy_state=policy_state)
  shardings = state_shardings(shapes, mesh, config.mesh.param_sharding, policy)
  step_kw = {}
  micro = int(config.train.get("micro_batch_size", 0) or 0)
  if micro:
    acc = config.train.get("accumulation", "grad_cache")
    grad_cache.check_micro_batch(batch_size, micro, mesh.size, acc)
    step_kw = dict(
      step=functools.partial(
        grad_cache.micro_batch_step, micro_batch_size=micro, accumulation=acc, mesh=mesh
      )
    )
  init_shardings = shardings.replace(policy_state={})
  init_key = tuple(jax.tree.flatten(init_shardings))
  init_key = (tuple(init_key[0]), init_key[1])
  if init_key not in init.jitted:
    init.jitted[init_key] = jax.jit(init.create, out_shardings=init_shardings)
  leaves, treedef = jax.tree.flatten(shardings)
  step_fn = built.jitted.get((tuple(leaves), treedef))
  if step_fn is None:
    # The compiled step never applies a non-finite update; `config.train.skip_nonfinite`
    # only decides whether the loop then goes on or stops (`train.loop`), so both settings
    # share one compilation and a stopped run's in-memory state is the last good one.
    step_fn = built.jitted[(tuple(leaves), treedef)] = compile_train_step(
      shardings,
      mesh,
      policy=policy,
      loss_fn=loss_fn,
      lr_fn=lr_fn,
      skip_nonfinite=True,
      flat_grad_norm=bool(config.optim.get("flatten", False)),
      **step_kw,
    )
  state = init.jitted[init_key](**args)
  # A jitted copy with out_shardings, as the policy state reached the devices inside `create`
  # before (multi-process meshes included); it compiles in milliseconds.
  state = state.replace(
    policy_state=jax.jit(_copy, out_shardings=shardings.policy_state)(dict(policy_state or {}))
  )
  run = Setup(
    config=config,
    mesh=mesh,
    source=source,
    policy=policy,
    loss_fn=loss_fn,
    model=model,
    tx=tx,
    lr_fn=lr_fn,
    state=state,
    shardings=shardings,
    step_fn=step_fn,
    shift_table=table,
    shift_table_id=table_fingerprint(table),
    global_batch_size=batch_size,
    _first=first,
  )

  if checkpointer is None and workdir is not None:
    from etils import epath

    from mmts_jax.checkpointing import Checkpointer

    directory = epath.Path(workdir) / "checkpoints"
    if directory.is_dir():
      checkpointer = Checkpointer(directory, every_steps=1, keep=1 << 30, async_save=False)
      try:
        return _finish(run, config, checkpointer)
      finally:
        checkpointer.close()
  return _finish(run, config, checkpointer)


def _finish(run: Setup, config, checkpointer) -> Setup:
  if checkpointer is not None:
    run = _restore_latest(run, checkpointer)
  init = config.get("init", {}).get("checkpoint", "")
  if init and not run.start_step:
    from mmts_jax.train.pretrained import load_params

    params, _ = load_params(init, run.state.params)
    params = jax.device_put(params, run.shardings.params)
    # The optimizer state does not depend on the parameter values at step 0 (AdamW's moments
    # start at zero), so only the parameters change.
    run.state = run.state.replace(params=params)
  return run
