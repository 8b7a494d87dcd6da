r"""Seed-batched training of one study row: `jax.vmap` over seeds of a `lax.scan` over steps.

All trials of one grid row and all their seeds are one compiled program: the runs' models,
optimiser states and policy states are stacked on a leading (trial x seed) axis, the steps run in a
`lax.scan`, and the validation and test embeddings come out of the same program. Seeds are
*paired* across rows: seed `s` fixes the initialisation (`PRNGKey(s)`) and the batch order
(`batch_orders`) whatever the policy, and the data is the same for every seed and row.

One step, for the batch of dataset rows `index` (the `Policy` interface):

  `(loss, values, new_state) = policy.loss(state, z_img, z_txt, step=t, index=index,
  loss_fn=..., model_temperature=...)`, differentiated in the model parameters with
  `new_state` as a stop-gradient auxiliary output; AdamW with linear warm-up and cosine decay.

CLIP's learnable temperature is the model's `log(1/tau)` parameter, clamped *as a parameter*
after every update to `[0, ln 100]` (OpenCLIP's rule), so it can move back from the bound, and
left out of weight decay. Each step also records the batch's mean, min and max temperature.

The policy's float hyper-parameters (those not in its `static_fields`) are vmapped arguments of
the program, not constants: the trials of a grid row train side by side in one program.

Example (two seeds, three steps; the rows are different models of the same seeds):
  >>> from mmts_jax.study.task import make_task
  >>> from mmts_jax.study.policies import Fixed
  >>> from mmts_jax.longtail.generator import GeneratorConfig
  >>> task = make_task(GeneratorConfig(num_classes=4, head_size=40, imbalance=10,
  ...                                  val_per_class=4, test_per_class=4))
  >>> out = train_seeds(Fixed(0.1), task, seeds=(0, 1), cfg=TrainConfig(steps=3, batch_size=8))
  >>> out["test_image"].shape, out["temperature"].shape
  ((2, 16, 64), (2, 3, 3))
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmts_jax import losses, temperature
from mmts_jax.losses import dispatch as loss_dispatch
from mmts_jax.models import DualEncoder, FeatureTower
from mmts_jax.study.policies import trainer_policy
from mmts_jax.study.task import Task

__all__ = ["TrainConfig", "batch_orders", "make_model", "train_seeds", "train_trials"]

_TEMP_PARAM = "log_inv_temperature"
_MAX_LOG_INV_TAU = math.log(100.0)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Budget and model of every row (the synthetic benchmark's defaults)."""

  steps: int = 300
  batch_size: int = 256
  lr: float = 2e-3
  warmup_steps: int = 20
  weight_decay: float = 0.1
  hidden: int = 128
  embed_dim: int = 64
  loss: str = "infonce"

  def __post_init__(self):
    if self.steps < 1 or self.batch_size < 2:
      raise ValueError(
        f"TrainConfig: steps must be >= 1 and batch_size >= 2, got steps="
        f"{self.steps}, batch_size={self.batch_size}"
      )
    if self.loss not in loss_dispatch.NAMES:
      raise ValueError(f"TrainConfig: loss must be one of {loss_dispatch.NAMES}, got {self.loss!r}")


def make_model(cfg: TrainConfig, learnable_tau: float | None = None) -> DualEncoder:
  """Feature towers over image features and bag-of-words captions, `embed_dim` outputs."""
  kw: dict[str, Any] = {}
  if learnable_tau is not None:
    kw = dict(learnable_temperature=True, init_temperature=float(learnable_tau))
  return DualEncoder(
    FeatureTower((cfg.hidden,)),
    FeatureTower((cfg.hidden,)),
    embed_dim=cfg.embed_dim,
    image_key="image",
    text_key="text",
    **kw,
  )


