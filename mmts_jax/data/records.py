"""ArrayRecord datasets of serialized image-text examples, with a manifest.

Layout of a converted dataset directory::

  manifest.json                 num_records, fingerprint, fields, shards (written last)
  data-00000.array_record ...   one msgpack map per record, `group_size:1` for random access
  captions.jsonl                line i = JSON string of record i's caption (when captions exist)
  keys.jsonl                    line i = JSON string of record i's key (its id in the source)

A record is a msgpack map with `index` (int, its record number, the stable position every
training example carries), `key` (str, its id in the source: file name, tar key, TFDS id),
`image` (bytes, the encoded JPEG/PNG as found in the source) and optionally `caption` (str) and
`label` (int). Images stay encoded so a dataset costs its JPEG size on disk; decoding happens in
the input pipeline.

Everything is written atomically and the manifest last, so a directory without `manifest.json`
is not a dataset. The directory is an `etils.epath` path, local or on an object store:

* local: shards and side files are written under temporary names in the same directory and
  renamed into place when complete;
* object store (`gs://...`): they are written in a local staging directory and each finished file
  is uploaded once under its final name (an object upload is atomic: it appears whole or not at
  all); the manifest is uploaded after every file it lists.

Reading (`RecordSource`) takes the manifest and side files through epath and hands the shard
paths to array_record, whose reader opens `gs://` objects itself (ranged reads, no download).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import msgpack
import numpy as np
from etils import epath

from mmts_jax.atomic_io import atomic_write_bytes, is_object_store  # noqa: F401  (re-exported)
from mmts_jax.data.fingerprint import Fingerprinter

__all__ = [
  "Manifest",
  "RecordWriter",
  "RecordSource",
  "write_records",
  "read_manifest",
  "read_captions",
  "read_keys",
  "atomic_write_bytes",
  "MANIFEST",
  "FORMAT",
]

MANIFEST = "manifest.json"
SIDE_FILES = {"caption": "captions.jsonl", "key": "keys.jsonl"}
FORMAT = "mmts_records/1"
_SHARD = "data-{:05d}.array_record"
# Field types a record may carry; `index` and `key` are always there.
_FIELD_TYPES = {"index": int, "key": str, "image": bytes, "caption": str, "label": int}


@dataclasses.dataclass(frozen=True)
class Manifest:
  """What a converted dataset holds; `num_records` and `fingerprint` identify it.

  `fingerprint` is `dataset_fingerprint` (`"sha256:..."`) over the captions in record order, or
  over the keys when the records have no captions (`fingerprint_of` says which).
  """

  num_records: int
  fingerprint: str
  fingerprint_of: str
  fields: dict[str, str]
  shards: tuple[str, ...]
  shard_lengths: tuple[int, ...]
  source: dict[str, Any] = dataclasses.field(default_factory=dict)
  format: str = FORMAT

  def to_json(self) -> str:
    d = dataclasses.asdict(self)
    d["shards"], d["shard_lengths"] = list(self.shards), list(self.shard_lengths)
    return json.dumps(d, indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> Manifest:
    d = json.loads(text)
    if d.get("format") != FORMAT:
      raise ValueError(f"not an {FORMAT} manifest: format={d.get('format')!r}")
    d["shards"], d["shard_lengths"] = tuple(d["shards"]), tuple(d["shard_lengths"])
    m = cls(**d)
    if sum(m.shard_lengths) != m.num_records or len(m.shards) != len(m.shard_lengths):
      raise ValueError(
        f"inconsistent manifest: num_records={m.num_records}, shard_lengths={list(m.shard_lengths)}"
      )
    return m


def _check_example(ex: Mapping[str, Any]) -> None:
  for name, value in ex.items():
    want = _FIELD_TYPES.get(name)
    if want is None:
      raise ValueError(f"unknown record field {name!r}; allowed: {sorted(_FIELD_TYPES)}")
    if want is int:
      ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    else:
      ok = isinstance(value, want)
    if not ok:
      raise TypeError(f"record field {name!r} must be {want.__name__}, got {type(value).__name__}")
  if "image" not in ex:
    raise ValueError(f"a record needs an 'image' field, got fields {sorted(ex)}")


class RecordWriter:
  """Streams examples into ArrayRecord shards; `close()` writes the manifest and returns it.

  Each example is a dict with `image` (encoded bytes) and optionally `key`, `caption`, `label`;
  the writer assigns `index` (0, 1, ...) in write order. All examples must have the same fields.

  Example:
    >>> import tempfile
    >>> from mmts_jax.data.sample_images import make_image
    >>> jpeg_bytes = make_image(0, np.random.default_rng(0))
    >>> out_dir = tempfile.mkdtemp()
    >>> with RecordWriter(out_dir) as w:
    ...   _ = w.write({"image": jpeg_bytes, "caption": "a dog", "key": "0001"})
    >>> w.manifest.num_records
    1
    >>> r = RecordSource(out_dir)[0]
    >>> r["index"], r["key"], r["caption"], r["image"] == jpeg_bytes
    (0, '0001', 'a dog', True)
  """

  def __init__(
    self,
    out_dir: str | os.PathLike,
    *,
    records_per_shard: int = 50_000,
    overwrite: bool = False,
    source: Mapping[str, Any] | None = None,
  ):
    if not isinstance(records_per_shard, int) or records_per_shard < 1:
      raise ValueError(f"records_per_shard must be a positive int, got {records_per_shard!r}")
    self.out_dir = epath.Path(os.fspath(out_dir))
    if (self.out_dir / MANIFEST).exists() and not overwrite:
      raise FileExistsError(
        f"{self.out_dir} already holds a dataset ({MANIFEST}); pass overwrite=True to replace it"
      )
    self.out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite and (self.out_dir / MANIFEST).exists():
      # The old manifest goes first: a half-rewritten directory must not look complete.
      (self.out_dir / MANIFEST).unlink()
    # Files are written here, then published under their final names in out_dir.
    self._remote = is_object_store(self.out_dir)
    self._stage = (
      tempfile.mkdtemp(prefix="mmts_records_") if self._remote else os.fspath(self.out_dir)
    )
    self._per_shard = records_per_shard
    self._source = dict(source or {})
    self._fields: tuple[str, ...] | None = None
    self._shards: list[str] = []
    self._lengths: list[int] = []
    self._writer = None
    self._tmp_shard: str | None = None
    # Captions and keys also go to JSON-lines side files: the cluster-table stage reads them
    # without touching images, and the fingerprint (whose header holds N) is hashed from them.
    self._side, self._side_tmp = {}, {}
    for field, name in SIDE_FILES.items():
      fd, self._side_tmp[field] = tempfile.mkstemp(
        prefix=f".{name}.", suffix=".tmp", dir=self._stage
      )
      self._side[field] = os.fdopen(fd, "w", encoding="utf-8")
    self.num_records = 0
    self.manifest: Manifest | None = None

  def __enter__(self) -> RecordWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()

  def _open_shard(self) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    name = _SHARD.format(len(self._shards))
    self._tmp_shard = os.path.join(self._stage, f".{name}.tmp")
    self._writer = ArrayRecordWriter(self._tmp_shard, "group_size:1")
    self._shards.append(name)
    self._lengths.append(0)

  def _publish(self, tmp: str, name: str) -> None:
    """Moves a finished local file to `out_dir/name`: a rename, or one streamed upload."""
    if not self._remote:
      os.replace(tmp, os.path.join(self._stage, name))
      return
    with open(tmp, "rb") as src, (self.out_dir / name).open("wb") as dst:
      shutil.copyfileobj(src, dst, 16 << 20)  # the object appears when the upload completes
    os.unlink(tmp)

  def _close_shard(self) -> None:
    assert self._writer is not None and self._tmp_shard is not None, "a shard is open"
    self._writer.close()
    self._publish(self._tmp_shard, self._shards[-1])
    self._writer = self._tmp_shard = None

  def write(self, example: Mapping[str, Any]) -> int:
    """Appends one example and returns its index (record number)."""
    if self.manifest is not None:
      raise ValueError("write() after close()")
    ex = {k: v for k, v in example.items() if v is not None}
    ex.setdefault("key", str(self.num_records))
    ex["index"] = self.num_records
    _check_example(ex)
    fields = tuple(sorted(ex))
    if self._fields is None:
      self._fields = fields
    elif fields != self._fields:
      raise ValueError(
        f"record {self.num_records} has fields {list(fields)}, earlier records "
        f"have {list(self._fields)}"
      )
    if self._writer is None or self._lengths[-1] >= self._per_shard:
      if self._writer is not None:
        self._close_shard()
      self._open_shard()
    ex = {k: (int(v) if k in ("index", "label") else v) for k, v in ex.items()}
    assert self._writer is not None, "_open_shard() made one"
    self._writer.write(msgpack.packb(ex, use_bin_type=True))
    self._lengths[-1] += 1
    for field, f in self._side.items():
      if field in ex:
        f.write(json.dumps(ex[field], ensure_ascii=False) + "\n")
    self.num_records += 1
    return ex["index"]

  def update_source(self, **info: Any) -> None:
    """Adds provenance (e.g. skip counts) to the manifest's `source` before `close()`."""
    self._source.update(info)

  def close(self) -> Manifest:
    if self.manifest is not None:
      return self.manifest
    if self.num_records == 0:
      self.abort()
      raise ValueError(f"no records were written to {self.out_dir}")
    self._close_shard()
    assert self._fields is not None, "the first write() set the fields"
    has_captions = "caption" in self._fields
    fingerprint_of = "caption" if has_captions else "key"
    for f in self._side.values():
      f.close()
    # Hashed from the local copy, before it is published.
    fingerprint = _fingerprint_file(self._side_tmp[fingerprint_of], self.num_records)
    for field in self._side:
      if field in self._fields:
        self._publish(self._side_tmp[field], SIDE_FILES[field])
      else:
        os.unlink(self._side_tmp[field])
    types = {
      "index": "int64",
      "key": "str",
      "image": "bytes (encoded JPEG/PNG)",
      "caption": "str",
      "label": "int64",
    }
    self.manifest = Manifest(
      num_records=self.num_records,
      fingerprint=fingerprint,
      fingerprint_of=fingerprint_of,
      fields={k: types[k] for k in self._fields},
      shards=tuple(self._shards),
      shard_lengths=tuple(self._lengths),
      source=self._source,
    )
    atomic_write_bytes(self.out_dir / MANIFEST, self.manifest.to_json().encode())
    # Shards of an overwritten, larger dataset are no longer listed anywhere: reclaim the space.
    for stale in self.out_dir.glob("data-*.array_record"):
      if stale.name not in self.manifest.shards:
        stale.unlink()
    if self._remote:
      shutil.rmtree(self._stage, ignore_errors=True)
    return self.manifest

  def abort(self) -> None:
    """Drops temporary files; the directory keeps no manifest, so it is not a dataset."""
    if self._writer is not None:
      assert self._tmp_shard is not None, "set with the writer"
      self._writer.close()
      os.unlink(self._tmp_shard)
      self._writer = None
    for field, f in self._side.items():
      f.close()
      if os.path.exists(self._side_tmp[field]):
        os.unlink(self._side_tmp[field])
    if self._remote:
      shutil.rmtree(self._stage, ignore_errors=True)


