"""A synthetic long-tail image-caption dataset with a known class structure.

Classes have Zipf sizes: the class of rank `r` (1-based) has `n_r = floor(n_1 * r^{-s})` training
samples with `s = ln(imbalance) / ln(C)`, so `n_1 / n_C >= imbalance`. Every sample has a latent
code

  `z_i = mu_{c_i} + e_i`, `mu_c ~ N(0, scale^2 I)` (class prototype), `e_i ~ N(0, I)` (own part),

seen through two views:

- image: `x_i = W_2 tanh(W_1 z_i) + noise`, a fixed random nonlinear map (a stand-in for a frozen
  image backbone's features);
- caption: a real English string, `a <noun>, a <colour> <size> <noun> <action> <place>`: the noun
  names the class, each attribute word is the quantile bin of one coordinate of `e_i` (so
  captions of a class share words, and similar samples share more of them).

Head classes therefore hold many near-duplicate semantics (same noun, same attribute words):
same-class negatives in a batch, which is what MM-TS's larger head temperature tolerates. The
test split is class-balanced (`test_per_class` per class), the usual long-tail protocol, so head
and tail recall are measured on the same footing.

Task knobs (each default reproduces the original data bit for bit):

- `imbalance`: `n_1 / n_C`, the steepness of the Zipf sizes.
- `head_duplicates`: the fraction `f` of the largest class's samples that are *semantic
  near-duplicates* (false negatives when they meet in a batch): their per-sample part is another
  sample's of the class plus noise (std `duplicate_jitter` x the class spread), so they share
  its caption words and nearly its image. The fraction falls with the class size like the spread,
  `f_c = f * ln(n_c/n_C) / ln(n_1/n_C)`, to 0 in the smallest class. Applied to every split.
- `val_per_class`: a class-balanced validation split drawn after the test split (0: none), for
  selecting hyper-parameters without touching the test split.

Example:
  >>> ds = make_dataset(GeneratorConfig(num_classes=8, head_size=200, imbalance=100))
  >>> int(ds.class_sizes.max() // ds.class_sizes.min()) >= 100
  True
  >>> ds.train.captions[0]
  'a dog, a yellow medium dog rolling in a park'
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics

import numpy as np

from mmts_jax.longtail import words

__all__ = [
  "GeneratorConfig",
  "Split",
  "SyntheticDataset",
  "zipf_class_sizes",
  "make_dataset",
  "build_vocab",
  "tokenize",
]

PAD = "<pad>"
_WORD = re.compile(r"[a-z]+")


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
  """Knobs of the synthetic dataset; every field is validated on construction.

  Attributes:
    num_classes: `C`, at most `len(words.CLASS_NOUNS)`.
    head_size: training samples of the largest class, `n_1`.
    imbalance: `n_1 / n_C` (at least this, after flooring).
    latent_dim: dimension of `z`; the first 4 coordinates of `e_i` are the caption attributes.
    image_dim: dimension of the image feature `x`.
    hidden_dim: width of the random map.
    class_scale: std of the class prototypes relative to the per-sample part (larger: classes
      further apart).
    head_spread: std of the per-sample part in the largest class (1 in the smallest, geometric
      in between, see `class_spread`): head classes are dense in near-duplicates.
    image_noise: std of the additive noise of the image view.
    test_per_class: samples of every class in the balanced test split.
    head_min_size: classes with `n_c >= head_min_size` are head (default `n_1 // 10`).
    tail_max_size: classes with `n_c < tail_max_size` are tail (default `2 * n_C`).
    max_len: token length of a caption (padded with 0).
    seed: seeds everything (prototypes, samples, map, noise, order).
    head_duplicates: fraction of the largest class that are near-duplicates of another sample
      of it, in [0, 1); falls to 0 in the smallest class (see the module docstring).
    duplicate_jitter: std of the noise added to a near-duplicate's copy, relative to the
      class's spread, >= 0.
    val_per_class: samples of every class in the balanced validation split (0: no split).
  """

  num_classes: int = 40
  head_size: int = 1000
  imbalance: float = 100.0
  latent_dim: int = 16
  image_dim: int = 64
  hidden_dim: int = 128
  class_scale: float = 1.0
  head_spread: float = 0.3
  image_noise: float = 0.1
  test_per_class: int = 20
  head_min_size: int | None = None
  tail_max_size: int | None = None
  max_len: int = 12
  seed: int = 0
  head_duplicates: float = 0.0
  duplicate_jitter: float = 0.05
  val_per_class: int = 0

  def __post_init__(self):
    if not 2 <= self.num_classes <= len(words.CLASS_NOUNS):
      raise ValueError(
        f"num_classes must be in [2, {len(words.CLASS_NOUNS)}], got {self.num_classes}"
      )
    if not (math.isfinite(self.imbalance) and self.imbalance >= 1):
      raise ValueError(f"imbalance must be a finite number >= 1, got {self.imbalance}")
    if self.head_size / self.imbalance < 1:
      raise ValueError(
        f"head_size / imbalance must be >= 1 sample, got head_size="
        f"{self.head_size}, imbalance={self.imbalance}"
      )
    if self.latent_dim < len(words.ATTRIBUTE_SLOTS):
      raise ValueError(
        f"latent_dim must be >= {len(words.ATTRIBUTE_SLOTS)} (one coordinate per "
        f"caption attribute), got {self.latent_dim}"
      )
    for name in ("image_dim", "hidden_dim", "test_per_class"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if not self.class_scale > 0 or not self.image_noise >= 0 or not 0 < self.head_spread <= 1:
      raise ValueError(
        f"class_scale must be > 0, image_noise >= 0 and head_spread in (0, 1], "
        f"got class_scale={self.class_scale}, image_noise={self.image_noise}, "
        f"head_spread={self.head_spread}"
      )
    if not (0 <= self.head_duplicates < 1 and self.duplicate_jitter >= 0):
      raise ValueError(
        f"head_duplicates must be in [0, 1) and duplicate_jitter >= 0, got "
        f"head_duplicates={self.head_duplicates}, "
        f"duplicate_jitter={self.duplicate_jitter}"
      )
    if self.val_per_class < 0:
      raise ValueError(f"val_per_class must be >= 0, got {self.val_per_class}")
    if self.max_len < 10:
      raise ValueError(f"max_len must be >= 10 (the longest caption), got {self.max_len}")

  @property
  def min_size(self) -> int:
    return max(1, math.floor(self.head_size / self.imbalance))

  @property
  def head_threshold(self) -> int:
    return self.head_min_size if self.head_min_size is not None else max(2, self.head_size // 10)

  @property
  def tail_threshold(self) -> int:
    return self.tail_max_size if self.tail_max_size is not None else 2 * self.min_size


@dataclasses.dataclass(frozen=True)
class Split:
  """One split; row `i` is the sample whose stable `index` is `i`.

  Attributes:
    image: `(N, image_dim)` float32 image features.
    tokens: `(N, max_len)` int32 caption token ids (0 is padding).
    captions: the `N` caption strings.
    label: `(N,)` int32 class ids (0 is the largest class).
    index: `(N,)` int32, `arange(N)`: the per-sample key of the shift table.
    latent: `(N, latent_dim)` float32 latent codes `z`.
  """

  image: np.ndarray
  tokens: np.ndarray
  captions: tuple[str, ...]
  label: np.ndarray
  index: np.ndarray
  latent: np.ndarray

  def __len__(self) -> int:
    return len(self.captions)

  def arrays(self) -> dict[str, np.ndarray]:
    """The model inputs as a dict of arrays: `image`, `text` (token ids), `index`, `label`."""
    return {"image": self.image, "text": self.tokens, "index": self.index, "label": self.label}


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
  """A long-tailed train split, balanced test (and validation) splits, the class structure."""

  config: GeneratorConfig
  train: Split
  test: Split
  class_sizes: np.ndarray  # (C,) training samples per class, descending
  head_classes: np.ndarray  # (C,) bool
  tail_classes: np.ndarray  # (C,) bool
  class_names: tuple[str, ...]
  vocab: tuple[str, ...]
  val: Split | None = None  # balanced, `config.val_per_class` per class; None if 0

  @property
  def imbalance(self) -> float:
    return float(self.class_sizes.max() / self.class_sizes.min())

  def group_of(self, label: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks `all`, `head`, `tail` over samples with class ids `label`."""
    label = np.asarray(label)
    return {
      "all": np.ones(label.shape, bool),
      "head": self.head_classes[label],
      "tail": self.tail_classes[label],
    }

  def fingerprint(self) -> str:
    """The cluster table's dataset fingerprint of the training captions in index order."""
    from mmts_jax.clusters.table import dataset_fingerprint

    return dataset_fingerprint(self.train.captions)