def batch_orders(seeds, num_examples: int, steps: int, batch_size: int) -> np.ndarray:
  """`(S, steps, B)` int32 dataset rows per step: seed `s`'s epochs of permutations.

  Every row of the study with seed `s` sees the same batches in the same order. Epochs are
  shuffled by `numpy.random.default_rng(s)`; the last partial batch of an epoch is dropped.

  Example:
    >>> o = batch_orders([0], 10, 3, 4)
    >>> o.shape, sorted(o[0, :2].reshape(-1).tolist()) == sorted(set(o[0, :2].reshape(-1).tolist()))
    ((1, 3, 4), True)
  """
  if batch_size > num_examples:
    raise ValueError(f"batch_size {batch_size} > {num_examples} training examples")
  per_epoch = num_examples // batch_size
  out = []
  for s in seeds:
    rng = np.random.default_rng(int(s))
    epochs = -(-steps // per_epoch)
    rows = [rng.permutation(num_examples)[: per_epoch * batch_size] for _ in range(epochs)]
    out.append(np.concatenate(rows).reshape(-1, batch_size)[:steps])
  return np.stack(out).astype(np.int32)


def _is_temperature(path) -> bool:
  return any(getattr(k, "key", None) == _TEMP_PARAM for k in path)


def _optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, cfg.lr, min(cfg.warmup_steps, cfg.steps), max(cfg.steps, cfg.warmup_steps + 1)
  )
  mask = lambda params: jax.tree_util.tree_map_with_path(
    lambda path, _: not _is_temperature(path), params
  )
  return optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=mask)


def _clamp_temperature(params):
  return jax.tree_util.tree_map_with_path(
    lambda path, x: jnp.clip(x, 0.0, _MAX_LOG_INV_TAU) if _is_temperature(path) else x, params
  )


def _traced_fields(policy) -> tuple[str, ...]:
  """Float hyper-parameters fed to the program as arguments (one compile per policy type)."""
  static = getattr(policy, "static_fields", ())
  return tuple(
    f.name
    for f in dataclasses.fields(policy)
    if isinstance(getattr(policy, f.name), float) and f.name not in static
  )


def _with_values(policy, values: dict):
  """A copy of `policy` with `values` set, validation skipped (they may be tracers)."""
  new = copy.copy(policy)
  for k, v in values.items():
    object.__setattr__(new, k, v)
  return new


def _program_key(policy, cfg: TrainConfig):
  traced = _traced_fields(policy)
  # `level` only shapes the table (host side): level-matched and plain rows share a program.
  static = tuple(
    (f.name, getattr(policy, f.name))
    for f in dataclasses.fields(policy)
    if f.name not in traced and f.name != "level"
  )
  return type(policy), static, cfg


_PROGRAMS: dict = {}  # program key -> jitted program (the skeleton's traced fields are unused)


def _cached_program(key, skeleton):
  if key not in _PROGRAMS:
    cfg = key[2]
    learnable = isinstance(trainer_policy(skeleton), temperature.Learnable)
    _PROGRAMS[key] = _program(
      skeleton, cfg, make_model(cfg, 0.07 if learnable else None), learnable
    )
  return _PROGRAMS[key]


