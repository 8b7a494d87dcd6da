r"""EK-100 features for feature-level fine-tuning, derived from the real annotations.

AVION fine-tunes on EPIC-KITCHENS-100 from video clips; feature-level fine-tuning trains only
projection heads on frozen per-clip features. The clips cannot be shipped, so this module builds
**synthetic features standing in for frozen AVION features** from the real annotations: every
sample gets a class-derived latent plus noise, seen through a fixed random map per modality.

For a sample with verb class `v` and noun classes `N` (the EK-100 MIR relevancy uses the same
two fields):

.. math::
  z = \tfrac{1}{\sqrt 2}\,\big(E^{verb}_v + \tfrac{1}{|N|}\textstyle\sum_{n \in N} E^{noun}_n\big),
  \qquad x_m = z\,W_m + \sigma\,\epsilon_m,\quad m \in \{video, text\},

with `E ~ N(0, 1)` class embeddings (latent_dim columns), `W_m ~ N(0, 1/latent_dim)` a fixed
(latent_dim, dim_m) map per modality and `epsilon_m ~ N(0, 1)` drawn per sample and modality. All
randomness comes from `FeatureSpec.seed` (class embeddings and maps) and the split name (noise),
so the train and validation splits share the maps but not the noise. Raw video and text
features are not comparable (different maps, different widths): the heads have to learn the
alignment, and samples of a class are as related as the class structure makes them, so MIR
mAP / nDCG measure what they measure on real features.

Splits:
* train: the 15,989 distinct captions of `EPIC_100_retrieval_train_sentence.csv`, one
  (video, text) pair each, `index` = row number, the dataset fingerprint taken over the
  `narration_id` column (what `mmts cluster ... --id-column narration_id` computes, so a table
  built by the CLI validates against these features).
* validation (the MIR test split): the 9,668 videos of `EPIC_100_retrieval_test.csv` and the
  3,842 captions of `EPIC_100_retrieval_test_sentence.csv`, each caption with the classes of
  its `narration_id` (`mmts_jax.eval.read_ek100_mir`).

The cluster table is the paper's EK-100 setting: a sample's cluster is its main noun class (the
first of `noun_classes`) and `K_c` that class's count in the official frequency table of the
67,217 training narrations (`ek100_noun_freq.csv`).

Example:
  >>> import tempfile  # the annotations are ../shared/data/ek100 from the repository root
  >>> files = build_ek100_features("../shared/data/ek100", tempfile.mkdtemp())
  >>> train = np.load(files.train)
  >>> train["image_features"].shape, train["text_features"].shape
  ((15989, 64), (15989, 48))
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from mmts_jax import array_files
from mmts_jax.clusters.table import ClusterTable, atomic_write, dataset_fingerprint
from mmts_jax.data.features import save_features
from mmts_jax.errors import MissingFileError, UserInputError
from mmts_jax.eval.relevancy import Ek100MirAnnotations, parse_class_list, read_ek100_mir
from mmts_jax.table_files import Table, read_table

__all__ = [
  "TRAIN_CSV",
  "NOUN_FREQ_CSV",
  "Ek100Train",
  "FeatureSpec",
  "read_ek100_train",
  "read_frequencies",
  "noun_cluster_table",
  "ClassFeatureMaps",
  "Ek100FeatureFiles",
  "build_ek100_features",
  "load_val_features",
]

TRAIN_CSV = "EPIC_100_retrieval_train_sentence.csv"
NOUN_FREQ_CSV = "ek100_noun_freq.csv"
VERB_CLASSES_CSV = "EPIC_100_verb_classes.csv"
NOUN_CLASSES_CSV = "EPIC_100_noun_classes_v2.csv"
_VAL_FORMAT = "mmts_jax.Ek100ValFeatures"


@dataclasses.dataclass(frozen=True)
class Ek100Train:
  """The distinct training captions with their classes, in CSV order (row i = `index` i)."""

  narration_ids: tuple[str, ...]
  captions: tuple[str, ...]
  verbs: np.ndarray  # (N,) int64
  nouns: tuple[tuple[int, ...], ...]  # noun classes per caption, main noun first

  def __len__(self) -> int:
    return len(self.narration_ids)

  @property
  def main_nouns(self) -> np.ndarray:
    """(N,) int64: the first noun class of each caption (MM-TS's EK-100 cluster)."""
    return np.fromiter((n[0] for n in self.nouns), np.int64, len(self.nouns))

  @property
  def fingerprint(self) -> str:
    """`dataset_fingerprint` over the narration ids in row order."""
    return dataset_fingerprint(self.narration_ids)


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """Shapes and randomness of the synthetic features (see the module docstring)."""

  video_dim: int = 64
  text_dim: int = 48
  latent_dim: int = 32
  noise: float = 1.0
  seed: int = 0

  def __post_init__(self):
    for name in ("video_dim", "text_dim", "latent_dim"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"FeatureSpec.{name} must be a positive int, got {value!r}")
    if not (np.isfinite(self.noise) and self.noise >= 0):
      raise ValueError(f"FeatureSpec.noise must be finite and >= 0, got {self.noise!r}")
    if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
      raise ValueError(f"FeatureSpec.seed must be an int >= 0, got {self.seed!r}")


def _table(path: pathlib.Path, required: Sequence[str]) -> Table:
  if not path.is_file():
    raise MissingFileError(path, "does not exist", expected="an EK-100 annotation CSV")
  return read_table(os.fspath(path), required, kind="csv")


def _int_column(t: Table, column: str, what: str = "an integer class id") -> np.ndarray:
  out = np.empty(len(t.rows), np.int64)
  for i, r in enumerate(t.rows):
    try:
      out[i] = int(r[column].strip())
    except ValueError:
      raise UserInputError(
        t.path, f"{column} is {r[column]!r}", line=t.lines[i], key=column, expected=what
      ) from None
  return out


def read_ek100_train(directory: str | os.PathLike) -> Ek100Train:
  """Reads `EPIC_100_retrieval_train_sentence.csv` (narration_id, narration, verb_class,
  noun_classes).

  Raises:
    FileNotFoundError: the CSV is missing. ValueError (`UserInputError`, naming the line): a
    missing column, a malformed class list or a duplicate narration_id (each row must be one
    sample).
  """
  path = pathlib.Path(directory) / TRAIN_CSV
  t = _table(path, ("narration_id", "narration", "verb_class", "noun_classes"))
  rows = t.rows
  ids = tuple(r["narration_id"] for r in rows)
  seen: dict[str, int] = {}
  for i, nid in enumerate(ids):
    if nid in seen:
      raise UserInputError(
        path,
        f"narration_id {nid!r} repeats line {t.lines[seen[nid]]}",
        line=t.lines[i],
        key="narration_id",
        expected="unique narration ids",
      )
    seen[nid] = i
  return Ek100Train(
    narration_ids=ids,
    captions=tuple(r["narration"] for r in rows),
    verbs=_int_column(t, "verb_class"),
    nouns=tuple(
      parse_class_list(r["noun_classes"], f"{path}:{t.lines[i]}", "noun_classes", non_empty=True)
      for i, r in enumerate(rows)
    ),
  )


def read_frequencies(path: str | os.PathLike) -> dict[str, int]:
  """`class_id,count` table (the official EK-100 frequency CSVs) -> {class id: count}."""
  t = _table(pathlib.Path(path), ("class_id", "count"))
  counts = _int_column(t, "count", "an integer count >= 0")
  for i, c in enumerate(counts):
    if c < 0:
      raise UserInputError(
        t.path, f"count is {c}", line=t.lines[i], key="count", expected="an integer count >= 0"
      )
  return {str(r["class_id"]).strip(): int(c) for r, c in zip(t.rows, counts, strict=True)}


def noun_cluster_table(train: Ek100Train, frequencies: str | os.PathLike) -> ClusterTable:
  """The EK-100 class-label cluster table: cluster = main noun class, `K_c` = its count in the
  official frequency table. Fingerprinted like `mmts cluster --id-column narration_id`.

  Raises:
    ValueError: a noun class without an entry in the frequency table (the message names it).
  """
  freq = read_frequencies(frequencies)
  return ClusterTable.from_frequencies(
    train.main_nouns.tolist(),
    freq,
    fingerprint=train.fingerprint,
    fingerprint_keys="column:narration_id",
    column="noun_classes",
    frequency_table=os.path.basename(os.fspath(frequencies)),
  )


def _num_classes(directory: pathlib.Path, name: str, used: np.ndarray) -> int:
  """Class vocabulary size from the EK-100 class CSV (ids are 0..C-1); at least max used + 1."""
  ids = _int_column(_table(directory / name, ("id",)), "id")
  return max(int(ids.max()) + 1, int(used.max()) + 1 if used.size else 0)


class ClassFeatureMaps:
  """The fixed class embeddings and per-modality maps of one `FeatureSpec` (module docstring).

  Example:
    >>> maps = ClassFeatureMaps(FeatureSpec(video_dim=4, text_dim=3, latent_dim=2), 5, 7)
    >>> maps.features("video", [0, 1], [(2,), (2, 3)], rng=np.random.default_rng(0)).shape
    (2, 4)
  """

  def __init__(self, spec: FeatureSpec, num_verbs: int, num_nouns: int):
    self.spec = spec
    rng = np.random.default_rng([spec.seed, 0])
    self.verb_emb = rng.normal(size=(num_verbs, spec.latent_dim))
    self.noun_emb = rng.normal(size=(num_nouns, spec.latent_dim))
    scale = 1.0 / np.sqrt(spec.latent_dim)
    self.maps = {
      "video": rng.normal(scale=scale, size=(spec.latent_dim, spec.video_dim)),
      "text": rng.normal(scale=scale, size=(spec.latent_dim, spec.text_dim)),
    }

  def latent(self, verbs, nouns: Sequence[Sequence[int]]) -> np.ndarray:
    """(n, latent_dim) float64 class-derived latents."""
    verbs = np.asarray(verbs, np.int64)
    if verbs.shape != (len(nouns),):
      raise ValueError(f"one verb per noun set needed, got {verbs.shape} for {len(nouns)} sets")
    lengths = np.array([len(s) for s in nouns])
    if verbs.size and (lengths.min() == 0):
      raise ValueError("every sample needs at least one noun class")
    for name, ids, table in (
      ("verb", verbs, self.verb_emb),
      ("noun", np.fromiter((c for s in nouns for c in s), np.int64), self.noun_emb),
    ):
      if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise ValueError(
          f"{name} classes must lie in [0, {table.shape[0]}), got [{ids.min()}, {ids.max()}]"
        )
    flat = np.fromiter((c for s in nouns for c in s), np.int64, int(lengths.sum()))
    owner = np.repeat(np.arange(len(nouns)), lengths)
    noun_mean = np.zeros((len(nouns), self.spec.latent_dim))
    np.add.at(noun_mean, owner, self.noun_emb[flat])
    noun_mean /= np.maximum(lengths, 1)[:, None]
    return (self.verb_emb[verbs] + noun_mean) / np.sqrt(2.0)

  def features(self, modality: str, verbs, nouns, *, rng: np.random.Generator) -> np.ndarray:
    """(n, dim) float32 features of `modality` ("video" or "text") for these classes."""
    if modality not in self.maps:
      raise ValueError(f"modality must be 'video' or 'text', got {modality!r}")
    clean = self.latent(verbs, nouns) @ self.maps[modality]
    noise = self.spec.noise * rng.normal(size=clean.shape)
    return (clean + noise).astype(np.float32)


class Ek100FeatureFiles(NamedTuple):
  """Where `build_ek100_features` wrote its artifacts."""

  train: pathlib.Path  # features file for the trainer (`trainer_source:features`)
  val: pathlib.Path  # validation videos and captions (`load_val_features`)
  table: pathlib.Path  # the noun-class ClusterTable


def _split_rng(spec: FeatureSpec, split: str, modality: str) -> np.random.Generator:
  tag = {"train": 1, "val": 2}[split] * 10 + {"video": 1, "text": 2}[modality]
  return np.random.default_rng([spec.seed, tag])


def _save_npz_atomic(path: pathlib.Path, arrays: dict) -> None:
  atomic_write(path, lambda f: np.savez(f, **arrays))


def build_ek100_features(
  annotations: str | os.PathLike,
  out_dir: str | os.PathLike,
  spec: FeatureSpec = FeatureSpec(),
  *,
  frequencies: str | os.PathLike | None = None,
) -> Ek100FeatureFiles:
  """Writes `train_features.npz`, `val_features.npz` and `ek100_nouns.npz` into `out_dir`.

  Args:
    annotations: the EK-100 folder (`EPIC_100_retrieval_{train_sentence,test,test_sentence}.csv`,
      the class vocabularies and, unless `frequencies` is given, `ek100_noun_freq.csv`).
    out_dir: created if needed; every file is written atomically.
    spec: feature widths, noise and seed.

  Returns:
    `Ek100FeatureFiles(train, val, table)` paths.
  """
  if not isinstance(spec, FeatureSpec):
    raise TypeError(f"spec must be a FeatureSpec, got {type(spec).__name__}")
  directory = pathlib.Path(annotations)
  out = pathlib.Path(out_dir)
  train = read_ek100_train(directory)
  val = read_ek100_mir(directory)
  table = noun_cluster_table(train, frequencies or directory / NOUN_FREQ_CSV)
  all_verbs = np.concatenate([train.verbs, val.video_verbs])
  all_nouns = np.fromiter((c for s in train.nouns + val.video_nouns for c in s), np.int64)
  maps = ClassFeatureMaps(
    spec,
    _num_classes(directory, VERB_CLASSES_CSV, all_verbs),
    _num_classes(directory, NOUN_CLASSES_CSV, all_nouns),
  )
  out.mkdir(parents=True, exist_ok=True)
  files = Ek100FeatureFiles(
    out / "train_features.npz", out / "val_features.npz", out / "ek100_nouns.npz"
  )
  provenance = json.dumps(
    {
      "generator": "mmts_jax.projects.ek100_features.ek100_features",
      "spec": dataclasses.asdict(spec),
    },
    sort_keys=True,
  )

  save_features(
    files.train,
    image_features=maps.features(
      "video", train.verbs, train.nouns, rng=_split_rng(spec, "train", "video")
    ),
    text_features=maps.features(
      "text", train.verbs, train.nouns, rng=_split_rng(spec, "train", "text")
    ),
    index=np.arange(len(train), dtype=np.int64),
    label=train.main_nouns,
    num_records=len(train),
    fingerprint=train.fingerprint,
  )
  _save_npz_atomic(
    files.val,
    {
      "format": np.array(_VAL_FORMAT),
      "provenance": np.array(provenance),
      "video_features": maps.features(
        "video", val.video_verbs, val.video_nouns, rng=_split_rng(spec, "val", "video")
      ),
      "text_features": maps.features(
        "text", val.caption_verbs, val.caption_nouns, rng=_split_rng(spec, "val", "text")
      ),
      "video_ids": np.array(val.video_ids, dtype=str),
      "caption_ids": np.array(val.caption_ids, dtype=str),
    },
  )
  table.save(files.table)
  return files


def load_val_features(
  path: str | os.PathLike, annotations: Ek100MirAnnotations | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """`(video_features (V, Dv), text_features (C, Dt))` of a `val_features.npz`.

  With `annotations`, checks that the rows follow its video and caption order (the relevancy's
  rows and columns) and raises ValueError if not.
  """
  path = pathlib.Path(path)
  expected = f"a {_VAL_FORMAT} .npz (`mmts finetune prepare`)"
  z = array_files.read_npz(path, expected=expected)
  if "format" not in z or str(z["format"]) != _VAL_FORMAT:
    raise ValueError(
      f"{str(path)!r} is not a {_VAL_FORMAT} file (build it with "
      f"build_ek100_features / `mmts finetune prepare`)"
    )
  missing = [
    k for k in ("video_features", "text_features", "video_ids", "caption_ids") if k not in z
  ]
  if missing:
    raise UserInputError(path, f"has no array(s) {missing}", expected=expected)
  video, text = z["video_features"], z["text_features"]
  video_ids, caption_ids = z["video_ids"].tolist(), z["caption_ids"].tolist()
  array_files.check_matrix(video, path, "video_features")
  array_files.check_matrix(text, path, "text_features")
  if annotations is not None and (
    tuple(video_ids) != annotations.video_ids or tuple(caption_ids) != annotations.caption_ids
  ):
    raise ValueError(
      f"{str(path)!r} does not follow the order of the EK-100 annotations "
      f"({len(video_ids)} x {len(caption_ids)} vs {annotations.shape})"
    )
  return video, text