def zipf_class_sizes(num_classes: int, head_size: int, imbalance: float) -> np.ndarray:
  """`n_r = max(1, floor(head_size * r^{-s}))`, `s = ln(imbalance)/ln(C)`, for `r = 1..C`.

  Example:
    >>> zipf_class_sizes(5, 100, 10).tolist()
    [100, 37, 20, 13, 10]
  """
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  if head_size < 1 or imbalance < 1:
    raise ValueError(
      f"head_size and imbalance must be >= 1, got head_size={head_size}, imbalance={imbalance}"
    )
  exponent = math.log(imbalance) / math.log(num_classes)
  ranks = np.arange(1, num_classes + 1, dtype=np.float64)
  # The small epsilon keeps exact integers (e.g. 1000 / 100) from flooring one below.
  sizes = np.floor(head_size * ranks**-exponent + 1e-9).astype(np.int64)
  return np.maximum(sizes, 1)


def class_spread(sizes: np.ndarray, head_spread: float) -> np.ndarray:
  """Std of the per-sample part of each class: `head_spread` for the largest, 1 for the smallest.

  Geometric in the class size, `sigma_c = head_spread ** (ln(n_c/n_min) / ln(n_max/n_min))`, so
  head classes are dense in near-duplicates and tail classes spread out.

  Example:
    >>> class_spread(np.array([100, 10, 1]), 0.25).round(3).tolist()
    [0.25, 0.5, 1.0]
  """
  sizes = np.asarray(sizes, np.float64)
  span = math.log(sizes.max() / sizes.min())
  frac = np.log(sizes / sizes.min()) / span if span > 0 else np.zeros_like(sizes)
  return head_spread**frac


