"""Zero-shot retrieval on Flickr30K / COCO-style test sets, as the paper's Table 1 reports it.

MM-TS Table 1 (CLIP pre-trained on CC3M, evaluated zero-shot on Flickr30K and MSCOCO) lists,
per test set, **IR@K** (image retrieval: a caption queries the images, a hit if its own image is
in the top K) and **TR@K** (text retrieval: an image queries the captions, a hit if *any* of its
captions, 5 per image, is in the top K), in percent; the headline columns are IR@1 and TR@1.
Here every test set gets IR@1/5/10, TR@1/5/10 and RSUM (their sum), computed blockwise on the
device by `mmts_jax.eval.retrieval_metrics` on cosine similarities.

Two ways in:
* during training: `ZeroShotEval(test_sets, image_key=..., text_key=...)` is the trainer's
  `eval_fn` (`train_and_evaluate(..., eval_fn=zs)`), logged as `zs/<name>/IR@1` etc. every
  `config.eval.every_steps` steps and at the end;
* after training: `evaluate_checkpoint(workdir, test_sets)` restores a checkpoint of a run
  (`finetune.restore`) and returns the same numbers.

A test set is a dataset converted by `mmts prepare` with one record per caption
(`RetrievalTestSet.from_records`: images decoded and centre-cropped, captions tokenised), or a
`.npz` of model inputs (`RetrievalTestSet.from_npz`): the image-tower input
under the model's image key (`image` pixels, or `image_features`), the text-tower input under
its text key (`text` token ids, or `text_features`), and either `text_to_image` (M,) or the
COCO / Flickr30K layout where caption `j` describes image `j // captions_per_image`.

Example (a 3-image test set with 2 captions per image and identity towers; after training,
`evaluate_checkpoint("runs/cc3m", [flickr])` gives the same table for a run's checkpoint):
  >>> import os, tempfile
  >>> path = os.path.join(tempfile.mkdtemp(), "flickr.npz")
  >>> images = np.eye(3, dtype=np.float32)
  >>> RetrievalTestSet.from_arrays("flickr", images, images[[0, 0, 1, 1, 2, 0]],
  ...                              captions_per_image=2).save(path)
  >>> flickr = RetrievalTestSet.from_npz(path, image_key="image", text_key="text")
  >>> def embed(variables, batch):  # stands in for `make_embed_fn(model)`
  ...   (x,) = batch.values()
  ...   return {"image": x, "text": x}
  >>> print(format_table1(ZeroShotEval([flickr]).evaluate(embed, None)))
  test set       IR@1   IR@5  IR@10   TR@1   TR@5  TR@10   RSUM
  flickr        83.33 100.00 100.00 100.00 100.00 100.00 583.33
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from mmts_jax import array_files
from mmts_jax.projects.ek100_features.embedding import DEFAULT_CHUNK, embed_array

__all__ = [
  "TABLE1_COLUMNS",
  "table1_metrics",
  "RetrievalTestSet",
  "ZeroShotEval",
  "load_test_sets",
  "eval_fn_from_config",
  "evaluate_checkpoint",
  "format_table1",
]

TABLE1_COLUMNS = ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "RSUM")
_KS = (1, 5, 10)


def table1_metrics(image_emb, text_emb, text_to_image, *, block_size=None) -> dict[str, float]:
  """IR@1/5/10, TR@1/5/10 (percent) and RSUM of one test set.

  Args:
    image_emb: (N, D) image embeddings. text_emb: (M, D) caption embeddings.
    text_to_image: (M,) int, the image of each caption.

  Example:
    >>> img = np.eye(3, dtype=np.float32)
    >>> table1_metrics(img, img[[0, 0, 1, 1, 2, 2]], np.repeat(np.arange(3), 2))["IR@1"]
    100.0
  """
  from mmts_jax.eval import retrieval_metrics

  m = retrieval_metrics(image_emb, text_emb, text_to_image, ks=_KS, block_size=block_size)
  out = {f"IR@{k}": 100.0 * m[f"t2i/R@{k}"] for k in _KS}
  out.update({f"TR@{k}": 100.0 * m[f"i2t/R@{k}"] for k in _KS})
  out["RSUM"] = sum(out[c] for c in TABLE1_COLUMNS[:-1])
  return out


def _mapping(
  text_to_image, num_texts: int, num_images: int, captions_per_image: int | None
) -> np.ndarray:
  if text_to_image is None:
    if captions_per_image is None:
      raise ValueError("give text_to_image (the image of each caption) or captions_per_image")
    if (
      isinstance(captions_per_image, bool)
      or not isinstance(captions_per_image, int)
      or captions_per_image <= 0
    ):
      raise ValueError(f"captions_per_image must be a positive int, got {captions_per_image!r}")
    if num_texts != captions_per_image * num_images:
      raise ValueError(
        f"captions_per_image={captions_per_image} needs "
        f"{captions_per_image * num_images} captions for {num_images} images, "
        f"got {num_texts}"
      )
    return np.arange(num_texts, dtype=np.int32) // captions_per_image
  mapping = np.asarray(text_to_image)
  if mapping.shape != (num_texts,) or not np.issubdtype(mapping.dtype, np.integer):
    raise ValueError(
      f"text_to_image must be ({num_texts},) ints, got {mapping.dtype} {mapping.shape}"
    )
  if mapping.min() < 0 or mapping.max() >= num_images:
    raise ValueError(
      f"text_to_image must index the {num_images} images, got range "
      f"[{mapping.min()}, {mapping.max()}]"
    )
  return mapping.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class RetrievalTestSet:
  """A zero-shot test set of model inputs: (N, ...) images, (M, ...) captions, caption->image."""

  name: str
  images: np.ndarray
  texts: np.ndarray
  text_to_image: np.ndarray

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name or "/" in self.name:
      raise ValueError(f"test set name must be a non-empty string without '/', got {self.name!r}")
    for field in ("images", "texts"):
      a = np.asarray(getattr(self, field))
      if a.ndim < 1 or a.shape[0] == 0:
        raise ValueError(
          f"test set {self.name!r}: {field} must be a non-empty (n, ...) array, got shape {a.shape}"
        )
    object.__setattr__(
      self, "text_to_image", _mapping(self.text_to_image, len(self.texts), len(self.images), None)
    )

  @classmethod
  def from_arrays(
    cls, name: str, images, texts, *, text_to_image=None, captions_per_image: int | None = None
  ) -> RetrievalTestSet:
    """From model inputs and either `text_to_image` or `captions_per_image` (COCO layout)."""
    images, texts = np.asarray(images), np.asarray(texts)
    return cls(
      name, images, texts, _mapping(text_to_image, len(texts), len(images), captions_per_image)
    )

  @classmethod
  def from_npz(
    cls,
    path: str | os.PathLike,
    *,
    image_key: str = "image",
    text_key: str = "text",
    name: str | None = None,
    captions_per_image: int | None = None,
  ) -> RetrievalTestSet:
    """Reads `path` (see the module docstring); `name` defaults to the file's stem."""
    path = epath.Path(os.fspath(path))  # local or gs://
    z = array_files.read_npz(path, expected="a .npz of model inputs")
    missing = [k for k in (image_key, text_key) if k not in z]
    if missing:
      raise ValueError(
        f"{str(path)!r} has no {missing} (the model's input keys); it has {sorted(z)}"
      )
    mapping = z.get("text_to_image")
    if mapping is not None and captions_per_image is not None:
      raise ValueError(f"{str(path)!r} has text_to_image; do not also give captions_per_image")
    return cls.from_arrays(
      name or path.stem,
      z[image_key],
      z[text_key],
      text_to_image=mapping,
      captions_per_image=captions_per_image,
    )

  @classmethod
  def from_records(
    cls,
    data_dir: str | os.PathLike,
    tokenizer,
    *,
    image_size: int = 224,
    text_len: int = 77,
    name: str | None = None,
  ) -> RetrievalTestSet:
    """From a dataset converted by `mmts prepare` with one record per caption (Flickr30K /
    COCO test splits): records with the same `key` (the image file) are one image.

    Images are decoded once each, resized and centre-cropped to `image_size` and
    CLIP-normalised (float32, N x S x S x 3 in host memory: 0.6 GB for Flickr30K's 1,000 test
    images at 224); captions are tokenised to `text_len` ids.

    Args:
      tokenizer: a `mmts_jax.data.tokenize.TextTokenizer`, or its directory.
    """
    from mmts_jax.data.pipeline import ImageTextTransform
    from mmts_jax.data.records import RecordSource, read_captions, read_keys

    if isinstance(tokenizer, (str, os.PathLike)):
      from mmts_jax.data.tokenize import TextTokenizer

      tokenizer = TextTokenizer(tokenizer, text_len)
    source = RecordSource(data_dir)
    keys, captions = read_keys(data_dir), read_captions(data_dir)
    first: dict[str, int] = {}
    mapping = np.array([first.setdefault(k, len(first)) for k in keys], np.int32)
    rows = sorted(first, key=first.__getitem__)
    record_of = {k: i for i, k in reversed(list(enumerate(keys)))}  # first record per key
    transform = ImageTextTransform(None, image_size=image_size, train=False)
    images = np.stack([transform(source[record_of[k]])["image"] for k in rows])
    texts = np.stack([np.asarray(tokenizer(c), np.int32) for c in captions])
    return cls(name or epath.Path(os.fspath(data_dir)).name, images, texts, mapping)

  def save(
    self, path: str | os.PathLike, *, image_key: str = "image", text_key: str = "text"
  ) -> None:
    """Writes the `.npz` `from_npz` reads (atomically)."""
    from mmts_jax.clusters.table import atomic_write

    arrays: dict[str, Any] = {
      image_key: self.images,
      text_key: self.texts,
      "text_to_image": self.text_to_image,
    }
    atomic_write(path, lambda f: np.savez(f, **arrays))


