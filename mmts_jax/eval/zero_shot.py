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

import jax
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
  "longtail_metrics",
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
  # Optional, for the long-tail report: (N,) class / cluster id of every image, and (C,) size
  # (training frequency) of every id (default: the ids' counts in this test set).
  clusters: np.ndarray | None = None
  cluster_sizes: np.ndarray | None = None

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
    if self.clusters is None:
      if self.cluster_sizes is not None:
        raise ValueError(f"test set {self.name!r}: cluster_sizes given without clusters")
      return
    ids = np.asarray(self.clusters)
    if (
      ids.shape != (len(self.images),) or not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0
    ):
      raise ValueError(
        f"test set {self.name!r}: clusters must be ({len(self.images)},) "
        f"non-negative ints (one class / cluster id per image), got {ids.dtype} "
        f"{ids.shape}"
      )
    sizes = np.bincount(ids) if self.cluster_sizes is None else np.asarray(self.cluster_sizes)
    if sizes.ndim != 1 or len(sizes) <= ids.max():
      raise ValueError(
        f"test set {self.name!r}: cluster_sizes must be a (C,) array with an "
        f"entry for every id (max id {ids.max()}), got shape {sizes.shape}"
      )
    from mmts_jax.eval.longtail import cluster_buckets

    cluster_buckets(sizes)  # validates the sizes now (finite, >= 0, a positive total)
    object.__setattr__(self, "clusters", ids.astype(np.int32))
    object.__setattr__(self, "cluster_sizes", sizes)

  @classmethod
  def from_arrays(
    cls,
    name: str,
    images,
    texts,
    *,
    text_to_image=None,
    captions_per_image: int | None = None,
    clusters=None,
    cluster_sizes=None,
  ) -> RetrievalTestSet:
    """From model inputs and either `text_to_image` or `captions_per_image` (COCO layout);
    optional per-image `clusters` (class ids) and their `cluster_sizes` (long-tail report)."""
    images, texts = np.asarray(images), np.asarray(texts)
    return cls(
      name,
      images,
      texts,
      _mapping(text_to_image, len(texts), len(images), captions_per_image),
      clusters,
      cluster_sizes,
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
    if "cluster" in z and "label" in z:
      raise ValueError(
        f"{str(path)!r} has both 'cluster' and 'label' arrays; keep one (the "
        f"per-image class / cluster id)"
      )
    return cls.from_arrays(
      name or path.stem,
      z[image_key],
      z[text_key],
      text_to_image=mapping,
      captions_per_image=captions_per_image,
      clusters=z.get("cluster", z.get("label")),
      cluster_sizes=z.get("cluster_sizes"),
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
    if self.clusters is not None:
      arrays.update(cluster=self.clusters, cluster_sizes=self.cluster_sizes)
    atomic_write(path, lambda f: np.savez(f, **arrays))


class ZeroShotEval:
  """The trainer's `eval_fn`: Table 1 metrics of every test set, keys `zs/<name>/<column>`.

  With `longtail=True`, every test set that carries per-image class / cluster ids
  (`RetrievalTestSet.clusters`) also gets the head / middle / tail report of
  `mmts_jax.eval.longtail.longtail_report` on the cosine similarities (images x captions):
  instance R@K (a caption's positive is its own image), and mAP / nDCG with the relevancy
  `[same class]` (a caption takes its image's id); buckets by `cluster_sizes` under
  `bucket_scheme`. Logged as `zs/<name>/longtail/<bucket>/<metric>` (fractions in [0, 1]) and,
  on process 0, printed as the `format_longtail` table each time the hook runs.

  `self.last` keeps the latest `{"step", "results": {name: metrics}, "longtail": {name: report}}`.
  """

  def __init__(
    self,
    test_sets: Sequence[RetrievalTestSet],
    *,
    image_key: str = "image",
    text_key: str = "text",
    chunk: int = DEFAULT_CHUNK,
    block_size=None,
    longtail: bool = False,
    bucket_scheme: str = "share",
    longtail_ks: Sequence[int] = _KS,
    verbose: bool = True,
  ):
    from mmts_jax.eval.longtail import SCHEMES

    test_sets = list(test_sets)
    if not test_sets or not all(isinstance(t, RetrievalTestSet) for t in test_sets):
      raise TypeError("ZeroShotEval needs a non-empty sequence of RetrievalTestSet")
    names = [t.name for t in test_sets]
    if len(set(names)) != len(names):
      raise ValueError(f"test set names must be unique, got {names}")
    if bucket_scheme not in SCHEMES:
      raise ValueError(f"bucket_scheme must be one of {SCHEMES}, got {bucket_scheme!r}")
    longtail_ks = tuple(int(k) for k in longtail_ks)
    labelled = [t for t in test_sets if t.clusters is not None]
    if longtail:
      # Checked here, before training starts, not at the first evaluation.
      if not labelled:
        raise ValueError(
          f"longtail=True needs a test set with per-image class / cluster ids "
          f"(a 'cluster' or 'label' array in its .npz); none of {names} has one"
        )
      for t in labelled:
        n = min(len(t.images), len(t.texts))
        if not longtail_ks or min(longtail_ks) < 1 or max(longtail_ks) > n:
          raise ValueError(
            f"test set {t.name!r}: longtail_ks must be in [1, {n}] (its "
            f"images / captions), got {longtail_ks}"
          )
    self.test_sets = test_sets
    self.image_key, self.text_key = image_key, text_key
    self.chunk, self.block_size = chunk, block_size
    self.longtail, self.bucket_scheme, self.longtail_ks = bool(longtail), bucket_scheme, longtail_ks
    self.verbose = verbose
    self.last: dict | None = None

  def _embed(self, t: RetrievalTestSet, embed: Callable, variables):
    image = embed_array(embed, variables, self.image_key, t.images, "image", chunk=self.chunk)
    text = embed_array(embed, variables, self.text_key, t.texts, "text", chunk=self.chunk)
    return image, text

  def evaluate(self, embed: Callable, variables) -> dict[str, dict[str, float]]:
    """{test set name: Table 1 metrics} of the model."""
    return self.evaluate_all(embed, variables)[0]

  def evaluate_all(
    self, embed: Callable, variables
  ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, float]]]]:
    """({name: Table 1 metrics}, {name: long-tail report}); the second is empty unless
    `longtail` (and then holds only the test sets with class / cluster ids)."""
    results, longtail = {}, {}
    for t in self.test_sets:
      image, text = self._embed(t, embed, variables)
      results[t.name] = table1_metrics(image, text, t.text_to_image, block_size=self.block_size)
      if self.longtail and t.clusters is not None:
        longtail[t.name] = longtail_metrics(
          image, text, t, ks=self.longtail_ks, scheme=self.bucket_scheme
        )
    return results, longtail

  def __call__(self, step: int, embed: Callable, variables) -> dict[str, float]:
    results, longtail = self.evaluate_all(embed, variables)
    self.last = {"step": int(step), "results": results, "longtail": longtail}
    out = {f"zs/{name}/{col}": value for name, m in results.items() for col, value in m.items()}
    out.update(
      {
        f"zs/{name}/longtail/{bucket}/{key}": value
        for name, report in longtail.items()
        for bucket, row in report.items()
        for key, value in row.items()
      }
    )
    if longtail and self.verbose and jax.process_index() == 0:
      from mmts_jax.eval.longtail import format_longtail

      for name, report in longtail.items():
        print(
          f"zero-shot long tail: {name}, step {int(step)} (buckets by {self.bucket_scheme} "
          f"of cluster size)\n{format_longtail(report, self.longtail_ks)}",
          flush=True,
        )
    return out


