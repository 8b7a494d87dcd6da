"""Out-of-range temperatures / margins reached under `jit` give NaN, in every form; `checked`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.sharding import Mesh
from test_losses_blockwise import _inputs, compiled

from mmts_jax import losses
from mmts_jax.losses import _checks

BAD = {"negative": -1.0, "zero": 0.0, "inf": np.inf, "nan": np.nan}


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()), ("batch",))


def _loss(name, impl, mesh):
  if impl in ("ring", "gather"):
    fn = losses.get(name, impl=impl, mesh=mesh, block_size=3)
  else:
    fn = losses.get(name, impl=impl, block_size=3 if impl == "blockwise" else None)
  return (lambda x, y, t: fn(x, y, t, bias=-1.0)) if name == "sigmoid" else fn


@pytest.mark.parametrize("name", ["infonce", "max_margin", "sigmoid"])
@pytest.mark.parametrize("impl", ["dense", "blockwise", "ring", "gather"])
def test_a_bad_traced_value_makes_loss_and_gradient_nan(mesh, name, impl):
  x, y, t = _inputs(16, 8, seed=11)
  f = compiled(jax.value_and_grad(_loss(name, impl, mesh), argnums=(0, 1)))
  v, (gx, gy) = f(x, y, t)
  assert np.isfinite(float(v)) and np.all(np.isfinite(gx)) and np.all(np.isfinite(gy))
  for kind, bad in BAD.items():
    # One anchor out of 16 (on the last device of the mesh for the sharded forms).
    v, (gx, gy) = f(x, y, t.at[13].set(bad))
    assert np.isnan(float(v)), (kind, float(v))
    assert np.all(np.isnan(gx)) and np.all(np.isnan(gy)), kind


def test_a_valid_value_keeps_value_and_gradient_bit_exact():
  x, _, t = _inputs(6, 4, seed=12)
  f = lambda x: jnp.sum(jnp.sin(x) / t[:, None])
  g = lambda x: _checks.nan_unless_valid(f(x), positive=(t,), finite=(-t,))
  v0, g0 = jax.value_and_grad(f)(x)
  v, g = jax.value_and_grad(g)(x)
  assert float(v) == float(v0) and np.array_equal(np.asarray(g), np.asarray(g0))
  # A non-finite `finite` entry (a bias) poisons too; a negative one does not.
  assert np.isnan(float(_checks.nan_unless_valid(f(x), finite=(t.at[0].set(np.nan),))))
  assert float(_checks.nan_unless_valid(f(x), finite=(-t,))) == float(v0)


@pytest.mark.parametrize("name,what", [("infonce", "temperature"), ("max_margin", "margin")])
def test_checked_raises_with_the_bad_value_under_jit(name, what):
  x, y, t = _inputs(8, 4, seed=13)
  f = jax.jit(losses.checked(getattr(losses, name), what))
  err, v = f(x, y, t)
  assert err.get() is None and np.isfinite(float(v))
  err, v = f(x, y, t.at[2].set(-0.25))
  with pytest.raises(
    checkify.JaxRuntimeError,
    match=rf"{what} must be finite and > 0, got min "
    r"-0\.25 and 0 non-finite",
  ):
    err.throw()
  err, _ = f(x, y, t.at[5].set(np.inf))
  with pytest.raises(checkify.JaxRuntimeError, match=r"and 1 non-finite value"):
    err.throw()


def test_checked_sharded_loss(mesh):
  x, y, t = _inputs(16, 4, seed=14)
  f = jax.jit(losses.checked(losses.make_sharded_loss(mesh, "infonce", sharded="ring")))
  err, v = f(x, y, t)
  assert err.get() is None
  err, v = f(x, y, t.at[9].set(0.0))
  assert np.isnan(float(v))
  with pytest.raises(checkify.JaxRuntimeError, match="temperature must be finite and > 0"):
    err.throw()


def test_checked_sigmoid_checks_the_bias():
  x, y, t = _inputs(8, 4, seed=15)
  f = jax.jit(losses.checked(losses.sigmoid))
  err, v = f(x, y, t, bias=jnp.float32(-10.0))
  assert err.get() is None and np.isfinite(float(v))
  err, v = f(x, y, t, bias=jnp.float32(np.nan))
  assert np.isnan(float(v))
  with pytest.raises(checkify.JaxRuntimeError, match="bias must be finite, got 1 non-finite"):
    err.throw()
