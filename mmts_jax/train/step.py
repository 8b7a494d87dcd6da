"""The pure train step and the evaluation step.

  train_step(state, batch, *, policy, loss_fn, lr_fn=None, skip_nonfinite=True)
      -> (state, metrics)

Inside it, for the batch's anchors `i` (dataset positions `index_i`):

  z_img, z_txt[, b] = model(batch)                            (unit-norm embeddings; b: the
                                                               sigmoid loss's learned bias)
  loss, tau, s = policy.loss(policy_state, z_img, z_txt, ...) (tau_i: per-anchor temperature
                                                               or margin; s: the new state)
  params     <- tx(grad loss)

The dependencies are explicit keyword arguments: bind them once with `functools.partial` and
jit the result (`compile_train_step` does, with explicit shardings and the state donated).

Example:
  >>> import functools, jax, jax.numpy as jnp, optax
  >>> from mmts_jax import losses, temperature
  >>> from mmts_jax.models import DualEncoder, FeatureTower
  >>> from mmts_jax.train import state as state_lib
  >>> model = DualEncoder(FeatureTower((8,)), FeatureTower((8,)), embed_dim=4,
  ...                     image_key="x", text_key="y")
  >>> batch = {"x": jnp.ones((4, 3)), "y": jnp.eye(4), "index": jnp.arange(4)}
  >>> s = state_lib.create(model, optax.sgd(0.1), rng=jax.random.PRNGKey(0), sample_batch=batch)
  >>> step = jax.jit(functools.partial(train_step, policy=temperature.Fixed(value=0.1),
  ...                                  loss_fn=losses.get("infonce")))
  >>> s, metrics = step(s, batch)
  >>> int(s.step), bool(metrics["finite"])
  (1, True)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mmts_jax import mesh as mesh_lib
from mmts_jax.temperature import Policy
from mmts_jax.train.state import TrainState

__all__ = [
  "train_step",
  "apply_gradients",
  "eval_step",
  "compile_train_step",
  "make_embed_fn",
  "model_loss_fn",
]

LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _check_no_raw_pixels(batch: Mapping[str, Any]) -> None:
  # At trace time: uint8 (B, H, W, 3) pixels are normalised by `data.sources.to_device`; raw
  # 0-255 values reaching a tower would train silently on the wrong scale.
  for k, v in batch.items():
    if v.dtype == jnp.uint8 and v.ndim == 4 and v.shape[-1] == 3:
      raise TypeError(
        f"batch[{k!r}] holds raw uint8 pixels {v.shape}: pass the batch through "
        f"mmts_jax.data.sources.to_device, which normalises them on the device"
      )


def _forward(state: TrainState, params, batch, train: bool, rng=None):
  _check_no_raw_pixels(batch)
  variables = {"params": params}
  has_bs = bool(state.batch_stats)
  if has_bs:
    variables["batch_stats"] = state.batch_stats
  kw = {"rngs": {"dropout": rng}} if rng is not None else {}
  if train and has_bs:
    out, mutated = state.apply_fn(variables, batch, train=True, mutable=["batch_stats"], **kw)
    return out, mutated["batch_stats"]
  return state.apply_fn(variables, batch, train=train, **kw), state.batch_stats


def _global_norm(tree, *, flat: bool = False):
  """The global L2 norm of `tree`; `flat`: of its leaves concatenated, as `optax.flatten`
  concatenates them (`optim.flatten`), so that XLA computes that vector and its norm once for
  the clipping and the logged `grad_norm`, instead of one reduction per parameter as well."""
  if flat:
    tree = jnp.concatenate([jnp.reshape(x, [-1]) for x in jax.tree.leaves(tree)])
  tree_norm = getattr(getattr(optax, "tree", None), "norm", None)  # optax >= 0.2.5
  return tree_norm(tree) if tree_norm is not None else optax.global_norm(tree)


def model_loss_fn(loss_fn: Callable, out: Mapping[str, jax.Array]) -> LossFn:
  """`loss_fn` with the model's own loss terms bound: `bias=out["bias"]` when the model owns
  the sigmoid loss's logit bias, so every policy calls `loss_fn(image, text, values)` alike.

  The one place where a model output reaches the loss besides the embeddings; the bias is
  differentiated through it like any parameter.

  Example:
    >>> import jax.numpy as jnp
    >>> from mmts_jax import losses
    >>> fn = model_loss_fn(losses.get("sigmoid", impl="dense"), {"bias": jnp.float32(-1.0)})
    >>> x = jnp.eye(2)
    >>> # (1/B) sum_ij softplus(-z_ij (s_ij / tau + b)) = (2 softplus(0) + 2 softplus(-1)) / 2
    >>> round(float(fn(x, x, jnp.float32(1.0))), 4)
    1.0064
  """
  if "bias" not in out:
    return loss_fn
  return functools.partial(loss_fn, bias=out["bias"])


def _value_metrics(loss, values, bias=None) -> dict:
  metrics = {
    "loss": loss,
    "temperature_mean": jnp.mean(values),
    "temperature_min": jnp.min(values),
    "temperature_max": jnp.max(values),
  }
  if bias is not None:
    metrics["bias"] = jnp.asarray(bias, jnp.float32)
  return metrics


def train_step(
  state: TrainState,
  batch: Mapping[str, jax.Array],
  *,
  policy: Policy,
  loss_fn: LossFn,
  lr_fn: Callable | None = None,
  skip_nonfinite: bool = True,
  flat_grad_norm: bool = False,
) -> tuple[TrainState, dict]:
  """One optimisation step; pure. `batch` needs the model's inputs and `index`.

  Args:
    policy: the temperature / margin policy (`mmts_jax.temperature`).
    loss_fn: `loss_fn(image, text, values[, *, bias]) -> scalar` (`mmts_jax.losses.get`);
      a model that outputs `"bias"` (the sigmoid loss) has it bound by `model_loss_fn`.
    lr_fn: the learning-rate schedule, only logged (as `lr`).
    skip_nonfinite: if the loss or the gradient is not finite, return the state unchanged
      (`metrics["finite"]` is False), so no checkpoint ever holds a poisoned state.
    flat_grad_norm: compute the logged gradient norm over the concatenated gradient (set with
      `optim.flatten`, whose clipping uses the same vector; same value).
  """
  rng = jax.random.fold_in(state.rng, state.step)

  def objective(params):
    out, batch_stats = _forward(state, params, batch, True, rng)
    loss, values, policy_state = policy.loss(
      state.policy_state,
      out["image"],
      out["text"],
      step=state.step,
      index=batch["index"],
      loss_fn=model_loss_fn(loss_fn, out),
      model_temperature=out.get("temperature"),
    )
    return loss, (values, batch_stats, jax.lax.stop_gradient(policy_state), out.get("bias"))

  (loss, (values, batch_stats, policy_state, bias)), grads = jax.value_and_grad(
    objective, has_aux=True
  )(state.params)
  return apply_gradients(
    state,
    grads,
    loss=loss,
    values=values,
    batch_stats=batch_stats,
    policy_state=policy_state,
    policy=policy,
    lr_fn=lr_fn,
    skip_nonfinite=skip_nonfinite,
    bias=bias,
    flat_grad_norm=flat_grad_norm,
  )


def apply_gradients(
  state: TrainState,
  grads,
  *,
  loss: jax.Array,
  values: jax.Array,
  batch_stats,
  policy_state,
  policy: Policy,
  lr_fn: Callable | None = None,
  skip_nonfinite: bool = True,
  bias: jax.Array | None = None,
  flat_grad_norm: bool = False,
) -> tuple[TrainState, dict]:
  """The second half of a step, shared by `train_step` and `mmts_jax.train.grad_cache`:
  the optimizer update from `grads`, the non-finite guard and the step's metrics (`bias`: the
  sigmoid loss's bias the forward pass used, logged when given; `flat_grad_norm` as in
  `train_step`)."""
  grad_norm = _global_norm(grads, flat=flat_grad_norm)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  new = state.replace(
    step=state.step + 1,
    params=optax.apply_updates(state.params, updates),
    opt_state=opt_state,
    batch_stats=batch_stats,
    policy_state=policy_state,
  )
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if skip_nonfinite:
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
  metrics = _value_metrics(loss, values, bias)  # the bias the step's forward pass used
  metrics.update(
    grad_norm=grad_norm,
    finite=finite,
    temperature_base=jnp.asarray(policy.base(state.step), jnp.float32),
  )
  if lr_fn is not None:
    metrics["lr"] = jnp.asarray(lr_fn(state.step), jnp.float32)
  return new, metrics


def eval_step(
  state: TrainState, batch: Mapping[str, jax.Array], *, policy: Policy, loss_fn: LossFn
) -> dict:
  """Loss, per-anchor values and embeddings of a batch in inference mode (no update)."""
  out, _ = _forward(state, state.params, batch, False)
  loss, values, _ = policy.loss(
    state.policy_state,
    out["image"],
    out["text"],
    step=state.step,
    index=batch["index"],
    loss_fn=model_loss_fn(loss_fn, out),
    model_temperature=out.get("temperature"),
  )
  metrics = _value_metrics(loss, values, out.get("bias"))
  metrics.update(image=out["image"], text=out["text"])
  return metrics


def compile_train_step(
  shardings: TrainState, mesh, *, step: Callable | None = None, **deps
) -> Callable:
  """`jax.jit(partial(step, **deps))` with explicit in/out shardings (the batch split over the
  data axis, the state as `shardings`) and the state donated. `step` defaults to `train_step`;
  `mmts_jax.train.grad_cache.micro_batch_step` is the micro-batched one."""
  return jax.jit(
    functools.partial(step or train_step, **deps),
    in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
    out_shardings=(shardings, mesh_lib.replicated(mesh)),
    donate_argnums=0,
  )


def make_embed_fn(model) -> Callable:
  """`embed(variables, batch) -> {"image": (B, D), "text": (B, D)}`, unit-norm float32, jitted.
  For retrieval evaluation: `variables = state.variables()`; a batch may hold only one modality.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from mmts_jax.models import DualEncoder, FeatureTower
    >>> model = DualEncoder(FeatureTower((8,)), FeatureTower((8,)), embed_dim=4,
    ...                     image_key="x", text_key="y")
    >>> v = model.init(jax.random.PRNGKey(0), {"x": jnp.ones((2, 3)), "y": jnp.ones((2, 5))})
    >>> make_embed_fn(model)(v, {"x": jnp.ones((2, 3))})["image"].shape
    (2, 4)
  """

  @jax.jit
  def embed(variables, batch):
    out = {}
    if model.image_key in batch:
      out["image"] = model.apply(variables, batch[model.image_key], method="encode_image")
    if model.text_key in batch:
      out["text"] = model.apply(variables, batch[model.text_key], method="encode_text")
    return out

  return embed
