"""nonlinear_mmcl: InfoNCE and linear special cases, a float64 numpy reference for another
(phi, psi), blockwise == dense, shard_map == global batch, stability, jit/vmap, bad input.

Tolerances: against `infonce_dense`, float32 rel 1e-5 (gradients relative to the largest entry)
and float64 rel 1e-10; against the numpy reference float32 rel 1e-5.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mmts_jax.losses import infonce_dense
from mmts_jax.losses.nonlinear import nonlinear_mmcl, nonlinear_mmcl_similarity

shard_map = getattr(jax, "shard_map", None)
if shard_map is None:  # jax < 0.6
  from jax.experimental.shard_map import shard_map


def ident(u):
  return u


def sqrt1p(u):
  return jnp.sqrt(1.0 + u)


CLIP = dict(phi=jnp.log1p, psi=jnp.exp)
OTHER = dict(phi=sqrt1p, psi=jax.nn.softplus)


def _vg(fn, **kw):
  """jit(value_and_grad) in both embeddings: one compile instead of many eager ones."""
  return jax.jit(jax.value_and_grad(functools.partial(fn, **kw), argnums=(0, 1)))


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300)


def _data(seed, b, d, dtype=jnp.float32, tau_lo=0.005):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(k1, (b, d), dtype)
  y = jax.random.normal(k2, (b, d), dtype)
  x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
  y = y / jnp.linalg.norm(y, axis=1, keepdims=True)
  tau = tau_lo + 0.1 * jax.random.uniform(k3, (b,), dtype)
  return x, y, tau


def _np_general(x, y, tau, phi, psi):
  """Loops over anchors, float64: the definition, term by term."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  b = x.shape[0]
  tau = np.broadcast_to(np.asarray(tau, np.float64), (b,))
  s = x @ y.T
  total = 0.0
  for i in range(b):
    u = sum(psi((s[i, j] - s[i, i]) / tau[i]) for j in range(b) if j != i)
    v = sum(psi((s[j, i] - s[i, i]) / tau[i]) for j in range(b) if j != i)
    total += phi(u) + phi(v)
  return total / (2 * b)


def _np_sqrt1p(u):
  return np.sqrt(1.0 + u)


def _np_softplus(a):
  return np.logaddexp(0.0, a)


@pytest.mark.parametrize("block_size", [None, 4])
def test_log1p_exp_equals_infonce_float32(block_size):
  x, y, tau = _data(0, 13, 8)
  value, grads = _vg(nonlinear_mmcl, block_size=block_size, **CLIP)(x, y, tau)
  ref_value, ref_grads = _vg(infonce_dense)(x, y, tau)
  assert _rel(value, ref_value) <= 1e-5
  for g, r in zip(grads, ref_grads, strict=True):
    assert _rel(g, r) <= 1e-5


@pytest.mark.parametrize("block_size,t", [(None, "per_anchor"), (5, "per_anchor"), (5, 0.005)])
def test_log1p_exp_equals_infonce_float64(block_size, t):
  with jax.enable_x64(True):
    x, y, tau = _data(1, 11, 6, jnp.float64)
    t = tau if t == "per_anchor" else t
    value, grads = _vg(nonlinear_mmcl, block_size=block_size, **CLIP)(x, y, t)
    ref_value, ref_grads = _vg(infonce_dense)(x, y, t)
    assert value.dtype == jnp.float64
    assert _rel(value, ref_value) <= 1e-10
    for g, r in zip(grads, ref_grads, strict=True):
      assert _rel(g, r) <= 1e-10


@pytest.mark.parametrize("block_size", [None, 3])
def test_general_pair_matches_float64_numpy(block_size):
  x, y, tau = _data(2, 9, 5, tau_lo=0.05)
  got = jax.jit(functools.partial(nonlinear_mmcl, block_size=block_size, **OTHER))(x, y, tau)
  want = _np_general(x, y, tau, _np_sqrt1p, _np_softplus)
  assert _rel(got, want) <= 1e-5


def test_general_pair_gradient_matches_finite_differences_float64():
  with jax.enable_x64(True):
    x, y, tau = _data(3, 6, 4, jnp.float64, tau_lo=0.1)
    for bs in (None, 4):
      # Independent of autodiff: central differences of the numpy value along random directions.
      _, g = _vg(nonlinear_mmcl, block_size=bs, **OTHER)(x, y, tau)
      rng = np.random.default_rng(0)
      for _ in range(3):
        dx, dy = rng.normal(size=x.shape), rng.normal(size=y.shape)
        h = 1e-5
        fd = (
          _np_general(x + h * dx, y + h * dy, tau, _np_sqrt1p, _np_softplus)
          - _np_general(x - h * dx, y - h * dy, tau, _np_sqrt1p, _np_softplus)
        ) / (2 * h)
        ad = float(jnp.sum(g[0] * dx) + jnp.sum(g[1] * dy))
        np.testing.assert_allclose(ad, fd, rtol=1e-7)


def test_identity_pair_is_the_linear_loss():
  with jax.enable_x64(True):
    x, y, tau = _data(4, 7, 5, jnp.float64)
    s = np.asarray(x @ y.T)
    b, t = 7, np.asarray(tau)
    # sum_{j != i} (s_ij - s_ii) = sum_j s_ij - b s_ii, both directions.
    want = np.sum((s.sum(1) - b * np.diag(s)) / t + (s.sum(0) - b * np.diag(s)) / t) / (2 * b)
    for bs in (None, 2):
      got = jax.jit(functools.partial(nonlinear_mmcl, phi=ident, psi=ident, block_size=bs))(
        x, y, tau
      )
      np.testing.assert_allclose(float(got), want, rtol=1e-12)


