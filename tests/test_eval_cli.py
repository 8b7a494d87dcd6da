"""`mmts eval`: files in, a metrics json and a table out; clear one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmts_jax import cli
from mmts_jax.eval import read_ek100_mir, retrieval_metrics


@pytest.fixture(scope="module")
def ref(shared_dir):
  with np.load(shared_dir / "reference" / "ek100_mir_small.npz") as d:
    return {k: d[k] for k in d.files}


def test_retrieval_npz_to_json(tmp_path, capsys):
  rng = np.random.default_rng(0)
  image = rng.standard_normal((20, 8)).astype(np.float32)
  text = (np.repeat(image, 5, axis=0) + rng.standard_normal((100, 8))).astype(np.float32)
  np.savez(tmp_path / "emb.npz", image_emb=image, text_emb=text)
  np.save(tmp_path / "tail.npy", np.arange(20) < 5)
  out = tmp_path / "sub" / "metrics.json"
  rc = cli.main(
    [
      "eval",
      "retrieval",
      "--embeddings",
      str(tmp_path / "emb.npz"),
      "--captions-per-image",
      "5",
      "--subset",
      f"tail={tmp_path / 'tail.npy'}",
      "--out",
      str(out),
    ]
  )
  assert rc == 0
  record = json.loads(out.read_text())
  want = retrieval_metrics(image, text, np.arange(100) // 5, subsets={"tail": np.arange(20) < 5})
  assert record["task"] == "retrieval" and record["metrics"] == want
  table = capsys.readouterr().out
  assert "text->image" in table and "tail/image->text" in table
  assert f"{100 * want['t2i/R@1']:8.2f}" in table
  assert not list((tmp_path / "sub").glob("*.tmp"))  # the atomic write left no temp file


def test_ek100_similarity_and_relevancy_files(tmp_path, ref, capsys):
  np.save(tmp_path / "sim.npy", ref["noisy_oracle/similarity"])
  np.save(tmp_path / "rel.npy", ref["relevancy"])
  out = tmp_path / "mir.json"
  assert (
    cli.main(
      [
        "eval",
        "ek100",
        "--similarity",
        str(tmp_path / "sim.npy"),
        "--relevancy",
        str(tmp_path / "rel.npy"),
        "--out",
        str(out),
      ]
    )
    == 0
  )
  metrics = json.loads(out.read_text())["metrics"]
  np.testing.assert_allclose(
    [metrics[f"mAP/{k}"] for k in ("video_to_text", "text_to_video", "average")],
    ref["noisy_oracle/mAP"],
    rtol=0,
    atol=1e-6,
  )
  np.testing.assert_allclose(metrics["nDCG/average"], ref["noisy_oracle/nDCG"][2], atol=1e-6)
  assert "nDCG" in capsys.readouterr().out


def test_ek100_embeddings_with_annotations(tmp_path, shared_dir):
  # One random direction per (verb, noun set): a video and a caption are as similar as possible
  # exactly when their relevancy is 1, so every fully relevant item ranks first: mAP = 1. This
  # checks the whole path: CSV order, relevancy, embeddings -> cosine similarity -> metrics.
  ann = read_ek100_mir(shared_dir / "data" / "ek100")
  signature = {}

  def sig(verbs, nouns):
    return [
      signature.setdefault((int(v), frozenset(n)), len(signature))
      for v, n in zip(verbs, nouns, strict=True)
    ]

  video_sig = sig(ann.video_verbs, ann.video_nouns)
  text_sig = sig(ann.caption_verbs, ann.caption_nouns)
  rng = np.random.default_rng(0)
  directions = rng.standard_normal((len(signature), 16)).astype(np.float32)
  # A little noise keeps exact ties rare (they are tested on small cases; here they would only
  # cost time) and far below the gap between directions.
  video = directions[video_sig] + 1e-3 * rng.standard_normal((len(video_sig), 16))
  text = directions[text_sig] + 1e-3 * rng.standard_normal((len(text_sig), 16))
  np.savez(tmp_path / "emb.npz", video_emb=video, text_emb=text)
  out = tmp_path / "mir.json"
  assert (
    cli.main(
      [
        "eval",
        "ek100",
        "--embeddings",
        str(tmp_path / "emb.npz"),
        "--annotations",
        str(shared_dir / "data" / "ek100"),
        "--out",
        str(out),
      ]
    )
    == 0
  )
  record = json.loads(out.read_text())
  assert record["inputs"] == {"videos": 9668, "captions": 3842}
  assert [record["metrics"][f"mAP/{k}"] for k in ("video_to_text", "text_to_video", "average")] == [
    1.0,
    1.0,
    1.0,
  ]
  # Partial relevancies (0.5 for a shared verb, ...) still rank randomly, so nDCG is between
  # the random baseline (10.9%) and 1.
  assert 0.15 < record["metrics"]["nDCG/average"] < 1.0


def test_errors_are_one_line_with_status_2(tmp_path, capsys, shared_dir):
  np.savez(
    tmp_path / "emb.npz",
    image_emb=np.ones((3, 2), np.float32),
    text_emb=np.ones((4, 2), np.float32),
  )
  assert cli.main(["eval", "retrieval", "--embeddings", str(tmp_path / "emb.npz")]) == 2
  assert "missing caption->image map" in capsys.readouterr().err
  assert (
    cli.main(
      ["eval", "retrieval", "--embeddings", str(tmp_path / "emb.npz"), "--captions-per-image", "2"]
    )
    == 2
  )
  assert "needs 2 x 3 = 6 captions, got 4" in capsys.readouterr().err
  assert (
    cli.main(
      [
        "eval",
        "retrieval",
        "--embeddings",
        str(tmp_path / "emb.npz"),
        "--image-key",
        "img",
        "--captions-per-image",
        "1",
      ]
    )
    == 2
  )
  assert "emb.npz: has no array 'img'" in capsys.readouterr().err
  np.save(tmp_path / "sim.npy", np.zeros((5, 5), np.float32))
  assert (
    cli.main(
      [
        "eval",
        "ek100",
        "--similarity",
        str(tmp_path / "sim.npy"),
        "--annotations",
        str(shared_dir / "data" / "ek100"),
      ]
    )
    == 2
  )
  assert "expected 9668 videos x 3842 captions" in capsys.readouterr().err
  np.save(tmp_path / "rel.npy", np.zeros((5, 4), np.float32))
  assert (
    cli.main(
      [
        "eval",
        "ek100",
        "--similarity",
        str(tmp_path / "sim.npy"),
        "--relevancy",
        str(tmp_path / "rel.npy"),
      ]
    )
    == 2
  )
  assert (
    "rel.npy: has shape (5, 4); expected the similarity's shape (5, 5)" in capsys.readouterr().err
  )
