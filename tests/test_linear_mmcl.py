"""mmts_jax.projects.nakada: beta and S(beta) against their definitions, the closed-form gradient
against jax.grad, gradient descent converging to the SVD of S, the generative model, pair
detection and the combined loss. Float64 (tolerances stated per test)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmts_jax.projects import nakada as lm
from mmts_jax.projects.nakada import gaussian_sampler as synthetic

CLIP = dict(phi=jnp.log1p, psi=jnp.exp)
LINEAR = dict(phi=lm.identity, psi=lm.identity)
OTHER = dict(phi=lambda u: jnp.sqrt(1.0 + u), psi=jax.nn.softplus)


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300)


def _problem(seed, n=7, d1=5, d2=4, r=2):
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = jax.random.normal(k1, (n, d1), jnp.float64)
  xt = x[:, :d2] + 0.5 * jax.random.normal(k2, (n, d2), jnp.float64)
  tau = 0.2 + jax.random.uniform(k3, (n,), jnp.float64)
  enc = lm.init_encoders(k4, d1, d2, r, scale=1.0, dtype=jnp.float64)
  return x, xt, tau, enc


def test_cross_covariance_matches_its_definition():
  with jax.enable_x64(True):
    x, xt, _, _ = _problem(0)
    n = x.shape[0]
    beta = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (n, n), jnp.float64))
    xn, xtn = np.asarray(x), np.asarray(xt)
    want = sum(beta[i, i] * np.outer(xn[i], xtn[i]) for i in range(n))
    want = want - sum(
      beta[i, j] * np.outer(xn[i], xtn[j]) for i in range(n) for j in range(n) if i != j
    )
    assert _rel(lm.cross_covariance(x, xt, jnp.asarray(beta)), want / n) <= 1e-12
    centered = lm.cross_covariance(x, xt, lm.linear_weights(n, 1.0, jnp.float64)) / (n - 1)
    assert _rel(lm.centered_cross_covariance(x, xt), centered) <= 1e-12


def test_beta_closed_forms_equal_the_autodiff_weights():
  with jax.enable_x64(True):
    x, xt, tau, enc = _problem(2)
    s = lm.similarities(enc, x, xt)
    assert _rel(lm.infonce_weights(s, tau), lm.loss_weights(s, tau, **CLIP)) <= 1e-10
    assert _rel(lm.linear_weights(7, tau, jnp.float64), lm.loss_weights(s, tau, **LINEAR)) <= 1e-12
    # Increasing phi, psi: every weight is positive.
    assert np.all(np.asarray(lm.loss_weights(s, tau, **OTHER)) > 0)


@pytest.mark.parametrize("kw", [CLIP, LINEAR, OTHER], ids=["clip", "linear", "sqrt_softplus"])
def test_closed_form_gradient_equals_autodiff(kw):
  with jax.enable_x64(True):
    x, xt, tau, enc = _problem(3)
    loss = functools.partial(lm.loss, rho=0.3, **kw)
    closed = functools.partial(lm.closed_form_grad, rho=0.3, **kw)
    want = jax.jit(jax.grad(loss))(enc, x, xt, tau)
    got = jax.jit(closed)(enc, x, xt, tau)
    assert _rel(got.g1, want.g1) <= 1e-10
    assert _rel(got.g2, want.g2) <= 1e-10


def test_gradient_descent_on_the_linear_loss_converges_to_the_svd_of_s():
  with jax.enable_x64(True):
    n, r, rho = 24, 2, 0.5
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(4), 3)
    x = jax.random.normal(k1, (n, 6), jnp.float64)
    mix = jax.random.normal(k2, (2, 5), jnp.float64)
    xt = 2.0 * x[:, :2] @ mix + 0.5 * jax.random.normal(k3, (n, 5), jnp.float64)
    enc0 = lm.init_encoders(jax.random.PRNGKey(5), 6, 5, r, scale=0.1, dtype=jnp.float64)
    # tau = n - 1 makes S the size-independent centred cross-covariance.
    enc, trace = lm.gradient_descent(
      enc0, x, xt, float(n - 1), rho=rho, lr=0.05, steps=500, **LINEAR
    )
    s_mat = lm.centered_cross_covariance(x, xt)
    u, sv, vt = np.linalg.svd(np.asarray(s_mat))
    assert sv[r - 1] > 1.5 * sv[r]  # a spectral gap, so the top-r subspaces are well defined
    assert float(lm.sin_theta(lm.row_space(enc.g1), jnp.asarray(u[:, :r]))) <= 1e-6
    assert float(lm.sin_theta(lm.row_space(enc.g2), jnp.asarray(vt[:r].T))) <= 1e-6
    best = (u[:, :r] * sv[:r]) @ vt[:r] / rho
    assert _rel(enc.g1.T @ enc.g2, best) <= 1e-6
    # The loss decreases to the closed-form minimum -||SVD_r(S)||_F^2 / (2 rho) (+ constant).
    closed = lm.linear_minimiser(s_mat, r, rho)
    at_min = lm.loss(closed, x, xt, float(n - 1), rho=rho, **LINEAR)
    np.testing.assert_allclose(float(trace[-1]), float(at_min), rtol=1e-9)
    assert np.all(np.diff(np.asarray(trace)) <= 1e-12)


def test_unimodal_minimiser_is_stationary_and_beats_perturbations():
  with jax.enable_x64(True):
    a = jax.random.normal(jax.random.PRNGKey(6), (6, 6), jnp.float64)
    s_mat, rho = a @ a.T / 6 - 0.3 * jnp.eye(6), 0.7

    def obj(g):
      m = g.T @ g
      return -jnp.sum(m * s_mat) + 0.5 * rho * jnp.sum(m * m)

    g = lm.unimodal_minimiser(s_mat, 2, rho)
    assert float(jnp.max(jnp.abs(jax.grad(obj)(g)))) <= 1e-10
    for k in range(3):
      pert = g + 0.05 * jax.random.normal(jax.random.PRNGKey(10 + k), g.shape, jnp.float64)
      assert float(obj(pert)) > float(obj(g))


def test_sin_theta():
  theta = 0.3
  a = jnp.array([[1.0], [0.0], [0.0]])
  b = jnp.array([[np.cos(theta)], [np.sin(theta)], [0.0]])
  np.testing.assert_allclose(float(lm.sin_theta(a, 5 * b)), np.sin(theta), rtol=1e-6)
  q = jnp.eye(4)[:, :2]
  mixed = q @ jnp.array([[2.0, 1.0], [-1.0, 3.0]])  # another basis of the same span
  assert float(lm.sin_theta(q, mixed)) <= 1e-6
  np.testing.assert_allclose(float(lm.sin_theta(q, jnp.eye(4)[:, 2:])), 1.0, rtol=1e-6)
  np.testing.assert_allclose(
    float(lm.sin_theta(q, jnp.eye(4)[:, 1:3], "frobenius")), np.sqrt(0.5), rtol=1e-6
  )
  with pytest.raises(ValueError, match="norm"):
    lm.sin_theta(q, q, "nuclear")


def test_generative_model_mismatch_and_views():
  model = synthetic.make_model(7, 12, 10, 3, noise_rank=2, spike=0.0, noise=0.0)
  x, xt, z = synthetic.sample_pairs(model, 8, 40)
  np.testing.assert_allclose(x @ model.u1, z, atol=1e-5)
  np.testing.assert_allclose(xt @ model.u2, z, atol=1e-5)
  assert np.max(np.abs(model.u1.T @ model.v1)) <= 1e-6
  shuffled, matched = synthetic.mismatch(9, xt, 0.25)
  assert np.sum(~matched) == 10
  np.testing.assert_array_equal(np.all(np.isclose(shuffled, xt), axis=1), matched)
  a, b = synthetic.random_masking_views(10, x)
  np.testing.assert_allclose(a + b, x)
  assert np.max(np.abs(a * b)) == 0.0
  xp, xtp, match = synthetic.hidden_pair_pool(model, 11, 30, 10)
  assert np.sum(match >= 0) == 30 and len(set(match[match >= 0])) == 30
  hid = match >= 0
  np.testing.assert_allclose((xp @ model.u1)[hid], (xtp @ model.u2)[match[hid]], atol=1e-5)
  # Noise spikes are modality-specific: the empirical cross-covariance ignores them.
  noisy = synthetic.make_model(1, 12, 10, 3, noise_rank=2, spike=3.0, noise=0.1)
  x, xt, _ = synthetic.sample_pairs(noisy, 2, 20000)
  cross = x.T.astype(np.float64) @ xt / 20000
  np.testing.assert_allclose(cross, noisy.u1 @ noisy.u2.T, atol=0.12)
  with pytest.raises(ValueError, match="fraction"):
    synthetic.mismatch(0, xt, 1.5)
  with pytest.raises(ValueError, match="rank"):
    synthetic.make_model(0, 5, 5, 3, noise_rank=3)
  with pytest.raises(TypeError, match="rng"):
    synthetic.make_model(jax.random.PRNGKey(0), 5, 5, 1, noise_rank=1)


@pytest.mark.parametrize("method", ["mutual_nn", "assignment"])
def test_detect_pairs_recovers_a_planted_matching(method):
  rng = np.random.default_rng(0)
  e1 = rng.normal(size=(30, 6))
  perm = rng.permutation(30)
  e2 = np.concatenate([e1[perm] + 0.01 * rng.normal(size=(30, 6)), rng.normal(size=(5, 6))])
  match = np.argsort(perm)  # e1[i] is e2[match[i]]
  i, j, c = lm.detect_pairs(e1, e2, threshold=0.9, method=method)
  m = lm.pair_metrics(i, j, match)
  assert m["precision"] == 1.0 and m["recall"] == 1.0 and m["detected"] == 30
  assert np.all(c >= 0.9)
  # Noisier pairs: the threshold drops the low-confidence ones and keeps only cosines above it.
  e1 = rng.normal(size=(200, 6))
  perm = rng.permutation(200)
  noisy = e1[perm] + 0.5 * rng.normal(size=(200, 6))
  i_all, j_all, _ = lm.detect_pairs(e1, noisy, threshold=-1.0, method=method)
  i, j, c = lm.detect_pairs(e1, noisy, threshold=0.95, method=method)
  assert 0 < i.size < i_all.size and np.all(c >= 0.95)
  truth = np.argsort(perm)
  assert (
    lm.pair_metrics(i, j, truth)["precision"] > lm.pair_metrics(i_all, j_all, truth)["precision"]
  )
  with pytest.raises(ValueError, match="method"):
    lm.detect_pairs(e1, e2, threshold=0.9, method="greedy")
  with pytest.raises(ValueError, match="threshold"):
    lm.detect_pairs(e1, e2, threshold=2.0)


def test_combined_loss_gradient_is_the_sum_of_cross_covariances():
  with jax.enable_x64(True):
    x, xt, tau, enc = _problem(12)
    xu, xtu = x[:5] * 0.7, xt[::-1][:5]
    w, rho = 0.4, 0.2
    got = jax.jit(
      jax.grad(lambda e: lm.combined_loss(e, (x, xt), (xu, xtu), 0.5, rho=rho, weight=w, **CLIP))
    )(enc)
    beta_p = lm.infonce_weights(lm.similarities(enc, x, xt), 0.5)
    beta_u = lm.infonce_weights(lm.similarities(enc, xu, xtu), 0.5)
    s_mat = lm.cross_covariance(x, xt, beta_p) + w * lm.cross_covariance(xu, xtu, beta_u)
    want_g1 = -enc.g2 @ s_mat.T + rho * enc.g2 @ enc.g2.T @ enc.g1
    want_g2 = -enc.g1 @ s_mat + rho * enc.g1 @ enc.g1.T @ enc.g2
    assert _rel(got.g1, want_g1) <= 1e-10 and _rel(got.g2, want_g2) <= 1e-10


def test_self_training_detects_hidden_pairs_and_improves_recovery():
  model = synthetic.make_model(13, 24, 24, 8, noise_rank=8, spike=0.5, noise=0.1)
  x, xt, _ = synthetic.sample_pairs(model, 14, 40)
  xp, xtp, match = synthetic.hidden_pair_pool(model, 15, 300, 100)
  before = lm.linear_minimiser(lm.centered_cross_covariance(x, xt), 8, 1.0)
  enc, hist = lm.self_train_linear(x, xt, xp, xtp, rank=8, rounds=2, threshold=0.95, match=match)
  # Measured: precision 0.98 -> 1.00, recall 0.84 -> 0.98, sin theta 0.52 -> 0.20.
  assert hist[-1]["precision"] >= 0.95 and hist[-1]["recall"] >= 0.9
  assert hist[-1]["recall"] > hist[0]["recall"]
  err_before = float(lm.sin_theta(lm.row_space(before.g1), model.u1))
  err_after = float(lm.sin_theta(lm.row_space(enc.g1), model.u1))
  assert err_after < 0.5 * err_before


def test_bad_arguments():
  with pytest.raises(ValueError, match="rank"):
    lm.init_encoders(jax.random.PRNGKey(0), 3, 4, 5)
  enc = lm.init_encoders(jax.random.PRNGKey(0), 3, 3, 1)
  with pytest.raises(ValueError, match="steps"):
    lm.gradient_descent(
      enc, jnp.ones((4, 3)), jnp.ones((4, 3)), 1.0, rho=1.0, lr=0.1, steps=0, **LINEAR
    )
  with pytest.raises(ValueError, match="cross_covariance"):
    lm.cross_covariance(jnp.ones((4, 3)), jnp.ones((5, 3)), jnp.ones((4, 4)))
  with pytest.raises(ValueError, match="weight"):
    lm.combined_loss(enc, (jnp.ones((4, 3)),) * 2, None, 1.0, rho=1.0, weight=-1.0, **LINEAR)
