"""Feature-level EK-100 fine-tuning end to end: features -> cluster table -> training -> MIR.

  prepare(annotations, data_dir)            train/val features + the noun-class cluster table
  finetune(config, workdir, data_dir, ...)  trains projection heads with `mmts_jax.train`
                                            (MIR logged every `config.eval.every_steps`), then
                                            writes the validation embeddings and MIR metrics
  evaluate(workdir, data_dir, ...)          the same metrics from a checkpoint

Artifacts in the workdir (besides the trainer's): `val_embeddings.npz` (`video_emb`,
`text_emb`, in the order of the EK-100 CSVs, so `mmts eval ek100 --embeddings` reads it) and
`mir_metrics.json`.

Usage (the EK-100 annotations are needed; `tests/test_finetune_ek100.py` runs it end to end):

  files = prepare("../shared/data/ek100", "data/ek100")
  out = finetune(get_config(), "runs/ek100", "data/ek100", "../shared/data/ek100")
  out.scores["mir/mAP_avg"]
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, NamedTuple

import numpy as np
from etils import epath

from mmts_jax.clusters.table import atomic_write
from mmts_jax.projects.ek100_features.ek100_features import (
  Ek100FeatureFiles,
  FeatureSpec,
  build_ek100_features,
)
from mmts_jax.projects.ek100_features.mir_eval import Ek100Validation

__all__ = [
  "prepare",
  "data_files",
  "data_files_of",
  "configure",
  "FinetuneResult",
  "finetune",
  "evaluate",
]


def prepare(
  annotations: str | os.PathLike, data_dir: str | os.PathLike, spec: FeatureSpec = FeatureSpec()
) -> Ek100FeatureFiles:
  """`build_ek100_features`: writes the features and the cluster table into `data_dir`."""
  return build_ek100_features(annotations, data_dir, spec)


def data_files_of(data_dir: str | os.PathLike) -> Ek100FeatureFiles:
  """The paths `prepare` writes into `data_dir` (whether they exist or not)."""
  d = pathlib.Path(data_dir)
  return Ek100FeatureFiles(d / "train_features.npz", d / "val_features.npz", d / "ek100_nouns.npz")


def data_files(data_dir: str | os.PathLike) -> Ek100FeatureFiles:
  """The files `prepare` wrote; raises FileNotFoundError naming a missing one."""
  d = pathlib.Path(data_dir)
  files = data_files_of(d)
  for path in files:
    if not path.is_file():
      raise FileNotFoundError(
        f"{str(path)!r} does not exist: run `mmts finetune prepare --out {d}` first"
      )
  return files


def configure(config, data_dir: str | os.PathLike):
  """Points `config.data.path` / `config.mmts.cluster_table` at `data_dir`'s files (explicit
  values in the config win)."""
  files = data_files(data_dir)
  if not config.data.get("path"):
    config.data.path = str(files.train)
  if not config.mmts.get("cluster_table"):
    config.mmts.cluster_table = str(files.table)
  return config


def _validation(config, data_dir, annotations, max_val_videos) -> Ek100Validation:
  from mmts_jax.models import build_model

  model = build_model(config.model)  # only for the batch keys its towers read
  return Ek100Validation.load(
    data_files(data_dir).val,
    annotations,
    max_videos=max_val_videos,
    image_key=model.image_key,
    text_key=model.text_key,
  )


def _write_outputs(
  workdir: epath.Path, video: np.ndarray, text: np.ndarray, record: dict
) -> tuple[epath.Path, epath.Path]:
  emb_path, metrics_path = workdir / "val_embeddings.npz", workdir / "mir_metrics.json"
  atomic_write(emb_path, lambda f: np.savez(f, video_emb=video, text_emb=text))
  atomic_write(
    metrics_path, lambda f: f.write((json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
  )
  return emb_path, metrics_path


class FinetuneResult(NamedTuple):
  train: Any  # mmts_jax.train.TrainResult
  scores: dict  # mir/mAP_v2t ... mir/nDCG_avg (fractions)
  embeddings: epath.Path  # val_embeddings.npz
  metrics: epath.Path  # mir_metrics.json


def finetune(
  config,
  workdir: str | os.PathLike,
  data_dir: str | os.PathLike,
  annotations: str | os.PathLike,
  *,
  max_val_videos: int | None = None,
  stop_at_step: int | None = None,
) -> FinetuneResult:
  """Trains `config` on `data_dir`'s features with MIR validation, then writes the outputs.

  Args:
    config: e.g. `configs/ek100_features_mimm.py`; `data.path` / `mmts.cluster_table` default
      to `data_dir`'s files.
    annotations: the EK-100 folder (the validation relevancy comes from its CSVs).
    max_val_videos: validate on the first videos only (faster; see `Ek100Validation.load`).
    stop_at_step: as `train_and_evaluate`; rerunning resumes.
  """
  from mmts_jax import train

  config = configure(config, data_dir)
  val = _validation(config, data_dir, annotations, max_val_videos)
  result = train.train_and_evaluate(config, workdir, eval_fn=val, stop_at_step=stop_at_step)
  embed = train.make_embed_fn(result.model)
  variables = result.state.variables()
  video, text = val.embed(embed, variables)
  scores = (
    dict(val.last)
    if val.last and val.last["step"] == result.step
    else {"step": result.step, **val(result.step, embed, variables)}
  )
  scores.pop("step")
  record = {
    "step": result.step,
    "status": result.status,
    "videos": val.shape[0],
    "captions": val.shape[1],
    "metrics": scores,
  }
  emb_path, metrics_path = _write_outputs(result.workdir, video, text, record)
  return FinetuneResult(result, scores, emb_path, metrics_path)


def evaluate(
  workdir: str | os.PathLike,
  data_dir: str | os.PathLike,
  annotations: str | os.PathLike,
  *,
  step: int | None = None,
  max_val_videos: int | None = None,
) -> tuple[int, dict]:
  """MIR metrics of a run's checkpoint (default the latest) -> `(step, scores)`."""
  from mmts_jax import train
  from mmts_jax.projects.ek100_features.restore import load_trained_model

  trained = load_trained_model(workdir, step)
  val = _validation(trained.config, data_dir, annotations, max_val_videos)
  return trained.step, val(trained.step, train.make_embed_fn(trained.model), trained.variables)
