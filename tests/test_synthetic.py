"""The synthetic long-tail benchmark: generator properties, its R@K, and a tiny end-to-end run.

The end-to-end run goes through the real pieces (MiniLM encoder, K-Means, the trainer, the
plots) with a few steps, through the `mmts synthetic` command.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import chex
import numpy as np
import pytest

from mmts_jax import shifts
from mmts_jax.longtail import generator, metrics, words
from mmts_jax.longtail.generator import GeneratorConfig, make_dataset, zipf_class_sizes

SMALL = GeneratorConfig(num_classes=12, head_size=300, imbalance=100, test_per_class=5)


@pytest.fixture(scope="module")
def default_ds():
  return make_dataset(GeneratorConfig())


def test_default_is_long_tailed_with_head_and_tail(default_ds):
  ds = default_ds
  assert ds.imbalance >= 100
  assert np.all(np.diff(ds.class_sizes) <= 0)  # rank order: class 0 is the largest
  np.testing.assert_array_equal(np.bincount(ds.train.label), ds.class_sizes)
  np.testing.assert_array_equal(
    np.bincount(ds.test.label), np.full(ds.config.num_classes, ds.config.test_per_class)
  )
  assert ds.head_classes.any() and ds.tail_classes.any()
  assert not np.any(ds.head_classes & ds.tail_classes)
  assert ds.class_sizes[ds.head_classes].min() > ds.class_sizes[ds.tail_classes].max()


def test_zipf_sizes_match_the_power_law():
  sizes = zipf_class_sizes(40, 1000, 100)
  expected = np.floor(1000 * np.arange(1, 41.0) ** (-np.log(100) / np.log(40)) + 1e-9)
  np.testing.assert_array_equal(sizes, expected)
  assert sizes[0] / sizes[-1] >= 100
  for n_cls, head, imb in [(7, 500, 250), (64, 2000, 100), (2, 10, 10)]:
    s = zipf_class_sizes(n_cls, head, imb)
    assert s[0] == head and s[0] / s[-1] >= imb and len(s) == n_cls


def test_index_is_stable_dense_and_keys_the_rows():
  ds = make_dataset(SMALL)
  for split in (ds.train, ds.test):
    np.testing.assert_array_equal(split.index, np.arange(len(split)))
    chex.assert_shape(split.image, (len(split), SMALL.image_dim))
    chex.assert_shape(split.tokens, (len(split), SMALL.max_len))
    assert split.index.dtype == np.int32 and split.tokens.dtype == np.int32
    arrays = split.arrays()
    assert set(arrays) == {"image", "text", "index", "label"}
  # Classes are interleaved, so a contiguous batch of the index order mixes them.
  assert len(np.unique(ds.train.label[:32])) > 3


def test_determinism_by_seed():
  a, b = make_dataset(SMALL), make_dataset(SMALL)
  c = make_dataset(dataclasses.replace(SMALL, seed=1))
  for name in ("image", "tokens", "label", "latent"):
    np.testing.assert_array_equal(getattr(a.train, name), getattr(b.train, name))
  assert a.train.captions == b.train.captions and a.fingerprint() == b.fingerprint()
  assert c.fingerprint() != a.fingerprint()
  assert not np.allclose(a.train.image[:10], c.train.image[:10])


def test_captions_are_words_of_the_vocabulary_and_name_the_class():
  ds = make_dataset(SMALL)
  vocab = np.asarray(ds.vocab)
  for i in range(0, len(ds.train), 37):
    caption, label = ds.train.captions[i], ds.train.label[i]
    ids = ds.train.tokens[i]
    decoded = " ".join(vocab[ids[ids > 0]])
    assert decoded == caption.replace(",", "")
    assert caption.split()[1].rstrip(",") == ds.class_names[label]
    assert caption.count(ds.class_names[label]) == 2
  # Head classes repeat captions (near-duplicate semantics), tail classes hardly do.
  captions = np.asarray(ds.train.captions, dtype=object)
  head, tail = ds.train.label == 0, ds.tail_classes[ds.train.label]
  assert len(set(captions[head])) / head.sum() < 0.6
  assert len(set(captions[tail])) / tail.sum() > 0.9


def test_per_sample_spread_follows_class_size():
  ds = make_dataset(GeneratorConfig(head_spread=0.3, num_classes=6, head_size=2000, imbalance=20))
  spread = generator.class_spread(ds.class_sizes, 0.3)
  np.testing.assert_allclose(spread[[0, -1]], [0.3, 1.0])
  prototypes = np.stack([ds.train.latent[ds.train.label == c].mean(0) for c in range(6)])
  own = ds.train.latent - prototypes[ds.train.label]
  for c in (0, 5):
    std = own[ds.train.label == c].std()
    # A sample std of n*16 values: within 10% of the generating spread.
    np.testing.assert_allclose(std, spread[c], rtol=0.1)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(num_classes=1), "num_classes"),
    (dict(num_classes=len(words.CLASS_NOUNS) + 1), "num_classes"),
    (dict(imbalance=0.5), "imbalance"),
    (dict(head_size=50, imbalance=100), "head_size / imbalance"),
    (dict(head_spread=0.0), "head_spread"),
    (dict(max_len=4), "max_len"),
  ],
)
def test_invalid_generator_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    GeneratorConfig(**kwargs)


def _recall_reference(sim, relevant, k):
  hits = []
  for q in range(sim.shape[0]):
    order = sorted(range(sim.shape[1]), key=lambda j: -sim[q, j])
    hits.append(any(relevant[q, j] for j in order[:k]))
  return float(np.mean(hits))


def test_recall_matches_a_brute_force_reference():
  rng = np.random.default_rng(0)
  sim = rng.standard_normal((30, 40))
  relevant = rng.random((30, 40)) < 0.08
  relevant[np.arange(30), np.arange(30)] = True
  got = metrics.recall_at_k(sim, relevant, (1, 5, 10))
  for k in (1, 5, 10):
    assert got[k] == pytest.approx(_recall_reference(sim, relevant, k), abs=1e-12)
  strings = ["a", "b", "a", "c"]
  np.testing.assert_array_equal(metrics.same_string(strings)[0], [True, False, True, False])
  with pytest.raises(ValueError, match="K must be in"):
    metrics.recall_at_k(sim, relevant, (41,))


def test_config_rows_and_mmts_settings_are_valid():
  from mmts_jax.longtail import config, source

  c = config.get_config()
  assert c.temperature.mode == "mmts"
  shifts.validate_positive(c.mmts.alpha, c.mmts.sh_min, c.mmts.sh_max)
  assert c.model.text.vocab_size == len(generator.build_vocab())
  assert source.generator_config(c.data) == GeneratorConfig()
  modes = {row: config.get_config(row).temperature.mode for row in config.BENCHMARK_ROWS}
  assert modes == {"fixed": "fixed", "ts": "ts", "ics": "ics", "mmts": "mmts"}
  with pytest.raises(ValueError, match="nope"):
    config.get_config("nope")


def test_source_feeds_the_trainer_protocol():
  import ml_collections

  from mmts_jax.clusters.table import dataset_fingerprint
  from mmts_jax.longtail import source

  cfg = ml_collections.ConfigDict(
    dict(name="x", shuffle=True, num_classes=12, head_size=300, imbalance=100, test_per_class=5)
  )
  src = source.make_source(cfg, global_batch_size=32, seed=3)
  ds = make_dataset(SMALL)
  assert src.num_examples == len(ds.train)
  assert src.fingerprint == dataset_fingerprint(ds.train.captions) == ds.fingerprint()
  np.testing.assert_array_equal(src.cluster_sizes, ds.class_sizes[ds.train.label])
  batch = next(src.iterate(0))
  np.testing.assert_array_equal(batch["image_features"], ds.train.image[batch["index"]])
  np.testing.assert_array_equal(batch["text"], ds.train.tokens[batch["index"]])


def test_end_to_end_tiny(tmp_path):
  from mmts_jax.commands import synthetic as command

  workdir = tmp_path / "bench"
  rc = command.main(
    [
      "--workdir",
      str(workdir),
      "--num-classes",
      "10",
      "--head-size",
      "200",
      "--imbalance",
      "100",
      "--clusters",
      "5",
      "--steps",
      "24",
      "--batch-size",
      "64",
      "--eval-every",
      "12",
      "--rows",
      "fixed,mmts",
      "--devices",
      "1",
    ]
  )
  assert rc == 0
  results = json.loads((workdir / "results.json").read_text())
  assert results["rows"] == ["fixed", "mmts"] and results["data"]["imbalance"] >= 100
  assert sum(results["clusters"]["sizes"]) == results["data"]["num_train"]
  n_test = results["data"]["num_test"]
  for row, stats in results["summary"].items():
    for group in ("all", "head", "tail"):
      r1, r5, r10 = (stats[f"{group}/R@{k}"][0] for k in (1, 5, 10))
      assert 0 <= r1 <= r5 <= r10 <= 1
    # Far above chance (K / n_test) after 24 steps: the two views are aligned.
    assert stats["all/R@5"][0] > 3 * 5 / n_test, (row, stats["all/R@5"])
  runs = {r["row"]: r for r in results["runs"]}
  assert [c["step"] for c in runs["mmts"]["curve"]] == [12, 24]
  # MM-TS temperatures stay inside [sh_min - alpha/2, sh_max + alpha/2]; the fixed row's is.
  mm = results["config"]["mmts"]
  lo, hi = mm["sh_min"] - mm["alpha"] / 2, mm["sh_max"] + mm["alpha"] / 2
  for rec in runs["mmts"]["train_log"]:
    if "temperature_min" in rec:
      assert lo - 1e-6 <= rec["temperature_min"] <= rec["temperature_max"] <= hi + 1e-6
  fixed_taus = {
    round(r["temperature_mean"], 6) for r in runs["fixed"]["train_log"] if "temperature_mean" in r
  }
  assert fixed_taus == {0.07}
  # The saved cluster table belongs to the training captions and covers every sample.
  from mmts_jax.clusters.table import ClusterTable

  table = ClusterTable.load(workdir / "cluster_table.npz")
  assert table.fingerprint == results["data"]["fingerprint"]
  assert table.num_samples == results["data"]["num_train"]
  assert table.provenance["model"] == "sentence-transformers/all-MiniLM-L6-v2"
  # A second run into the same workdir is refused (it would mix runs) unless --overwrite.
  assert command.main(["--workdir", str(workdir), "--steps", "2"]) == 2
  for name in ("temperature_per_cluster", "cluster_distribution", "learning_curves"):
    png = pathlib.Path(results["plots"][name])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
