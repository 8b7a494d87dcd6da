r"""Seed-batched training of one study row: `jax.vmap` over seeds of a `lax.scan` over steps.

All seeds of one (policy, hyper-parameters) trial are one compiled program: the seeds' models,
optimiser states and policy states are stacked on a leading axis, the steps run in a
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

The policy's float hyper-parameters (those not in its `static_fields`) are arguments of the
program, not constants: the five trials of a grid row share one compilation.

Example (two seeds, three steps; the rows are different models of the same seeds):
  >>> from mmts_jax.study.task import make_task
  >>> from mmts_jax.study.policies import Fixed
  >>> from mmts_jax.synthetic.generator import GeneratorConfig
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

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmts_jax import losses
from mmts_jax.losses import dispatch as loss_dispatch
from mmts_jax.models import DualEncoder, FeatureTower
from mmts_jax.study.task import Task

__all__ = ["TrainConfig", "batch_orders", "make_model", "train_seeds"]

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
      raise ValueError(f"TrainConfig: steps must be >= 1 and batch_size >= 2, got steps="
                       f"{self.steps}, batch_size={self.batch_size}")
    if self.loss not in loss_dispatch.NAMES:
      raise ValueError(f"TrainConfig: loss must be one of {loss_dispatch.NAMES}, got "
                       f"{self.loss!r}")


def make_model(cfg: TrainConfig, learnable_tau: float | None = None) -> DualEncoder:
  """Feature towers over image features and bag-of-words captions, `embed_dim` outputs."""
  kw = {}
  if learnable_tau is not None:
    kw = dict(learnable_temperature=True, init_temperature=float(learnable_tau))
  return DualEncoder(FeatureTower((cfg.hidden,)), FeatureTower((cfg.hidden,)),
                     embed_dim=cfg.embed_dim, image_key="image", text_key="text", **kw)


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
    rows = [rng.permutation(num_examples)[:per_epoch * batch_size] for _ in range(epochs)]
    out.append(np.concatenate(rows).reshape(-1, batch_size)[:steps])
  return np.stack(out).astype(np.int32)


def _is_temperature(path) -> bool:
  return any(getattr(k, "key", None) == _TEMP_PARAM for k in path)


def _optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, min(cfg.warmup_steps, cfg.steps),
                                                max(cfg.steps, cfg.warmup_steps + 1))
  mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: not _is_temperature(path), params)
  return optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=mask)


def _clamp_temperature(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.clip(x, 0.0, _MAX_LOG_INV_TAU) if _is_temperature(path) else x, params)


def _traced_fields(policy) -> tuple[str, ...]:
  """Float hyper-parameters fed to the program as arguments (one compile per policy type)."""
  static = getattr(policy, "static_fields", ())
  return tuple(f.name for f in dataclasses.fields(policy)
               if isinstance(getattr(policy, f.name), float) and f.name not in static)


def _with_values(policy, values: dict):
  """A copy of `policy` with `values` set, validation skipped (they may be tracers)."""
  new = copy.copy(policy)
  for k, v in values.items():
    object.__setattr__(new, k, v)
  return new


def _program_key(policy, cfg: TrainConfig, learnable_tau):
  traced = _traced_fields(policy)
  static = tuple((f.name, getattr(policy, f.name)) for f in dataclasses.fields(policy)
                 if f.name not in traced)
  return type(policy), static, cfg, learnable_tau


_PROGRAMS: dict = {}  # program key -> jitted program (the skeleton's traced fields are unused)


def _cached_program(key, skeleton):
  if key not in _PROGRAMS:
    _, _, cfg, learnable_tau = key
    _PROGRAMS[key] = _program(skeleton, cfg, make_model(cfg, learnable_tau))
  return _PROGRAMS[key]


def _program(skeleton, cfg: TrainConfig, model: DualEncoder):
  """The jitted `(hyper, keys, orders, arrays..., state0) -> outputs`, vmapped over seeds."""
  tx = _optimizer(cfg)
  loss_fn = losses.get(cfg.loss, impl="dense")

  def one_seed(hyper, key, order, train_x, train_t, val_x, val_t, test_x, test_t, state0):
    policy = _with_values(skeleton, hyper)
    params = model.init(key, {"image": train_x[:2], "text": train_t[:2]})["params"]
    opt_state = tx.init(params)

    def step(carry, inputs):
      params, opt_state, state = carry
      t, index = inputs

      def objective(params):
        out = model.apply({"params": params}, {"image": train_x[index], "text": train_t[index]})
        loss, values, new_state = policy.loss(
            state, out["image"], out["text"], step=t, index=index, loss_fn=loss_fn,
            model_temperature=out.get("temperature"))
        return loss, (values, jax.lax.stop_gradient(new_state))

      (loss, (values, new_state)), grads = jax.value_and_grad(objective, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = _clamp_temperature(optax.apply_updates(params, updates))
      stats = jnp.stack([jnp.mean(values), jnp.min(values), jnp.max(values)])
      return (params, opt_state, new_state), (loss, stats)

    steps = jnp.arange(order.shape[0], dtype=jnp.int32)
    (params, _, state), (loss, stats) = jax.lax.scan(step, (params, opt_state, state0),
                                                     (steps, order))
    embed = lambda x, t: model.apply({"params": params}, {"image": x, "text": t})
    val, test = embed(val_x, val_t), embed(test_x, test_t)
    return dict(loss=loss, temperature=stats, val_image=val["image"], val_text=val["text"],
                test_image=test["image"], test_text=test["text"], final_state=state)

  in_axes = (None, 0, 0) + (None,) * 7
  return jax.jit(jax.vmap(one_seed, in_axes=in_axes))


def train_seeds(policy, task: Task, *, seeds, cfg: TrainConfig = TrainConfig(),
                shift_table=None) -> dict[str, np.ndarray]:
  """Trains `policy` once per seed (one program) and embeds the validation and test splits.

  Args:
    policy: a `Policy` (see `mmts_jax.study.policies`); `Learnable` gives the model CLIP's
      temperature parameter initialised at `policy.tau`.
    task: `make_task(...)`.
    seeds: the paired seeds.
    cfg: budget and model.
    shift_table: `(N,)` per-sample shifts for `ICS` / `MMTS` (`init_state`).

  Returns:
    numpy arrays with a leading seed axis: `loss (S, T)`, `temperature (S, T, 3)` (batch mean,
    min, max per step), `{val,test}_{image,text}` embeddings, and `final_state` (a dict).
  """
  seeds = tuple(int(s) for s in seeds)
  if not seeds:
    raise ValueError("train_seeds: no seeds")
  n = task.train["image"].shape[0]
  learnable = getattr(policy, "name", "") == "learnable"
  state0 = policy.init_state(n, shift_table)
  keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
  orders = jnp.asarray(batch_orders(seeds, n, cfg.steps, cfg.batch_size))
  arrays = [jnp.asarray(a[k]) for a in (task.train, task.val, task.test) for k in ("image",
                                                                                   "text")]
  key = _program_key(policy, cfg, policy.tau if learnable else None)
  hyper = {k: jnp.float32(getattr(policy, k)) for k in _traced_fields(policy)}
  out = _cached_program(key, _with_values(policy, {}))(hyper, keys, orders, *arrays, state0)
  return jax.tree_util.tree_map(np.asarray, out)
