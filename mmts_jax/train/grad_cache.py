"""A global batch larger than the devices hold, every negative kept: gradient caching
(GradCache, Gao et al. 2021) as a drop-in for `train_step`.

The contrastive loss couples every pair of the global batch, so the loss cannot be split over
micro-batches; the towers can. With the global batch of `B` split into `n` micro-batches `b_k`
and `f_theta` the towers (unit-norm embeddings `z = (z_img, z_txt)`, and CLIP's temperature
`t` and the sigmoid loss's bias `b` when the model owns them):

  1. embed every micro-batch without gradients:   z_k = f_theta(b_k)           (lax.scan)
  2. loss and its gradient w.r.t. the embeddings over the WHOLE batch, through the same
     `policy.loss` + `loss_fn` as the plain step (dense, blockwise or ring; per-sample
     temperatures or margins; the policy's new state):
                                                  L, g = grad_z L(z_1 .. z_n, t)
  3. backpropagate micro-batch by micro-batch with the cached embedding gradients:
        grad_theta L = sum_k J_theta f_theta(b_k)^T g_k                         (lax.scan)
     computed as `grad_theta sum(f_theta(b_k) * g_k)`; the temperature's gradient `dL/dt`
     enters each micro-batch's term as `dL/dt / n` (every micro-batch outputs the same `t`),
     and the bias's `dL/db / n` likewise.

The update therefore equals the big-batch `train_step`'s (tests/test_grad_cache.py: within
1e-5 in float32), while the activations held at once are one micro-batch's. The price is a
second forward pass (3 passes instead of 2 per example).

Micro-batch `k` holds the global rows `k, k + n, k + 2n, ...`: with the batch split over the
data axis, every micro-batch is spread evenly over the devices without moving data (the
micro-batch size must be a multiple of the device count).

Randomness and BatchNorm, kept consistent between the two forward passes of a micro-batch:
  - dropout: micro-batch `k` uses `fold_in(fold_in(rng, step), k)` in both passes, so the
    recomputed forward is the one whose embeddings entered the loss. The masks differ from the
    big-batch step's (the same distribution), so equality with it holds without dropout.
  - BatchNorm: in training mode it normalises with the statistics of its input, here the
    micro-batch (as a per-device BatchNorm does), identical in both passes; the running
    averages are updated once per micro-batch, in order, in the embedding pass. The big-batch
    step normalises with the global batch's statistics: equality holds for models without
    BatchNorm (ViT, the CLIP transformers, the feature towers); the ResNets differ as
    micro-batch BatchNorm does.

`accumulation="plain"` is ordinary gradient accumulation for comparison: the loss of each
micro-batch alone (negatives only within it), gradients averaged. It is NOT the big-batch
update (tests/test_grad_cache.py shows the difference).

Example:
  >>> import functools, jax, jax.numpy as jnp, optax
  >>> from mmts_jax import losses, temperature
  >>> from mmts_jax.models import DualEncoder, FeatureTower
  >>> from mmts_jax.train import state as state_lib
  >>> from mmts_jax.train.step import train_step
  >>> model = DualEncoder(FeatureTower((8,)), FeatureTower((8,)), embed_dim=4,
  ...                     image_key="x", text_key="y")
  >>> batch = {"x": jax.random.normal(jax.random.PRNGKey(1), (8, 3)), "y": jnp.eye(8),
  ...          "index": jnp.arange(8)}
  >>> s = state_lib.create(model, optax.sgd(0.1), rng=jax.random.PRNGKey(0), sample_batch=batch)
  >>> deps = dict(policy=temperature.Fixed(value=0.1), loss_fn=losses.get("infonce"))
  >>> _, big = jax.jit(functools.partial(train_step, **deps))(s, batch)
  >>> _, cached = jax.jit(functools.partial(micro_batch_step, micro_batch_size=2, **deps))(
  ...     s, batch)
  >>> bool(jnp.allclose(big["loss"], cached["loss"], atol=1e-6))
  True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmts_jax import mesh as mesh_lib
from mmts_jax.temperature import Policy
from mmts_jax.train.state import TrainState
from mmts_jax.train.step import _forward, apply_gradients, model_loss_fn

__all__ = ["micro_batch_step", "check_micro_batch", "split_micro", "merge_micro", "ACCUMULATIONS"]

ACCUMULATIONS = ("grad_cache", "plain")


def check_micro_batch(
  batch_size: int, micro_batch_size: int, num_devices: int = 1, accumulation: str = "grad_cache"
) -> int:
  """The number of micro-batches `batch_size / micro_batch_size`, checked.

  Raises:
    ValueError: `micro_batch_size` is not a positive divisor of `batch_size`, or not a multiple
      of `num_devices` (every micro-batch is split over the devices), or `accumulation` unknown.

  Example:
    >>> check_micro_batch(32768, 512, num_devices=1)
    64
  """
  if accumulation not in ACCUMULATIONS:
    raise ValueError(f"train.accumulation must be one of {ACCUMULATIONS}, got {accumulation!r}")
  if (
    isinstance(micro_batch_size, bool)
    or not isinstance(micro_batch_size, int)
    or (micro_batch_size <= 0)
  ):
    raise ValueError(f"train.micro_batch_size must be a positive integer, got {micro_batch_size!r}")
  if batch_size % micro_batch_size:
    raise ValueError(
      f"train.micro_batch_size {micro_batch_size} does not divide batch_size {batch_size}"
    )
  if micro_batch_size % num_devices:
    raise ValueError(
      f"train.micro_batch_size {micro_batch_size} must be a multiple of the "
      f"{num_devices} devices (each micro-batch is split over them)"
    )
  return batch_size // micro_batch_size


def split_micro(x: jax.Array, n: int) -> jax.Array:
  """`(B, ...) -> (n, B / n, ...)`; micro-batch `k` holds rows `k, k + n, k + 2n, ...`.

  Example:
    >>> split_micro(jnp.arange(6), 2).tolist()
    [[0, 2, 4], [1, 3, 5]]
  """
  m = x.shape[0] // n
  return jnp.swapaxes(x.reshape((m, n) + x.shape[1:]), 0, 1)


def merge_micro(y: jax.Array) -> jax.Array:
  """The inverse of `split_micro`: `(n, m, ...) -> (n m, ...)` in the original row order.

  Example:
    >>> merge_micro(split_micro(jnp.arange(6), 3)).tolist()
    [0, 1, 2, 3, 4, 5]
  """
  n, m = y.shape[:2]
  return jnp.swapaxes(y, 0, 1).reshape((n * m,) + y.shape[2:])


def _constrain(tree, mesh, spec=(None, mesh_lib.DATA_AXIS)):
  # Micro-batch axis whole, rows split over the data axis: each device keeps its own rows.
  if mesh is None:
    return tree
  sharding = NamedSharding(mesh, P(*spec))
  return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sharding), tree)


def _strided(batch, n: int, mesh):
  """`batch` viewed as `(B / n, n, ...)` (a reshape, no copy): micro-batch `k` is column `k`
  (`_take`), the rows `k, k + n, ...` of `split_micro`, read in place. Scanning over
  `split_micro(x, n)` instead would first write a transposed copy of every input (at a global
  batch of 32,768 ViT images, a second 19 GiB)."""
  view = {k: v.reshape((v.shape[0] // n, n) + v.shape[1:]) for k, v in batch.items()}
  return _constrain(view, mesh, (mesh_lib.DATA_AXIS,))


def _take(view, k):
  # Micro-batch `k` of `_strided`'s view: equal to `split_micro(x, n)[k]`.
  return {
    name: jax.lax.dynamic_index_in_dim(v, k, axis=1, keepdims=False) for name, v in view.items()
  }


def _tree_add(a, b):
  return jax.tree.map(jnp.add, a, b)


def micro_batch_step(
  state: TrainState,
  batch: Mapping[str, jax.Array],
  *,
  policy: Policy,
  loss_fn: Callable,
  micro_batch_size: int,
  accumulation: str = "grad_cache",
  lr_fn: Callable | None = None,
  skip_nonfinite: bool = True,
  mesh=None,
  flat_grad_norm: bool = False,
) -> tuple[TrainState, dict]:
  """`train_step` over `B / micro_batch_size` micro-batches (see the module docstring).

  Args:
    micro_batch_size: examples per tower pass; a divisor of the global batch and a multiple of
      the device count.
    accumulation: "grad_cache" (the big-batch update) or "plain" (per-micro-batch losses).
    mesh: when given, each micro-batch is constrained to stay split over its data axis.
  Other arguments and the result as `mmts_jax.train.step.train_step`.
  """
  batch_size = batch["index"].shape[0]
  n = check_micro_batch(
    batch_size, micro_batch_size, 1 if mesh is None else mesh.size, accumulation
  )
  view = _strided(batch, n, mesh)
  base = jax.random.fold_in(state.rng, state.step)
  rngs = jax.vmap(lambda k: jax.random.fold_in(base, k))(jnp.arange(n))
  if accumulation == "plain":
    return _plain(
      state,
      view,
      rngs,
      n,
      policy=policy,
      loss_fn=loss_fn,
      lr_fn=lr_fn,
      skip_nonfinite=skip_nonfinite,
      flat_grad_norm=flat_grad_norm,
    )

  # 1. Embeddings of every micro-batch; no gradient is taken through this scan.
  def embed(batch_stats, xs):
    k, rng = xs
    mb = _take(view, k)
    out, batch_stats = _forward(state.replace(batch_stats=batch_stats), state.params, mb, True, rng)
    return batch_stats, (out["image"], out["text"], {k: out[k] for k in keys})

  steps = jnp.arange(n)
  keys = _scalar_outputs(state, _take(view, 0), rngs[0])
  batch_stats, (image, text, scalars) = jax.lax.scan(embed, state.batch_stats, (steps, rngs))
  image, text = merge_micro(image), merge_micro(text)

  # 2. The loss over the whole batch and its gradient w.r.t. the embeddings and the model's
  # scalar outputs (CLIP's temperature, the sigmoid loss's bias; bound as the plain step does).
  def objective(image, text, scalars):
    loss, values, policy_state = policy.loss(
      state.policy_state,
      image,
      text,
      step=state.step,
      index=batch["index"],
      loss_fn=model_loss_fn(loss_fn, scalars),
      model_temperature=scalars.get("temperature"),
    )
    return loss, (values, jax.lax.stop_gradient(policy_state))

  scalars = {k: v[0] for k, v in scalars.items()}  # every micro-batch outputs the same value
  (loss, (values, policy_state)), (g_image, g_text, g_scalars) = jax.value_and_grad(
    objective, argnums=(0, 1, 2), has_aux=True
  )(image, text, scalars)
  cotangents = _constrain((split_micro(g_image, n), split_micro(g_text, n)), mesh)

  # 3. Backpropagate each micro-batch with its cached embedding gradients; sum.
  def backward(grads, xs):
    k, rng, g_img, g_txt = xs
    mb = _take(view, k)

    def surrogate(params):
      out, _ = _forward(state, params, mb, True, rng)
      s = jnp.sum(out["image"].astype(jnp.float32) * g_img) + jnp.sum(
        out["text"].astype(jnp.float32) * g_txt
      )
      for k in keys:
        s = s + out[k].astype(jnp.float32) * (g_scalars[k] / n)
      return s

    return _tree_add(grads, jax.grad(surrogate)(state.params)), None

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  grads, _ = jax.lax.scan(backward, zeros, (steps, rngs) + cotangents)
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
    bias=scalars.get("bias"),
    flat_grad_norm=flat_grad_norm,
  )


def _scalar_outputs(state, mb, rng) -> tuple[str, ...]:
  # The model's scalar outputs (CLIP's temperature, the sigmoid loss's bias): decided from
  # shapes only (no computation).
  out = jax.eval_shape(lambda mb, rng: _forward(state, state.params, mb, True, rng)[0], mb, rng)
  return tuple(k for k in ("temperature", "bias") if k in out)


def _plain(state, view, rngs, n, *, policy, loss_fn, lr_fn, skip_nonfinite, flat_grad_norm):
  """Plain gradient accumulation: each micro-batch's own loss (its negatives only), the
  gradients and losses averaged, the policy state and BatchNorm statistics threaded in order."""

  def body(carry, xs):
    grads, batch_stats, policy_state = carry
    k, rng = xs
    mb = _take(view, k)

    def objective(params):
      out, new_bs = _forward(state.replace(batch_stats=batch_stats), params, mb, True, rng)
      loss, values, new_ps = policy.loss(
        policy_state,
        out["image"],
        out["text"],
        step=state.step,
        index=mb["index"],
        loss_fn=model_loss_fn(loss_fn, out),
        model_temperature=out.get("temperature"),
      )
      return loss, (values, new_bs, jax.lax.stop_gradient(new_ps))

    (loss, (values, batch_stats, policy_state)), g = jax.value_and_grad(objective, has_aux=True)(
      state.params
    )
    grads = jax.tree.map(lambda a, b: a + b / n, grads, g)
    return (grads, batch_stats, policy_state), (loss, values)

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (grads, batch_stats, policy_state), (losses, values) = jax.lax.scan(
    body, (zeros, state.batch_stats, state.policy_state), (jnp.arange(n), rngs)
  )
  return apply_gradients(
    state,
    grads,
    loss=jnp.mean(losses),
    values=merge_micro(values),
    batch_stats=batch_stats,
    policy_state=policy_state,
    policy=policy,
    lr_fn=lr_fn,
    skip_nonfinite=skip_nonfinite,
    flat_grad_norm=flat_grad_norm,
  )
