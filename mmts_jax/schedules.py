"""Temperature schedules as optax schedules (`step -> value`), safe to evaluate on a traced step.

MM-TS (Sheludzko et al., WACV 2026, Eq. 7) oscillates a *base* temperature around zero and adds a
per-sample shift (see `mmts_jax.shifts`). The uni-modal temperature schedule (TS, Kukleva et al.,
ICLR 2023) oscillates a single temperature between two bounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

__all__ = ["cosine_oscillation", "temperature_schedule", "period_from_total_steps"]


def _check_finite(name: str, value) -> float:
  try:
    value = float(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be a real number, got {value!r}") from e
  if not math.isfinite(value):
    raise ValueError(f"{name} must be finite, got {value}")
  return value


def _check_period(period) -> float:
  period = _check_finite("period", period)
  if period <= 0:
    raise ValueError(f"period must be > 0 steps, got {period}")
  return period


def period_from_total_steps(total_steps: int, num_oscillations: float = 5) -> float:
  """The oscillation period `T = total_steps / num_oscillations` (the official default is 5).

  Example:
    >>> period_from_total_steps(10_000)
    2000.0
  """
  steps = _check_finite("total_steps", total_steps)
  num_oscillations = _check_finite("num_oscillations", num_oscillations)
  if steps <= 0:
    raise ValueError(f"total_steps must be > 0, got {steps}")
  if num_oscillations <= 0:
    raise ValueError(f"num_oscillations must be > 0, got {num_oscillations}")
  return steps / num_oscillations


def cosine_oscillation(alpha: float, period: float) -> Callable[[chex.Numeric], jax.Array]:
  r"""MM-TS base schedule (Eq. 7): :math:`\tau_{base}(t) = \frac{\alpha}{2}\cos(2\pi t / T)`.

  It oscillates in `[-alpha/2, alpha/2]`; the per-sample temperature (or margin) is
  `cosine_oscillation(alpha, T)(t) + shift_i`.

  Args:
    alpha: peak-to-peak amplitude, `>= 0`.
    period: `T` in steps, `> 0` (see `period_from_total_steps`).

  Returns:
    An optax schedule `count -> value` (float32, float64 under x64), jit-safe.

  Example:
    >>> sched = cosine_oscillation(alpha=0.04, period=1000)
    >>> round(float(sched(0)), 6), round(float(sched(500)), 6)
    (0.02, -0.02)
  """
  alpha = _check_finite("alpha", alpha)
  if alpha < 0:
    raise ValueError(f"alpha must be >= 0, got {alpha}")
  period = _check_period(period)

  def schedule(count: chex.Numeric) -> jax.Array:
    # The default float dtype: float32, or float64 under jax_enable_x64.
    t = jnp.asarray(count, jnp.result_type(float))
    return (alpha / 2) * jnp.cos((2 * math.pi / period) * t)

  return schedule


def temperature_schedule(
  tau_min: float, tau_max: float, period: float
) -> Callable[[chex.Numeric], jax.Array]:
  r"""Uni-modal temperature schedule (TS):
  :math:`\tau(t) = \tau_{min} + (\tau_{max} - \tau_{min})\,(1 + \cos(2\pi t/T))/2`.

  Starts at `tau_max`, reaches `tau_min` at `T/2`.

  Example:
    >>> sched = temperature_schedule(0.1, 1.0, period=200)
    >>> float(sched(0)), round(float(sched(100)), 6)
    (1.0, 0.1)
  """
  tau_min = _check_finite("tau_min", tau_min)
  tau_max = _check_finite("tau_max", tau_max)
  if tau_min <= 0:
    raise ValueError(f"tau_min must be > 0, got {tau_min}")
  if tau_max < tau_min:
    raise ValueError(f"tau_max must be >= tau_min, got tau_min={tau_min}, tau_max={tau_max}")
  period = _check_period(period)

  def schedule(count: chex.Numeric) -> jax.Array:
    t = jnp.asarray(count, jnp.result_type(float))
    wave = (1 + jnp.cos((2 * math.pi / period) * t)) / 2
    return tau_min + (tau_max - tau_min) * wave

  return schedule