def longtail_metrics(
  image_emb, text_emb, test_set: RetrievalTestSet, *, ks: Sequence[int] = _KS, scheme: str = "share"
) -> dict[str, dict[str, float]]:
  """The long-tail report of one labelled test set from its (N, D) image and (M, D) caption
  embeddings: `longtail_report` on the cosine similarities :math:`s_{ij} = \\hat u_i \\cdot
  \\hat v_j` (float32), positives :math:`[\\text{text\\_to\\_image}_j = i]`, relevancy
  `label_relevancy(clusters, clusters[text_to_image])` and buckets by `test_set.cluster_sizes`.

  Example (two classes, class 0 three times as frequent; identity embeddings):
    >>> t = RetrievalTestSet.from_arrays("toy", np.eye(4), np.eye(4), captions_per_image=1,
    ...                                  clusters=np.array([0, 0, 0, 1]))
    >>> rep = longtail_metrics(np.eye(4), np.eye(4), t, ks=(1,))
    >>> sorted(rep), rep["tail"]["R@1"], rep["tail"]["num_queries"]
    (['all', 'head', 'tail'], 1.0, 1)
  """
  from mmts_jax.eval.longtail import label_relevancy, longtail_report

  if test_set.clusters is None:
    raise ValueError(f"test set {test_set.name!r} has no class / cluster ids (clusters)")
  image = np.asarray(image_emb, np.float32)
  text = np.asarray(text_emb, np.float32)
  image = image / np.maximum(np.linalg.norm(image, axis=1, keepdims=True), 1e-8)
  text = text / np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-8)
  mapping, ids = test_set.text_to_image, test_set.clusters
  positives = mapping[None, :] == np.arange(len(image))[:, None]
  return longtail_report(
    image @ text.T,
    label_relevancy(ids, ids[mapping]),
    image_clusters=ids,
    text_clusters=ids[mapping],
    cluster_sizes=test_set.cluster_sizes,
    positives=positives,
    ks=ks,
    scheme=scheme,
  )


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
  without `text_to_image`. `config.eval.longtail` (with `config.eval.bucket_scheme`) adds the
  head / middle / tail report of the test sets whose `.npz` has a `cluster` or `label` array.

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
  return ZeroShotEval(
    test_sets,
    image_key=model.image_key,
    text_key=model.text_key,
    longtail=bool(config.eval.get("longtail", False)),
    bucket_scheme=config.eval.get("bucket_scheme", "share"),
  )


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
