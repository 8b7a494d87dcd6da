"""`mmts cluster` end to end: real EK-100 labels, a small caption file through the real encoder,
embeddings from .npy, and every bad input failing cleanly with no artifact left."""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from mmts_jax.cli import main as mmts
from mmts_jax.clusters.table import ClusterTable, dataset_fingerprint

CAPTIONS = [
  "open door",
  "close door",
  "open the fridge door",
  "close fridge",
  "open cupboard",
  "take cup",
  "pick up cup",
  "put down cup",
  "wash cup",
  "rinse mug",
  "cut onion",
  "chop onion",
  "slice tomato",
  "cut carrot",
  "dice pepper",
  "turn on tap",
  "turn off tap",
  "open tap",
  "close the tap",
  "wash hands",
]


def _write_csv(path, rows, columns):
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
  return str(path)


def test_labels_with_official_frequencies(shared_dir, tmp_path, capsys):
  d = shared_dir / "data" / "ek100"
  out = tmp_path / "nouns.npz"
  rc = mmts(
    [
      "cluster",
      str(d / "EPIC_100_retrieval_train_sentence.csv"),
      "--label-column",
      "noun_classes",
      "--frequencies",
      str(d / "ek100_noun_freq.csv"),
      "--id-column",
      "narration_id",
      "--class-names",
      str(d / "EPIC_100_noun_classes_v2.csv"),
      "--out",
      str(out),
      "--no-progress",
    ]
  )
  printed = capsys.readouterr().out
  assert rc == 0, printed
  table = ClusterTable.load(out)
  with open(d / "EPIC_100_retrieval_train_sentence.csv") as f:
    rows = list(csv.DictReader(f))
  with open(d / "ek100_noun_freq.csv") as f:
    freq = {r["class_id"]: int(r["count"]) for r in csv.DictReader(f)}
  first_noun = [r["noun_classes"].strip("[]").split(",")[0].strip() for r in rows]
  np.testing.assert_array_equal(table.per_sample_sizes(), [freq[n] for n in first_noun])
  table.validate(
    num_samples=len(rows), fingerprint=dataset_fingerprint(r["narration_id"] for r in rows)
  )
  assert table.provenance["source"] == "frequencies"
  assert "15989 samples" in printed and "K=3617" in printed and "'0 tap'" in printed
  assert "size histogram" in printed and "head:" in printed
  png = out.with_suffix(".png")
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_text_clusters_through_the_encoder(tmp_path, capsys):
  rows = [{"id": f"s{i}", "caption": c, "noun": c.split()[-1]} for i, c in enumerate(CAPTIONS)]
  src = _write_csv(tmp_path / "caps.csv", rows, ["id", "caption", "noun"])
  out = tmp_path / "text.npz"
  emb = tmp_path / "emb.npy"
  rc = mmts(
    [
      "cluster",
      src,
      "--text-column",
      "caption",
      "--id-column",
      "id",
      "--k",
      "4",
      "--seed",
      "1",
      "--compare-column",
      "noun",
      "--save-embeddings",
      str(emb),
      "--out",
      str(out),
      "--no-progress",
      "--no-plot",
      "--json",
    ]
  )
  summary = json.loads(capsys.readouterr().out)
  assert rc == 0
  table = ClusterTable.load(out)
  p = table.provenance
  assert p["source"] == "text" and p["k"] == 4 and p["seed"] == 1 and len(p["weights_sha256"]) == 64
  assert p["model"] == "sentence-transformers/all-MiniLM-L6-v2"
  assert table.num_samples == 20 and table.sizes.sum() == 20
  x = np.load(emb)
  np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
  # Semantics survive: every door caption shares a cluster with another door caption.
  ids = table.cluster_ids
  assert ids[0] == ids[1] and ids[15] == ids[16]
  assert 0.0 < summary["nmi"]["value"] <= 1.0
  assert summary["largest"][0]["examples"]
  assert not os.path.exists(out.with_suffix(".png"))


def test_embeddings_from_npy_with_jax_backend(tmp_path, capsys):
  x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
  x[:32] += 5.0
  np.save(tmp_path / "e.npy", x)
  out = tmp_path / "e.npz"
  rc = mmts(
    [
      "cluster",
      str(tmp_path / "e.npy"),
      "--k",
      "2",
      "--backend",
      "jax",
      "--out",
      str(out),
      "--no-progress",
      "--no-plot",
    ]
  )
  assert rc == 0, capsys.readouterr().err
  table = ClusterTable.load(out)
  assert table.provenance["source"] == "embeddings" and table.fingerprint is None
  assert sorted(table.sizes.tolist()) == [32, 32]
  assert len(set(table.cluster_ids[:32])) == 1 and len(set(table.cluster_ids[32:])) == 1


def _fails(argv, capsys, tmp_path, message):
  rc = mmts(["cluster", *argv, "--no-progress"])
  err = capsys.readouterr().err
  assert rc == 2, err
  assert message in err, err
  assert not [f for f in os.listdir(tmp_path) if f.endswith((".npz", ".png", ".tmp"))]


def test_bad_inputs_fail_cleanly_without_artifacts(tmp_path, capsys):
  rows = [{"id": str(i), "caption": c} for i, c in enumerate(CAPTIONS[:5])]
  src = _write_csv(tmp_path / "c.csv", rows, ["id", "caption"])
  out = str(tmp_path / "t.npz")
  _fails(
    [src, "--text-column", "narration", "--out", out], capsys, tmp_path, "has no column 'narration'"
  )
  _fails(
    [src, "--text-column", "caption", "--k", "6", "--out", out],
    capsys,
    tmp_path,
    "k=6 is larger than the number of samples (5)",
  )
  empty = _write_csv(tmp_path / "empty.csv", [], ["id", "caption"])
  _fails([empty, "--text-column", "caption", "--out", out], capsys, tmp_path, "has no rows")
  bad = np.ones((10, 4), np.float32)
  bad[3, 1] = np.nan
  np.save(tmp_path / "nan.npy", bad)
  _fails(
    [str(tmp_path / "nan.npy"), "--k", "2", "--out", out],
    capsys,
    tmp_path,
    "non-finite value(s), first at row 3",
  )
  _fails(
    [src, "--label-column", "caption", "--frequencies", src, "--out", out],
    capsys,
    tmp_path,
    "expected a finite number >= 0",
  )


def test_validate_detects_a_table_built_for_another_dataset(tmp_path, capsys):
  rows = [{"id": str(i), "caption": c, "cls": str(i % 3)} for i, c in enumerate(CAPTIONS)]
  src = _write_csv(tmp_path / "a.csv", rows, ["id", "caption", "cls"])
  table = str(tmp_path / "a.npz")
  assert (
    mmts(
      ["cluster", src, "--label-column", "cls", "--id-column", "id", "--out", table, "--no-plot"]
    )
    == 0
  )
  assert mmts(["cluster", src, "--id-column", "id", "--validate", table]) == 0
  other = _write_csv(tmp_path / "b.csv", rows[::-1], ["id", "caption", "cls"])
  capsys.readouterr()
  assert mmts(["cluster", other, "--id-column", "id", "--validate", table]) == 2
  assert "different content or order" in capsys.readouterr().err
  shorter = _write_csv(tmp_path / "c.csv", rows[:-1], ["id", "caption", "cls"])
  assert mmts(["cluster", shorter, "--id-column", "id", "--validate", table]) == 2
  assert "built for 20 samples but the dataset has 19" in capsys.readouterr().err
