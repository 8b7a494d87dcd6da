"""Training metrics: one JSON object per logged step in `WORKDIR/metrics.jsonl`, and the same
scalars (plus histograms) as TensorBoard events in `WORKDIR/tensorboard/` when `tensorboardX` is
installed.

Only process 0 writes. Non-finite floats are written as `null` so the file stays strict JSON.

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

import json
import math
import os
import pathlib
import tempfile
import warnings
from typing import Any, Mapping

import numpy as np

__all__ = ["MetricsWriter", "read_metrics", "truncate_metrics", "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"


def _jsonable(v: Any):
  if isinstance(v, (bool, np.bool_)):
    return bool(v)
  if isinstance(v, (int, np.integer)):
    return int(v)
  v = float(np.asarray(v))
  return v if math.isfinite(v) else None


def read_metrics(workdir) -> list[dict]:
  """All records of `WORKDIR/metrics.jsonl`, in order ([] if there is none)."""
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(workdir, last_step: int) -> int:
  """Drops records with `step > last_step` (logged after the checkpoint a run resumes from), so
  a resumed run appends exactly what the uninterrupted run would have. Atomic. Returns the number
  of records dropped."""
  path = pathlib.Path(workdir) / METRICS_FILE
  records = read_metrics(workdir)
  keep = [r for r in records if int(r.get("step", 0)) <= last_step]
  if len(keep) == len(records):
    return 0
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{METRICS_FILE}.")
  with os.fdopen(fd, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in keep)
  os.replace(tmp, path)
  return len(records) - len(keep)


class MetricsWriter:
  """Appends scalars to `metrics.jsonl` and, optionally, TensorBoard."""

  def __init__(self, workdir, *, tensorboard: bool = True, enabled: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._file = open(self.workdir / METRICS_FILE, "a", encoding="utf-8")
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:
        warnings.warn("tensorboardX is not installed: TensorBoard scalars are not written "
                      "(pip install tensorboardX)", stacklevel=2)
      else:
        self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
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
