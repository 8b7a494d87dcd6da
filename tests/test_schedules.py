"""Schedules: Eq. 7 and uni-modal TS against float64 numpy, traced steps, bad arguments."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmts_jax import schedules


@pytest.mark.parametrize("alpha,period", [(0.04, 1000), (0.2, 500.0), (0.0, 3)])
def test_cosine_oscillation_matches_eq7(alpha, period):
  steps = np.arange(0, 2 * int(period) + 7, 7)
  expected = alpha * np.cos(2 * np.pi * steps / period) / 2
  got = jax.vmap(schedules.cosine_oscillation(alpha, period))(jnp.asarray(steps))
  chex.assert_trees_all_close(np.asarray(got, np.float64), expected, atol=1e-7)


def test_cosine_oscillation_on_traced_step_under_jit():
  sched = schedules.cosine_oscillation(0.2, 100)
  got = jax.jit(sched)(jnp.int32(25))
  assert abs(float(got)) < 1e-7  # cos(pi/2) = 0
  assert float(jax.jit(sched)(jnp.int32(50))) == pytest.approx(-0.1, abs=1e-7)


def test_temperature_schedule_matches_formula():
  tau_min, tau_max, period = 0.1, 1.0, 400
  steps = np.arange(0, 900, 13)
  expected = tau_min + (tau_max - tau_min) * (1 + np.cos(2 * np.pi * steps / period)) / 2
  got = jax.vmap(schedules.temperature_schedule(tau_min, tau_max, period))(jnp.asarray(steps))
  chex.assert_trees_all_close(np.asarray(got, np.float64), expected, atol=1e-6)


def test_schedule_is_float64_under_x64():
  with jax.enable_x64(True):
    v = schedules.cosine_oscillation(0.2, 500)(333)
    assert v.dtype == jnp.float64
    assert float(v) == pytest.approx(0.1 * math.cos(2 * math.pi * 333 / 500), rel=1e-14)


def test_period_from_total_steps():
  assert schedules.period_from_total_steps(10_000) == 2000.0
  assert schedules.period_from_total_steps(900, 3) == 300.0


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(alpha=-0.1, period=10), "alpha"),
    (dict(alpha=0.1, period=0), "period"),
    (dict(alpha=float("nan"), period=10), "alpha"),
    (dict(alpha=0.1, period=float("inf")), "period"),
  ],
)
def test_cosine_oscillation_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    schedules.cosine_oscillation(**kwargs)


@pytest.mark.parametrize(
  "args,match",
  [((0.0, 1.0, 10), "tau_min"), ((0.5, 0.1, 10), "tau_max"), ((0.1, 1.0, -5), "period")],
)
def test_temperature_schedule_rejects_bad_arguments(args, match):
  with pytest.raises(ValueError, match=match):
    schedules.temperature_schedule(*args)
