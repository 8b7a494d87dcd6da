"""Mesh helpers of the sharded losses: `shard_map` across jax versions and the batch axes.

The sharded losses themselves are built by `mmts_jax.losses.make_sharded_loss`
(`mmts_jax.losses.dispatch`); this module knows nothing about any loss.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh

__all__ = ["batch_axes", "shard_map"]


def shard_map(f, *, mesh, in_specs, out_specs):
  """`jax.shard_map` where it exists (jax >= 0.7), else the experimental one."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
  from jax.experimental.shard_map import shard_map as legacy  # pragma: no cover (old jax)

  return legacy(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def batch_axes(mesh: Mesh, axis_name, fn: str):
  """`(axis_name, n)`: the mesh axis (a name, or a tuple for several) and the devices along it.

  `axis_name=None` takes all of the mesh's axes.

  Example:
    >>> import jax, numpy as np
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
    >>> batch_axes(mesh, None, "loss")
    ('batch', 1)
  """
  if not isinstance(mesh, Mesh):
    raise TypeError(f"{fn}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  if axis_name is None:
    axis_name = tuple(mesh.axis_names)
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  for a in names:
    if a not in mesh.axis_names:
      raise ValueError(f"{fn}: axis {a!r} is not in the mesh axes {tuple(mesh.axis_names)}")
  n = 1
  for a in names:
    n *= mesh.shape[a]
  return (names[0] if len(names) == 1 else names), n
