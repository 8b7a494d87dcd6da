"""The CLIP BPE tokenizer against OpenCLIP's (ids stored by tests/data/clip/make_reference.py)
and against transformers' `CLIPTokenizer` built from the same merges file."""

import json
import pathlib
import sys

import numpy as np
import pytest

from mmts_jax.models.clip.tokenizer import ClipTokenizer, default_bpe_path, write_tokenizer_dir

DATA = pathlib.Path(__file__).parent / "data" / "clip"


@pytest.fixture(scope="module")
def tok():
  return ClipTokenizer()


def test_ids_equal_open_clip_simple_tokenizer(tok):
  meta = json.loads((DATA / "clip_reference.json").read_text())
  ref = np.load(DATA / "clip_reference.npz")["tokenizer/open_clip_ids"]
  ids = tok(meta["tokenizer_texts"])
  assert ids.shape == ref.shape == (len(meta["tokenizer_texts"]), 77)
  for text, got, want in zip(meta["tokenizer_texts"], ids, ref, strict=True):
    np.testing.assert_array_equal(got, want, err_msg=repr(text))


def test_vocabulary_layout_and_truncation(tok):
  assert tok.vocab_size == 49408 and (tok.sot_id, tok.eot_id) == (49406, 49407)
  ids = tok(["word " * 100, ""], context_length=10)
  assert ids[0, 0] == 49406 and ids[0, -1] == 49407 and (ids[0, 1:-1] != 0).all()
  np.testing.assert_array_equal(ids[1], [49406, 49407] + [0] * 8)
  assert tok.decode(tok(["a Photo of 2 cats!"])[0]) == "a photo of 2 cats ! "
  with pytest.raises(ValueError, match="context_length"):
    tok(["x"], context_length=1)


def test_found_without_importing_open_clip_or_torch(tok):
  assert default_bpe_path().name == "bpe_simple_vocab_16e6.txt.gz"
  assert "open_clip" not in sys.modules  # its __init__ imports torch


def test_env_var_names_a_missing_file(monkeypatch, tmp_path):
  monkeypatch.setenv("MMTS_CLIP_BPE", str(tmp_path / "nope.txt.gz"))
  with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
    default_bpe_path()


def _random_texts(n, seed=0):
  rng = np.random.default_rng(seed)
  pieces = (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    + list(".,;:!?'\"()[]{}-_/#@%*+=~")
    + [
      "'s",
      "'ll",
      "n't",
      "\u00e9",
      "\u00fc",
      "\u00df",
      "\u4e2d",
      "\u6587",
      "\U0001f600",
      "\u00b0",
      "\u20ac",
    ]
    + [" "] * 12
  )
  return ["".join(rng.choice(pieces, size=int(rng.integers(0, 60)))) for _ in range(n)]


def test_ids_equal_tokenizers_json_and_transformers_on_random_text(tok, tmp_path):
  # The exported tokenizer.json through the data pipeline's loader (the `tokenizers` library,
  # the route `config.data.tokenizer=DIR` takes), and transformers' slow CLIPTokenizer built
  # from the same merges: three implementations, one set of ids.
  from mmts_jax.data.tokenize import TextTokenizer

  pipeline_tok = TextTokenizer(write_tokenizer_dir(tmp_path / "clip_bpe", tok), max_length=77)
  texts = _random_texts(200)
  ours = tok(texts)
  np.testing.assert_array_equal(pipeline_tok.batch(texts), ours)
  import transformers

  vocab = {
    (
      "<|startoftext|>"
      if t == "<start_of_text>"
      else "<|endoftext|>"
      if t == "<end_of_text>"
      else t
    ): i
    for t, i in tok.encoder.items()
  }
  (tmp_path / "vocab.json").write_text(json.dumps(vocab))
  (tmp_path / "merges.txt").write_text(
    "#version: 0.2\n" + "\n".join(" ".join(m) for m in tok.merges) + "\n"
  )
  hf = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
  for text, row in zip(texts, ours, strict=True):
    want = hf(text, truncation=True, max_length=77)["input_ids"]
    assert row[: len(want)].tolist() == want and not row[len(want) :].any(), repr(text)


def test_mmts_convert_clip_tokenizer_writes_a_pipeline_tokenizer(tok, tmp_path, capsys):
  from mmts_jax.cli import main as cli_main
  from mmts_jax.data.tokenize import TextTokenizer

  assert cli_main(["convert", "clip-tokenizer", "--out", str(tmp_path / "bpe")]) == 0
  assert "tokenizer.json" in capsys.readouterr().out
  texts = ["A dog on a skateboard.", "two cats, sleeping"]
  np.testing.assert_array_equal(TextTokenizer(tmp_path / "bpe", 77).batch(texts), tok(texts))
