"""Where one family of the towers' Pallas kernels runs (`pallas_layer_norm`, `pallas_gelu`,
`pallas_qkv`, `pallas_attention` each keep one switch): None (the default: the kernels on GPUs,
the XLA form elsewhere), False (the XLA form everywhere) or "interpret" (the kernels through
the Pallas interpreter on any backend: slow, for tests on the CPU). Read at trace time.

Example:
  >>> import jax.numpy as jnp
  >>> switch = KernelSwitch("set_pallas_demo", (jnp.float32,))
  >>> switch.set("interpret"); switch.on(jnp.float32), switch.on(jnp.int32), switch.interpret
  (True, False, True)
  >>> switch.set(None); switch.on(jnp.float32)  # on the CPU
  False
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["MODES", "KernelSwitch"]

MODES = (None, False, "interpret")


class KernelSwitch:
  """The mode of one kernel family (module docstring) and the dtypes its kernels take.
  `setter` names the module's public setter in the ValueError of a bad mode."""

  def __init__(self, setter: str, dtypes):
    self.setter = setter
    self.dtypes = tuple(jnp.dtype(d) for d in dtypes)
    self.mode = None

  def set(self, mode) -> None:
    if mode not in MODES:
      raise ValueError(f"{self.setter}: mode must be None, False or 'interpret', got {mode!r}")
    self.mode = mode

  @property
  def interpret(self) -> bool:
    return self.mode == "interpret"

  def on(self, dtype) -> bool:
    """Whether inputs of `dtype` take the kernels now."""
    if self.mode is False or jnp.dtype(dtype) not in self.dtypes:
      return False
    return self.interpret or jax.default_backend() == "gpu"
