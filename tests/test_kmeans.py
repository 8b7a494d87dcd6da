"""K-Means: the JAX back-end against scikit-learn and against float64 numpy recomputation."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mmts_jax.clusters.kmeans import kmeans, kmeans_jax, kmeans_sklearn


def _blobs(n=3000, d=16, c=12, seed=0, noise=0.6):
  """A long-tailed mixture on the unit sphere, like caption embeddings."""
  rng = np.random.default_rng(seed)
  weights = 1.0 / np.arange(1, c + 1) ** 1.2
  centers = rng.normal(size=(c, d))
  labels = rng.choice(c, size=n, p=weights / weights.sum())
  x = centers[labels] + noise * rng.normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _inertia64(x, labels, centers):
  diff = x.astype(np.float64) - centers.astype(np.float64)[labels]
  return float((diff * diff).sum())


@pytest.fixture(scope="module")
def data():
  # Overlapping clusters (a continuum, as text embeddings are): single-init K-Means lands within
  # ~0.2% of its mean inertia here, so a 1% gap would be a real difference, not seed luck.
  # One shape and k=20 throughout, so the module compiles few programs.
  # 1999 rows do not split over 8 devices: every sharded run here also exercises the padding.
  return _blobs(n=1999, d=32, c=60, noise=1.5)


def test_jax_inertia_within_one_percent_of_sklearn(data):
  x = data
  ref = kmeans_sklearn(x, 20, seed=0)
  got = kmeans_jax(x, 20, seed=0)
  assert got.labels.shape == (x.shape[0],) and got.labels.dtype == np.int32
  assert got.centers.shape == (20, x.shape[1]) and got.centers.dtype == np.float32
  assert abs(got.inertia / ref.inertia - 1) <= 0.01, (got.inertia, ref.inertia)
  # The reported inertia is the true one of the returned labels and centres.
  np.testing.assert_allclose(got.inertia, _inertia64(x, got.labels, got.centers), rtol=1e-5)
  np.testing.assert_allclose(ref.inertia, _inertia64(x, ref.labels, ref.centers), rtol=1e-4)


def test_jax_result_is_a_lloyd_fixed_point(data):
  got = kmeans_jax(data, 20, seed=1, tol=0.0)
  x = data.astype(np.float64)
  d2 = ((x[:, None, :] - got.centers.astype(np.float64)[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(got.labels, d2.argmin(1))  # each point at its nearest centre
  for c in range(20):
    members = x[got.labels == c]
    assert members.size
    np.testing.assert_allclose(got.centers[c], members.mean(0), atol=1e-5)


def test_sharded_equals_single_device_and_pads_uneven_n(data):
  x = data
  assert jax.device_count() == 8
  many = kmeans_jax(x, 20, seed=2)
  one = kmeans_jax(x, 20, seed=2, devices=jax.devices()[:1])
  assert many.labels.shape == (1999,)
  np.testing.assert_allclose(many.inertia, one.inertia, rtol=1e-5)
  np.testing.assert_allclose(many.inertia, _inertia64(x, many.labels, many.centers), rtol=1e-5)


def test_matmul_and_scatter_updates_agree(data):
  a = kmeans_jax(data, 20, seed=0, update="matmul")
  b = kmeans_jax(data, 20, seed=0, update="scatter")
  np.testing.assert_allclose(a.inertia, b.inertia, rtol=1e-5)


def test_seeded_runs_are_reproducible_and_n_init_keeps_the_best(data):
  a = kmeans(data, 20, seed=4, backend="jax")
  b = kmeans(data, 20, seed=4, backend="jax")
  np.testing.assert_array_equal(a.labels, b.labels)
  best = kmeans(data, 20, seed=4, backend="jax", n_init=3)
  assert best.inertia <= a.inertia * (1 + 1e-6)
  s = kmeans(data, 20, seed=4, backend="sklearn", n_init=2)
  assert s.backend == "sklearn" and s.labels.shape == (1999,)


@pytest.mark.parametrize("backend", ["sklearn", "jax"])
def test_bad_input_is_rejected_before_any_work(backend):
  x = _blobs(n=50, d=4, c=3)
  with pytest.raises(ValueError, match=r"k=51 is larger than the number of samples \(50\)"):
    kmeans(x, 51, backend=backend)
  bad = x.copy()
  bad[7, 2] = np.nan
  with pytest.raises(ValueError, match="NaN or inf.*row 7"):
    kmeans(bad, 3, backend=backend)
  with pytest.raises(ValueError, match="2-D"):
    kmeans(x[0], 3, backend=backend)
  with pytest.raises(ValueError, match="k must be >= 1"):
    kmeans(x, 0, backend=backend)
  with pytest.raises(TypeError, match="k must be an int"):
    kmeans(x, 2.5, backend=backend)


def test_unknown_backend_and_update_are_named():
  x = _blobs(n=20, d=4, c=2)
  with pytest.raises(ValueError, match="backend='faiss'"):
    kmeans(x, 2, backend="faiss")
  with pytest.raises(ValueError, match="update='dense'"):
    kmeans_jax(x, 2, update="dense")
