"""grain input pipelines: deterministic shuffling, per-host sharding, resumable loaders, prefetch.

The global order is fixed by the dataset and the seed alone: the records are shuffled per epoch
with grain's index shuffle (O(1) memory, a new permutation each epoch), every position `q` of that
stream gets its own augmentation generator (grain `random_map`, seeded by `(seed, q)`), and global
batch `b` is positions `[b*G, (b+1)*G)`. Host `p` of `P` reads rows `[p*G/P, (p+1)*G/P)` of every
global batch, which is how `jax.make_array_from_process_local_data` lays out a batch sharded over
a mesh whose batch axis spans processes. So the global batches are the same for any number of
hosts, and a loader is resumed by one int, the number of batches consumed.

Every example keeps `index`, its record number, so the trainer gathers per-sample MM-TS shifts
on device (`shift = table[index]`) without host work per step.

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from mmts_jax.data import device_crop as device_crop_lib
from mmts_jax.data import image_ops, sources

__all__ = [
  "ImageTextTransform",
  "Pipeline",
  "Loader",
  "DeviceIterator",
  "make_pipeline",
  "image_text_pipeline",
  "host_slice",
]


class ImageTextTransform:
  """Record -> example: `image` (S, S, 3) float32 CLIP-normalised, `text` (L,) int32, `index`.

  Train: random resized crop (`crop_scale`, aspect 3/4..4/3); eval: resize + centre crop.
  Optionally keeps `caption` (str) and `label` (int32); `mask` is passed through. With
  `uint8=True` the image stays uint8 (4x less to transfer, no float work on the host);
  `mmts_jax.data.sources.to_device` normalises it on the device. `decoder` is
  `image_ops.decode_image`'s ("auto": simplejpeg for JPEGs when installed; same pixels as "pil").
  `device_crop=True` (train, with `uint8=True`) moves the crop's resampling to the device: `image`
  is the decoded image stretched to a uint8 `source_side x source_side` square, `crop_box` (4,)
  float32 the same random box in that square, `crop_size` the int32 output side; `to_device`
  crops (bicubic) and normalises there (see `mmts_jax.data.device_crop`).
  Picklable, so grain worker processes can run it.

  Usage (tests/test_data_pipeline.py runs these on a small converted dataset):
    t = ImageTextTransform(tokenizer, image_size=224)
    t(source[0], np.random.default_rng(0))["image"].shape    # (224, 224, 3)
  """

  def __init__(
    self,
    tokenizer: Callable[[str], np.ndarray] | None,
    *,
    image_size: int = 224,
    train: bool = True,
    crop_scale: tuple[float, float] = (0.9, 1.0),
    keep_caption: bool = False,
    keep_label: bool = False,
    uint8: bool = False,
    decoder: str = "auto",
    device_crop: bool = False,
  ):
    if decoder not in image_ops.DECODERS:
      raise ValueError(f"decoder must be one of {image_ops.DECODERS}, got {decoder!r}")
    if not isinstance(image_size, int) or image_size < 1:
      raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
      raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}")
    if device_crop and not (train and uint8):
      raise ValueError(
        f"device_crop=True needs train=True and uint8=True (the device crops raw pixels), got "
        f"train={train}, uint8={uint8}"
      )
    self.device_crop = bool(device_crop)
    self.tokenizer, self.image_size, self.train = tokenizer, image_size, train
    self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
    self.keep_caption, self.keep_label, self.uint8 = keep_caption, keep_label, uint8
    self.decoder = decoder
    # A crop of area fraction s of a side-D image has side ~ sqrt(s) D; decoding JPEGs at the
    # scale where that is still >= image_size loses nothing the resize keeps.
    self._draft = image_ops.source_side(image_size, crop_scale[0]) if train else image_size

  def __call__(
    self, record: Mapping[str, Any], rng: np.random.Generator | None = None
  ) -> dict[str, Any]:
    img = image_ops.decode_image(record["image"], draft=self._draft, decoder=self.decoder)
    if self.train:
      if rng is None:
        raise ValueError("a train transform needs a generator (use it through grain random_map)")
      if self.device_crop:
        return self._finish(record, self._device_crop_fields(img, rng))
      img = image_ops.random_resized_crop(img, self.image_size, rng, scale=self.crop_scale)
    else:
      img = image_ops.resize_center_crop(img, self.image_size)
    pixels = np.asarray(img, np.uint8) if self.uint8 else image_ops.normalize(img)
    return self._finish(record, {"image": pixels})

  def _device_crop_fields(self, img, rng: np.random.Generator) -> dict[str, Any]:
    # The same generator draws the same box as the host path's random_resized_crop.
    box = image_ops.random_resized_crop_box(img.width, img.height, rng, scale=self.crop_scale)
    # The square's side is the draft target; a box covers at least crop_scale[0] of each axis,
    # so it keeps >= crop_scale[0] * side pixels per axis (213 of 237 at 224 px, 0.9).
    side = self._draft
    return {
      "image": device_crop_lib.square_source(img, side),
      "crop_box": device_crop_lib.box_in_square(box, img.width, img.height, side),
      "crop_size": np.int32(self.image_size),
    }

  def _finish(self, record: Mapping[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    out = {**fields, "index": np.int32(record["index"])}
    if self.tokenizer is not None:
      if "caption" not in record:
        raise KeyError(f"record {record.get('index')} has no caption to tokenise")
      out["text"] = self.tokenizer(record["caption"])
    if self.keep_caption:
      out["caption"] = record["caption"]
    if self.keep_label:
      out["label"] = np.int32(record["label"])
    if "mask" in record:
      out["mask"] = np.bool_(record["mask"])
    return out


class _RandomApply(grain.transforms.RandomMap):
  def __init__(self, fn):
    self.fn = fn

  def random_map(self, element, rng):
    return self.fn(element, rng)


class _Apply(grain.transforms.Map):
  def __init__(self, fn):
    self.fn = fn

  def map(self, element):
    return self.fn(element, None)


class _Padded(Sequence):
  """`source` followed by copies of its last record, with `mask` False on the copies."""

  def __init__(self, source, length: int):
    self.source, self.length = source, length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, i: int):
    n = len(self.source)
    return {**self.source[min(int(i), n - 1)], "mask": int(i) < n}


class _HostRows(grain.MapDataset):
  """Element `i` of host `p`: global position `(i // L) * G + p * L + i % L` (L = G / P)."""

  def __init__(
    self,
    parent: grain.MapDataset,
    global_batch: int,
    local_batch: int,
    process_index: int,
    num_batches: int,
  ):
    super().__init__(parent)
    self._g, self._l, self._p, self._n = global_batch, local_batch, process_index, num_batches

  def __len__(self) -> int:
    return self._n * self._l

  def _position(self, i: int) -> int:
    b, j = divmod(int(i), self._l)
    return b * self._g + self._p * self._l + j

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    if not 0 <= index < len(self):
      raise IndexError(f"element {index} out of range [0, {len(self)})")
    return self._parent[self._position(index)]

  def __str__(self) -> str:
    return f"_HostRows(G={self._g}, L={self._l}, p={self._p})"


def host_slice(
  global_batch_size: int, process_index: int | None = None, process_count: int | None = None
) -> tuple[int, int, int]:
  """(process_index, process_count, local batch size); defaults from `jax.process_*`."""
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
  if (
    isinstance(global_batch_size, bool)
    or not isinstance(global_batch_size, (int, np.integer))
    or global_batch_size < 1
    or global_batch_size % process_count
  ):
    raise ValueError(
      f"global_batch_size={global_batch_size} must be a positive multiple of "
      f"process_count={process_count}"
    )
  return process_index, process_count, global_batch_size // process_count


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """This host's stream of examples, `local_batch_size` per batch, `num_batches` (None: endless).

  `loader(position)` iterates over batches `position, position + 1, ...`.
  """

  elements: grain.MapDataset
  local_batch_size: int
  global_batch_size: int
  num_batches: int | None
  num_records: int

  def loader(self, position: int = 0, **kwargs) -> Loader:
    return Loader(self, position=position, **kwargs)


def make_pipeline(
  source,
  transform: Callable[[Mapping[str, Any], Any], Mapping[str, Any]],
  *,
  global_batch_size: int,
  seed: int = 0,
  train: bool = True,
  num_epochs: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Pipeline:
  """Builds the per-host pipeline over any random-access `source` of record dicts.

  train: shuffle each epoch (seeded), `transform(record, rng)` with a per-position generator,
    `num_epochs` passes (None: endless), incomplete last global batch dropped.
  eval (`train=False`): one pass in record order, `transform(record, None)`, the last global batch
    padded with copies of the last record whose `mask` is False (every record is seen once).
  """
  n = len(source)
  if n == 0:
    raise ValueError("the source is empty")
  if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
    raise ValueError(f"num_epochs must be a positive int or None, got {num_epochs!r}")
  p, _, local = host_slice(global_batch_size, process_index, process_count)
  g = global_batch_size
  if train:
    shuffle_seed, aug_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat(num_epochs)
    ds = ds.random_map(_RandomApply(transform), seed=aug_seed)
    num_batches = None if num_epochs is None else (n * num_epochs) // g
    if num_batches == 0:
      raise ValueError(f"{n} records x {num_epochs} epochs make no global batch of {g}")
  else:
    num_batches = -(-n // g)
    ds = grain.MapDataset.source(_Padded(source, num_batches * g)).map(_Apply(transform))
  rows = _HostRows(ds, g, local, p, num_batches if num_batches is not None else (len(ds) // g))
  return Pipeline(rows, local, g, num_batches, n)


def image_text_pipeline(
  source,
  tokenizer,
  *,
  image_size: int = 224,
  global_batch_size: int,
  seed: int = 0,
  train: bool = True,
  num_epochs: int | None = None,
  crop_scale: tuple[float, float] = (0.9, 1.0),
  keep_caption: bool = False,
  keep_label: bool = False,
  uint8: bool = False,
  decoder: str = "auto",
  device_crop: bool = False,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Pipeline:
  """`make_pipeline` with `ImageTextTransform`; `source` is a `RecordSource` or a dataset dir.

  Usage (tests/test_data_pipeline.py runs it on a small converted dataset):
    pipe = image_text_pipeline("data/cc3m", TextTokenizer(tok_dir, 77),
                               global_batch_size=1024, seed=0)
    batch = next(iter(pipe.loader()))
    # image (1024, 224, 224, 3) float32, text (1024, 77) int32, index (1024,) int32
  """
  if isinstance(source, (str, os.PathLike)):
    from mmts_jax.data.records import RecordSource

    source = RecordSource(source)
  transform = ImageTextTransform(
    tokenizer,
    image_size=image_size,
    train=train,
    crop_scale=crop_scale,
    keep_caption=keep_caption,
    keep_label=keep_label,
    uint8=uint8,
    decoder=decoder,
    device_crop=device_crop,
  )
  return make_pipeline(
    source,
    transform,
    global_batch_size=global_batch_size,
    seed=seed,
    train=train,
    num_epochs=num_epochs,
    process_index=process_index,
    process_count=process_count,
  )


def _stack(examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _absl_flags_parsed() -> None:
  """grain workers read absl flags; outside `absl.app.run` (pytest, notebooks) take defaults."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class Loader:
  """Iterates over a `Pipeline`'s host-local batches (dicts of numpy arrays), resumably.

  `get_state()` is `{"position": batches handed out so far}` (plain ints, checkpointable);
  `set_state` (or `position=` at construction) restarts exactly at that batch. `num_threads`
  and `prefetch` (examples; default one batch, at least 32) are grain's `ReadOptions`: threads
  decode and augment ahead of the consumer. `worker_count > 0` moves the work to grain worker
  processes, one batch per task. None of them changes the batches.
  """

  def __init__(
    self,
    pipeline: Pipeline,
    *,
    position: int = 0,
    num_threads: int = 8,
    prefetch: int | None = None,
    worker_count: int = 0,
  ):
    if prefetch is None:  # one batch ahead keeps every thread busy without hoarding memory
      prefetch = max(32, pipeline.local_batch_size)
    if num_threads < 0 or prefetch < 0 or worker_count < 0:
      raise ValueError(
        f"num_threads={num_threads}, prefetch={prefetch}, worker_count={worker_count} must be >= 0"
      )
    self.pipeline = pipeline
    self._read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    self._workers = worker_count
    self._it = None
    self.set_state({"position": position})

  def get_state(self) -> dict[str, int]:
    return {"position": self.position}

  def set_state(self, state: Mapping[str, int]) -> None:
    position = state["position"]
    if not isinstance(position, (int, np.integer)) or position < 0:
      raise ValueError(f"position must be an int >= 0, got {position!r}")
    n = self.pipeline.num_batches
    if n is not None and position > n:
      raise ValueError(f"position {position} is past the end ({n} batches)")
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
    self.position = int(position)
    local = self.pipeline.local_batch_size
    if self._workers:
      # grain hands whole elements of the map dataset to workers round-robin and interleaves
      # their outputs in order, so the unit of work must be the batch: batching inside a
      # worker would mix rows of different batches and change them with the worker count.
      _absl_flags_parsed()
      ds = self.pipeline.elements.batch(local, drop_remainder=True, batch_fn=_stack)
      ds = ds[self.position :].to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)
      )
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers))
    else:
      # Threads work element by element, so a batch is ready as soon as its rows are.
      ds = self.pipeline.elements[self.position * local :].to_iter_dataset(self._read)
      ds = ds.batch(local, drop_remainder=True, batch_fn=_stack)
    self._it = iter(ds)

  def __iter__(self) -> Loader:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    assert self._it is not None, "set_state() in __init__ made it"
    batch = next(self._it)
    self.position += 1
    return batch

  def __len__(self) -> int:
    if self.pipeline.num_batches is None:
      raise TypeError("an endless (num_epochs=None) loader has no length")
    return self.pipeline.num_batches - self.position


