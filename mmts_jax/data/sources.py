"""The trainer's input, in one place: the source protocol, the registry of sources, and the one
host-to-device path.

A source (`Source`) has

  num_examples    N: the dataset size; shift tables and per-sample state are (N,) arrays
  iterate(start_batch, process_index, process_count)
                  an endless iterator of this process's numpy batches (a dict of arrays with the
                  rows `[p B/P, (p+1) B/P)` of each global batch of B), starting at global batch
                  `start_batch`, so a resumed run sees exactly the same data. Every batch
                  carries `index`: each example's stable dataset position in [0, N).
  cluster_sizes   (N,) per-example cluster sizes, or None (then a cluster table is needed)
  fingerprint     a string identifying the sample identities in order (`"sha256:..."` over ids
                  or captions, `mmts_jax.data.fingerprint`; `"content-sha256:..."` over the
                  arrays' bytes in row order for in-memory data): a cluster table built for
                  other data or another row order is refused before anything is compiled.

`config.data.name` picks a source from `SOURCES` (or `"package.module:function"`); the factory
is called as `factory(config.data, global_batch_size=B, seed=S)`.

Images: a batch entry of dtype uint8 and shape (B, H, W, 3) is raw 0-255 pixels (the pipeline's
`uint8=True`, 4x fewer bytes to move); `to_device` normalises it on the device
(`image_ops.normalize_on_device`) right after the transfer, so the model only ever sees
normalised float pixels.

Example:
  >>> import ml_collections
  >>> cfg = ml_collections.ConfigDict(dict(num_examples=64, num_clusters=4, zipf=1.1,
  ...     image_dim=8, text="features", noise=0.5))
  >>> src = make_source(ml_collections.ConfigDict(dict(cfg, name="toy_features")),
  ...                   global_batch_size=16, seed=0)
  >>> batch = next(src.iterate(0))
  >>> sorted(batch), batch["index"].shape, src.fingerprint[:15]
  (['image_features', 'index', 'text_features'], (16,), 'content-sha256:')
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import numpy as np

__all__ = [
  "Source",
  "ArraySource",
  "SOURCES",
  "make_source",
  "toy_features",
  "npz",
  "content_fingerprint",
  "check_batch",
  "to_device",
  "prefetch_to_device",
]

Batch = dict[str, np.ndarray]


class Source(Protocol):
  """What the trainer needs from its input (see the module docstring)."""

  num_examples: int
  cluster_sizes: np.ndarray | None
  fingerprint: str | None

  def iterate(
    self, start_batch: int = 0, process_index: int = 0, process_count: int = 1
  ) -> Iterator[Batch]: ...


def content_fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
  """`"content-sha256:<hex>"` over the arrays' names, dtypes, shapes and bytes, in row order:
  the identity of in-memory data that has no ids (reordering the rows changes it).

  Example:
    >>> a = {"x": np.arange(4)}
    >>> content_fingerprint(a) == content_fingerprint({"x": np.arange(4)[::-1]})
    False
  """
  h = hashlib.sha256(b"mmts-content-v1\n")
  for key in sorted(arrays):
    v = np.ascontiguousarray(arrays[key])
    h.update(f"{key}\n{v.dtype.str}\n{v.shape}\n".encode())
    h.update(v.tobytes())
  return "content-sha256:" + h.hexdigest()


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


class ArraySource:
  """In-memory examples, deterministic and resumable: global batch `b` of epoch `e = b // S`
  (`S = N // B`, the remainder dropped) is slice `b % S` of a permutation seeded by
  `(seed, e)`; process `p` of `P` takes rows `[p B/P, (p+1) B/P)` of it.

  `fingerprint`: the sample identities (e.g. `dataset_fingerprint(captions)`); None: the
  content fingerprint of `arrays`, computed on first use.
  """

  def __init__(
    self,
    arrays: Mapping[str, np.ndarray],
    *,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    cluster_sizes: np.ndarray | None = None,
    fingerprint: str | None = None,
  ):
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    if not arrays:
      raise ValueError("ArraySource needs at least one array")
    sizes = {k: v.shape[0] for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"all arrays must have the same number of examples, got {sizes}")
    self.num_examples = next(iter(sizes.values()))
    if global_batch_size > self.num_examples:
      raise ValueError(f"batch_size {global_batch_size} > number of examples {self.num_examples}")
    self.arrays = arrays
    self.batch_size = int(global_batch_size)
    self.seed = int(seed)
    self.shuffle = bool(shuffle)
    self.cluster_sizes = cluster_sizes
    self.steps_per_epoch = self.num_examples // self.batch_size
    self._fingerprint = fingerprint

  @property
  def fingerprint(self) -> str:
    if self._fingerprint is None:
      self._fingerprint = content_fingerprint(self.arrays)
    return self._fingerprint

  def __len__(self) -> int:
    return self.num_examples

  def _order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.num_examples)
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

  def iterate(
    self, start_batch: int = 0, process_index: int = 0, process_count: int = 1
  ) -> Iterator[Batch]:
    if self.batch_size % process_count:
      raise ValueError(
        f"batch_size {self.batch_size} does not split over {process_count} processes"
      )
    local = self.batch_size // process_count
    b, epoch, order = int(start_batch), None, None
    while True:
      if b // self.steps_per_epoch != epoch:
        epoch = b // self.steps_per_epoch
        order = self._order(epoch)
      start = (b % self.steps_per_epoch) * self.batch_size + process_index * local
      assert order is not None, "set on the first pass"
      rows = order[start : start + local]
      yield {k: v[rows] for k, v in self.arrays.items()}
      b += 1


# ----------------------------------------------------------------------------- built-in sources


def _zipf_sizes(num_examples: int, num_clusters: int, exponent: float) -> np.ndarray:
  """Long-tail cluster sizes proportional to `1 / rank^exponent`, each >= 1, summing to N."""
  w = 1.0 / np.arange(1, num_clusters + 1) ** exponent
  sizes = np.maximum(1, np.floor(w / w.sum() * num_examples)).astype(np.int64)
  sizes[0] += num_examples - sizes.sum()
  if sizes[0] < 1:
    raise ValueError(f"cannot split {num_examples} examples into {num_clusters} clusters")
  return sizes


def toy_features(cfg, *, global_batch_size: int, seed: int) -> ArraySource:
  """Toy long-tail pairs for tests and smoke runs (not the synthetic benchmark of
  `mmts_jax.longtail`): cluster `c` (Zipf-sized) has a random feature centre and a few keyword
  tokens; `image_features = centre + noise`, `text` = keywords + random tokens (or
  `text_features`, with `cfg.text == "features"`). Trains in seconds on a CPU."""
  n = _positive_int("data.num_examples", cfg.num_examples)
  k = _positive_int("data.num_clusters", cfg.num_clusters)
  rng = np.random.default_rng(seed)
  sizes = _zipf_sizes(n, k, float(cfg.zipf))
  cluster = rng.permutation(np.repeat(np.arange(k), sizes))
  dim = _positive_int("data.image_dim", cfg.image_dim)
  centres = rng.normal(size=(k, dim)).astype(np.float32)
  image = centres[cluster] + float(cfg.noise) * rng.normal(size=(n, dim)).astype(np.float32)
  arrays = {"image_features": image.astype(np.float32), "index": np.arange(n, dtype=np.int32)}
  if cfg.text == "tokens":
    length = _positive_int("data.text_len", cfg.text_len)
    vocab = _positive_int("data.vocab_size", cfg.vocab_size)
    if vocab < 4 or length < 4:
      raise ValueError(f"data.vocab_size and data.text_len must be >= 4, got {vocab}, {length}")
    keywords = rng.integers(1, vocab, size=(k, 2))
    tokens = rng.integers(1, vocab, size=(n, length)).astype(np.int32)
    tokens[:, :2] = keywords[cluster]
    lengths = rng.integers(3, length + 1, size=n)
    tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0  # pad id 0
    arrays["text"] = tokens
  elif cfg.text == "features":
    text_centres = rng.normal(size=(k, dim)).astype(np.float32)
    arrays["text_features"] = (
      text_centres[cluster] + float(cfg.noise) * rng.normal(size=(n, dim))
    ).astype(np.float32)
  else:
    raise ValueError(f"data.text must be 'tokens' or 'features', got {cfg.text!r}")
  return ArraySource(
    arrays,
    global_batch_size=global_batch_size,
    seed=seed,
    shuffle=bool(cfg.get("shuffle", True)),
    cluster_sizes=sizes[cluster],
  )


def npz(cfg, *, global_batch_size: int, seed: int) -> ArraySource:
  """Precomputed features (or token ids) from `cfg.path` (.npz): any of `image`,
  `image_features`, `text`, `text_features`, optional `index` (default: the row number, which is
  the example's stable dataset position), `cluster_size` (per example, for the shifts) and
  `fingerprint` (a string: the dataset's ids fingerprint; default the content fingerprint)."""
  import os

  path = str(cfg.get("path", "") or "")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data.path {path!r} does not exist")
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except (ValueError, OSError) as e:  # not a zip, or object arrays (pickles are refused)
    raise ValueError(f"data.path {path!r} is not a readable .npz of arrays: {e}") from None
  cluster_sizes = arrays.pop("cluster_size", None)
  fingerprint = arrays.pop("fingerprint", None)
  if not arrays:
    raise ValueError(f"data.path {path!r} holds no data arrays")
  n = next(iter(arrays.values())).shape[0]
  arrays.setdefault("index", np.arange(n, dtype=np.int32))
  return ArraySource(
    arrays,
    global_batch_size=global_batch_size,
    seed=seed,
    shuffle=bool(cfg.get("shuffle", True)),
    cluster_sizes=cluster_sizes,
    fingerprint=None if fingerprint is None else str(fingerprint),
  )


# Registered names -> "module:function" (imported on use: a name costs nothing until chosen).
SOURCES: dict[str, str | Callable] = {
  "toy_features": "mmts_jax.data.sources:toy_features",
  "npz": "mmts_jax.data.sources:npz",
  "records": "mmts_jax.data.trainer_source:records",
  "features": "mmts_jax.data.trainer_source:features",
  "tfds": "mmts_jax.data.trainer_source:tfds",
  "features_in_memory": "mmts_jax.projects.ek100_features.feature_source:in_memory",
  "synthetic_longtail": "mmts_jax.longtail.source:make_source",
}
_RENAMED = {"synthetic": "toy_features"}


def _resolve(target: str | Callable) -> Callable:
  if callable(target):
    return target
  module, _, fn = target.partition(":")
  return getattr(importlib.import_module(module), fn)


def make_source(cfg, *, global_batch_size: int, seed: int) -> Source:
  """`config.data` -> a source: `cfg.name` is a key of `SOURCES` or "package.module:function"."""
  name = cfg.get("name") if hasattr(cfg, "get") else getattr(cfg, "name", None)
  if name in SOURCES:
    factory = _resolve(SOURCES[name])
  elif isinstance(name, str) and ":" in name:
    try:
      factory = _resolve(name)
    except (ImportError, AttributeError) as e:
      raise ValueError(f"data.name {name!r} cannot be imported: {e}") from None
  elif name in _RENAMED:
    raise ValueError(f"data.name {name!r} was renamed {_RENAMED[name]!r}")
  else:
    raise ValueError(
      f"data.name must be one of {sorted(SOURCES)} or 'package.module:function', got {name!r}"
    )
  return factory(cfg, global_batch_size=global_batch_size, seed=seed)


def check_batch(batch: Mapping[str, np.ndarray], num_examples: int) -> None:
  """Every batch must carry `index` (its examples' dataset positions) within [0, N)."""
  if "index" not in batch:
    raise KeyError(
      f"the batch has no 'index' (keys: {sorted(batch)}): every example must carry "
      f"its stable dataset position, which selects its MM-TS shift"
    )
  index = np.asarray(batch["index"])
  if not np.issubdtype(index.dtype, np.integer) or index.ndim != 1:
    raise ValueError(f"batch['index'] must be a 1-D integer array, got {index.dtype} {index.shape}")
  if index.size and (index.min() < 0 or index.max() >= num_examples):
    raise ValueError(
      f"batch['index'] has values in [{index.min()}, {index.max()}] outside the "
      f"dataset / shift table [0, {num_examples})"
    )


# ----------------------------------------------------------------------------- host to device


def is_raw_pixels(x) -> bool:
  """A uint8 (B, H, W, 3) array: raw 0-255 RGB pixels, to be normalised on device."""
  return getattr(x, "dtype", None) == np.uint8 and np.ndim(x) == 4 and np.shape(x)[-1] == 3


_normalize_jit = None


def _normalize(x):
  global _normalize_jit
  if _normalize_jit is None:
    import jax

    from mmts_jax.data import image_ops

    # Elementwise: the output keeps the input's (batch) sharding, no data moves between devices.
    _normalize_jit = jax.jit(image_ops.normalize_on_device)
  return _normalize_jit(x)


def to_device(local: Mapping[str, np.ndarray], target) -> dict[str, Any]:
  """This process's numpy batch -> global `jax.Array`s: the one host-to-device path.

  `target` is a mesh (rows split over its data axis, as the trainer does) or a
  `jax.sharding.Sharding` (or a mapping field -> sharding). Non-numeric fields (captions) stay on
  the host and are dropped; raw uint8 pixels (see `is_raw_pixels`) are shipped as uint8 and
  normalised on the device. A batch with `crop_box` (the pipeline's `device_crop=True`) is
  cropped to `crop_size` on the device first (`device_crop.crop_on_device`, bicubic).

  Example:
    >>> from mmts_jax import mesh as mesh_lib
    >>> m = mesh_lib.make_mesh(1)
    >>> out = to_device({"image": np.full((2, 4, 4, 3), 255, np.uint8),
    ...                  "caption": np.array(["a", "b"])}, m)
    >>> sorted(out), str(out["image"].dtype), round(float(out["image"][0, 0, 0, 0]), 4)
    (['image'], 'float32', 1.9303)
  """
  import jax

  from mmts_jax import mesh as mesh_lib

  if isinstance(target, jax.sharding.Mesh):
    sharding, n_proc = mesh_lib.batch_sharding(target), jax.process_count()
  else:
    sharding, n_proc = target, None
  crop_size = _crop_size(local)
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    if k == "crop_size" or not (np.issubdtype(v.dtype, np.number) or v.dtype == np.bool_):
      continue
    s = sharding[k] if isinstance(sharding, Mapping) else sharding
    shape = None if n_proc is None else (v.shape[0] * n_proc,) + v.shape[1:]
    x = jax.make_array_from_process_local_data(s, v, shape)
    out[k] = _normalize(x) if is_raw_pixels(v) and crop_size is None else x
  if crop_size is not None:  # the pipeline's device_crop: crop, then normalise, on the device
    from mmts_jax.data import device_crop

    crops = device_crop.crop_on_device(out["image"], out.pop("crop_box"), crop_size)
    out["image"] = _normalize(crops)
  return out


def _crop_size(local: Mapping[str, np.ndarray]) -> int | None:
  """The device crop's output side from a batch with `crop_box` (None without one)."""
  if "crop_box" not in local:
    return None
  sizes = np.unique(np.asarray(local.get("crop_size", ())))
  if sizes.size != 1 or not is_raw_pixels(local.get("image")):
    raise ValueError(
      f"a batch with crop_box needs uint8 (B, S, S, 3) image and one crop_size, got crop_size "
      f"{sizes.tolist()} and image {getattr(local.get('image'), 'dtype', None)}"
    )
  return int(sizes[0])


def prefetch_to_device(
  batches: Iterable[Mapping[str, np.ndarray]],
  mesh,
  *,
  size: int = 2,
  check: Callable[[Mapping[str, np.ndarray]], None] | None = None,
) -> Iterator[dict[str, Any]]:
  """`to_device` over an iterator, keeping `size` batches in flight so the next transfer overlaps
  the current step. `check(local_batch)` runs on each host batch first (e.g. `check_batch`)."""
  queue: collections.deque = collections.deque()
  it = iter(batches)

  def put(n):
    for local in itertools.islice(it, n):
      if check is not None:
        check(local)
      queue.append(to_device(local, mesh))

  put(max(int(size), 1))
  while queue:
    yield queue.popleft()
    put(1)
