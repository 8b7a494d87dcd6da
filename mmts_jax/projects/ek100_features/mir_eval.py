"""EK-100 MIR evaluation of a feature-level model: embed the validation split, mAP and nDCG.

`Ek100Validation` holds the validation features and the relevancy (`0.5 [verb equal] +
0.5 IoU(noun sets)`, from the annotation CSVs, `mmts_jax.eval.ek100_relevancy`); calling it with
the trainer's `embed` function and the variables returns the official MIR metrics of the cosine
similarity of the embeddings (`mmts_jax.eval.mir_metrics`). It has the trainer's `eval_fn`
signature, so `mmts_jax.train.train_and_evaluate(..., eval_fn=validation)` logs MIR every
`config.eval.every_steps` steps and at the end.

Metric names (fractions in [0, 1]): `mir/mAP_v2t`, `mir/mAP_t2v`, `mir/mAP_avg`,
`mir/nDCG_v2t`, `mir/nDCG_t2v`, `mir/nDCG_avg`.

Example (two videos, three captions; `Ek100Validation.load(val_features, annotations)` reads the
real split):
  >>> rel = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]], np.float32)
  >>> video = np.eye(2, 4, dtype=np.float32)
  >>> text = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0.2, 0, 0]], np.float32)  # 2 looks like 0
  >>> val = Ek100Validation(video, text, rel)
  >>> def embed(variables, batch):  # identity towers, stand-ins for `make_embed_fn(model)`
  ...   (x,) = batch.values()
  ...   return {"image": x, "text": x}
  >>> print(format_mir(val(0, embed, None)))
            v->t    t->v     avg
  mAP     100.00   91.67   95.83
  nDCG    100.00   95.32   97.66

During training, `train_and_evaluate(config, workdir, eval_fn=val)` logs these every
`config.eval.every_steps` steps.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np

from mmts_jax.eval import class_relevancy, mir_metrics, read_ek100_mir, video_subset
from mmts_jax.projects.ek100_features.ek100_features import load_val_features
from mmts_jax.projects.ek100_features.embedding import DEFAULT_CHUNK, embed_array

__all__ = ["Ek100Validation", "mir_scores", "format_mir"]

_DIRECTIONS = (("v2t", "video_to_text"), ("t2v", "text_to_video"), ("avg", "average"))


def mir_scores(
  video_emb: np.ndarray,
  text_emb: np.ndarray,
  relevancy: np.ndarray,
  *,
  prefix: str = "mir/",
  num_threads: int | None = None,
) -> dict[str, float]:
  """Cosine similarity of the embeddings -> flat MIR metrics (see the module docstring)."""
  video = np.asarray(video_emb, np.float32)
  text = np.asarray(text_emb, np.float32)
  if video.ndim != 2 or text.ndim != 2 or video.shape[1] != text.shape[1]:
    raise ValueError(
      f"video and text embeddings must be (n, D) with one D, got {video.shape} and {text.shape}"
    )
  video = video / np.maximum(np.linalg.norm(video, axis=1, keepdims=True), 1e-8)
  text = text / np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-8)
  return _flatten(mir_metrics(video @ text.T, relevancy, num_threads=num_threads), prefix)


def _flatten(metrics, prefix: str) -> dict[str, float]:
  return {
    f"{prefix}{name}_{short}": float(getattr(score, field))
    for name, score in metrics.items()
    for short, field in _DIRECTIONS
  }


def format_mir(scores: dict[str, float], prefix: str = "mir/") -> str:
  """The two-row table `mmts eval ek100` prints (percent)."""
  lines = [f"{'':<6}{'v->t':>8}{'t->v':>8}{'avg':>8}"]
  for name in ("mAP", "nDCG"):
    lines.append(
      f"{name:<6}" + "".join(f"{100 * scores[f'{prefix}{name}_{s}']:8.2f}" for s, _ in _DIRECTIONS)
    )
  return "\n".join(lines)


@dataclasses.dataclass
class Ek100Validation:
  """Validation videos and captions (model inputs) and their (V, C) relevancy.

  Attributes:
    video_features: (V, Dv) inputs of the image/video tower.
    text_features: (C, Dt) inputs of the text tower.
    relevancy: (V, C) float32.
    image_key, text_key: the batch keys the towers read (`model.image_key` / `text_key`).
  """

  video_features: np.ndarray
  text_features: np.ndarray
  relevancy: np.ndarray
  image_key: str = "image_features"
  text_key: str = "text_features"
  chunk: int = DEFAULT_CHUNK
  num_threads: int | None = None
  last: dict | None = dataclasses.field(default=None, repr=False)

  def __post_init__(self):
    v, c = len(self.video_features), len(self.text_features)
    if np.shape(self.relevancy) != (v, c):
      raise ValueError(
        f"relevancy must be (videos, captions) = ({v}, {c}), got {np.shape(self.relevancy)}"
      )

  @classmethod
  def load(
    cls,
    val_features: str | os.PathLike,
    annotations: str | os.PathLike,
    *,
    max_videos: int | None = None,
    **kw,
  ) -> Ek100Validation:
    """From `val_features.npz` and the EK-100 annotation folder (relevancy from its CSVs).

    `max_videos`: keep the first videos of the split and the captions whose narration is one
    of them (a smaller, faster validation slice with the same relevancy definition).
    """
    ann = read_ek100_mir(annotations)
    video, text = load_val_features(val_features, ann)
    keep_v = np.arange(len(video))
    keep_c = np.arange(len(text))
    if max_videos is not None:
      keep_v, keep_c = video_subset(ann, max_videos)
    relevancy = class_relevancy(
      ann.video_verbs[keep_v],
      [ann.video_nouns[i] for i in keep_v],
      ann.caption_verbs[keep_c],
      [ann.caption_nouns[j] for j in keep_c],
    )
    return cls(video[keep_v], text[keep_c], relevancy, **kw)

  @property
  def shape(self) -> tuple[int, int]:
    return self.relevancy.shape

  def embed(self, embed: Callable, variables) -> tuple[np.ndarray, np.ndarray]:
    """(video_emb (V, D), text_emb (C, D)) through the model's towers."""
    return (
      embed_array(embed, variables, self.image_key, self.video_features, "image", chunk=self.chunk),
      embed_array(embed, variables, self.text_key, self.text_features, "text", chunk=self.chunk),
    )

  def __call__(self, step: int, embed: Callable, variables) -> dict[str, float]:
    """The trainer's `eval_fn`: MIR metrics of the current model (also kept in `self.last`)."""
    video, text = self.embed(embed, variables)
    scores = mir_scores(video, text, self.relevancy, num_threads=self.num_threads)
    self.last = {"step": int(step), **scores}
    return scores

  def random_baseline(self, seed: int = 0) -> dict[str, float]:
    """MIR metrics of a random similarity matrix of this split (the chance level)."""
    sim = np.random.default_rng(seed).normal(size=self.shape).astype(np.float32)
    return _flatten(mir_metrics(sim, self.relevancy, num_threads=self.num_threads), "mir/")
