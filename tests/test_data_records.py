"""ArrayRecord records, manifest and the dataset fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np
import pytest

from mmts_jax.data import records
from mmts_jax.data.fingerprint import Fingerprinter, dataset_fingerprint
from mmts_jax.data.sample_images import caption_of, make_image


def _examples(n, with_caption=True, seed=0):
  rng = np.random.default_rng(seed)
  for i in range(n):
    ex = {"image": make_image(i, rng), "key": f"k{i}", "label": i % 3}
    if with_caption:
      ex["caption"] = caption_of(i)
    yield ex


def test_fingerprint_matches_independent_sha256():
  caps = ["a dog", "", "un chat \u00e9t\u00e9", "a dog"]
  h = hashlib.sha256(b"mmts-dataset-v1\n4\n")
  for c in caps:
    b = c.encode("utf-8")
    h.update(struct.pack("<Q", len(b)) + b)
  assert dataset_fingerprint(caps) == "sha256:" + h.hexdigest()
  # The value the cluster-table stage documents for the same function.
  assert dataset_fingerprint(["open door", "take cup"])[:15] == "sha256:569530f4"
  assert dataset_fingerprint(["ab", "c"]) != dataset_fingerprint(["a", "bc"])
  assert dataset_fingerprint(caps) != dataset_fingerprint(caps[::-1])
  assert dataset_fingerprint(caps) != dataset_fingerprint(caps[:3])
  assert dataset_fingerprint([1, 2]) == dataset_fingerprint(["1", "2"])
  f = Fingerprinter(4)
  for c in caps:
    f.update(c)
  assert f.hexdigest() == dataset_fingerprint(caps) and f.count == 4
  with pytest.raises(TypeError, match="float"):
    dataset_fingerprint([1.5])
  short = Fingerprinter(5)
  short.update("x")
  with pytest.raises(ValueError, match="announced 5 keys but got 1"):
    short.hexdigest()


def test_roundtrip_shards_manifest_and_captions(tmp_path):
  out = tmp_path / "ds"
  exs = list(_examples(23))
  m = records.write_records(out, exs, records_per_shard=10, source={"kind": "test"})
  assert m.num_records == 23 and m.shard_lengths == (10, 10, 3)
  assert m.fingerprint == dataset_fingerprint(caption_of(i) for i in range(23))
  assert m.fingerprint_of == "caption"
  assert sorted(m.fields) == ["caption", "image", "index", "key", "label"]
  assert records.read_manifest(out) == m
  # No temporary file survives a completed write.
  assert sorted(os.listdir(out)) == [
    "captions.jsonl",
    "data-00000.array_record",
    "data-00001.array_record",
    "data-00002.array_record",
    "keys.jsonl",
    "manifest.json",
  ]
  src = records.RecordSource(out)
  assert len(src) == 23
  for i in (0, 9, 10, 22):
    r = src[i]
    assert r == {**exs[i], "index": i}
  assert [r["index"] for r in src.__getitems__([22, 3, 10])] == [22, 3, 10]
  assert records.read_captions(out) == [caption_of(i) for i in range(23)]
  assert records.read_keys(out) == [f"k{i}" for i in range(23)]
  with pytest.raises(IndexError, match="23"):
    src[23]


def test_fingerprint_over_keys_without_captions(tmp_path):
  m = records.write_records(tmp_path / "ds", _examples(5, with_caption=False))
  assert m.fingerprint_of == "key"
  assert m.fingerprint == dataset_fingerprint([f"k{i}" for i in range(5)])
  assert not (tmp_path / "ds" / "captions.jsonl").exists()
  assert records.read_keys(tmp_path / "ds") == [f"k{i}" for i in range(5)]
  with pytest.raises(ValueError, match="no captions"):
    records.read_captions(tmp_path / "ds")


def test_refuses_existing_dataset_and_overwrites_on_request(tmp_path):
  out = tmp_path / "ds"
  records.write_records(out, _examples(3))
  with pytest.raises(FileExistsError, match="overwrite"):
    records.write_records(out, _examples(3))
  records.write_records(out, _examples(9), records_per_shard=3, overwrite=True)
  m = records.write_records(out, _examples(4), overwrite=True)
  assert records.read_manifest(out).num_records == 4 == m.num_records
  assert sorted(p.name for p in out.glob("*.array_record")) == ["data-00000.array_record"]


def test_failed_write_leaves_no_dataset(tmp_path):
  out = tmp_path / "ds"

  def broken():
    yield from _examples(3)
    raise RuntimeError("source died")

  with pytest.raises(RuntimeError, match="source died"):
    records.write_records(out, broken())
  assert os.listdir(out) == [], os.listdir(out)
  with pytest.raises(FileNotFoundError, match="mmts prepare"):
    records.RecordSource(out)


def test_invalid_examples_are_rejected(tmp_path):
  w = records.RecordWriter(tmp_path / "a")
  with pytest.raises(TypeError, match="'caption' must be str"):
    w.write({"image": b"x", "caption": 3})
  with pytest.raises(ValueError, match="unknown record field 'img'"):
    w.write({"img": b"x"})
  w.write({"image": b"x", "caption": "c"})
  with pytest.raises(ValueError, match="fields"):
    w.write({"image": b"x"})
  w.abort()
  with pytest.raises(ValueError, match="records_per_shard"):
    records.RecordWriter(tmp_path / "b", records_per_shard=0)


def test_inconsistent_manifest_is_rejected(tmp_path):
  out = tmp_path / "ds"
  records.write_records(out, _examples(3))
  d = json.loads((out / "manifest.json").read_text())
  d["num_records"] = 4
  (out / "manifest.json").write_text(json.dumps(d))
  with pytest.raises(ValueError, match="num_records=4"):
    records.read_manifest(out)


def test_cluster_table_stage_computes_the_same_fingerprint(tmp_path):
  from mmts_jax.clusters import table as cluster_table

  m = records.write_records(tmp_path / "ds", _examples(6))
  captions = records.read_captions(tmp_path / "ds")
  assert cluster_table.dataset_fingerprint(captions) == m.fingerprint
  assert records.RecordSource(tmp_path / "ds").fingerprint == m.fingerprint