class ZeroShotEval:
  """The trainer's `eval_fn`: Table 1 metrics of every test set, keys `zs/<name>/<column>`.

  `self.last` keeps the latest `{name: metrics}` and its step.
  """

  def __init__(
    self,
    test_sets: Sequence[RetrievalTestSet],
    *,
    image_key: str = "image",
    text_key: str = "text",
    chunk: int = DEFAULT_CHUNK,
    block_size=None,
  ):
    test_sets = list(test_sets)
    if not test_sets or not all(isinstance(t, RetrievalTestSet) for t in test_sets):
      raise TypeError("ZeroShotEval needs a non-empty sequence of RetrievalTestSet")
    names = [t.name for t in test_sets]
    if len(set(names)) != len(names):
      raise ValueError(f"test set names must be unique, got {names}")
    self.test_sets = test_sets
    self.image_key, self.text_key = image_key, text_key
    self.chunk, self.block_size = chunk, block_size
    self.last: dict | None = None

  def evaluate(self, embed: Callable, variables) -> dict[str, dict[str, float]]:
    """{test set name: Table 1 metrics} of the model."""
    results = {}
    for t in self.test_sets:
      image = embed_array(embed, variables, self.image_key, t.images, "image", chunk=self.chunk)
      text = embed_array(embed, variables, self.text_key, t.texts, "text", chunk=self.chunk)
      results[t.name] = table1_metrics(image, text, t.text_to_image, block_size=self.block_size)
    return results

  def __call__(self, step: int, embed: Callable, variables) -> dict[str, float]:
    results = self.evaluate(embed, variables)
    self.last = {"step": int(step), "results": results}
    return {f"zs/{name}/{col}": value for name, m in results.items() for col, value in m.items()}


