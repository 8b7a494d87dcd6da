"""The study's task: the synthetic long-tail dataset as arrays for the feature-tower dual encoder.

Images are the generator's image features; a caption is its bag of words (a multi-hot over the
generator's vocabulary: every caption slot draws from its own word list, so nothing is lost but
the order). Clusters are the generator's classes (an oracle clustering: no sentence encoder or
K-Means runs in the study), so `K_c` is the class's training size; the shift table is Eq. 6 of
it. Splits: long-tailed train, class-balanced validation (selection) and test (report).

Example:
  >>> task = make_task(GeneratorConfig(num_classes=4, head_size=40, imbalance=10,
  ...                                  val_per_class=3, test_per_class=3))
  >>> task.train["image"].shape[0] == len(task.train_label), task.val["text"].shape[1]
  (True, 101)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mmts_jax.longtail.generator import GeneratorConfig, SyntheticDataset, make_dataset

__all__ = ["Task", "bag_of_words", "make_task"]


def bag_of_words(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
  """`(N, V)` float32 multi-hot of the token ids (id 0, padding, left out).

  Example:
    >>> bag_of_words(np.array([[1, 3, 0]]), 4).tolist()
    [[0.0, 1.0, 0.0, 1.0]]
  """
  out = np.zeros((tokens.shape[0], vocab_size), np.float32)
  rows = np.repeat(np.arange(tokens.shape[0]), tokens.shape[1])
  out[rows, tokens.reshape(-1)] = 1.0
  out[:, 0] = 0.0
  return out


@dataclasses.dataclass(frozen=True)
class Task:
  """Arrays of every split (`image`, `text`), labels, captions and the cluster structure."""

  dataset: SyntheticDataset | None  # None: a task from other data (EK-100), without `split`
  train: dict[str, np.ndarray]
  val: dict[str, np.ndarray]
  test: dict[str, np.ndarray]
  train_label: np.ndarray
  cluster_sizes: np.ndarray  # (C,) training samples per class

  def split(self, name: str):
    """`(arrays, labels, captions)` of "val" or "test"."""
    if self.dataset is None:
      raise ValueError(
        "Task.split needs the synthetic dataset's labels and captions; this task has none"
      )
    s = {"val": self.dataset.val, "test": self.dataset.test}[name]
    return getattr(self, name), s.label, s.captions

  def sample_sizes(self) -> np.ndarray:
    """`(N,)` the cluster size `K_c` of every training sample."""
    return self.cluster_sizes[self.train_label]


def make_task(cfg: GeneratorConfig) -> Task:
  """Draws the dataset of `cfg` (which needs `val_per_class > 0`) and builds the arrays."""
  if cfg.val_per_class < 1:
    raise ValueError(
      f"the study selects on a validation split: val_per_class must be >= 1, got "
      f"{cfg.val_per_class}"
    )
  ds = make_dataset(cfg)
  v = len(ds.vocab)
  arrays = lambda s: {"image": s.image, "text": bag_of_words(s.tokens, v)}
  return Task(
    dataset=ds,
    train=arrays(ds.train),
    val=arrays(ds.val),
    test=arrays(ds.test),
    train_label=ds.train.label,
    cluster_sizes=ds.class_sizes,
  )
