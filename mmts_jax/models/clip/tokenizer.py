"""CLIP's byte-level BPE tokenizer (Radford et al. 2021), without PyTorch or ftfy.

`tokenize(texts)` gives the same ids as OpenCLIP's `SimpleTokenizer` (OpenAI's tokenizer):

  1. clean: repair-free text normalisation (NFC, curly quotes -> ASCII quotes, Latin ligatures
     and full-width forms -> ASCII, control characters dropped; ftfy's mojibake repair is not
     done), HTML entities unescaped twice, runs of whitespace -> one space, strip, lowercase;
  2. split with the regular expression (case-insensitive)
     `<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+`;
  3. map each piece's UTF-8 bytes to printable characters (GPT-2's byte-to-unicode table), mark
     the last character with `</w>` and merge pairs in the order of the 48,894 merge rules;
  4. `[SOT] + ids + [EOT]`, truncated to `context_length` (the last kept id becomes EOT) and
     zero-padded.

The vocabulary is 256 byte characters, the same with `</w>`, one token per merge rule and the
two special tokens: 49,408 ids, SOT = 49406, EOT = 49407. The merge rules are
`bpe_simple_vocab_16e6.txt.gz`, which ships inside the `open_clip_torch` wheel (installed with
`--no-deps`; found by path, the package is never imported since it imports torch), or any copy
named by `path=` or the `MMTS_CLIP_BPE` environment variable.

Example:
  >>> tok = ClipTokenizer()
  >>> ids = tok(["a photo of a cat"], context_length=8)
  >>> ids.tolist()
  [[49406, 320, 1125, 539, 320, 2368, 49407, 0]]
  >>> tok.decode(ids[0])
  'a photo of a cat '
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import os
import pathlib
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np
import regex

__all__ = [
  "ClipTokenizer",
  "default_bpe_path",
  "bytes_to_unicode",
  "clean_text",
  "write_tokenizer_dir",
]

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2
SOT, EOT = "<start_of_text>", "<end_of_text>"
_QUOTES = str.maketrans(
  {
    "\u2018": "'",
    "\u2019": "'",
    "\u201a": "'",
    "\u201b": "'",
    "\u2032": "'",
    "\u201c": '"',
    "\u201d": '"',
    "\u201e": '"',
    "\u201f": '"',
    "\u2033": '"',
  }
)
_LIGATURES = (
  "\u0132\u0133\u0149\u01c4\u01c5\u01c6\u01c7\u01c8\u01c9\u01ca\u01cb\u01cc"
  "\u01f1\u01f2\u01f3\ufb00\ufb01\ufb02\ufb03\ufb04\ufb05\ufb06"
)


def default_bpe_path() -> pathlib.Path:
  """`$MMTS_CLIP_BPE`, else the merges file inside the installed `open_clip` package.

  Raises:
    FileNotFoundError: neither exists (say how to install it).
  """
  env = os.environ.get("MMTS_CLIP_BPE")
  if env:
    path = pathlib.Path(env)
    if not path.is_file():
      raise FileNotFoundError(f"MMTS_CLIP_BPE={env!r} is not a file")
    return path
  spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
  for root in (spec.submodule_search_locations or []) if spec else []:
    path = pathlib.Path(root) / BPE_FILE
    if path.is_file():
      return path
  raise FileNotFoundError(
    f"CLIP BPE merges {BPE_FILE} not found: install the open_clip_torch wheel without its "
    "PyTorch dependency (`pip install --no-deps open_clip_torch`, done by `make install`) or "
    "set MMTS_CLIP_BPE to a copy of the file"
  )


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
  """Byte -> a printable character: printable Latin-1 bytes map to themselves, the other 68 to
  U+0100 onwards in byte order (so BPE never sees whitespace or control characters). The
  dict's order, printable bytes first, is the order of the first 256 vocabulary entries."""
  printable = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("\u00a1"), ord("\u00ac") + 1))
    + list(range(ord("\u00ae"), ord("\u00ff") + 1))
  )
  table, extra = {b: chr(b) for b in printable}, 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  return table  # insertion order (printable bytes first) is the vocabulary's order


def _normalise_unicode(text: str) -> str:
  text = unicodedata.normalize("NFC", text).translate(_QUOTES)
  out = []
  for ch in text:
    code = ord(ch)
    if ch in _LIGATURES or 0xFF01 <= code <= 0xFF5E or code == 0x3000:
      out.append(unicodedata.normalize("NFKC", ch))
    elif unicodedata.category(ch) == "Cc" and ch not in "\t\n\r":
      continue
    else:
      out.append(ch)
  return "".join(out)


def clean_text(text: str) -> str:
  """Step 1 of the module docstring.

  Example:
    >>> clean_text("  A \\u201cB\\u201d &amp;amp;  C\\n")
    'a "b" & c'
  """
  text = html.unescape(html.unescape(_normalise_unicode(text))).strip()
  return regex.sub(r"\s+", " ", text).strip().lower()


