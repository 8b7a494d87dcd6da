"""ClusterTable: construction, Eq. 6 shift table, atomic save/load, validation."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from mmts_jax.clusters.table import (
  FORMAT_VERSION,
  ClusterTable,
  ClusterTableMismatch,
  atomic_write,
  dataset_fingerprint,
)


def _eq6(k, sh_min, sh_max):
  k = np.asarray(k, np.float64)
  return (k - k.min()) / (k.max() - k.min()) * (sh_max - sh_min) + sh_min


def test_from_labels_counts_and_shift_table_follow_eq6():
  labels = np.random.default_rng(0).zipf(1.5, size=500) % 37
  table = ClusterTable.from_labels(labels.tolist())
  counts = {v: int((labels == v).sum()) for v in np.unique(labels)}
  expected_k = np.array([counts[v] for v in labels])
  np.testing.assert_array_equal(table.per_sample_sizes(), expected_k)
  assert table.num_clusters == len(counts) and table.sizes.sum() == 500
  got = table.shift_table(0.17, 0.30)
  assert got.dtype == np.float32 and got.shape == (500,)
  np.testing.assert_allclose(got, _eq6(expected_k, 0.17, 0.30), rtol=1e-6)
  # Integer labels keep numeric order: cluster 0 is label 0.
  assert table.cluster_names[0] == str(labels.min())


def test_ek100_noun_frequencies_give_each_sample_its_class_count(shared_dir):
  d = shared_dir / "data" / "ek100"
  with open(d / "ek100_noun_freq.csv") as f:
    freq = {r["class_id"]: int(r["count"]) for r in csv.DictReader(f)}
  with open(d / "EPIC_100_retrieval_train_sentence.csv") as f:
    rows = list(csv.DictReader(f))
  nouns = [r["noun_classes"].strip("[]").split(",")[0].strip() for r in rows]
  table = ClusterTable.from_frequencies(
    nouns, freq, fingerprint=dataset_fingerprint(r["narration_id"] for r in rows)
  )
  assert table.num_samples == 15989
  np.testing.assert_array_equal(table.per_sample_sizes(), [freq[n] for n in nouns])
  assert table.sizes.max() == 3617  # the official count of noun class 0 ("tap")
  sh = table.shift_table(0.05, 0.10)
  k = np.array([freq[n] for n in nouns])
  np.testing.assert_allclose(sh, _eq6(k, 0.05, 0.10), rtol=1e-6)
  assert sh[np.array(nouns) == "0"].min() == pytest.approx(0.10, abs=1e-7)


def test_from_frequencies_names_missing_classes():
  with pytest.raises(ValueError, match=r"no entry in the frequency table.*'9'"):
    ClusterTable.from_frequencies([1, 9], {1: 5})


def test_save_load_roundtrip_is_atomic_and_exact(tmp_path):
  table = ClusterTable.from_sizes(
    [0, 2, 1, 2], [10, 3, 700], fingerprint="sha256:abc", source="sizes", model="m", seed=3
  )
  path = tmp_path / "sub" / "table.npz"
  table.save(path)
  assert sorted(os.listdir(path.parent)) == ["table.npz"]  # no temp file left behind
  back = ClusterTable.load(path)
  np.testing.assert_array_equal(back.cluster_ids, table.cluster_ids)
  np.testing.assert_array_equal(back.sizes, table.sizes)
  assert back.cluster_ids.dtype == np.int32 and back.sizes.dtype == np.int64
  for key in ("source", "fingerprint", "model", "seed", "num_samples", "num_clusters", "created"):
    assert back.provenance[key] == table.provenance[key], key
  assert back.provenance["format_version"] == FORMAT_VERSION
  np.testing.assert_array_equal(back.shift_table(0.05, 0.1), table.shift_table(0.05, 0.1))


def test_failed_write_leaves_no_partial_file(tmp_path):
  path = tmp_path / "table.npz"

  def broken(f):
    f.write(b"half")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    atomic_write(path, broken)
  assert os.listdir(tmp_path) == []
  path.write_bytes(b"old")
  with pytest.raises(RuntimeError):
    atomic_write(path, broken)
  assert path.read_bytes() == b"old"  # the previous artifact survives


def test_validate_rejects_another_dataset(tmp_path):
  keys = [f"P01_01_{i}" for i in range(6)]
  table = ClusterTable.from_labels([0, 0, 1, 1, 1, 2], fingerprint=dataset_fingerprint(keys))
  path = tmp_path / "t.npz"
  table.save(path)
  table = ClusterTable.load(path)
  assert table.validate(num_samples=6, fingerprint=dataset_fingerprint(keys)) is table
  assert table.validate(keys) is table  # len() of a dataset object
  with pytest.raises(ClusterTableMismatch, match=r"built for 6 samples but the dataset has 7"):
    table.validate(num_samples=7)
  with pytest.raises(ClusterTableMismatch, match="different content or order"):
    table.validate(num_samples=6, fingerprint=dataset_fingerprint(keys[::-1]))
  with pytest.raises(ClusterTableMismatch, match=str(path)):
    table.validate(num_samples=5)


def test_fingerprint_is_order_and_boundary_sensitive():
  assert dataset_fingerprint(["ab", "c"]) != dataset_fingerprint(["a", "bc"])
  assert dataset_fingerprint(["a", "b"]) != dataset_fingerprint(["b", "a"])
  assert dataset_fingerprint([1, 2]) == dataset_fingerprint(["1", "2"])
  assert dataset_fingerprint(["a"]) != dataset_fingerprint(["a", ""])


def test_load_rejects_foreign_and_newer_files(tmp_path):
  foreign = tmp_path / "x.npz"
  np.savez(foreign, a=np.arange(3))
  with pytest.raises(ValueError, match="without the mmts_jax.ClusterTable format tag"):
    ClusterTable.load(foreign)
  table = ClusterTable.from_labels([1, 1, 2], format_version=FORMAT_VERSION + 1)
  table.save(tmp_path / "new.npz")
  with pytest.raises(ValueError, match=f"format_version {FORMAT_VERSION + 1}"):
    ClusterTable.load(tmp_path / "new.npz")
  with pytest.raises(FileNotFoundError):
    ClusterTable.load(tmp_path / "missing.npz")


def test_constructor_checks_ids_and_sizes():
  with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
    ClusterTable.from_sizes([0, 2], [1, 1])
  with pytest.raises(ValueError, match=">= 0"):
    ClusterTable.from_sizes([0], [-1])
  with pytest.raises(ValueError, match="labels is empty"):
    ClusterTable.from_labels([])


def test_summary_head_and_tail_shares():
  ids = np.repeat(np.arange(10), [50, 20, 10, 5, 5, 3, 3, 2, 1, 1])
  s = ClusterTable.from_labels(ids.tolist()).summary(top=3)
  assert s["size_max"] == 50 and s["size_min"] == 1 and s["occupied_clusters"] == 10
  assert s["head_clusters"] == 2 and s["head_share"] == pytest.approx(70 / 100)
  assert s["tail_clusters"] == 5 and s["tail_share"] == pytest.approx(10 / 100)
  assert [c[2] for c in s["largest"]] == [50, 20, 10]
