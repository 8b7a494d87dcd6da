"""The Flax sentence encoder against sentence-transformers' all-MiniLM-L6-v2 outputs
(../shared/reference/minilm_reference.npz, computed with PyTorch)."""

from __future__ import annotations

import json
import os
import shutil

import chex
import jax
import numpy as np
import pytest

from mmts_jax.clusters.encoder import BertConfig, BertEncoder, SentenceEncoder, default_model_dir
from mmts_jax.clusters.encoder.tokenize import bucket_length
from mmts_jax.clusters.encoder.weights import load_params


@pytest.fixture(scope="module")
def ref(shared_dir):
  with np.load(shared_dir / "reference" / "minilm_reference.npz") as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def encoder():
  # One device: the over-long sentence is a (2, 256) batch instead of (8, 256).
  return SentenceEncoder.load(None, devices=jax.devices()[:1])


def _cosine(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_parity_with_sentence_transformers_every_sentence(encoder, ref):
  sentences = [str(s) for s in ref["sentences"]]
  # The reference covers the empty, the one-letter, the unicode and the 1479-character sentence.
  assert "" in sentences and max(map(len, sentences)) > 1000
  assert any(ord(ch) > 127 for s in sentences for ch in s)
  got = encoder.encode(sentences, batch_size=16)
  assert got.dtype == np.float32 and got.shape == ref["embedding"].shape
  cos = _cosine(got, ref["embedding"])
  assert cos.min() >= 0.99999, (cos.min(), sentences[int(cos.argmin())][:40])
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_tokenizer_matches_reference_ids_and_truncates_at_max_seq_length(encoder, ref):
  assert encoder.max_seq_length == int(ref["max_seq_length"]) == 256
  ids = encoder.tokenizer([str(s) for s in ref["sentences"]])
  for i, x in enumerate(ids):
    expected = ref["input_ids"][i][ref["attention_mask"][i] > 0]
    np.testing.assert_array_equal(x, expected, err_msg=f"sentence {i}")
  assert max(len(x) for x in ids) == 256


def test_last_hidden_state_matches_reference(encoder, ref):
  short = np.flatnonzero(ref["attention_mask"].sum(1) <= 16)
  ids = ref["input_ids"][short, :16].astype(np.int32)
  mask = ref["attention_mask"][short, :16].astype(np.int32)
  model = BertEncoder(encoder.config, precision=jax.lax.Precision.HIGHEST)
  hidden = np.asarray(jax.jit(model.apply)(encoder.params, ids, mask))
  expected = ref["last_hidden_state"][short, :16]
  m = mask.astype(bool)
  np.testing.assert_allclose(hidden[m], expected[m], atol=2e-4, rtol=1e-4)


def test_sharded_over_eight_devices_equals_reference(ref):
  assert jax.device_count() == 8
  enc = SentenceEncoder.load(None)
  assert enc.num_devices == 8
  idx = np.flatnonzero(ref["attention_mask"].sum(1) <= 8)[:11]  # 11 rows: padded to 16
  got = enc.encode([str(s) for s in ref["sentences"][idx]], batch_size=16)
  assert _cosine(got, ref["embedding"][idx]).min() >= 0.99999


def _as_distilbert(src: str, dst) -> None:
  """Rewrites the MiniLM checkpoint in DistilBERT's layout (no token-type table: it is folded
  into the position table, which gives the same function)."""
  from safetensors.numpy import load_file, save_file

  w = load_file(os.path.join(src, "model.safetensors"))
  out = {
    "distilbert.embeddings.word_embeddings.weight": w["embeddings.word_embeddings.weight"],
    "distilbert.embeddings.position_embeddings.weight": w["embeddings.position_embeddings.weight"]
    + w["embeddings.token_type_embeddings.weight"][0],
    "distilbert.embeddings.LayerNorm.weight": w["embeddings.LayerNorm.weight"],
    "distilbert.embeddings.LayerNorm.bias": w["embeddings.LayerNorm.bias"],
  }
  names = {
    "attention.self.query": "attention.q_lin",
    "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin",
    "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
  }
  for i in range(6):
    for a, b in names.items():
      for p in ("weight", "bias"):
        out[f"distilbert.transformer.layer.{i}.{b}.{p}"] = w[f"encoder.layer.{i}.{a}.{p}"]
  save_file(out, os.path.join(dst, "model.safetensors"))
  with open(os.path.join(src, "config.json")) as f:
    bert = json.load(f)
  cfg = {
    "model_type": "distilbert",
    "vocab_size": bert["vocab_size"],
    "dim": 384,
    "n_layers": 6,
    "n_heads": 12,
    "hidden_dim": 1536,
    "activation": "gelu",
    "max_position_embeddings": 512,
  }
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f)
  for name in ("tokenizer.json", "sentence_bert_config.json", "modules.json"):
    shutil.copy(os.path.join(src, name), dst)
  shutil.copytree(os.path.join(src, "1_Pooling"), os.path.join(dst, "1_Pooling"))


