"""The sigmoid (SigLIP) loss with per-anchor temperature and bias, every form, against an
independent float64 numpy reference (values and gradients wrt image, text, bias, temperature).

Tolerances: float32 with HIGHEST matmuls, relative 1e-5 for values and 1e-4 for gradients
(relative to the largest entry); float64 1e-10.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from test_losses_blockwise import HIGHEST, _inputs, _rel, compiled

from mmts_jax import losses


def _softplus(x):
  return np.logaddexp(0.0, x)


def _sigmoid(x):
  return 0.5 * (1.0 + np.tanh(0.5 * x))


def reference(x, y, tau, bias):
  """float64 value and gradients `(L, dL/dx, dL/dy, dL/dbias, dL/dtau)`, written out by hand.

  `bias` is a scalar (its gradient a scalar) or a `(B,)` per-anchor bias (a `(B,)` gradient);
  the derivative formulas are those of the docstring of `losses.sigmoid`.
  """
  x, y, tau = (np.asarray(v, np.float64) for v in (x, y, tau))
  b = x.shape[0]
  tau = np.broadcast_to(tau, (b,))
  c = np.broadcast_to(np.asarray(bias, np.float64), (b,))
  s = x @ y.T
  z = 2.0 * np.eye(b) - 1.0
  ur = z * (s / tau[:, None] + c[:, None])  # image anchor i, pair (i, j)
  uc = z * (s / tau[None, :] + c[None, :])  # text anchor j, pair (i, j)
  loss = (_softplus(-ur).sum() + _softplus(-uc).sum()) / (2 * b)
  pr = -z * _sigmoid(-ur) / (2 * b)  # dL / d(s_ij / tau_i + b_i)
  pc = -z * _sigmoid(-uc) / (2 * b)
  ds = pr / tau[:, None] + pc / tau[None, :]
  dtau = -((pr * s).sum(1) + (pc * s).sum(0)) / tau**2
  dc = pr.sum(1) + pc.sum(0)
  return loss, ds @ y, ds.T @ x, dc.sum() if np.ndim(bias) == 0 else dc, dtau


def _check(got, want, tol_v, tol_g):
  v, grads = got
  assert _rel(v, want[0]) <= tol_v, (float(v), want[0])
  for g, w, name in zip(grads, want[1:], ("image", "text", "bias", "temperature"), strict=True):
    err = np.max(np.abs(np.asarray(g, np.float64) - w))
    assert err <= tol_g * np.max(np.abs(w)) + 1e-7, name


def _vg(loss_fn):
  return compiled(
    jax.value_and_grad(lambda x, y, t, c: loss_fn(x, y, t, bias=c), argnums=(0, 1, 3, 2))
  )


def test_scalar_temperature_is_siglip():
  # SigLIP: -1/B sum_ij log sigmoid(z_ij (t s_ij + b)), t = exp(t'), one direction.
  x, y, _ = _inputs(7, 8, seed=1)
  t_prime, b = np.log(10.0), -10.0
  s = np.asarray(x, np.float64) @ np.asarray(y, np.float64).T
  z = 2 * np.eye(7) - 1
  want = -np.sum(np.log(_sigmoid(z * (np.exp(t_prime) * s + b)))) / 7
  got = compiled(
    lambda x, y: losses.sigmoid(
      x, y, 1.0 / np.exp(t_prime), bias=b, impl="dense", precision=HIGHEST
    )
  )(x, y)
  assert _rel(got, want) <= 1e-5


@pytest.mark.parametrize("impl,block", [("dense", None), ("blockwise", (5, 3)), ("blockwise", 4)])
@pytest.mark.parametrize("b", [1, 2, 13])
def test_matches_the_float64_reference(impl, block, b):
  x, y, t = _inputs(b, 12, seed=b)
  y = 1.5 * y  # used as given, not normalised
  fn = losses.get("sigmoid", impl=impl, block_size=block, precision=HIGHEST)
  got = _vg(fn)(x, y, t, jnp.float32(-2.0))
  _check(got, reference(x, y, t, -2.0), 1e-5, 1e-4)


def test_float64():
  with jax.enable_x64(True):
    x, y, t = (jnp.asarray(v, jnp.float64) for v in _inputs(9, 6, seed=3))
    want = reference(x, y, t, 0.5)
    for impl, block in (("dense", None), ("blockwise", (4, 2))):
      fn = losses.get("sigmoid", impl=impl, block_size=block)
      got = _vg(fn)(x, y, t, jnp.float64(0.5))
      assert got[0].dtype == jnp.float64
      _check(got, want, 1e-10, 1e-10)


@pytest.mark.parametrize("impl", ["ring", "gather"])
def test_sharded_over_the_8_device_mesh(impl):
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  assert mesh.size == 8, "tests/conftest.py forces 8 CPU devices"
  # 40 = 8 x 5 rows; tiles of (2, 3) leave a ragged tile on every device.
  x, y, t = _inputs(40, 8, seed=4)
  fn = losses.get("sigmoid", impl=impl, mesh=mesh, block_size=(2, 3), precision=HIGHEST)
  got = _vg(fn)(x, y, t, jnp.float32(-3.0))
  _check(got, reference(x, y, t, -3.0), 1e-5, 1e-4)


def test_inside_shard_map_with_the_public_function():
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  x, y, t = _inputs(16, 8, seed=5)
  from jax.sharding import PartitionSpec as P

  from mmts_jax.losses import sharding

  f = sharding.shard_map(
    lambda x, y, t: losses.sigmoid(
      x, y, t, bias=-1.0, axis_name="batch", sharded="ring", block_size=1, precision=HIGHEST
    ),
    mesh=mesh,
    in_specs=(P("batch"),) * 3,
    out_specs=P(),
  )
  assert _rel(compiled(f)(x, y, t), reference(x, y, t, -1.0)[0]) <= 1e-5


def test_a_per_anchor_bias_is_accepted_and_used():
  x, y, t = _inputs(6, 4, seed=6)
  c = jnp.linspace(-2.0, 1.0, 6)
  dense = compiled(lambda c: losses.sigmoid(x, y, t, bias=c, impl="dense", precision=HIGHEST))
  tiled = compiled(
    lambda c: losses.sigmoid(x, y, t, bias=c, impl="blockwise", block_size=4, precision=HIGHEST)
  )
  assert _rel(tiled(c), dense(c)) <= 1e-5
  assert abs(float(dense(c)) - float(dense(jnp.full((6,), -2.0)))) > 1e-3


def test_bad_arguments():
  x, y, t = _inputs(4, 4)
  fn = losses.get("sigmoid")
  with pytest.raises(TypeError, match=r"sigmoid: takes the keyword argument\(s\) \['bias'\]"):
    fn(x, y, t)
  with pytest.raises(TypeError, match="keyword"):
    losses.get("infonce")(x, y, t, bias=1.0)
  with pytest.raises(ValueError, match="bias must be finite"):
    losses.sigmoid(x, y, t, bias=np.nan)
  with pytest.raises(ValueError, match=r"bias must be a scalar or have shape \(4,\)"):
    losses.sigmoid(x, y, t, bias=np.zeros(3))
  with pytest.raises(ValueError, match="temperature must be > 0"):
    losses.sigmoid(x, y, -t, bias=0.0)
  # Under jit a bad temperature or bias makes the loss NaN (tests/test_losses_checks.py).
  f = jax.jit(lambda t, c: losses.sigmoid(x, y, t, bias=c, impl="blockwise", block_size=3))
  assert np.isfinite(float(f(t, 0.0)))
  assert np.isnan(float(f(t.at[0].set(0.0), 0.0))) and np.isnan(float(f(t, np.inf)))