def test_similarity_form_equals_embedding_form():
  x, y, tau = _data(5, 6, 4)
  for kw in (CLIP, OTHER):
    chex.assert_trees_all_close(
      jax.jit(functools.partial(nonlinear_mmcl_similarity, **kw))(x @ y.T, tau),
      jax.jit(functools.partial(nonlinear_mmcl, **kw))(x, y, tau),
      rtol=1e-6,
    )


def test_stable_at_small_temperature():
  key = jax.random.PRNGKey(6)
  base = jax.random.normal(key, (1, 32))
  x = base + 1e-6 * jax.random.normal(key, (16, 32))
  x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
  e = jnp.eye(8, 32)
  for bs, (a, b) in ((None, (x, x)), (5, (e, e))):
    value, grads = _vg(nonlinear_mmcl, block_size=bs, **CLIP)(a, b, 0.005)
    ref = jax.jit(infonce_dense)(a, b, 0.005)
    assert np.isfinite(float(value))
    chex.assert_tree_all_finite(grads)
    np.testing.assert_allclose(float(value), float(ref), rtol=1e-5, atol=1e-6)
  # Anti-aligned pairs: logits of 200 above the positive; the loss is ~200, not inf.
  value = jax.jit(functools.partial(nonlinear_mmcl, block_size=5, **CLIP))(e, e[::-1], 0.005)
  assert 150.0 < float(value) < 250.0


def test_single_pair_has_no_negatives():
  x = jnp.ones((1, 4)) / 2.0
  assert float(nonlinear_mmcl(x, x, 0.1, **CLIP)) == 0.0
  np.testing.assert_allclose(float(nonlinear_mmcl(x, x, 0.1, **OTHER)), 1.0)


def test_bf16_inputs_accumulate_in_float32():
  x, y, tau = _data(7, 16, 32)
  xb, yb = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
  value, (gx, _) = _vg(nonlinear_mmcl, block_size=4, **CLIP)(xb, yb, tau)
  assert value.dtype == jnp.float32 and gx.dtype == jnp.bfloat16
  ref = jax.jit(infonce_dense)(xb.astype(jnp.float32), yb.astype(jnp.float32), tau)
  assert _rel(value, ref) <= 1e-5


def test_jit_and_vmap():
  keys = jax.random.split(jax.random.PRNGKey(8), 3)
  xs = jax.vmap(lambda k: jax.random.normal(k, (6, 4)))(keys)
  ys = xs[::-1] * 0.5
  taus = jnp.linspace(0.05, 0.2, 18).reshape(3, 6)
  fn = functools.partial(nonlinear_mmcl, block_size=4, **OTHER)
  batched = jax.jit(jax.vmap(fn))(xs, ys, taus)
  single = jax.jit(fn)
  looped = jnp.stack([single(xs[i], ys[i], taus[i]) for i in range(3)])
  chex.assert_trees_all_close(batched, looped, rtol=1e-5)


@pytest.mark.parametrize(
  "kw,block_size", [(CLIP, None), (OTHER, 3)], ids=["log1p_exp-dense", "sqrt_softplus-blocks"]
)
def test_shard_map_equals_global_batch(kw, block_size):
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  x, y, tau = _data(9, 16, 8, tau_lo=0.05)

  def sharded(a, b, t):
    f = shard_map(
      lambda a, b, t: nonlinear_mmcl(a, b, t, axis_name="data", block_size=block_size, **kw),
      mesh=mesh,
      in_specs=(P("data"), P("data"), P("data")),
      out_specs=P(),
    )
    return f(a, b, t)

  value, grads = _vg(sharded)(x, y, tau)
  ref_value, ref_grads = _vg(nonlinear_mmcl, **kw)(x, y, tau)
  assert _rel(value, ref_value) <= 1e-5
  for g, r in zip(grads, ref_grads, strict=True):
    assert _rel(g, r) <= 1e-5


def test_bad_input_is_rejected():
  x = jnp.ones((4, 8)) / jnp.sqrt(8.0)
  with pytest.raises(TypeError, match="phi"):
    nonlinear_mmcl(x, x, 0.1, phi="log1p", psi=jnp.exp)
  with pytest.raises(TypeError, match="psi"):
    nonlinear_mmcl(x, x, 0.1, phi=jnp.log1p, psi=None)
  with pytest.raises(ValueError, match="block_size"):
    nonlinear_mmcl(x, x, 0.1, block_size=0, **CLIP)
  with pytest.raises(TypeError, match="block_size"):
    nonlinear_mmcl(x, x, 0.1, block_size=2.0, **CLIP)
  with pytest.raises(ValueError, match="> 0"):
    nonlinear_mmcl(x, x, jnp.array([0.1, 0.1, 0.0, 0.1]), **CLIP)
  with pytest.raises(ValueError, match="same shape"):
    nonlinear_mmcl(x, jnp.ones((5, 8)), 0.1, **CLIP)
  with pytest.raises(ValueError, match="square"):
    nonlinear_mmcl_similarity(jnp.ones((3, 4)), 0.1, **CLIP)
