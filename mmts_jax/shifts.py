"""Per-sample shifts from cluster sizes (MM-TS Eq. 6) and the positivity check of a configuration.

The shift maps the size `K_c` of a sample's semantic cluster linearly onto `[sh_min, sh_max]`:
large (head) clusters get large temperatures / margins, small (tail) clusters small ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import overload

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = ["cluster_shift", "validate_positive", "per_sample_values", "level_match"]


def _is_jax(x) -> bool:
  return isinstance(x, jax.Array)


@overload
def cluster_shift(
  sizes: jax.Array,
  sh_min: float,
  sh_max: float,
  min_size: ArrayLike | None = None,
  max_size: ArrayLike | None = None,
) -> jax.Array: ...
@overload
def cluster_shift(
  sizes: np.ndarray | Sequence[float],
  sh_min: float,
  sh_max: float,
  min_size: ArrayLike | None = None,
  max_size: ArrayLike | None = None,
) -> np.ndarray: ...
def cluster_shift(
  sizes,
  sh_min: float,
  sh_max: float,
  min_size: ArrayLike | None = None,
  max_size: ArrayLike | None = None,
) -> jax.Array | np.ndarray:
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


def validate_positive(
  alpha: float, sh_min: float, sh_max: float | None = None, *, what: str = "temperature"
) -> None:
  """Rejects a configuration whose temperature (or margin) can reach <= 0 over a period.

  The smallest value over a period is `sh_min - alpha/2` (the trough of Eq. 7 plus the smallest
  shift), so the configuration is valid iff that is > 0. Call it before compiling anything.

  Raises:
    ValueError: naming alpha, sh_min and the minimum reached.
  """
  for name, v in (("alpha", alpha), ("sh_min", sh_min)) + (
    (("sh_max", sh_max),) if sh_max is not None else ()
  ):
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
      f"choose sh_min > alpha/2 = {alpha / 2:g}"
    )


def per_sample_values(
  base: jax.Array | float, shift_table: jax.Array, index: jax.Array
) -> jax.Array:
  """`tau_i = base + shift_table[index_i]` (Eq. 8), gathered on device inside a jitted step."""
  return base + jnp.take(shift_table, index, axis=0)


def level_match(
  shift_table: ArrayLike, target: float, *, alpha: float = 0.0, what: str = "temperature"
) -> np.ndarray:
  r"""Re-centres per-sample shifts so that their sample mean is `target`, keeping the shape.

  :math:`sh'_i = sh_i - \frac{1}{N}\sum_j sh_j + target`. Over whole periods Eq. 7's cosine
  averages to 0, so an ICS or MM-TS run with `sh'` trains at the sample-mean temperature (or
  margin) `target`, e.g. the fixed baseline's: a comparison of shapes, not of levels. The mean is
  taken over the table's entries, i.e. over samples (a per-sample table weighs each cluster by
  its size).

  Args:
    shift_table: `(N,)` per-sample shifts (numpy), e.g. `ClusterTable.shift_table(...)`.
    target: the sample-mean value wanted, > 0.
    alpha: MM-TS amplitude (0 for ICS); the lowest value reached, `min sh' - alpha/2`, must be > 0.
    what: "temperature" or "margin", for the error message.

  Returns:
    `(N,)` float64 re-centred shifts.

  Raises:
    ValueError: `target` not finite / <= 0, an empty or non-finite table, or a re-centred table
      whose lowest value `min sh' - alpha/2` is <= 0 (naming it and the largest target that fits).

  Example:
    >>> level_match(np.array([0.05, 0.05, 0.10, 0.10]), 0.07)
    array([0.045, 0.045, 0.095, 0.095])
  """
  table = np.asarray(shift_table, np.float64)
  target = float(target)
  if not math.isfinite(target) or target <= 0:
    raise ValueError(f"level_match: target {what} must be finite and > 0, got {target}")
  if table.ndim != 1 or table.size == 0 or not np.all(np.isfinite(table)):
    raise ValueError(
      f"level_match: shift_table must be a non-empty finite (N,) array, got shape {table.shape}"
    )
  if not math.isfinite(float(alpha)) or alpha < 0:
    raise ValueError(f"level_match: alpha must be finite and >= 0, got {alpha}")
  out = table - table.mean() + target
  lowest = float(out.min()) - alpha / 2
  if lowest <= 0:
    raise ValueError(
      f"level_match: re-centred at a mean {what} of {target:g}, the lowest {what} is "
      f"{lowest:g} <= 0 (min shift {out.min():g} - alpha/2 {alpha / 2:g}); the shift spread "
      f"allows a target > {table.mean() - table.min() + alpha / 2:g}"
    )
  return out
