"""The input protocol in one place (`mmts_jax.data.sources`): the registry, the fingerprint of
in-memory data (a cluster table of other data or another row order is refused before anything
is compiled) and the prefetching host-to-device path."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest

from mmts_jax import temperature, train
from mmts_jax.clusters.table import ClusterTable, ClusterTableMismatch
from mmts_jax.data import sources
from mmts_jax.mesh import make_mesh


def _npz_config(path):
  c = train.default_config()
  c.total_steps, c.batch_size, c.progress_bar, c.tensorboard = 10, 16, False, False
  c.data.update(name="npz", path=str(path))
  c.model.image = dict(name="features", hidden_dims=(8,))
  c.model.text = dict(name="features", hidden_dims=(8,))
  c.model.update(embed_dim=4)
  c.optim.warmup_steps = 1
  return c


def test_every_registered_source_resolves_and_names_are_checked():
  for name, target in sources.SOURCES.items():
    assert callable(sources._resolve(target)), name
  cfg = ml_collections.ConfigDict(dict(name="synthetic"))
  with pytest.raises(ValueError, match="renamed 'toy_features'"):
    sources.make_source(cfg, global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="data.name must be one of"):
    sources.make_source(ml_collections.ConfigDict(dict(name="nope")), global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="cannot be imported"):
    sources.make_source(
      ml_collections.ConfigDict(dict(name="mmts_jax.nope:f")), global_batch_size=4, seed=0
    )


def test_npz_cluster_table_of_another_row_order_is_refused_before_compiling(tmp_path):
  rng = np.random.default_rng(0)
  image, text = rng.normal(size=(64, 6)), rng.normal(size=(64, 5))
  labels = np.arange(64) % 4
  labels[:20] = 0  # one head cluster
  np.savez(tmp_path / "data.npz", image_features=image, text_features=text)
  order = rng.permutation(64)
  np.savez(tmp_path / "shuffled.npz", image_features=image[order], text_features=text[order])
  ours = _npz_config(tmp_path / "data.npz")
  src = sources.make_source(ours.data, global_batch_size=16, seed=0)
  assert src.fingerprint.startswith("content-sha256:")
  ClusterTable.from_labels(labels.tolist(), fingerprint=src.fingerprint).save(tmp_path / "t.npz")
  ours.mmts.cluster_table = str(tmp_path / "t.npz")
  policy = temperature.from_config(ours.temperature, ours.mmts, total_steps=10)
  table = train.resolve_shift_table(ours, src, policy)
  assert table.shape == (64,) and table[0] > table[-1]  # the head cluster's shift is larger
  other = _npz_config(tmp_path / "shuffled.npz")
  other.mmts.cluster_table = ours.mmts.cluster_table
  with pytest.raises(ClusterTableMismatch, match="different content or order"):
    train.setup(other)
  run = train.setup(ours)  # the right data trains
  state, metrics = run.step_fn(run.state, run.to_device(next(run.batches(0))))
  assert bool(metrics["finite"])


def test_npz_with_its_own_fingerprint_and_unreadable_files(tmp_path):
  np.savez(tmp_path / "d.npz", image_features=np.ones((8, 2)), fingerprint="sha256:" + "0" * 64)
  cfg = ml_collections.ConfigDict(dict(name="npz", path=str(tmp_path / "d.npz")))
  src = sources.make_source(cfg, global_batch_size=4, seed=0)
  assert src.fingerprint == "sha256:" + "0" * 64 and "fingerprint" not in next(src.iterate())
  (tmp_path / "bad.npz").write_bytes(b"not a zip")
  cfg.path = str(tmp_path / "bad.npz")
  with pytest.raises(ValueError, match="bad.npz.*not a readable .npz"):
    sources.make_source(cfg, global_batch_size=4, seed=0)
  np.savez(tmp_path / "obj.npz", image_features=np.array([{"a": 1}] * 8, dtype=object))
  cfg.path = str(tmp_path / "obj.npz")
  with pytest.raises(ValueError, match="obj.npz"):
    sources.make_source(cfg, global_batch_size=4, seed=0)


def test_prefetch_to_device_keeps_order_values_and_checks():
  mesh = make_mesh()
  cfg = train.default_config().data
  cfg.update(num_examples=128, text="features")
  src = sources.make_source(cfg, global_batch_size=32, seed=1)
  host = [b for b, _ in zip(src.iterate(0), range(5), strict=False)]
  dev = list(sources.prefetch_to_device(iter(host), mesh, size=2))
  assert len(dev) == 5
  for h, d in zip(host, dev, strict=True):
    assert d["image_features"].sharding.spec == jax.sharding.PartitionSpec("data")
    for k in h:
      np.testing.assert_array_equal(np.asarray(d[k]), h[k])
  bad = [dict(host[0]), {k: v for k, v in host[1].items() if k != "index"}]
  it = sources.prefetch_to_device(
    iter(bad), mesh, size=1, check=lambda b: sources.check_batch(b, 128)
  )
  next(it)
  with pytest.raises(KeyError, match="no 'index'"):
    next(it)
