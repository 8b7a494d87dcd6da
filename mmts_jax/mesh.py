"""Device mesh, shardings and multi-host input for the trainer.

One mesh axis, `"data"`, spans every device of every process. The batch is split along it (data
parallelism). Parameters and optimizer state are either replicated (`"replicated"`) or FSDP-sharded
(`"fsdp"`): each array large enough is split along its largest dimension divisible by the number
of devices, and XLA inserts the all-gathers / reduce-scatters under `jit`.

Multi-host: call `initialize_distributed()` first (one process per host, or per GPU); each process
then loads only its own slice of every global batch, and `mmts_jax.data.sources.to_device` (the
one host-to-device path) assembles the global array from the process-local pieces without any
cross-host copy.

Example:
  >>> mesh = make_mesh()
  >>> mesh.axis_names
  ('data',)
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
  "DATA_AXIS",
  "PARAM_SHARDINGS",
  "initialize_distributed",
  "make_mesh",
  "batch_sharding",
  "replicated",
  "param_sharding",
  "tree_shardings",
  "local_batch_size",
]

DATA_AXIS = "data"
PARAM_SHARDINGS = ("replicated", "fsdp")
# Arrays smaller than this stay replicated under FSDP: their all-gather costs more than it saves.
FSDP_MIN_SIZE = 2**14


def _looks_multiprocess() -> bool:
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  # A single-task SLURM / MPI job is one process: nothing to coordinate.
  if any(env.get(k, "1") not in ("", "1") for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")):
    return True
  return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(enabled: bool | str = "auto") -> bool:
  """`jax.distributed.initialize()` for multi-process runs; returns whether it ran.

  `"auto"` initialises when the cluster says there are several processes (a coordinator address,
  SLURM or Open MPI with more than one task, a multi-host TPU slice); `True` always does (the
  arguments are auto-detected); `False` never does. Call it before anything touches a device.
  """
  if enabled not in (True, False, "auto"):
    raise ValueError(f"distributed must be True, False or 'auto', got {enabled!r}")
  if enabled is False or (enabled == "auto" and not _looks_multiprocess()):
    return False
  jax.distributed.initialize()
  return True


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D `("data",)` mesh over the first `num_devices` devices (default: all, all hosts)."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else int(num_devices)
  if not 0 < n <= len(devices):
    raise ValueError(f"mesh: num_devices must be in [1, {len(devices)}], got {num_devices}")
  return Mesh(np.asarray(devices[:n]), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over `"data"`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_sharding(shape: tuple[int, ...], mesh: Mesh, mode: str) -> NamedSharding:
  """The sharding of one parameter-shaped array under `mode` (see the module docstring)."""
  if mode not in PARAM_SHARDINGS:
    raise ValueError(f"mesh.param_sharding must be one of {PARAM_SHARDINGS}, got {mode!r}")
  n = mesh.shape[DATA_AXIS]
  if mode == "replicated" or n == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
    return replicated(mesh)
  # The largest dimension divisible by the device count (ties: the last one, usually the
  # output features, which keeps the gathered layout contiguous).
  best = None
  for axis, dim in enumerate(shape):
    if dim % n == 0 and (best is None or dim >= shape[best]):
      best = axis
  if best is None:
    return replicated(mesh)
  spec: list[str | None] = [None] * len(shape)
  spec[best] = DATA_AXIS
  return NamedSharding(mesh, P(*spec))


def tree_shardings(tree: Any, mesh: Mesh, mode: str) -> Any:
  """Shardings for every array leaf of `tree` (arrays or `jax.ShapeDtypeStruct`s)."""
  return jax.tree.map(lambda x: param_sharding(tuple(np.shape(x)), mesh, mode), tree)


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """The per-process batch; raises ValueError when the global batch does not split evenly."""
  n_dev, n_proc = mesh.size, jax.process_count()
  if global_batch_size <= 0 or global_batch_size % n_dev:
    raise ValueError(
      f"batch_size {global_batch_size} must be a positive multiple of the number "
      f"of devices ({n_dev})"
    )
  return global_batch_size // n_proc
