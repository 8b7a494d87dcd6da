r"""Paired differences between study rows: mean and 95% confidence interval over seeds.

For seeds :math:`s = 1..S` and per-seed scores :math:`a_s` (a row) and :math:`b_s` (the
baseline, same seed: same data, initialisation and batch order), the paired differences
:math:`d_s = a_s - b_s` give

.. math::
  \bar d \pm t_{0.975,\,S-1}\, \frac{\mathrm{sd}(d)}{\sqrt{S}}

(Student's t, `sd` with `S - 1` degrees of freedom). An interval that covers 0 is reported as
"no measurable difference".

Example:
  >>> r = paired_interval([0.52, 0.55, 0.51, 0.56], [0.50, 0.52, 0.50, 0.53])
  >>> round(r["mean"], 4), r["verdict"]
  (0.0225, 'higher')
"""

from __future__ import annotations

import functools
import math

import numpy as np
from jax.scipy.special import betainc

__all__ = ["paired_interval", "t_quantile", "verdict"]


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
  """Student's t quantile for `p` in (0.5, 1), by bisection of the CDF.

  For `t > 0`, :math:`F(t) = 1 - \\tfrac12 I_{df/(df + t^2)}(df/2, 1/2)` (regularised incomplete
  beta, `jax.scipy.special.betainc`); no SciPy needed.

  Example:
    >>> round(t_quantile(0.975, 9), 3), round(t_quantile(0.975, 1000), 2)
    (2.262, 1.96)
  """
  if not 0.5 < p < 1 or df < 1:
    raise ValueError(f"t_quantile: need p in (0.5, 1) and df >= 1, got p={p}, df={df}")
  cdf = lambda t: 1.0 - 0.5 * float(betainc(df / 2, 0.5, df / (df + t * t)))
  lo, hi = 0.0, 1.0
  while cdf(hi) < p:
    hi *= 2
  for _ in range(60):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
  return (lo + hi) / 2


def verdict(lo: float, hi: float) -> str:
  """ "higher" / "lower" when the interval excludes 0, else "no measurable difference"."""
  if lo > 0:
    return "higher"
  if hi < 0:
    return "lower"
  return "no measurable difference"


def paired_interval(scores, baseline, confidence: float = 0.95) -> dict:
  """`{"mean", "lo", "hi", "sd", "n", "verdict"}` of `scores - baseline`, paired by position."""
  a, b = np.asarray(scores, np.float64), np.asarray(baseline, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(
      f"paired_interval: scores and baseline must be equal 1-D shapes (one per "
      f"seed), got {a.shape} and {b.shape}"
    )
  if len(a) < 2:
    raise ValueError(f"paired_interval: needs >= 2 seeds, got {len(a)}")
  if not 0 < confidence < 1:
    raise ValueError(f"paired_interval: confidence must be in (0, 1), got {confidence}")
  d = a - b
  n = len(d)
  sd = float(np.std(d, ddof=1))
  half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
  mean = float(d.mean())
  return {
    "mean": mean,
    "lo": mean - half,
    "hi": mean + half,
    "sd": sd,
    "n": n,
    "verdict": verdict(mean - half, mean + half),
  }
