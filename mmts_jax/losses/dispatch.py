"""`losses.get`: the one place that turns a loss name and an implementation into a function.

Every caller that picks a loss from configuration (the trainer, fine-tuning, benchmarks) goes
through here, so the choice between the dense, blockwise, all-gather and ring forms is made once,
when the function is built, not on every call.
"""
from __future__ import annotations

from typing import Callable

import jax

__all__ = ["get", "NAMES", "IMPLS"]

NAMES = ("infonce", "max_margin")
# "auto" / "dense" / "blockwise": the loss of the global batch, which XLA partitions when the
# batch is sharded; "gather" / "ring": the per-device sharded loss under `shard_map`.
IMPLS = ("auto", "dense", "blockwise", "gather", "ring")

LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def get(name: str, *, impl: str = "auto", block_size=None, mesh=None, axis_name=None,
        precision=None) -> LossFn:
  """Returns `loss_fn(image, text, values) -> scalar` for a loss named in a config.

  Args:
    name: "infonce" (`values` are temperatures) or "max_margin" (`values` are margins).
    impl: one of `IMPLS`. "gather" and "ring" need `mesh`.
    block_size: blockwise / ring tile, an int or `(rows, cols)`; None picks the default.
    mesh: the `jax.sharding.Mesh` the batch is split over ("gather" / "ring" only).
    axis_name: the mesh axis (or axes) of the batch; None: all of the mesh's axes.
    precision: matmul precision.

  Example:
    >>> import jax.numpy as jnp
    >>> loss_fn = get("infonce", impl="dense")
    >>> x = jnp.eye(4)
    >>> round(float(loss_fn(x, x, jnp.full((4,), 0.5))), 4)  # log(e^2 + 3) - 2
    0.3408
  """
  from mmts_jax import losses
  if name not in NAMES:
    raise ValueError(f"loss name must be one of {NAMES}, got {name!r}")
  if impl not in IMPLS:
    raise ValueError(f"loss impl must be one of {IMPLS}, got {impl!r}")
  if isinstance(block_size, list):
    block_size = tuple(block_size)
  if impl in ("gather", "ring"):
    if mesh is None:
      raise ValueError(f"loss impl {impl!r} needs the mesh")
    return losses.make_sharded_loss(mesh, name, axis_name=axis_name, sharded=impl,
                                    block_size=block_size, precision=precision)
  fn = losses.infonce if name == "infonce" else losses.max_margin

  def loss_fn(image, text, values):
    return fn(image, text, values, impl=impl, block_size=block_size, precision=precision)

  return loss_fn
