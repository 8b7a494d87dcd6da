"""Per-sample shifts from cluster sizes (MM-TS Eq. 6) and the positivity check of a configuration.

The shift maps the size `K_c` of a sample's semantic cluster linearly onto `[sh_min, sh_max]`:
large (head) clusters get large temperatures / margins, small (tail) clusters small ones.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["cluster_shift", "validate_positive", "per_sample_values"]


def _is_jax(x) -> bool:
  return isinstance(x, jax.Array)


def cluster_shift(sizes, sh_min: float, sh_max: float, min_size=None, max_size=None):
  r"""Eq. 6: :math:`sh(c) = \frac{K_c - \min K}{\max K - \min K}(sh_{max} - sh_{min}) + sh_{min}`.

  Args:
    sizes: cluster size of each sample (or of each cluster), numpy or jax array.
    sh_min, sh_max: the shift range, `sh_min <= sh_max`.
    min_size, max_size: `min K` / `max K` over the whole dataset. Default: taken from `sizes`,
      which is right when `sizes` covers the whole dataset but not for a batch.

  Returns:
    Shifts with the shape of `sizes`: float64 for numpy input; for jax input the default float
    dtype (float32, float64 under x64). If
    `max K == min K` every shift is `sh_min`.

  Example:
    >>> cluster_shift(np.array([1, 10, 19]), 0.05, 0.10)
    array([0.05 , 0.075, 0.1  ])
  """
  if not (math.isfinite(float(sh_min)) and math.isfinite(float(sh_max))):
    raise ValueError(f"sh_min and sh_max must be finite, got sh_min={sh_min}, sh_max={sh_max}")
  if sh_min > sh_max:
    raise ValueError(f"sh_min must be <= sh_max, got sh_min={sh_min}, sh_max={sh_max}")
  xp = jnp if _is_jax(sizes) else np
  dtype = jnp.result_type(float) if xp is jnp else np.float64
  sizes = xp.asarray(sizes, dtype=dtype)
  if xp is np and sizes.size and np.any(sizes < 0):
    raise ValueError(f"cluster sizes must be >= 0, got min {sizes.min()}")
  lo = xp.min(sizes) if min_size is None else xp.asarray(min_size, dtype)
  hi = xp.max(sizes) if max_size is None else xp.asarray(max_size, dtype)
  span = hi - lo
  # Equal sizes: every sample is in a same-size cluster, so every shift is sh_min (no 0/0).
  safe_span = xp.where(span > 0, span, 1)
  frac = xp.where(span > 0, (sizes - lo) / safe_span, 0)
  return (frac * (sh_max - sh_min) + sh_min).astype(dtype)


def validate_positive(alpha: float, sh_min: float, sh_max: float | None = None, *,
                      what: str = "temperature") -> None:
  """Rejects a configuration whose temperature (or margin) can reach <= 0 over a period.

  The smallest value over a period is `sh_min - alpha/2` (the trough of Eq. 7 plus the smallest
  shift), so the configuration is valid iff that is > 0. Call it before compiling anything.

  Raises:
    ValueError: naming alpha, sh_min and the minimum reached.
  """
  for name, v in (("alpha", alpha), ("sh_min", sh_min)) + (
      (("sh_max", sh_max),) if sh_max is not None else ()):
    if not math.isfinite(float(v)):
      raise ValueError(f"{name} must be finite, got {v}")
  if alpha < 0:
    raise ValueError(f"alpha must be >= 0, got {alpha}")
  if sh_max is not None and sh_min > sh_max:
    raise ValueError(f"sh_min must be <= sh_max, got sh_min={sh_min}, sh_max={sh_max}")
  lowest = sh_min - alpha / 2
  if lowest <= 0:
    raise ValueError(
        f"the {what} can reach {lowest:g} <= 0: sh_min - alpha/2 = {sh_min} - {alpha}/2; "
        f"choose sh_min > alpha/2 = {alpha / 2:g}")


def per_sample_values(base, shift_table, index):
  """`tau_i = base + shift_table[index_i]` (Eq. 8), gathered on device inside a jitted step."""
  return base + jnp.take(shift_table, index, axis=0)
