"""Cloud storage against a real GCS API: `gcp-storage-emulator` on the loopback (the
`gcs_emulator` fixture in conftest.py), with gcsfs (epath), tensorstore (orbax) and array_record's
reader pointed at it.

A tiny training run with a gs:// workdir checkpoints, logs metrics and TensorBoard events there,
stops, and resumes bit-exactly; `mmts cluster --out gs://`, `mmts eval --out gs://`, cluster
tables and ArrayRecord datasets read from gs://, and two simulated hosts each reading only their
slice of a gs:// dataset.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from etils import epath

from mmts_jax import atomic_io, cli
from mmts_jax.checkpointing import Checkpointer
from mmts_jax.metrics_log import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def test_atomic_writes_publish_whole_objects(gcs_emulator):
  base = epath.Path(gcs_emulator.fresh("atomic"))
  target = base / "sub" / "a.bin"
  atomic_io.atomic_write_bytes(target, b"one")
  assert target.read_bytes() == b"one"

  def broken(f):
    f.write(b"partial")
    raise RuntimeError("crash mid-write")

  with pytest.raises(RuntimeError, match="crash mid-write"):
    atomic_io.atomic_write(target, broken)
  # The failed write published nothing: the old object, and no temporary beside it.
  assert target.read_bytes() == b"one"
  assert [p.name for p in (base / "sub").iterdir()] == ["a.bin"]
  atomic_io.atomic_write_json(base / "c.json", {"k": [1, 2]})
  assert json.loads((base / "c.json").read_text()) == {"k": [1, 2]}


def test_tiny_training_on_gs_stops_and_resumes_bit_exactly(gcs_emulator, tmp_path, capsys):
  args = ["--config", TINY, "--config.total_steps=6", "--config.checkpoint.every_steps=2",
          "--config.checkpoint.keep=2", "--no-progress"]
  gs = gcs_emulator.fresh("train")
  local = str(tmp_path / "local")
  assert cli.main(["train", "--workdir", gs, "--stop-at-step", "3"] + args) == 0
  out = capsys.readouterr().out
  assert "step 3/6 (stopped)" in out and f"{gs}/metrics.jsonl" in out
  workdir = epath.Path(gs)
  assert json.loads((workdir / "config.json").read_text())["total_steps"] == 6
  assert Checkpointer(workdir / "checkpoints", every_steps=2, keep=2).all_steps() == [2, 3]
  assert [r["step"] for r in read_metrics(gs)] == [1, 2, 3]
  events = list((workdir / "tensorboard").iterdir())
  assert len(events) == 1 and events[0].name.startswith("events.out.tfevents")
  assert events[0].stat().length > 0
  # Resume from step 3 on gs://, and the same run uninterrupted on a local disk.
  assert cli.main(["train", "--workdir", gs] + args) == 0
  assert cli.main(["train", "--workdir", local] + args) == 0
  capsys.readouterr()
  resumed, straight = read_metrics(gs), read_metrics(local)
  assert [r["step"] for r in resumed] == list(range(1, 7))
  keys = ("loss", "grad_norm", "temperature_mean", "lr")
  assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]
  a = Checkpointer(workdir / "checkpoints", every_steps=2, keep=2)
  b = Checkpointer(local + "/checkpoints", every_steps=2, keep=2)
  assert a.all_steps() == b.all_steps() == [4, 6]
  (ta, ma), (tb, mb) = a.restore(6), b.restore(6)
  assert ma == mb and ma["input_position"] == 6
  import jax
  leaves_a, leaves_b = jax.tree.leaves(ta), jax.tree.leaves(tb)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
