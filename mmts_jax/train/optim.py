"""The optimizer: AdamW with linear warmup and cosine decay, gradient clipping, and the clamp of
CLIP's learnable temperature.

`make_optimizer(config.optim, total_steps)` returns `(tx, lr_fn)`: linear warmup from 0 to `lr`
over `warmup_steps`, cosine decay to `lr * end_lr_factor` at `total_steps`; the global gradient
norm clipped at `grad_clip_norm` (0: no clipping) first; no weight decay on parameters with fewer
than 2 dimensions (biases, norms, scalars).

`optim.flatten=True` computes the same update with the clipping and Adam's moments on one flat
vector of all parameters (`optax.flatten`): the gradients are concatenated once, clipped with
one norm and the moments `mu`, `nu` live as two flat vectors, so the update is a handful of
kernels instead of a few per parameter (about 800 for ViT-B/16 + CLIP's text tower on a GPU).
Weight decay and the learning rate stay per parameter, fused with `apply_updates`. The values
are those of the default path (`tests/test_optim_flatten.py`); the optimizer state's structure
differs, so a checkpoint restores only into the setting it was written with. Meant for
replicated (data-parallel) parameters: with `mesh.param_sharding="fsdp"` the concatenation
gathers the shards.

`clamp_parameter(name, max_value)` bounds a parameter *after* the update (as OpenCLIP clamps
`logit_scale` after `optimizer.step()`), so a parameter at its bound keeps its gradient and can
move back; a forward `minimum` would zero the gradient there for good.

Example:
  >>> import jax.numpy as jnp, optax
  >>> tx = optax.chain(optax.sgd(1.0), clamp_parameter("log_inv_temperature", 2.0))
  >>> params = {"log_inv_temperature": jnp.float32(1.5), "w": jnp.float32(0.0)}
  >>> grads = {"log_inv_temperature": jnp.float32(-1.0), "w": jnp.float32(-1.0)}
  >>> updates, _ = tx.update(grads, tx.init(params), params)
  >>> {k: float(v) for k, v in optax.apply_updates(params, updates).items()}
  {'log_inv_temperature': 2.0, 'w': 1.0}
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

__all__ = ["make_optimizer", "clamp_parameter", "decay_mask"]


def decay_mask(params):
  """True for the parameters that get weight decay (2-D and larger)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def clamp_parameter(name: str, max_value: float) -> optax.GradientTransformation:
  """Makes the update of every parameter whose key is `name` land at `min(p + u, max_value)`.

  Goes last in a chain: `u' = min(p + u, max_value) - p`, so `apply_updates` gives the clamped
  value (up to one float rounding).
  """

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("clamp_parameter needs the parameters (tx.update(grads, state, params))")

    def one(path, u, p):
      last = path[-1]
      key = getattr(last, "key", getattr(last, "name", None))
      if key != name:
        return u
      return jnp.minimum(p + u, jnp.asarray(max_value, p.dtype)) - p

    return jax.tree_util.tree_map_with_path(one, updates, params), state

  return optax.GradientTransformation(init, update)


def make_optimizer(
  cfg, total_steps: int, *, max_log_inv_temperature: float | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`config.optim` -> `(tx, lr_fn)` (see the module docstring). With
  `max_log_inv_temperature`, CLIP's `log_inv_temperature` is clamped there after each update.

  Raises:
    ValueError: a warmup outside [0, total_steps) or a learning rate that is not > 0.
  """
  warmup = int(cfg.warmup_steps)
  if not 0 <= warmup < total_steps:
    raise ValueError(f"optim.warmup_steps must be in [0, total_steps={total_steps}), got {warmup}")
  lr = float(cfg.lr)
  if not (math.isfinite(lr) and lr > 0):
    raise ValueError(f"optim.lr must be finite and > 0, got {lr}")
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, lr, warmup, int(total_steps), end_value=lr * float(cfg.end_lr_factor)
  )
  clip = float(cfg.grad_clip_norm or 0.0)
  parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
  b1, b2, eps, wd = (float(cfg[k]) for k in ("b1", "b2", "eps", "weight_decay"))
  if cfg.get("flatten", False):
    # optax.adamw is chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate): the
    # same three steps, the first (with the clipping) on the flat vector.
    parts = [
      optax.flatten(optax.chain(*parts, optax.scale_by_adam(b1=b1, b2=b2, eps=eps))),
      optax.add_decayed_weights(wd, mask=decay_mask),
      optax.scale_by_learning_rate(schedule),
    ]
  else:
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=decay_mask))
  if max_log_inv_temperature is not None:
    parts.append(clamp_parameter("log_inv_temperature", float(max_log_inv_temperature)))
  return optax.chain(*parts), schedule
