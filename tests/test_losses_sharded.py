"""Ring and all-gather sharded losses on the 8-device simulated CPU mesh (tests/conftest.py).

Each must reproduce the dense single-device loss of the global batch and its gradients
(image, text and temperature), float32 relative 1e-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from test_losses_blockwise import HIGHEST, _inputs, _rel, compiled

from mmts_jax import losses
from mmts_jax.losses import dense, sharding

DENSE = {"infonce": dense.infonce_dense, "max_margin": dense.max_margin_dense}


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) == 8, "tests/conftest.py forces 8 CPU devices"
  return Mesh(np.array(jax.devices()), ("batch",))


def _global_reference(loss, x, y, t):
  return jax.value_and_grad(DENSE[loss], argnums=(0, 1, 2))(x, y, t, precision=HIGHEST)


@pytest.mark.parametrize("loss", ["infonce", "max_margin"])
@pytest.mark.parametrize("variant", ["ring", "gather"])
def test_mesh_helper_reproduces_the_global_batch(mesh, loss, variant):
  # 40 = 8 devices x 5 rows; tiles of (2, 3) leave a ragged tile on every device.
  x, y, t = _inputs(40, 8, seed=1)
  fn = losses.make_sharded_loss(mesh, loss, sharded=variant, block_size=(2, 3), precision=HIGHEST)
  v, g = compiled(jax.value_and_grad(fn, argnums=(0, 1, 2)))(x, 1.5 * y, t)
  v0, g0 = _global_reference(loss, x, 1.5 * y, t)
  assert _rel(v, v0) <= 1e-5, (float(v), float(v0))
  for got, want in zip(g, g0, strict=True):
    assert _rel(got, want) <= 1e-4


def test_grad_inside_shard_map_is_the_local_slice_of_the_global_gradient(mesh):
  x, y, t = _inputs(32, 8, seed=2)

  def local(x, y, t):
    f = lambda x, y: losses.infonce(
      x, y, t, axis_name="batch", sharded="ring", block_size=3, precision=HIGHEST
    )
    v, g = jax.value_and_grad(f, argnums=(0, 1))(x, y)
    return v, g

  fn = sharding.shard_map(
    local, mesh=mesh, in_specs=(P("batch"),) * 3, out_specs=(P(), (P("batch"), P("batch")))
  )
  v, g = compiled(fn)(x, y, t)
  v0, g0 = _global_reference("infonce", x, y, t)
  assert _rel(v, v0) <= 1e-5
  assert _rel(g[0], g0[0]) <= 1e-4 and _rel(g[1], g0[1]) <= 1e-4


def test_ring_over_two_mesh_axes(mesh):
  mesh2 = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
  x, y, t = _inputs(16, 8, seed=3)
  fn = losses.make_sharded_loss(mesh2, "infonce", sharded="ring", precision=HIGHEST)
  v, g = compiled(jax.value_and_grad(fn, argnums=(0, 1)))(x, y, 0.07)
  v0, g0 = _global_reference("infonce", x, y, jnp.full((16,), 0.07))
  assert _rel(v, v0) <= 1e-5
  assert _rel(g[0], g0[0]) <= 1e-4 and _rel(g[1], g0[1]) <= 1e-4


def test_pmap_gives_the_global_value():
  # Under pmap the same axis_name contract gives the global loss on every device. As for any
  # psum-ed loss under pmap, jax.grad there sums the cotangents over the axis: n x the global
  # gradient (shard_map gives it exactly, see the test above).
  x, y, t = _inputs(16, 8, seed=4)
  f = jax.pmap(
    lambda x, y, t: jax.value_and_grad(
      lambda x: losses.infonce(
        x, y, t, axis_name="i", sharded="ring", block_size=2, precision=HIGHEST
      )
    )(x),
    axis_name="i",
  )
  v, g = f(x.reshape(8, 2, 8), y.reshape(8, 2, 8), t.reshape(8, 2))
  v0, g0 = _global_reference("infonce", x, y, t)
  assert _rel(v, jnp.full((8,), v0)) <= 1e-5
  assert _rel(g.reshape(16, 8) / 8, g0[0]) <= 1e-4


def test_mesh_helper_rejects_bad_arguments(mesh):
  with pytest.raises(TypeError, match="must be a jax.sharding.Mesh, got list"):
    losses.make_sharded_loss(list(jax.devices()), "infonce")
  with pytest.raises(ValueError, match="loss must be one of .* got 'clip'"):
    losses.make_sharded_loss(mesh, "clip")
  with pytest.raises(ValueError, match="axis 'model' is not in the mesh axes"):
    losses.make_sharded_loss(mesh, "infonce", axis_name="model")
  fn = losses.make_sharded_loss(mesh, "infonce")
  x, y, t = _inputs(12, 4)
  with pytest.raises(ValueError, match="global batch 12 is not divisible by the 8 devices"):
    fn(x, y, t)
  x, y, t = _inputs(16, 4)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    fn(x, y, -t)
