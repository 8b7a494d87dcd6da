"""Input checks shared by every loss path. They run at trace time, so errors come before compiling."""
from __future__ import annotations

import jax
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
        f"{tuple(text.shape)}")
  if image.shape[0] < 1:
    raise ValueError(f"{fn}: the batch is empty")


def check_per_anchor(value, batch: int, name: str, fn: str, *, strictly_positive: bool,
                     signed: bool = False):
  """A scalar or (batch,) array; concrete values are checked for finiteness and sign.

  `strictly_positive`: > 0, else >= 0; `signed`: any finite value (a bias).
  """
  shape = tuple(np.shape(value))
  if shape not in ((), (batch,)):
    raise ValueError(
        f"{fn}: {name} must be a scalar or have shape ({batch},) (one per anchor), got {shape}")
  if not isinstance(value, jax.core.Tracer):
    v = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(v)):
      raise ValueError(f"{fn}: {name} must be finite, got {int(np.sum(~np.isfinite(v)))} "
                       f"non-finite value(s)")
    if signed:
      return
    bad = v <= 0 if strictly_positive else v < 0
    if np.any(bad):
      raise ValueError(
          f"{fn}: {name} must be {'> 0' if strictly_positive else '>= 0'}, got min "
          f"{v.min():g} ({int(np.sum(bad))} of {v.size} value(s) out of range)")
