"""`shifts.level_match`: the sample-mean value equals the target, the shape is kept."""

import numpy as np
import pytest

from mmts_jax import shifts


def test_mean_is_target_and_differences_kept():
  rng = np.random.default_rng(0)
  sizes = rng.integers(1, 200, 500)
  table = shifts.cluster_shift(sizes, 0.05, 0.10)
  out = shifts.level_match(table, 0.07, alpha=0.04)
  np.testing.assert_allclose(out.mean(), 0.07, rtol=0, atol=1e-15)
  np.testing.assert_allclose(np.diff(out), np.diff(table), rtol=0, atol=1e-15)
  # The whole MM-TS schedule then averages to the target over full periods (Eq. 8).
  t = np.arange(1000)
  tau = 0.02 * np.cos(2 * np.pi * t / 200)[:, None] + out[None]
  np.testing.assert_allclose(tau.mean(), 0.07, atol=1e-12)
  assert tau.min() > 0


def test_non_positive_value_names_it():
  table = np.array([0.05, 0.10, 0.30])  # mean 0.15: shifted down by 0.13 the minimum is -0.08
  with pytest.raises(ValueError, match=r"lowest temperature is -0\.08 <= 0.*target > 0\.1"):
    shifts.level_match(table, 0.02)
  with pytest.raises(ValueError, match="lowest margin is"):
    shifts.level_match(table, 0.12, alpha=0.1, what="margin")
  with pytest.raises(ValueError, match="target temperature must be finite and > 0, got -1"):
    shifts.level_match(table, -1)
  with pytest.raises(ValueError, match="non-empty finite"):
    shifts.level_match(np.array([0.1, np.nan]), 0.07)