def build_vocab() -> tuple[str, ...]:
  """Token vocabulary: `<pad>` (id 0), then every word the captions can use, in a fixed order."""
  vocab = [PAD]
  template = re.sub(r"\{\w+\}", " ", words.CAPTION_TEMPLATE)
  pieces = [template, *words.CLASS_NOUNS]
  pieces += [w for slot in words.ATTRIBUTE_SLOTS for w in words.ATTRIBUTES[slot]]
  for piece in pieces:
    for w in _WORD.findall(piece):
      if w not in vocab:
        vocab.append(w)
  return tuple(vocab)


def tokenize(captions, vocab: tuple[str, ...], max_len: int) -> np.ndarray:
  """Lower-case words (punctuation dropped) -> ids in `vocab`, right-padded with 0 to `max_len`."""
  lookup = {w: i for i, w in enumerate(vocab)}
  out = np.zeros((len(captions), max_len), np.int32)
  for row, caption in enumerate(captions):
    try:
      ids = [lookup[w] for w in _WORD.findall(caption.lower())]
    except KeyError as e:
      raise ValueError(
        f"caption {caption!r} has a word {e.args[0]!r} outside the vocabulary"
      ) from e
    if len(ids) > max_len:
      raise ValueError(f"caption {caption!r} has {len(ids)} tokens > max_len={max_len}")
    out[row, : len(ids)] = ids
  return out


def _attribute_bins(values: np.ndarray, num_words: int) -> np.ndarray:
  """Equiprobable bins of N(0, 1): word `k` covers the k-th `1/num_words` quantile range."""
  edges = [statistics.NormalDist().inv_cdf(q) for q in np.arange(1, num_words) / num_words]
  return np.searchsorted(np.asarray(edges), values)


def _captions(label: np.ndarray, own: np.ndarray, class_names) -> tuple[str, ...]:
  slots = words.ATTRIBUTE_SLOTS
  bins = [_attribute_bins(own[:, k], len(words.ATTRIBUTES[s])) for k, s in enumerate(slots)]
  return tuple(
    words.CAPTION_TEMPLATE.format(
      noun=class_names[c],
      **{s: words.ATTRIBUTES[s][b[i]] for s, b in zip(slots, bins, strict=True)},
    )
    for i, c in enumerate(label)
  )