def _program(skeleton, cfg: TrainConfig, model: DualEncoder, learnable: bool):
  """The jitted `(hyper, keys, orders, arrays..., state0) -> outputs`, vmapped over the runs
  (trial x seed, flattened): every run has its own hyper-parameters, key, order and state."""
  tx = _optimizer(cfg)
  loss_fn = losses.get(cfg.loss, impl="dense")

  def one_run(hyper, key, order, state0, train_x, train_t, val_x, val_t, test_x, test_t):
    policy = _with_values(skeleton, hyper)
    params = model.init(key, {"image": train_x[:2], "text": train_t[:2]})["params"]
    if learnable:  # CLIP's parameter starts at log(1 / tau) of this trial (a traced value)
      params = jax.tree_util.tree_map_with_path(
        lambda path, x: -jnp.log(hyper["tau"]).astype(x.dtype) if _is_temperature(path) else x,
        params,
      )
    opt_state = tx.init(params)

    def step(carry, inputs):
      params, opt_state, state = carry
      t, index = inputs

      def objective(params):
        batch = {"image": train_x[index], "text": train_t[index]}
        # apply() without `mutable` returns the outputs only
        out = cast(dict[str, jax.Array], model.apply({"params": params}, batch))
        loss, values, new_state = policy.loss(
          state,
          out["image"],
          out["text"],
          step=t,
          index=index,
          loss_fn=loss_fn,
          model_temperature=out.get("temperature"),
        )
        return loss, (values, jax.lax.stop_gradient(new_state))

      (loss, (values, new_state)), grads = jax.value_and_grad(objective, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = _clamp_temperature(optax.apply_updates(params, updates))
      stats = jnp.stack([jnp.mean(values), jnp.min(values), jnp.max(values)])
      return (params, opt_state, new_state), (loss, stats)

    steps = jnp.arange(order.shape[0], dtype=jnp.int32)
    (params, _, state), (loss, stats) = jax.lax.scan(
      step, (params, opt_state, state0), (steps, order)
    )
    embed = lambda x, t: cast(
      dict[str, jax.Array], model.apply({"params": params}, {"image": x, "text": t})
    )
    val, test = embed(val_x, val_t), embed(test_x, test_t)
    return dict(
      loss=loss,
      temperature=stats,
      val_image=val["image"],
      val_text=val["text"],
      test_image=test["image"],
      test_text=test["text"],
      final_state=state,
    )

  in_axes = (0, 0, 0, 0) + (None,) * 6
  return jax.jit(jax.vmap(one_run, in_axes=in_axes))


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  """`x` with rows appended up to `n` (copies of the last row: never indexed by a batch)."""
  x = np.asarray(x)
  if x.shape[0] > n:
    raise ValueError(f"pad_to={n} is below the {x.shape[0]} training examples")
  return np.concatenate([x, np.repeat(x[-1:], n - x.shape[0], axis=0)]) if n > x.shape[0] else x


def train_trials(
  policies,
  task: Task,
  *,
  seeds,
  cfg: TrainConfig = TrainConfig(),
  shift_tables=None,
  pad_to: int | None = None,
) -> dict[str, np.ndarray]:
  """Trains every trial of one policy type, every seed, as one program (vmap over trial x seed).

  Args:
    policies: trials of one type and equal static fields (e.g. a grid row), `(T,)`.
    task: `make_task(...)`.
    seeds: the paired seeds `(S,)`: seed `s` fixes the initialisation and batch order of every
      trial.
    cfg: budget and model.
    shift_tables: per trial, the `(N,)` per-sample shifts (`ICS` / `MMTS`) or None.
    pad_to: pad the training arrays and per-sample states to this many rows (never sampled),
      so tasks of different sizes share compiled programs.

  Returns:
    numpy arrays with leading `(T, S)` axes: `loss (T, S, steps)`, `temperature (T, S, steps, 3)`
    (batch mean, min, max per step), `{val,test}_{image,text}` embeddings, `final_state`.
  """
  policies, seeds = list(policies), tuple(int(s) for s in seeds)
  if not seeds or not policies:
    raise ValueError(
      f"train_trials: need >= 1 trial and seed, got {len(policies)} trials, seeds {seeds}"
    )
  keys_ = {_program_key(p, cfg) for p in policies}
  if len(keys_) != 1:
    raise ValueError(
      f"train_trials: the trials must share a type and static fields, got "
      f"{[type(p).__name__ for p in policies]}"
    )
  tables = list(shift_tables) if shift_tables is not None else [None] * len(policies)
  n = task.train["image"].shape[0]
  rows = int(pad_to or n)
  t_, s_ = len(policies), len(seeds)
  states = []
  for policy, table in zip(policies, tables, strict=True):
    st = {k: _pad_rows(np.asarray(v), rows) for k, v in policy.init_state(n, table).items()}
    states.append(st)
  state0 = {k: np.repeat(np.stack([st[k] for st in states]), s_, axis=0) for k in states[0]}
  fields = _traced_fields(policies[0])
  hyper = {
    k: np.repeat(np.asarray([getattr(p, k) for p in policies], np.float32), s_) for k in fields
  }
  keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds] * t_)
  orders = np.tile(batch_orders(seeds, n, cfg.steps, cfg.batch_size), (t_, 1, 1))
  arrays = [jnp.asarray(_pad_rows(task.train[k], rows)) for k in ("image", "text")]
  arrays += [jnp.asarray(a[k]) for a in (task.val, task.test) for k in ("image", "text")]
  program = _cached_program(next(iter(keys_)), _with_values(policies[0], {}))
  out = program(hyper, keys, jnp.asarray(orders), state0, *arrays)
  out = jax.tree_util.tree_map(lambda x: np.asarray(x).reshape((t_, s_) + x.shape[1:]), out)
  out["final_state"] = {k: v[:, :, :n] for k, v in out["final_state"].items()}
  return out


def train_seeds(
  policy, task: Task, *, seeds, cfg: TrainConfig = TrainConfig(), shift_table=None
) -> dict[str, np.ndarray]:
  """One trial: `train_trials([policy], ...)` without the trial axis.

  Returns numpy arrays with a leading seed axis: `loss (S, T)`, `temperature (S, T, 3)`,
  `{val,test}_{image,text}` embeddings and `final_state` (a dict).
  """
  out = train_trials([policy], task, seeds=seeds, cfg=cfg, shift_tables=[shift_table])
  return jax.tree_util.tree_map(lambda x: x[0], out)