def test_distilbert_layout_loads_and_matches_reference(tmp_path, ref):
  _as_distilbert(default_model_dir(), tmp_path)
  enc = SentenceEncoder.load(tmp_path, devices=jax.devices()[:1])
  assert enc.config.model_type == "distilbert" and enc.config.type_vocab_size == 0
  idx = np.flatnonzero(ref["attention_mask"].sum(1) <= 8)[:8]
  got = enc.encode([str(s) for s in ref["sentences"][idx]], batch_size=8)
  assert _cosine(got, ref["embedding"][idx]).min() >= 0.99999


def test_missing_weight_is_named(tmp_path):
  from safetensors.numpy import save_file

  cfg = BertConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16)
  save_file(
    {"embeddings.word_embeddings.weight": np.zeros((10, 8), np.float32)},
    str(tmp_path / "model.safetensors"),
  )
  with pytest.raises(KeyError, match="embeddings.position_embeddings.weight"):
    load_params(tmp_path, cfg)


def test_bad_arguments_raise_before_compiling(encoder, tmp_path):
  with pytest.raises(TypeError, match="single str"):
    encoder.encode("open door")
  with pytest.raises(ValueError, match="batch_size"):
    encoder.encode(["a"], batch_size=0)
  with pytest.raises(TypeError, match="sentence 1"):
    encoder.encode(["a", None])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    SentenceEncoder.load(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="config.json"):
    SentenceEncoder.load(tmp_path)
  with pytest.raises(ValueError, match="num_heads"):
    BertConfig(vocab_size=10, hidden_size=10, num_layers=1, num_heads=3, intermediate_size=4)


def test_bucket_lengths_bound_padding_and_shapes():
  lengths = np.arange(1, 513)
  buckets = np.array([bucket_length(int(n), 512) for n in lengths])
  assert np.all(buckets >= lengths) and buckets.max() == 512
  # Short captions (the EK-100 case) are not padded at all.
  np.testing.assert_array_equal(buckets[:16], lengths[:16])
  # Padding below 1/8 of the length; 16 exact shapes, then 8 per octave (17-32, ..., 257-512).
  assert np.all((buckets - lengths) / lengths < 1 / 8)
  assert np.unique(buckets).size == 16 + 8 * 5
  chex.assert_trees_all_equal(bucket_length(300, 256), 256)
  with pytest.raises(ValueError, match="got 0"):
    bucket_length(0, 256)


def test_padding_to_buckets_leaves_embeddings_unchanged(encoder, ref):
  # The same sentences alone (exact length) and batched with a longer one (padded).
  sentences = [str(s) for s in ref["sentences"]][:4]
  alone = np.concatenate([encoder.encode([s]) for s in sentences])
  together = encoder.encode(sentences, batch_size=4)
  chex.assert_trees_all_close(together, alone, atol=2e-6)


def test_empty_input_gives_empty_array(encoder):
  out = encoder.encode([])
  assert out.shape == (0, encoder.dim) and out.dtype == np.float32


def test_provenance_names_model_and_weights(encoder):
  p = encoder.provenance()
  assert p["model"] == "sentence-transformers/all-MiniLM-L6-v2"
  assert len(p["weights_sha256"]) == 64 and p["pooling"] == "mean" and p["normalize"]