def duplicate_fraction(sizes: np.ndarray, head_duplicates: float) -> np.ndarray:
  """Per class, the fraction of near-duplicates: `f ln(n_c/n_min) / ln(n_max/n_min)`.

  Example:
    >>> duplicate_fraction(np.array([100, 10, 1]), 0.5).tolist()
    [0.5, 0.25, 0.0]
  """
  sizes = np.asarray(sizes, np.float64)
  span = math.log(sizes.max() / sizes.min())
  frac = np.log(sizes / sizes.min()) / span if span > 0 else np.zeros_like(sizes)
  return head_duplicates * frac


def _near_duplicates(own, label, dup_frac, jitter: np.ndarray, rng) -> np.ndarray:
  """Overwrites `round(f_c n)` samples of each class with a jittered copy of another of it."""
  own = own.copy()
  for c in np.flatnonzero(dup_frac > 0):
    members = np.flatnonzero(label == c)
    k = int(round(dup_frac[c] * len(members)))
    if k < 1 or len(members) < 2:
      continue
    # Copies come from the samples that stay originals, so a duplicate never copies a copy.
    chosen = rng.permutation(members)
    copies, originals = chosen[:k], chosen[k:]
    src = originals[rng.integers(0, len(originals), k)]
    own[copies] = own[src] + jitter[c] * rng.standard_normal((k, own.shape[1]))
  return own


def _split(
  label, prototypes, spread, image_map, cfg, vocab, class_names, rng, dup_frac=None
) -> Split:
  n = len(label)
  own = rng.standard_normal((n, cfg.latent_dim)) * spread[label][:, None]
  if dup_frac is not None and np.any(dup_frac > 0):  # no draw at 0: the original data
    own = _near_duplicates(own, label, dup_frac, cfg.duplicate_jitter * spread, rng)
  latent = prototypes[label] + own
  w1, w2 = image_map
  image = np.tanh(latent @ w1) @ w2 + cfg.image_noise * rng.standard_normal((n, cfg.image_dim))
  captions = _captions(label, own, class_names)
  return Split(
    image=image.astype(np.float32),
    tokens=tokenize(captions, vocab, cfg.max_len),
    captions=captions,
    label=label.astype(np.int32),
    index=np.arange(n, dtype=np.int32),
    latent=latent.astype(np.float32),
  )


def make_dataset(cfg: GeneratorConfig = GeneratorConfig()) -> SyntheticDataset:
  """Draws the dataset of `cfg`; the same `cfg` (seed included) gives identical arrays."""
  if not isinstance(cfg, GeneratorConfig):
    raise TypeError(f"cfg must be a GeneratorConfig, got {type(cfg).__name__}")
  rng = np.random.default_rng(cfg.seed)
  sizes = zipf_class_sizes(cfg.num_classes, cfg.head_size, cfg.imbalance)
  class_names = tuple(words.CLASS_NOUNS[: cfg.num_classes])
  vocab = build_vocab()
  prototypes = cfg.class_scale * rng.standard_normal((cfg.num_classes, cfg.latent_dim))
  image_map = (
    rng.standard_normal((cfg.latent_dim, cfg.hidden_dim)) / math.sqrt(cfg.latent_dim),
    rng.standard_normal((cfg.hidden_dim, cfg.image_dim)) / math.sqrt(cfg.hidden_dim),
  )
  # Shuffled order, so that any contiguous batch mixes classes; `index` is the shuffled position.
  train_label = rng.permutation(np.repeat(np.arange(cfg.num_classes), sizes))
  test_label = rng.permutation(np.repeat(np.arange(cfg.num_classes), cfg.test_per_class))
  spread = class_spread(sizes, cfg.head_spread)
  dup = duplicate_fraction(sizes, cfg.head_duplicates)
  train = _split(train_label, prototypes, spread, image_map, cfg, vocab, class_names, rng, dup)
  test = _split(test_label, prototypes, spread, image_map, cfg, vocab, class_names, rng, dup)
  val = None
  if cfg.val_per_class:  # drawn last: train and test are those of val_per_class=0
    val_label = rng.permutation(np.repeat(np.arange(cfg.num_classes), cfg.val_per_class))
    val = _split(val_label, prototypes, spread, image_map, cfg, vocab, class_names, rng, dup)
  return SyntheticDataset(
    config=cfg,
    train=train,
    test=test,
    class_sizes=sizes,
    head_classes=sizes >= cfg.head_threshold,
    tail_classes=sizes < cfg.tail_threshold,
    class_names=class_names,
    vocab=vocab,
    val=val,
  )
