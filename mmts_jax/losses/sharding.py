"""The sharded MM-TS losses for a `jax.sharding.Mesh`, for callers who do not write `shard_map`.

`make_sharded_loss(mesh, "infonce")` returns `loss(image, text, value)` that takes global
`(B, D)` arrays (sharded over the mesh's batch axes, or not: `shard_map` reshards them) and
returns the replicated global-batch loss, equal to the dense single-device loss; `jax.grad` of
it is the global gradient, sharded like the inputs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from mmts_jax.losses import _checks

__all__ = ["make_sharded_loss", "shard_map"]

_LOSSES = ("infonce", "max_margin")


def shard_map(f, *, mesh, in_specs, out_specs):
  """`jax.shard_map` where it exists (jax >= 0.7), else the experimental one."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
  from jax.experimental.shard_map import shard_map as legacy  # pragma: no cover (old jax)
  return legacy(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def make_sharded_loss(mesh: Mesh, loss: str = "infonce", *, axis_name=None,
                      sharded: str = "ring", block_size=None, precision=None):
  """Builds the global-batch loss over `mesh`, the batch split along `axis_name`.

  Args:
    mesh: the device mesh.
    loss: "infonce" (value = temperature) or "max_margin" (value = margin).
    axis_name: the mesh axis (or tuple of axes) the batch is split over; None uses all of them.
    sharded: "ring" (blocks passed round the devices), "gather" (all-gather) or "auto".
    block_size, precision: as in `mmts_jax.losses.infonce`.

  Returns:
    `loss_fn(image, text, value) -> scalar`, `value` a scalar or `(B,)`; the global batch B must
    be divisible by the number of devices along `axis_name`. Use it under `jax.jit`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import Mesh
    >>> mesh = Mesh(jax.devices(), ("batch",))
    >>> loss_fn = make_sharded_loss(mesh, "infonce")
    >>> x = jnp.ones((8 * len(jax.devices()), 4)) / 2
    >>> loss = jax.jit(loss_fn)(x, x, 0.07)
  """
  from mmts_jax import losses
  if not isinstance(mesh, Mesh):
    raise TypeError(f"make_sharded_loss: mesh must be a jax.sharding.Mesh, got "
                    f"{type(mesh).__name__}")
  if loss not in _LOSSES:
    raise ValueError(f"make_sharded_loss: loss must be one of {_LOSSES}, got {loss!r}")
  if axis_name is None:
    axis_name = tuple(mesh.axis_names)
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  for a in names:
    if a not in mesh.axis_names:
      raise ValueError(f"make_sharded_loss: axis {a!r} is not in the mesh axes "
                       f"{tuple(mesh.axis_names)}")
  if len(names) == 1:
    axis_name = names[0]
  n = 1
  for a in names:
    n *= mesh.shape[a]
  fn = losses.infonce if loss == "infonce" else losses.max_margin
  name = "temperature" if loss == "infonce" else "margin"
  spec = P(axis_name)

  def local(image, text, value):
    return fn(image, text, value, axis_name=axis_name, sharded=sharded, block_size=block_size,
              precision=precision)

  mapped = shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=P())

  def loss_fn(image, text, value):
    _checks.check_pair(image, text, loss)
    b = image.shape[0]
    if b % n:
      raise ValueError(f"{loss}: the global batch {b} is not divisible by the {n} devices along "
                       f"{axis_name!r}")
    _checks.check_per_anchor(value, b, name, loss, strictly_positive=True)
    value = jnp.broadcast_to(jnp.asarray(value, jnp.promote_types(image.dtype, jnp.float32)),
                             (b,))
    return mapped(image, text, value)

  return loss_fn
