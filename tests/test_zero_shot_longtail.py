"""The trainer's zero-shot hook with the long-tail report: a test set whose .npz carries per-image
class ids gets head / middle / tail R@K, mAP and nDCG in metrics.jsonl, equal to
`longtail_report` computed directly on the trained model's embeddings."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from mmts_jax import train
from mmts_jax.commands.train import load_config
from mmts_jax.eval.longtail import BUCKETS, format_longtail, label_relevancy, longtail_report
from mmts_jax.eval.zero_shot import RetrievalTestSet, ZeroShotEval, eval_fn_from_config


def _labelled_test_set(rng, path):
  """36 images of 5 Zipf-sized classes (feature centre + noise), 2 captions per image (a text
  feature centre per class + noise), and a training frequency per class."""
  counts = np.array([16, 9, 6, 3, 2])
  labels = rng.permutation(np.repeat(np.arange(5), counts))
  centres = rng.normal(size=(5, 16))
  images = (centres[labels] + 0.5 * rng.normal(size=(len(labels), 16))).astype(np.float32)
  mapping = np.repeat(np.arange(len(labels)), 2)
  text_centres = rng.normal(size=(5, 16))
  texts = (text_centres[labels[mapping]] + 0.5 * rng.normal(size=(len(mapping), 16))).astype(
    np.float32
  )
  np.savez(
    path,
    image_features=images,
    text_features=texts,
    text_to_image=mapping,
    label=labels,
    cluster_sizes=10 * counts,
  )
  return labels, mapping


def test_longtail_scalars_logged_and_equal_direct_report(tmp_path, capsys):
  rng = np.random.default_rng(0)
  labels, mapping = _labelled_test_set(rng, tmp_path / "val.npz")
  c = load_config(str(pathlib.Path(__file__).parents[1] / "configs" / "tiny.py"))
  c.total_steps, c.log_every, c.tensorboard = 4, 2, False
  c.mesh.num_devices = 1
  c.data.text = "features"  # feature towers on both sides: compiles in seconds
  c.model.text = dict(name="features", hidden_dims=(32,))
  c.checkpoint.update(every_steps=4, async_save=False)
  c.eval.update(
    every_steps=2, zero_shot=f"val={tmp_path / 'val.npz'}", longtail=True, bucket_scheme="share"
  )
  zs = eval_fn_from_config(c)
  assert zs.longtail and zs.test_sets[0].clusters is not None
  result = train.train_and_evaluate(c, tmp_path / "run", eval_fn=zs)
  assert result.step == 4

  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  logged = {r["step"]: r for r in records if "zs/val/longtail/all/R@1" in r}
  assert sorted(logged) == [2, 4]

  # Direct: the final parameters' embeddings, cosine in float64 (then float32, the report's
  # input type), positives from text_to_image, relevancy [same class], sizes from the npz.
  embed = train.make_embed_fn(result.model)
  variables = result.state.variables()
  t = zs.test_sets[0]
  img = np.asarray(embed(variables, {"image_features": t.images})["image"], np.float64)
  txt = np.asarray(embed(variables, {"text_features": t.texts})["text"], np.float64)
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  direct = longtail_report(
    (img @ txt.T).astype(np.float32),
    label_relevancy(labels, labels[mapping]),
    image_clusters=labels,
    text_clusters=labels[mapping],
    cluster_sizes=10 * np.array([16, 9, 6, 3, 2]),
    positives=mapping[None, :] == np.arange(len(labels))[:, None],
  )
  assert set(direct) == {"all", *BUCKETS}
  final = logged[4]
  for bucket, row in direct.items():
    for key, value in row.items():
      # Same ranks (similarities far apart compared with float32 rounding): equal up to the
      # float32 round-off of the embeddings, well below one query's share (1/72).
      assert final[f"zs/val/longtail/{bucket}/{key}"] == pytest.approx(value, abs=1e-6), (
        bucket,
        key,
      )
  assert zs.last["step"] == 4 and set(zs.last["longtail"]["val"]) == set(direct)
  assert direct["head"]["num_queries"] == 16 and direct["tail"]["num_queries"] == 11
  # The Table 1 columns are still there, and the table was printed (on process 0).
  assert "zs/val/IR@1" in final
  out = capsys.readouterr().out
  assert "zero-shot long tail: val, step 4" in out
  assert format_longtail(zs.last["longtail"]["val"]) in out


def test_longtail_config_errors(tmp_path):
  rng = np.random.default_rng(1)
  plain = RetrievalTestSet.from_arrays(
    "plain", rng.normal(size=(12, 4)), rng.normal(size=(12, 4)), captions_per_image=1
  )
  with pytest.raises(ValueError, match="none of \\['plain'\\] has one"):
    ZeroShotEval([plain], longtail=True)
  labelled = RetrievalTestSet.from_arrays(
    "lab", plain.images, plain.texts, captions_per_image=1, clusters=np.arange(12) % 3
  )
  with pytest.raises(ValueError, match="longtail_ks must be in \\[1, 12\\]"):
    ZeroShotEval([labelled], longtail=True, longtail_ks=(1, 20))
  with pytest.raises(ValueError, match="'thirds'"):
    ZeroShotEval([labelled], longtail=True, bucket_scheme="thirds")
  with pytest.raises(ValueError, match="one class / cluster id per image"):
    RetrievalTestSet.from_arrays(
      "x", plain.images, plain.texts, captions_per_image=1, clusters=np.arange(5)
    )
  with pytest.raises(ValueError, match="max id 11"):
    RetrievalTestSet.from_arrays(
      "x",
      plain.images,
      plain.texts,
      captions_per_image=1,
      clusters=np.arange(12),
      cluster_sizes=np.ones(4),
    )
  np.savez(
    tmp_path / "both.npz",
    image=plain.images,
    text=plain.texts,
    text_to_image=np.arange(12),
    cluster=np.zeros(12, int),
    label=np.zeros(12, int),
  )
  with pytest.raises(ValueError, match="both 'cluster' and 'label'"):
    RetrievalTestSet.from_npz(tmp_path / "both.npz")
  # Round trip through save / from_npz keeps the ids and sizes.
  labelled.save(tmp_path / "lab.npz")
  back = RetrievalTestSet.from_npz(tmp_path / "lab.npz")
  np.testing.assert_array_equal(back.clusters, labelled.clusters)
  np.testing.assert_array_equal(back.cluster_sizes, [4, 4, 4])