class ClipTokenizer:
  """CLIP's BPE over a merges file (see the module docstring)."""

  def __init__(self, path: str | os.PathLike | None = None):
    path = pathlib.Path(path) if path is not None else default_bpe_path()
    with gzip.open(path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    bad = [m for m in merges if len(m) != 2]
    if len(merges) != NUM_MERGES or bad:
      raise ValueError(
        f"{path}: expected {NUM_MERGES} merge rules of two symbols, got "
        f"{len(merges)} ({len(bad)} malformed)"
      )
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
    self.encoder = {token: i for i, token in enumerate(vocab)}
    self.decoder = {i: token for token, i in self.encoder.items()}
    self.ranks = {m: i for i, m in enumerate(merges)}
    self.merges = merges
    self.byte_encoder = bytes_to_unicode()
    self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
    self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
    self.vocab_size = len(vocab)
    self._pattern = regex.compile(
      rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
      regex.IGNORECASE,
    )
    self._cache: dict[str, tuple[str, ...]] = {SOT: (SOT,), EOT: (EOT,)}

  def bpe(self, piece: str) -> tuple[str, ...]:
    """One pre-token (byte characters) -> its BPE symbols; the last one ends with `</w>`."""
    if piece in self._cache:
      return self._cache[piece]
    word = list(piece[:-1]) + [piece[-1] + "</w>"]
    while len(word) > 1:
      pairs = {(a, b) for a, b in zip(word, word[1:], strict=False)}
      best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    self._cache[piece] = tuple(word)
    return self._cache[piece]

  def encode(self, text: str) -> list[int]:
    """A string -> its ids, without SOT / EOT."""
    ids = []
    for piece in self._pattern.findall(clean_text(text)):
      chars = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
      ids.extend(self.encoder[s] for s in self.bpe(chars))
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Ids -> text: SOT dropped, stops at EOT (the zero padding after it is not text, although
    id 0 is "!"); `</w>` becomes a space."""
    symbols = []
    for i in (int(i) for i in ids):
      if i == self.eot_id:
        break
      if i != self.sot_id:
        symbols.append(self.decoder[i])
    text = bytearray(self.byte_decoder[c] for c in "".join(symbols))
    return text.decode("utf-8", errors="replace").replace("</w>", " ")

  def __call__(self, texts: str | Sequence[str], context_length: int = 77) -> np.ndarray:
    """Texts -> (N, context_length) int32 ids `[SOT] + ids + [EOT]`, truncated (last id EOT)
    and zero-padded."""
    if isinstance(texts, str):
      texts = [texts]
    if int(context_length) < 2:
      raise ValueError(f"context_length must be >= 2 (SOT and EOT), got {context_length}")
    out = np.zeros((len(texts), int(context_length)), np.int32)
    for row, text in enumerate(texts):
      ids = [self.sot_id] + self.encode(text) + [self.eot_id]
      if len(ids) > context_length:
        ids = ids[:context_length]
        ids[-1] = self.eot_id
      out[row, : len(ids)] = ids
    return out


# Hugging Face spells the special tokens differently; the ids are the same.
_HF_SPECIALS = {SOT: "<|startoftext|>", EOT: "<|endoftext|>"}
_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def write_tokenizer_dir(
  directory: str | os.PathLike, tokenizer: ClipTokenizer | None = None, *, context_length: int = 77
) -> pathlib.Path:
  """Writes this BPE as a `tokenizers` library `tokenizer.json` (NFC, whitespace runs -> one
  space, lowercase, CLIP's split, byte-level BPE with `</w>`, SOT/EOT template) plus a
  `tokenizer_config.json` with OpenCLIP's padding (id 0), so that the input pipeline's
  tokenizer-directory loader (`mmts_jax.data.tokenize.TextTokenizer`, `config.data.tokenizer`)
  gives the same ids as `ClipTokenizer`. Differences: HTML entities are not unescaped and
  literal "<start_of_text>" text is not special (tests/test_clip_tokenizer.py checks the rest).

  Example:
    >>> import tempfile
    >>> from mmts_jax.data.tokenize import TextTokenizer
    >>> d = write_tokenizer_dir(tempfile.mkdtemp())
    >>> TextTokenizer(d, max_length=8)("a photo of a cat!").tolist()
    [49406, 320, 1125, 539, 320, 2368, 256, 49407]
  """
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

  tok = tokenizer or ClipTokenizer()
  vocab = {_HF_SPECIALS.get(t, t): i for t, i in tok.encoder.items()}
  bpe = models.BPE(
    vocab=vocab,
    merges=[(a, b) for a, b in tok.merges],
    end_of_word_suffix="</w>",
    unk_token=_HF_SPECIALS[EOT],
    fuse_unk=False,
    continuing_subword_prefix="",
  )
  fast = Tokenizer(bpe)
  fast.normalizer = normalizers.Sequence(
    [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
  )
  fast.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
  )
  sot, eot = _HF_SPECIALS[SOT], _HF_SPECIALS[EOT]
  fast.post_processor = processors.TemplateProcessing(
    single=f"{sot} $A {eot}", special_tokens=[(sot, tok.sot_id), (eot, tok.eot_id)]
  )
  fast.add_special_tokens([sot, eot])
  fast.decoder = decoders.ByteLevel()
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  fast.save(str(directory / "tokenizer.json"))
  config = {
    "model_max_length": int(context_length),
    "bos_token": sot,
    "eos_token": eot,
    "unk_token": eot,
    "pad_token": tok.decoder[0],
  }
  (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
  return directory
