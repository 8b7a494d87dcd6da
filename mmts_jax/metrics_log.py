"""Training metrics: one JSON object per logged step in `WORKDIR/metrics.jsonl`, and the same
scalars (plus histograms) as TensorBoard events in `WORKDIR/tensorboard/` when `tensorboardX` is
installed. `WORKDIR` may be local or on an object store (`gs://...`, through `etils.epath`).

Only process 0 writes. Non-finite floats are written as `null` so the file stays strict JSON.

Durability and atomicity per store:
* local: `metrics.jsonl` is opened for append and flushed after every record, so a preempted run
  keeps every line it logged; TensorBoard writes its event file as usual.
* object store: objects cannot be appended to, so the writer keeps the records (those already in
  the object when it opened, plus new ones) and rewrites the object whole after every record
  with one upload (`atomic_io.atomic_write`: readers see the previous or the new version, never
  a torn line). Cost per record: one upload of the file, O(records) bytes (~300 B a record).
  TensorBoard event files likewise are buffered and uploaded whole on each TensorBoard flush
  (every `flush_secs`, `flush()` and `close()`), through an `epath` writer registered with
  tensorboardX for the store's scheme.

`truncate_metrics` rewrites the file atomically (temp + rename locally, one upload remotely).

Example:
  >>> import tempfile
  >>> d = tempfile.mkdtemp()
  >>> w = MetricsWriter(d, tensorboard=False)
  >>> w.write(1, {"loss": 2.5})
  >>> w.close()
  >>> read_metrics(d)
  [{'step': 1, 'loss': 2.5}]
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from mmts_jax import atomic_io

__all__ = ["MetricsWriter", "read_metrics", "truncate_metrics", "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"


def _jsonable(v: Any):
  if isinstance(v, (bool, np.bool_)):
    return bool(v)
  if isinstance(v, (int, np.integer)):
    return int(v)
  v = float(np.asarray(v))
  return v if math.isfinite(v) else None


def _metrics_path(workdir) -> epath.Path:
  return epath.Path(os.fspath(workdir)) / METRICS_FILE


def read_metrics(workdir) -> list[dict]:
  """All records of `WORKDIR/metrics.jsonl`, in order ([] if there is none)."""
  path = _metrics_path(workdir)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(workdir, last_step: int) -> int:
  """Drops records with `step > last_step` (logged after the checkpoint a run resumes from), so
  a resumed run appends exactly what the uninterrupted run would have. Atomic. Returns the number
  of records dropped."""
  records = read_metrics(workdir)
  keep = [r for r in records if int(r.get("step", 0)) <= last_step]
  if len(keep) == len(records):
    return 0
  atomic_io.atomic_write_text(_metrics_path(workdir), "".join(json.dumps(r) + "\n" for r in keep))
  return len(records) - len(keep)


class _ObjectJsonl:
  """An append-only text file on an object store: the whole object is rewritten (one atomic
  upload) on every `write`, since objects cannot be appended to."""

  def __init__(self, path: epath.Path):
    self.path = path
    self._text = path.read_text() if path.exists() else ""

  def write(self, line: str) -> None:
    self._text += line
    atomic_io.atomic_write_text(self.path, self._text)

  def flush(self) -> None:
    pass  # every write is already published

  def close(self) -> None:
    pass


class _EpathEventFile:
  """tensorboardX record writer for object-store URIs: buffers the event file and uploads it
  whole (one atomic object write) on every flush."""

  def __init__(self, path: str):
    self.path = epath.Path(path)
    self.buffer = io.BytesIO()
    self._uploaded = 0

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    if self.buffer.tell() != self._uploaded:
      atomic_io.atomic_write_bytes(self.path, self.buffer.getvalue())
      self._uploaded = self.buffer.tell()

  def close(self) -> None:
    self.flush()


class _EpathEventFactory:
  def open(self, path: str) -> _EpathEventFile:
    return _EpathEventFile(path)

  def directory_check(self, path: str) -> None:
    del path  # object-store directories are implicit prefixes


def _register_tensorboard_scheme(logdir: str) -> None:
  """Routes tensorboardX's event files for `logdir`'s scheme through `epath` (its own `gs://`
  writer needs google-cloud-storage credentials and ignores the project's path type)."""
  from tensorboardX import record_writer

  scheme = logdir.split("://", 1)[0]
  if not isinstance(record_writer.REGISTERED_FACTORIES.get(scheme), _EpathEventFactory):
    record_writer.register_writer_factory(scheme, _EpathEventFactory())


class MetricsWriter:
  """Appends scalars to `metrics.jsonl` and, optionally, TensorBoard."""

  def __init__(self, workdir, *, tensorboard: bool = True, enabled: bool = True):
    self.workdir = epath.Path(os.fspath(workdir))
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    path = self.workdir / METRICS_FILE
    if atomic_io.is_object_store(path):
      self._file = _ObjectJsonl(path)
    else:
      self._file = open(path, "a", encoding="utf-8")
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:
        warnings.warn(
          "tensorboardX is not installed: TensorBoard scalars are not written "
          "(pip install tensorboardX)",
          stacklevel=2,
        )
      else:
        logdir = os.fspath(self.workdir / "tensorboard")
        if atomic_io.is_object_store(logdir):
          _register_tensorboard_scheme(logdir)
        self._tb = SummaryWriter(logdir)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record: dict[str, Any] = {"step": int(step)}
    record.update({k: _jsonable(v) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + "\n")
    # Flushed per record: a preempted run keeps every line it logged.
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and v is not None:
          self._tb.add_scalar(k, v, int(step))

  def write_histogram(self, step: int, name: str, values) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_histogram(name, np.asarray(values, np.float32), int(step))

  def flush(self) -> None:
    if self.enabled and self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()