def write_records(out_dir: str | os.PathLike, examples, **kwargs) -> Manifest:
  """Writes an iterable of example dicts with a `RecordWriter`; returns the manifest."""
  with RecordWriter(out_dir, **kwargs) as w:
    for ex in examples:
      w.write(ex)
  assert w.manifest is not None, "leaving the with block closed the writer"
  return w.manifest


def read_manifest(data_dir: str | os.PathLike) -> Manifest:
  path = epath.Path(os.fspath(data_dir)) / MANIFEST
  if not path.is_file():
    raise FileNotFoundError(
      f"{data_dir} is not a converted dataset: {MANIFEST} is missing (run `mmts prepare`)"
    )
  try:
    return Manifest.from_json(path.read_text(encoding="utf-8"))
  except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError too
    from mmts_jax.errors import UserInputError

    raise UserInputError(
      path, f"is corrupt ({type(e).__name__}: {e})", expected="a manifest written by `mmts prepare`"
    ) from e


def _json_lines(path) -> Iterator[Any]:
  with epath.Path(os.fspath(path)).open("r", encoding="utf-8") as f:
    for line in f:
      yield json.loads(line)


def _fingerprint_file(path, n: int) -> str:
  f = Fingerprinter(n)
  for key in _json_lines(path):
    f.update(key)
  return f.hexdigest()


