"""Adapters from converted datasets to the trainer's input protocol (`mmts_jax.train`).

The trainer calls `factory(config.data, global_batch_size=B, seed=S)` for
`config.data.name = "mmts_jax.data.trainer_source:records"` (or `:features`, `:tfds`) and needs
`num_examples` and `iterate(start_batch, process_index, process_count)`, an endless iterator of
this process's numpy batches starting at global batch `start_batch`. The sources here also carry
`num_records` and `fingerprint` (the dataset's, for checking a cluster table).

`config.data` keys (all but `path`/`tokenizer` optional):
  path          converted dataset directory (`mmts prepare`), or the .npz for `features`
  tokenizer     tokenizer directory (`tokenizer.json` or vocab files)
  text_len      token ids per caption (77)
  image_size    crop side (224); crop_scale (0.9, 1.0) for the random resized crop
  uint8         ship uint8 images and normalise on device (False)
  decoder       JPEG decoder: "auto" (simplejpeg when installed, else Pillow), "pil", "simplejpeg"
  device_crop   resample the random resized crop on the device, bicubic (False; needs uint8)
  num_threads   grain read threads (8); worker_count: grain worker processes (0)
  tfds_name, tfds_split, tfds_data_dir, caption_key, image_key   for `:tfds`
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from mmts_jax.data import pipeline as pipeline_lib

__all__ = ["PipelineSource", "records", "features", "tfds"]


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
  value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
  return default if value is None else value


class PipelineSource:
  """A grain pipeline factory behind the trainer's `iterate(start_batch, p, P)` protocol."""

  def __init__(
    self,
    source,
    make_pipeline,
    *,
    num_threads: int = 8,
    worker_count: int = 0,
    fingerprint: str | None = None,
  ):
    self.source, self._make = source, make_pipeline
    self.num_examples = self.num_records = len(source)
    self._fingerprint = fingerprint
    self._loader_kw = {"num_threads": int(num_threads), "worker_count": int(worker_count)}

  @property
  def fingerprint(self) -> str | None:
    """The dataset's fingerprint; for a TFDS source computed on first access (one pass)."""
    if self._fingerprint is None:
      self._fingerprint = getattr(self.source, "fingerprint", None)
    return self._fingerprint

  def __len__(self) -> int:
    return self.num_examples

  def pipeline(self, process_index: int = 0, process_count: int = 1) -> pipeline_lib.Pipeline:
    return self._make(process_index=process_index, process_count=process_count)

  def iterate(
    self, start_batch: int = 0, process_index: int = 0, process_count: int = 1
  ) -> Iterator[dict[str, np.ndarray]]:
    return self.pipeline(process_index, process_count).loader(
      position=int(start_batch), **self._loader_kw
    )


def _image_text(cfg, source, fingerprint, *, global_batch_size: int, seed: int):
  from mmts_jax.data.tokenize import TextTokenizer

  tok_dir = _get(cfg, "tokenizer")
  if not tok_dir:
    raise ValueError("config.data.tokenizer (a tokenizer directory) is required")
  tokenizer = TextTokenizer(tok_dir, int(_get(cfg, "text_len", 77)))
  kw = dict(
    image_size=int(_get(cfg, "image_size", 224)),
    crop_scale=tuple(_get(cfg, "crop_scale", (0.9, 1.0))),
    uint8=bool(_get(cfg, "uint8", False)),
    decoder=str(_get(cfg, "decoder", "auto")),
    device_crop=bool(_get(cfg, "device_crop", False)),
    global_batch_size=global_batch_size,
    seed=seed,
    num_epochs=None,
  )

  def make(**host):
    return pipeline_lib.image_text_pipeline(source, tokenizer, **kw, **host)

  return PipelineSource(
    source,
    make,
    num_threads=_get(cfg, "num_threads", 8),
    worker_count=_get(cfg, "worker_count", 0),
    fingerprint=fingerprint,
  )


def records(cfg, *, global_batch_size: int, seed: int) -> PipelineSource:
  """A converted dataset (`config.data.path`) with images and tokenised captions."""
  from mmts_jax.data.records import RecordSource

  source = RecordSource(_get(cfg, "path"))
  return _image_text(
    cfg, source, source.fingerprint, global_batch_size=global_batch_size, seed=seed
  )


def tfds(cfg, *, global_batch_size: int, seed: int) -> PipelineSource:
  """A TFDS split read in place (`TfdsSource`); its fingerprint is computed on first use."""
  from mmts_jax.data.tfds_source import TfdsSource

  source = TfdsSource(
    _get(cfg, "tfds_name"),
    split=_get(cfg, "tfds_split", "train"),
    data_dir=_get(cfg, "tfds_data_dir"),
    image_key=_get(cfg, "image_key", "image"),
    caption_key=_get(cfg, "caption_key", "captions/text"),
  )
  return _image_text(cfg, source, None, global_batch_size=global_batch_size, seed=seed)


def features(cfg, *, global_batch_size: int, seed: int) -> PipelineSource:
  """A features file (`features.save_features`): batches of image/text features + index."""
  from mmts_jax.data.features import FeatureSource, feature_pipeline

  source = FeatureSource(_get(cfg, "path"))

  def make(**host):
    return feature_pipeline(
      source, global_batch_size=global_batch_size, seed=seed, num_epochs=None, **host
    )

  src = PipelineSource(
    source, make, num_threads=_get(cfg, "num_threads", 1), fingerprint=source.fingerprint
  )
  if source.num_records is not None:
    # Shift tables are indexed by record number: size them by the dataset, not the file.
    src.num_examples = src.num_records = source.num_records
  return src
