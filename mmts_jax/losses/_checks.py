"""Input checks shared by every loss path.

They run at trace time, so errors come before compiling; `nan_unless_valid` covers traced values.
"""

from __future__ import annotations

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

# The keyword arguments a loss takes beyond (image, text, values): per-anchor or scalar arrays.
EXTRA = {"sigmoid": ("bias",)}


def check_pair(image, text, fn: str) -> None:
  """Both embeddings are (B, D) floating arrays of the same shape."""
  for name, x in (("image", image), ("text", text)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{fn}: {name} must be an array, got {type(x).__name__}")
    if x.ndim != 2:
      raise ValueError(f"{fn}: {name} must be (batch, dim), got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{fn}: {name} must be floating point, got dtype {x.dtype}")
  if image.shape != text.shape:
    raise ValueError(
      f"{fn}: image and text must have the same shape, got {tuple(image.shape)} and "
      f"{tuple(text.shape)}"
    )
  if image.shape[0] < 1:
    raise ValueError(f"{fn}: the batch is empty")


def check_per_anchor(
  value, batch: int, name: str, fn: str, *, strictly_positive: bool, signed: bool = False
):
  """A scalar or (batch,) array; concrete values are checked for finiteness and sign.

  `strictly_positive`: > 0, else >= 0; `signed`: any finite value (a bias).
  """
  shape = tuple(np.shape(value))
  if shape not in ((), (batch,)):
    raise ValueError(
      f"{fn}: {name} must be a scalar or have shape ({batch},) (one per anchor), got {shape}"
    )
  if not isinstance(value, jax.core.Tracer):
    v = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(v)):
      raise ValueError(
        f"{fn}: {name} must be finite, got {int(np.sum(~np.isfinite(v)))} non-finite value(s)"
      )
    if signed:
      return
    bad = v <= 0 if strictly_positive else v < 0
    if np.any(bad):
      raise ValueError(
        f"{fn}: {name} must be {'> 0' if strictly_positive else '>= 0'}, got min "
        f"{v.min():g} ({int(np.sum(bad))} of {v.size} value(s) out of range)"
      )


def nan_unless_valid(loss: jax.Array, positive=(), finite=(), axis_name=None) -> jax.Array:
  """`loss`, or NaN when a value reached under `jit` is out of range (the checks above skip
  tracers, so a bad traced temperature would otherwise give a finite, meaningless loss).

  Every array in `positive` must be finite and > 0 (temperatures, margins), every array in
  `finite` finite (a bias). Multiplying by 1 or NaN keeps the value and gradient bit-exact when
  valid and makes both NaN when not, so the trainer's non-finite guard stops on them.
  With `axis_name` (a sharded loss's local partial sum), a bad value on any device poisons the
  partial sums of all of them, so every device's gradient is NaN, not only the owner's.
  """
  bad = jnp.int32(0)
  for v in positive:
    bad = bad + jnp.sum(~((v > 0) & jnp.isfinite(v)), dtype=jnp.int32)
  for v in finite:
    bad = bad + jnp.sum(~jnp.isfinite(v), dtype=jnp.int32)
  if axis_name is not None:
    bad = jax.lax.psum(bad, axis_name)
  ok = bad == 0
  return loss * jnp.where(ok, 1.0, jnp.nan).astype(loss.dtype)
