"""Sharded losses on the 8-device simulated CPU mesh: ring and all-gather, shard_map and pmap.

Every variant must reproduce the single-device loss of the global batch and its gradients
(relative 1e-4 in f32 against a float64 dense evaluation), and the ring must never gather.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmts_jax import losses
from mmts_jax.losses import dense

TOL = 1e-4
N_DEV = 8
LOCAL = 5  # rows per device; tiles of 3 leave a partly padded last tile on every device


def _rel(got, want):
  """max |got - want| / max |want|, in float64; non-finite output fails."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.all(np.isfinite(got)), "non-finite output"
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _inputs(key, b, d):
  """Unit-norm, correlated pairs (some hinges active) and per-anchor values in [0.03, 0.13]."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(key), 3)
  x = jax.random.normal(k1, (b, d))
  y = x[::-1] * 0.5 + jax.random.normal(k2, (b, d))
  unit = lambda a: a / jnp.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
  return unit(x), unit(y), 0.03 + 0.1 * jax.random.uniform(k3, (b,))


def _f64_dense(fn, x, y, v):
  """Value and gradients w.r.t. (x, y, v) of a dense loss of the global batch, in float64."""
  with jax.enable_x64(True):
    args = [jnp.asarray(np.asarray(a, np.float64)) for a in (x, y, v)]
    val, grads = jax.value_and_grad(fn, argnums=(0, 1, 2))(*args)
    return np.asarray(val), [np.asarray(g) for g in grads]


def _assert_close(got, want, tol, what):
  (v, g), (v0, g0) = got, want
  assert _rel(v, v0) <= tol, (what, float(v), float(v0))
  for name, a, b in zip(("image", "text", "value"), g, g0):
    assert _rel(a, b) <= tol, (what, name, _rel(a, b))


def _mesh(shape=(N_DEV,), names=("batch",)):
  assert len(jax.devices()) >= N_DEV, "conftest forces 8 CPU devices"
  return Mesh(np.array(jax.devices()[:N_DEV]).reshape(shape), names)


def _global_step(mesh, sharded, axis_name=None):
  """jit of value_and_grad (w.r.t. both embeddings and the per-anchor values) of both losses."""
  nce = losses.make_sharded_loss(mesh, "infonce", sharded=sharded, block_size=3,
                                 axis_name=axis_name)
  mm = losses.make_sharded_loss(mesh, "max_margin", sharded=sharded, block_size=3,
                                axis_name=axis_name)

  def step(x, y, tau, m):
    return (jax.value_and_grad(nce, argnums=(0, 1, 2))(x, y, tau),
            jax.value_and_grad(mm, argnums=(0, 1, 2))(x, y, m))
  return jax.jit(step)


@pytest.mark.parametrize("sharded", ["ring", "gather"])
def test_global_batch_loss_and_gradients(sharded):
  mesh = _mesh()
  b = N_DEV * LOCAL
  x, y, tau = _inputs(0, b, 12)
  m = 0.1 + 2 * tau
  # Inputs laid out as a data-parallel step would have them: sharded over the batch.
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("batch")))  # noqa: E731
  lowered = _global_step(mesh, sharded).lower(put(x), put(y), put(tau), put(m))
  hlo = lowered.as_text()
  if sharded == "ring":
    # The ring passes blocks with collective permutes and never gathers the batch.
    assert "collective_permute" in hlo and "all_gather" not in hlo
  else:
    assert "all_gather" in hlo
  nce, mm = lowered.compile()(put(x), put(y), put(tau), put(m))
  _assert_close(nce, _f64_dense(dense.infonce_dense, x, y, tau), TOL, ("infonce", sharded))
  want = _f64_dense(dense.max_margin_dense, x, y, m)
  assert float(want[0]) > 0
  _assert_close(mm, want, TOL, ("max_margin", sharded))
  # The gradient comes back sharded like the inputs.
  assert nce[1][0].sharding.is_equivalent_to(NamedSharding(mesh, P("batch")), 2)


def test_ring_over_two_mesh_axes():
  # A (4, 2) mesh with the batch split over both axes: the ring runs over their product.
  mesh = _mesh((4, 2), ("data", "model"))
  b = N_DEV * LOCAL
  x, y, tau = _inputs(1, b, 12)
  nce = losses.make_sharded_loss(mesh, "infonce", block_size=(2, 3), sharded="ring")
  got = jax.jit(jax.value_and_grad(nce, argnums=(0, 1, 2)))(x, y, tau)
  _assert_close(got, _f64_dense(dense.infonce_dense, x, y, tau), TOL, "infonce (data, model)")


def test_axis_name_contract_under_pmap():
  b = N_DEV * LOCAL
  x, y, tau = _inputs(2, b, 12)
  split = lambda a: a.reshape((N_DEV, LOCAL) + a.shape[1:])  # noqa: E731

  def per_device(x, y, t):
    return (losses.infonce(x, y, t, axis_name="i", sharded="ring", block_size=3),
            losses.max_margin(x, y, t + 0.1, axis_name="i", sharded="gather"))

  nce, mm = jax.pmap(per_device, axis_name="i")(split(x), split(y), split(tau))
  # Every device holds the global-batch value.
  want_nce = _f64_dense(dense.infonce_dense, x, y, tau)[0]
  want_mm = _f64_dense(dense.max_margin_dense, x, y, tau + 0.1)[0]
  assert max(_rel(v, want_nce) for v in nce) <= TOL
  assert max(_rel(v, want_mm) for v in mm) <= TOL


def test_auto_gathers_small_batches_and_rings_large_ones():
  mesh = _mesh()

  def jaxpr(b):
    x = jnp.ones((b, 4)) / 2
    fn = losses.make_sharded_loss(mesh, "infonce", sharded="auto")
    return str(jax.make_jaxpr(fn)(x, x, 0.1))

  small, large = jaxpr(N_DEV * 2), jaxpr(losses.AUTO_GATHER_MAX + N_DEV)
  assert "all_gather" in small and "ppermute" not in small
  assert "ppermute" in large and "all_gather" not in large


def test_bad_arguments_name_the_value():
  mesh = _mesh()
  x, y, tau = _inputs(3, 12, 12)
  with pytest.raises(ValueError, match="12"):  # not divisible by the 8 devices
    losses.make_sharded_loss(mesh, "infonce")(x, y, tau)
  with pytest.raises(TypeError, match="list"):
    losses.make_sharded_loss(list(jax.devices()), "infonce")
  with pytest.raises(ValueError, match="'hinge'"):
    losses.make_sharded_loss(mesh, "hinge")
  with pytest.raises(ValueError, match="'model'"):
    losses.make_sharded_loss(mesh, "infonce", axis_name="model")
  x, y, tau = _inputs(3, 16, 12)
  with pytest.raises(ValueError, match="-0.5"):
    losses.make_sharded_loss(mesh, "max_margin")(x, y, -0.5)


@pytest.mark.parametrize("sharded", ["ring", "gather"])
def test_large_global_batches_trace_without_overflow(sharded):
  # The global normaliser 2B(B-1) passes int32 at B = 32,769 (see the blockwise test).
  mesh = _mesh()
  b = 131072
  x = jax.ShapeDtypeStruct((b, 8), jnp.float32)
  t = jax.ShapeDtypeStruct((b,), jnp.float32)
  for loss in ("infonce", "max_margin"):
    fn = losses.make_sharded_loss(mesh, loss, sharded=sharded)
    out = jax.eval_shape(jax.value_and_grad(fn, argnums=(0, 1)), x, x, t)
    assert out[0].shape == () and out[1][0].shape == (b, 8)
