"""Reading a TFDS dataset directly (no conversion) through `tfds.data_source`, without TensorFlow.

TFDS datasets prepared with `file_format="array_record"` have random access through
`builder.as_data_source(split)`, which parses examples with NumPy; images are fetched still
encoded (`tfds.decode.SkipDecoding`) and decoded by the pipeline like any record. A dataset in
the TFRecord format (the TFDS default before 4.9) has no data source: re-prepare it with
`tfds build NAME --file_format=array_record` (preparation may need TensorFlow; reading does not).

`TfdsSource` gives one record per TFDS example, its position as `index` and one caption (the
`caption_index`-th); use `convert.convert_tfds` for one record per caption.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from mmts_jax.data.fingerprint import dataset_fingerprint

__all__ = ["TfdsSource", "open_tfds", "lookup_feature", "as_text"]


def open_tfds(name: str, *, split: str, data_dir: str | None, image_key: str):
  """(builder, data source with encoded images) for a TFDS dataset in the array_record format."""
  import tensorflow_datasets as tfds

  builder = tfds.builder(name, data_dir=data_dir)
  # Typed `TopLevelFeature | FeatureConnector | None`; a dataset's top level is a FeaturesDict.
  features: Any = builder.info.features
  if image_key not in features:
    raise KeyError(f"{name} has no image feature {image_key!r}; features: {sorted(features)}")
  # tfds's logging decorator hides the signature from pyright (`split` is its first parameter).
  ds = builder.as_data_source(split=split, decoders={image_key: tfds.decode.SkipDecoding()})  # pyright: ignore[reportCallIssue]
  return builder, ds


def lookup_feature(example: dict, path: str) -> Any:
  """`example["captions"]["text"]` for `path="captions/text"` (a literal key wins: `image/id`)."""
  value = example
  for part in [path] if path in example else path.split("/"):
    if not isinstance(value, dict) or part not in value:
      raise KeyError(f"feature {path!r} not found; the example has {sorted(example)}")
    value = value[part]
  return value


def as_text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsSource(Sequence):
  """A TFDS split as a random-access source of records (`index`, `key`, `image`, `caption`...).

  Usage (needs a prepared TFDS dataset on disk, so it is not a doctest)::

    src = TfdsSource("coco_captions", split="val", data_dir="~/tensorflow_datasets")
    pipe = image_text_pipeline(src, tokenizer, global_batch_size=256)
  """

  def __init__(
    self,
    name: str,
    *,
    split: str = "train",
    data_dir: str | None = None,
    image_key: str = "image",
    caption_key: str | None = "captions/text",
    caption_index: int = 0,
    label_key: str | None = None,
  ):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.image_key, self.caption_key, self.label_key = image_key, caption_key, label_key
    self.caption_index = caption_index
    builder, self._ds = open_tfds(name, split=split, data_dir=data_dir, image_key=image_key)
    self.full_name = builder.info.full_name
    self._len = len(self._ds)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_ds"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    _, self._ds = open_tfds(
      self.name, split=self.split, data_dir=self.data_dir, image_key=self.image_key
    )

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    if not 0 <= i < self._len:
      raise IndexError(f"example {i} out of range [0, {self._len})")
    return self._record(i, self._ds[i])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    examples = self._ds.__getitems__(indices)
    return [self._record(int(i), ex) for i, ex in zip(indices, examples, strict=True)]

  def _record(self, i: int, ex: dict) -> dict[str, Any]:
    rec = {"index": i, "key": str(i), "image": ex[self.image_key]}
    if self.caption_key is not None:
      caps = lookup_feature(ex, self.caption_key)
      if not isinstance(caps, (str, bytes)):
        caps = caps[self.caption_index]
      rec["caption"] = as_text(caps)
    if self.label_key is not None:
      rec["label"] = int(lookup_feature(ex, self.label_key))
    return rec

  def captions(self) -> list[str]:
    """Every caption in order (one pass over the split, images included: slow on big splits)."""
    return [self[i]["caption"] for i in range(len(self))]

  @functools.cached_property
  def fingerprint(self) -> str:
    """`dataset_fingerprint` of the captions (computed on first access: one pass)."""
    return dataset_fingerprint(self.captions())
