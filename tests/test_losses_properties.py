"""Losses: an independent float64 numpy reference, stability, bf16, jit/grad/vmap, bad input."""

import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmts_jax import losses


def _np_infonce(x, y, tau):
  """Loop-free but independent float64 formulation (log-softmax via max subtraction)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  tau = np.broadcast_to(np.asarray(tau, np.float64), (x.shape[0],))
  s = x @ y.T

  def ce(logits):
    m = logits.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    return np.mean(lse - np.diag(logits))

  return 0.5 * (ce(s / tau[:, None]) + ce(s.T / tau[:, None]))


def _np_max_margin(x, y, m):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  b = x.shape[0]
  m = np.broadcast_to(np.asarray(m, np.float64), (b,))
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
  y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-8)
  s = x @ y.T
  total = 0.0
  for i in range(b):
    for j in range(b):
      if i != j:
        total += max(0.0, m[i] - s[i, i] + s[i, j]) + max(0.0, m[i] - s[i, i] + s[j, i])
  return total / (2 * b * (b - 1))


def _unit(key, shape):
  x = jax.random.normal(key, shape)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("b,d", [(1, 4), (3, 5), (17, 8)])
def test_infonce_matches_float64_numpy(b, d):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(b), 3)
  x, y = _unit(k1, (b, d)), _unit(k2, (b, d))
  tau = 0.02 + 0.1 * jax.random.uniform(k3, (b,))
  np.testing.assert_allclose(float(losses.infonce(x, y, tau)), _np_infonce(x, y, tau), rtol=1e-5)


@pytest.mark.parametrize("b,d", [(2, 4), (9, 6)])
def test_max_margin_matches_float64_numpy_on_unnormalised_input(b, d):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(b), 3)
  x, y = 3 * jax.random.normal(k1, (b, d)), 0.5 * jax.random.normal(k2, (b, d))
  m = 0.1 + 0.3 * jax.random.uniform(k3, (b,))
  np.testing.assert_allclose(float(losses.max_margin(x, y, m)), _np_max_margin(x, y, m), rtol=1e-5)


def test_infonce_stable_at_small_temperature_and_near_duplicates():
  key = jax.random.PRNGKey(0)
  base = _unit(key, (1, 32))
  # Near-duplicate rows: every similarity is within 1e-6 of 1, logits up to 200.
  x = _unit(key, (16, 32)) * 1e-6 + base
  x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
  value, grads = jax.value_and_grad(losses.infonce, argnums=(0, 1))(x, x, 0.005)
  assert np.isfinite(float(value))
  chex.assert_tree_all_finite(grads)
  np.testing.assert_allclose(float(value), _np_infonce(x, x, 0.005), rtol=1e-4)
  # Well-separated pairs at tau=0.005: the loss is ~0 and finite, not NaN from exp overflow.
  e = jnp.eye(8, 32)
  value, grads = jax.value_and_grad(losses.infonce)(e, e, 0.005)
  assert 0.0 <= float(value) < 1e-30 + 1e-6
  chex.assert_tree_all_finite(grads)


def test_bf16_inputs_accumulate_in_float32():
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  x, y = _unit(k1, (64, 128)), _unit(k2, (64, 128))
  tau = jnp.full((64,), 0.05)
  ref = _np_infonce(
    x.astype(jnp.bfloat16).astype(jnp.float32), y.astype(jnp.bfloat16).astype(jnp.float32), tau
  )
  for fn, ref_fn in ((losses.infonce, _np_infonce), (losses.max_margin, _np_max_margin)):
    xb, yb = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
    value, (gx, gy) = jax.value_and_grad(fn, argnums=(0, 1))(xb, yb, tau)
    assert value.dtype == jnp.float32
    assert gx.dtype == jnp.bfloat16 and gy.dtype == jnp.bfloat16
    ref = ref_fn(xb.astype(jnp.float32), yb.astype(jnp.float32), tau)
    np.testing.assert_allclose(float(value), ref, rtol=1e-4)


def test_vmap_over_a_stack_of_batches_equals_a_loop():
  keys = jax.random.split(jax.random.PRNGKey(2), 3)
  xs = jax.vmap(lambda k: _unit(k, (6, 8)))(keys)
  ys = jax.vmap(lambda k: _unit(k, (6, 8)))(keys[::-1])
  taus = jnp.linspace(0.05, 0.2, 18).reshape(3, 6)
  for fn in (losses.infonce, losses.max_margin):
    batched = jax.jit(jax.vmap(fn))(xs, ys, taus)
    looped = jnp.stack([fn(xs[i], ys[i], taus[i]) for i in range(3)])
    chex.assert_trees_all_close(batched, looped, rtol=1e-5)


def test_scalar_and_per_anchor_temperature_agree():
  k1, k2 = jax.random.split(jax.random.PRNGKey(3))
  x, y = _unit(k1, (5, 8)), _unit(k2, (5, 8))
  for fn in (losses.infonce, losses.max_margin):
    chex.assert_trees_all_close(fn(x, y, 0.1), fn(x, y, jnp.full((5,), 0.1)), rtol=1e-6)


def test_grad_with_respect_to_temperature_is_finite():
  # CLIP's learnable temperature differentiates through the loss in tau as well.
  k1, k2 = jax.random.split(jax.random.PRNGKey(4))
  x, y = _unit(k1, (5, 8)), _unit(k2, (5, 8))
  g = jax.grad(losses.infonce, argnums=2)(x, y, jnp.float32(0.07))
  assert np.isfinite(float(g))


@pytest.mark.parametrize("fn", [losses.infonce, losses.max_margin])
def test_bad_input_is_rejected_before_compiling(fn):
  x = jnp.ones((4, 8)) / jnp.sqrt(8.0)
  with pytest.raises(ValueError, match="same shape"):
    fn(x, jnp.ones((5, 8)), 0.1)
  with pytest.raises(ValueError, match=r"\(batch, dim\)"):
    fn(jnp.ones((4,)), jnp.ones((4,)), 0.1)
  with pytest.raises(ValueError, match=r"shape \(4,\)"):
    fn(x, x, jnp.ones((3,)))
  with pytest.raises(ValueError, match="> 0"):
    fn(x, x, jnp.array([0.1, 0.1, 0.0, 0.1]))
  with pytest.raises(ValueError, match="> 0"):
    fn(x, x, -0.05)
  with pytest.raises(ValueError, match="finite"):
    fn(x, x, float("nan"))
  with pytest.raises(TypeError, match="floating"):
    fn(jnp.ones((4, 8), jnp.int32), jnp.ones((4, 8), jnp.int32), 0.1)
  with pytest.raises(ValueError, match="impl"):
    fn(x, x, 0.1, impl="nope")


def test_max_margin_needs_two_samples():
  with pytest.raises(ValueError, match="at least 2"):
    losses.max_margin(jnp.ones((1, 4)), jnp.ones((1, 4)), 0.2)


def test_importing_losses_pulls_in_no_heavy_stack():
  code = (
    "import sys, mmts_jax.losses, mmts_jax.schedules, mmts_jax.shifts\n"
    "bad = [m for m in ('tensorflow', 'tensorflow_datasets', 'transformers', 'sklearn', "
    "'torch', 'grain') if m in sys.modules]\n"
    "print(','.join(bad))\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "", f"import mmts_jax.losses imported: {out.stdout.strip()}"