def _read_side(data_dir, field: str) -> list:
  m = read_manifest(data_dir)
  if field not in m.fields:
    raise ValueError(f"{data_dir} has no {field}s (fields: {sorted(m.fields)})")
  name = SIDE_FILES[field]
  values = list(_json_lines(epath.Path(os.fspath(data_dir)) / name))
  if len(values) != m.num_records:
    raise ValueError(f"{name} has {len(values)} lines, manifest says {m.num_records}")
  return values


def read_captions(data_dir: str | os.PathLike) -> list[str]:
  """The captions in record order (from `captions.jsonl`, without touching the images).

  `dataset_fingerprint(read_captions(d)) == read_manifest(d).fingerprint`.
  """
  return _read_side(data_dir, "caption")


def read_keys(data_dir: str | os.PathLike) -> list[str]:
  """The source ids of the records in order (file names, tar keys, TFDS positions)."""
  return _read_side(data_dir, "key")


class RecordSource(Sequence):
  """Random access to a converted dataset: `source[i]` is record i as a dict.

  Implements grain's `RandomAccessDataSource` protocol (`__len__`, `__getitem__`) and pickles
  cheaply (the reader opens lazily), so grain worker processes can use it.
  """

  def __init__(self, data_dir: str | os.PathLike):
    self.data_dir = epath.Path(os.fspath(data_dir))
    self.manifest = read_manifest(self.data_dir)
    for name in self.manifest.shards:
      if not (self.data_dir / name).is_file():
        raise FileNotFoundError(
          f"shard {name} listed in the manifest is missing from {self.data_dir}"
        )
    self._reader = None

  def _source(self):
    if self._reader is None:
      from array_record.python.array_record_data_source import ArrayRecordDataSource

      # gs:// shards are opened by array_record's own GCS reader (ranged reads).
      self._reader = ArrayRecordDataSource(
        [os.fspath(self.data_dir / s) for s in self.manifest.shards]
      )
    return self._reader

  def __getstate__(self):
    return {"data_dir": self.data_dir, "manifest": self.manifest, "_reader": None}

  @property
  def fingerprint(self) -> str:
    """The manifest's fingerprint (what `ClusterTable.validate(source)` compares)."""
    return self.manifest.fingerprint

  def __len__(self) -> int:
    return self.manifest.num_records

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"record {i} out of range [0, {len(self)})")
    return msgpack.unpackb(self._source()[i], raw=False)

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [msgpack.unpackb(r, raw=False) for r in self._source().__getitems__(list(indices))]

  def __iter__(self) -> Iterator[dict[str, Any]]:
    for i in range(len(self)):
      yield self[i]

  def __repr__(self) -> str:
    return f"RecordSource({str(self.data_dir)!r}, num_records={len(self)})"