def load_test_sets(
  specs: str | Sequence[str],
  *,
  image_key: str,
  text_key: str,
  tokenizer=None,
  image_size: int = 224,
  text_len: int = 77,
  captions_per_image: int | None = None,
) -> list[RetrievalTestSet]:
  """`"[NAME=]PATH,..."` (or a list of such) -> test sets: a directory is a dataset converted
  by `mmts prepare` (needs `tokenizer`), a file an `.npz` of model inputs."""
  if isinstance(specs, str):
    specs = [s for s in specs.split(",") if s.strip()]
  out = []
  for spec in specs:
    name, sep, path = spec.strip().rpartition("=")
    name = name if sep else None
    if epath.Path(path).is_dir():
      if not tokenizer:
        raise ValueError(
          f"test set {path!r} is a directory, read as a dataset converted by "
          f"`mmts prepare`: it needs a tokenizer (directory)"
        )
      out.append(
        RetrievalTestSet.from_records(
          path, tokenizer, image_size=image_size, text_len=text_len, name=name
        )
      )
    else:
      out.append(
        RetrievalTestSet.from_npz(
          path,
          image_key=image_key,
          text_key=text_key,
          name=name,
          captions_per_image=captions_per_image,
        )
      )
  return out


def eval_fn_from_config(config) -> ZeroShotEval | None:
  """The trainer's `eval_fn` for `config.eval.zero_shot` ("[NAME=]PATH,..."; empty: None).

  Converted datasets use `config.data.tokenizer`, `config.data.image_size` (224) and
  `config.data.text_len` (77); `config.eval.captions_per_image` applies to `.npz` files
  without `text_to_image`.

  Example:
    >>> import os, tempfile
    >>> from mmts_jax.config_defaults import default_config
    >>> config = default_config()  # feature model: image key "image_features", text key "text"
    >>> path = os.path.join(tempfile.mkdtemp(), "val.npz")
    >>> images, texts = np.ones((2, 64), np.float32), np.ones((4, 16), np.int32)
    >>> RetrievalTestSet.from_arrays("val", images, texts, captions_per_image=2).save(
    ...     path, image_key="image_features")
    >>> config.eval.zero_shot = f"val={path}"
    >>> eval_fn = eval_fn_from_config(config)  # then train_and_evaluate(..., eval_fn=eval_fn)
    >>> [(t.name, t.images.shape, t.texts.shape) for t in eval_fn.test_sets]
    [('val', (2, 64), (4, 16))]
  """
  from mmts_jax.models import build_model

  specs = config.eval.get("zero_shot", "") if "eval" in config else ""
  if not specs:
    return None
  model = build_model(config.model)
  data = config.get("data", {})
  test_sets = load_test_sets(
    specs,
    image_key=model.image_key,
    text_key=model.text_key,
    tokenizer=data.get("tokenizer") or None,
    image_size=int(data.get("image_size", 224)),
    text_len=int(data.get("text_len", 77)),
    captions_per_image=config.eval.get("captions_per_image", None),
  )
  return ZeroShotEval(test_sets, image_key=model.image_key, text_key=model.text_key)


