"""The train state: every array a step reads and writes, plus how to apply the model and the
optimizer (`apply_fn`, `tx`), as in Flax's `train_state.TrainState`.

  step          int32 scalar, the number of optimizer updates applied
  params        the model's parameters; `batch_stats` its BatchNorm statistics ({} if none)
  opt_state     the optimizer's state
  rng           the base PRNG key; step t uses `fold_in(rng, t)`
  policy_state  the temperature policy's dataset-sized state (`Policy.init_state`)

The temperature policy, the loss and the learning-rate schedule are not part of the state: the
train step takes them as explicit arguments (`mmts_jax.train.step`).

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from mmts_jax.models import DualEncoder, FeatureTower
  >>> model = DualEncoder(FeatureTower((8,)), FeatureTower((8,)), embed_dim=4,
  ...                     image_key="image_features", text_key="text_features")
  >>> batch = {"image_features": jnp.ones((2, 3)), "text_features": jnp.ones((2, 5))}
  >>> state = create(model, optax.sgd(0.1), rng=jax.random.PRNGKey(0), sample_batch=batch)
  >>> sorted(state.checkpoint_tree()), int(state.step)
  (['batch_stats', 'opt_state', 'params', 'policy_state', 'rng', 'step'], 0)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.struct as struct
import jax
import jax.numpy as jnp
import optax

__all__ = ["TrainState", "create"]


class TrainState(struct.PyTreeNode):
  """Arrays (pytree leaves) plus the static `apply_fn` and `tx`."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  policy_state: Any
  apply_fn: Callable = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  def variables(self) -> dict:
    """`{"params": ...[, "batch_stats": ...]}` for `model.apply`."""
    return {
      "params": self.params,
      **({"batch_stats": self.batch_stats} if self.batch_stats else {}),
    }

  def checkpoint_tree(self) -> dict:
    """What a checkpoint holds: every array of the state."""
    return {
      "step": self.step,
      "params": self.params,
      "batch_stats": self.batch_stats,
      "opt_state": self.opt_state,
      "rng": self.rng,
      "policy_state": self.policy_state,
    }

  def replace_from_checkpoint(self, tree: Mapping[str, Any]) -> TrainState:
    return self.replace(**{k: tree[k] for k in self.checkpoint_tree()})


def create(
  model,
  tx: optax.GradientTransformation,
  *,
  rng,
  sample_batch,
  policy_state: Mapping[str, jax.Array] | None = None,
) -> TrainState:
  """Initialises parameters, optimizer state and the RNG (pure: wrap it in `jax.jit` with
  `out_shardings` to create a sharded state directly on the devices). Only the per-example
  shapes of `sample_batch` matter."""
  init_rng, state_rng = jax.random.split(rng)
  variables = model.init({"params": init_rng, "dropout": init_rng}, sample_batch, train=False)
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=tx.init(params),
    rng=state_rng,
    policy_state=dict(policy_state or {}),
    apply_fn=model.apply,
    tx=tx,
  )
