"""Retrieval ranks and R@K against a float64 brute force over the full similarity matrix."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmts_jax.eval import recall_metrics, retrieval_metrics, retrieval_ranks


def _brute_force_ranks(image, text, text_to_image):
  """Position of the first positive in a stable descending sort of each float64 row."""
  s = text.astype(np.float64) @ image.astype(np.float64).T  # (M, N)

  def first(row, positive):
    order = np.argsort(-row, kind="stable")
    hit = positive[order]
    return int(np.argmax(hit)) + 1 if hit.any() else 0

  n = image.shape[0]
  t2i = [first(s[m], np.arange(n) == text_to_image[m]) for m in range(len(text))]
  i2t = [first(s[:, i], text_to_image == i) for i in range(n)]
  return np.array(t2i), np.array(i2t)


def _data(seed, n=40, captions=4, d=6, quantize=True):
  rng = np.random.default_rng(seed)
  image = rng.standard_normal((n, d)).astype(np.float32)
  mapping = np.repeat(np.arange(n), captions)
  text = image[mapping] + rng.standard_normal((len(mapping), d)).astype(np.float32)
  if quantize:  # small integers: exact float32 products and many ties
    image, text = np.round(image), np.round(text)
  return image, text.astype(np.float32), mapping


@pytest.mark.parametrize("block_size", [(7, 11), 16, (1000, 1000)])
def test_ranks_match_brute_force_with_ties(block_size):
  image, text, mapping = _data(0)
  ranks = retrieval_ranks(image, text, mapping, block_size=block_size, normalize=False)
  want_t2i, want_i2t = _brute_force_ranks(image, text, mapping)
  np.testing.assert_array_equal(ranks.t2i, want_t2i)
  np.testing.assert_array_equal(ranks.i2t, want_i2t)
  assert ranks.t2i.dtype == np.int32 and ranks.i2t.shape == (40,)


def test_queries_split_over_a_mesh_give_the_same_ranks():
  image, text, mapping = _data(4, n=37, captions=3)
  devices = np.array(jax.devices())
  assert devices.size == 8  # tests/conftest.py simulates 8 CPU devices
  mesh = jax.sharding.Mesh(devices.reshape(2, 4), ("data", "model"))
  ranks = retrieval_ranks(image, text, mapping, block_size=(5, 8), normalize=False, mesh=mesh)
  want_t2i, want_i2t = _brute_force_ranks(image, text, mapping)
  np.testing.assert_array_equal(ranks.t2i, want_t2i)
  np.testing.assert_array_equal(ranks.i2t, want_i2t)


def test_cosine_and_uneven_captions():
  rng = np.random.default_rng(1)
  image = rng.standard_normal((30, 8)).astype(np.float32)
  mapping = rng.integers(0, 30, size=75)  # 0 to many captions per image, shuffled
  text = (image[mapping] + 0.8 * rng.standard_normal((75, 8))).astype(np.float32)
  ranks = retrieval_ranks(3.0 * image, text, mapping, block_size=(8, 8))
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
  want_t2i, want_i2t = _brute_force_ranks(unit(image), unit(text), mapping)
  np.testing.assert_array_equal(ranks.t2i, want_t2i)
  np.testing.assert_array_equal(ranks.i2t, want_i2t)
  without = np.setdiff1d(np.arange(30), mapping)
  assert len(without) > 0 and (ranks.i2t[without] == 0).all()
  m = retrieval_metrics(image, text, mapping, block_size=8)
  assert m["i2t/num_queries"] == 30 - len(without) and m["t2i/num_queries"] == 75


def test_metrics_and_subsets_from_ranks():
  image, text, mapping = _data(2, quantize=False)
  tail = np.arange(40) < 10
  m = retrieval_metrics(
    jnp.asarray(image), jnp.asarray(text), mapping, ks=(1, 5), subsets={"tail": tail}
  )
  ranks = retrieval_ranks(image, text, mapping)
  expect = recall_metrics(ranks.t2i, (1, 5), tail[mapping], "tail/t2i/")
  for key, value in expect.items():
    assert m[key] == value
  r = ranks.i2t[tail]
  assert m["tail/i2t/R@5"] == np.mean(r <= 5) and m["tail/i2t/medR"] == np.median(r)
  assert m["tail/t2i/num_queries"] == 40 and m["tail/i2t/num_queries"] == 10
  want_rsum = 100 * sum(m[f"{side}/R@{k}"] for side in ("t2i", "i2t") for k in (1, 5))
  assert m["rsum"] == pytest.approx(want_rsum, abs=1e-9)


def test_recall_metrics_exact():
  got = recall_metrics(np.array([1, 3, 12, 0]), ks=(1, 5), mask=np.array([1, 1, 1, 1], bool))
  chex.assert_trees_all_close(
    got, {"R@1": 1 / 3, "R@5": 2 / 3, "medR": 3.0, "meanR": 16 / 3, "num_queries": 3}
  )
  with pytest.raises(ValueError, match="ks must be positive ints"):
    recall_metrics(np.array([1]), ks=(0,))


def test_bad_inputs_are_named():
  image, text, mapping = _data(3, n=5)
  with pytest.raises(ValueError, match=r"out of range, e.g. caption 2 -> 5"):
    retrieval_ranks(image, text, np.where(np.arange(20) == 2, 5, mapping))
  with pytest.raises(ValueError, match=r"one image index per caption, shape \(20,\), got \(19,\)"):
    retrieval_ranks(image, text, mapping[:-1])
  with pytest.raises(ValueError, match=r"same dim, got shapes \(5, 6\) and \(20, 5\)"):
    retrieval_ranks(image, text[:, :5], mapping)
  bad = text.copy()
  bad[[3, 7]] = np.nan
  with pytest.raises(ValueError, match=r"text_emb has 2 row\(s\) with NaN/inf, first \[3, 7\]"):
    retrieval_ranks(image, bad, mapping)
  with pytest.raises(TypeError, match="text_to_image must be integer"):
    retrieval_ranks(image, text, mapping.astype(float))
  with pytest.raises(ValueError, match="block_size must be a positive int"):
    retrieval_ranks(image, text, mapping, block_size=(0, 4))
  with pytest.raises(ValueError, match="subset 'tail' must be a bool mask over the 5 images"):
    retrieval_metrics(image, text, mapping, subsets={"tail": np.ones(4, bool)})