def evaluate_checkpoint(
  workdir: str | os.PathLike,
  test_sets: Sequence[RetrievalTestSet],
  *,
  step: int | None = None,
  chunk: int = DEFAULT_CHUNK,
) -> dict[str, dict[str, float]]:
  """Table 1 metrics of a run's checkpoint (default: the latest) on each test set."""
  from mmts_jax.projects.ek100_features.restore import load_trained_model
  from mmts_jax.train import make_embed_fn

  trained = load_trained_model(workdir, step)
  zs = ZeroShotEval(
    test_sets, image_key=trained.model.image_key, text_key=trained.model.text_key, chunk=chunk
  )
  return zs.evaluate(make_embed_fn(trained.model), trained.variables)


def format_table1(results: Mapping[str, Mapping[str, float]]) -> str:
  """One row per test set, the Table 1 columns in percent.

  Example:
    >>> print(format_table1({"flickr30k": dict(zip(TABLE1_COLUMNS, [1, 2, 3, 4, 5, 6, 21]))}))
    test set       IR@1   IR@5  IR@10   TR@1   TR@5  TR@10   RSUM
    flickr30k      1.00   2.00   3.00   4.00   5.00   6.00  21.00
  """
  lines = [f"{'test set':<12}" + "".join(f"{c:>7}" for c in TABLE1_COLUMNS)]
  for name, m in results.items():
    lines.append(f"{name:<12}" + "".join(f"{m[c]:7.2f}" for c in TABLE1_COLUMNS))
  return "\n".join(lines)