class DeviceIterator:
  """Keeps `size` batches in flight to the devices (transfers are asynchronous), each through
  `mmts_jax.data.sources.to_device` (captions dropped, uint8 pixels normalised on device).

  Yields dicts of global `jax.Array`s; `get_state()` counts the batches *yielded*, not the ones
  in flight, so restoring it replays nothing and skips nothing.

  Usage (tests/test_data_pipeline.py):
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    it = DeviceIterator(pipe.loader(), sharding)
    state = it.get_state()   # {"position": 12}: save it with the checkpoint
  """

  def __init__(self, loader: Loader, sharding, *, size: int = 2):
    if size < 1:
      raise ValueError(f"size must be >= 1, got {size}")
    self.loader, self.sharding, self.size = loader, sharding, size
    self._queue: collections.deque = collections.deque()

  def __iter__(self) -> DeviceIterator:
    return self

  def __next__(self) -> dict[str, Any]:
    while len(self._queue) < self.size:
      try:
        self._queue.append(sources.to_device(next(self.loader), self.sharding))
      except StopIteration:
        break
    if not self._queue:
      raise StopIteration
    return self._queue.popleft()

  def get_state(self) -> dict[str, int]:
    return {"position": self.loader.position - len(self._queue)}

  def set_state(self, state: Mapping[str, int]) -> None:
    self._queue.clear()
    self.loader.set_state(state)
