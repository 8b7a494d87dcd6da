"""Faults during training (docs/reliability.md, "Faults during training"): a NaN burst skipped or
stopping with exit status 3; an unreadable latest checkpoint (truncated, garbled) passed over
with a warning; a checkpoint write that fails part-way (the kernel's file-size limit) leaving the
previous one usable; a run continued on another device count (8 -> 4; 4 -> 8, the rerun after
the failed write); and two real JAX processes (`jax.distributed.initialize`, gloo CPU
collectives) equal to one process.

Runs that need another device count, another process group or a file-size limit are
subprocesses of `tests/faults_worker.py` (JAX fixes those when its backend starts); this test
process has 8 simulated CPU devices (tests/conftest.py).

Tolerances across device counts and process counts: float32 sums are reduced in another order,
so losses agree to rtol 1e-5 and the state (parameters, Adam moments, policy state) to
rtol 1e-4 / atol 1e-5 (the atol covers the attention key biases: their gradient is zero in exact
arithmetic, so they only carry float noise, measured up to 4e-6); same device count, same
process: bit for bit.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from faults_worker import FLAGS, config

from mmts_jax import cli, train
from mmts_jax.checkpointing import Checkpointer, CheckpointRestoreError
from mmts_jax.data import sources
from mmts_jax.metrics_log import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "faults_worker.py")
LOSS_RTOL = 1e-5
STATE_TOL = dict(rtol=1e-4, atol=1e-5)


def _env(devices: int, cache: pathlib.Path) -> dict:
  env = dict(
    os.environ,
    # This session's XLA flags (conftest.py) with the worker's own device count.
    XLA_FLAGS=" ".join(
      [f"--xla_force_host_platform_device_count={devices}"]
      + [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
      ]
    ),
    JAX_PLATFORMS="cpu",
    PYTHONPATH=str(ROOT),
    # Programs compiled by one subprocess are reused by the next (a second launch).
    JAX_COMPILATION_CACHE_DIR=str(cache),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  return env


def _tree(workdir, step: int):
  """The checkpoint's arrays on this process's first device (whatever devices wrote them)."""
  directory = pathlib.Path(workdir) / "checkpoints"
  saved = ocp.StandardCheckpointer().metadata(str(directory / str(step) / "state"))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
    getattr(saved, "item_metadata", saved),
  )
  ckpt = Checkpointer(directory, every_steps=1, keep=10)
  try:
    tree, meta = ckpt.restore(step, target)
  finally:
    ckpt.close()
  return jax.device_get(tree), meta


def _losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in read_metrics(workdir)}


def _devices_per_record(workdir) -> dict[int, int]:
  return {
    r["step"]: round(r["examples_per_sec"] / r["examples_per_sec_per_device"])
    for r in read_metrics(workdir)
  }


def _assert_same_run(got, want, steps, exact=False):
  a = {s: v for s, v in _losses(got).items() if s <= steps}
  b = {s: v for s, v in _losses(want).items() if s <= steps}
  assert sorted(a) == sorted(b) == list(range(1, steps + 1))
  tree_a, meta_a = _tree(got, steps)
  tree_b, meta_b = _tree(want, steps)
  assert meta_a == meta_b  # input position, global batch size, shift table, mode
  if exact:
    assert a == b
    chex.assert_trees_all_equal(tree_a, tree_b)
  else:
    np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], rtol=LOSS_RTOL)
    chex.assert_trees_all_close(tree_a, tree_b, **STATE_TOL)


# ----------------------------------------------------------------------------- NaN bursts


def _nan_burst(first: int, last: int):
  """A toy source whose batches for steps first..last hold NaN image features."""

  def factory(cfg, *, global_batch_size, seed):
    source = train.toy_features(cfg, global_batch_size=global_batch_size, seed=seed)
    iterate = source.iterate

    def poisoned(start_batch=0, process_index=0, process_count=1):
      for b, batch in enumerate(iterate(start_batch, process_index, process_count), start_batch):
        if first <= b + 1 <= last:
          batch = dict(batch, image_features=np.full_like(batch["image_features"], np.nan))
        yield batch

    source.iterate = poisoned
    return source

  return factory


def test_nan_burst_is_skipped_counted_and_logged(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(train.SOURCES, "nan_burst", _nan_burst(4, 6))
  c = config()
  c.data.name = "nan_burst"
  assert c.train.skip_nonfinite  # the default
  result = train.train_and_evaluate(c, tmp_path, stop_at_step=8)
  records = {r["step"]: r for r in read_metrics(tmp_path)}
  assert sorted(records) == list(range(1, 9))
  assert [records[s]["loss"] is None for s in range(1, 9)] == [False] * 3 + [True] * 3 + [
    False
  ] * 2  # NaN is written as null
  assert [records[s]["nonfinite_skipped"] for s in range(1, 9)] == [0, 0, 0, 1, 2, 3, 3, 3]
  err = capsys.readouterr().err
  assert err.count("batch skipped, the state was not updated") == 3
  assert "the loss is nan (grad norm nan) at step 5" in err
  # Steps 4..6 left the whole state as step 3 left it: parameters, optimizer, step, RNG.
  tree3, meta3 = _tree(tmp_path, 3)
  tree6, meta6 = _tree(tmp_path, 6)
  chex.assert_trees_all_equal(tree3, tree6)
  assert (meta3["nonfinite_skipped"], meta6["nonfinite_skipped"]) == (0, 3)
  assert meta6["input_position"] == 6  # the burst's batches were consumed
  assert result.step == 8 and int(result.state.step) == 5 and result.nonfinite_skipped == 3
  assert np.isfinite(records[8]["loss"])
  chex.assert_tree_all_finite(result.state.params)


def test_nan_burst_stops_with_exit_status_3_when_configured(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(train.SOURCES, "nan_burst", _nan_burst(4, 6))
  status = cli.main(
    [
      "train",
      "--workdir",
      str(tmp_path),
      "--stop-at-step",
      "8",
      "--config.data.name=nan_burst",
      "--config.train.skip_nonfinite=false",
    ]
    + FLAGS
  )
  assert status == 3
  err = capsys.readouterr().err
  assert "Traceback" not in err
  lines = [line for line in err.splitlines() if line.startswith("mmts train:")]
  assert lines == [
    f"mmts train: error: the loss is nan (grad norm nan) at step 4: training stopped "
    f"(train.skip_nonfinite=False); the state was not updated by that step; the last good "
    f"checkpoint is step 3 in {tmp_path / 'checkpoints'}"
  ]
  assert max(r["step"] for r in read_metrics(tmp_path)) == 3
  tree, _ = _tree(tmp_path, 3)
  chex.assert_tree_all_finite(tree)


# ----------------------------------------------------------------------------- unreadable steps


def _largest_array_file(step_dir) -> str:
  return max(glob.glob(f"{step_dir}/state/**/d/*", recursive=True), key=os.path.getsize)


def test_unreadable_steps_are_passed_over_with_a_warning_then_refused(tmp_path):
  """Restore falls back step by step; unreadable steps are set aside once an older one restores;
  a target that fits no step renames nothing."""
  ckpt = Checkpointer(tmp_path, every_steps=1, keep=5, async_save=False)
  rng = np.random.default_rng(0)
  saved = {s: {"w": rng.normal(size=(64, 64)).astype(np.float32)} for s in (1, 2, 3)}
  for s, tree in saved.items():
    ckpt.save(s, tree, {"input_position": s}, force=True)
  target = {"w": np.zeros((64, 64), np.float32)}
  # Step 3 garbled in the middle of its array data, step 2 cut in half.
  path = _largest_array_file(tmp_path / "3")
  data = bytearray(pathlib.Path(path).read_bytes())
  data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
  pathlib.Path(path).write_bytes(bytes(data))
  path = _largest_array_file(tmp_path / "2")
  os.truncate(path, os.path.getsize(path) // 2)
  with pytest.warns(RuntimeWarning) as caught:
    step, tree, meta = ckpt.restore_latest(target)
  messages = [str(w.message) for w in caught]
  assert len(messages) == 2
  assert messages[0].startswith(f"checkpoint step 3 in {tmp_path} cannot be restored (")
  assert "corrupt" in messages[0].lower()  # zstd: "Data corruption detected"
  assert messages[1].startswith(f"checkpoint step 2 in {tmp_path} cannot be restored (")
  assert "not valid for value of size" in messages[1]  # the truncated file
  assert step == 1 and meta == {"input_position": 1}
  np.testing.assert_array_equal(tree["w"], saved[1]["w"])
  # Set aside for inspection, out of orbax's list: the steps can be saved again.
  assert ckpt.all_steps() == [1]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2.unreadable", "3.unreadable"]
  ckpt.save(2, saved[2], {"input_position": 2}, force=True)
  assert ckpt.restore_latest(target)[0] == 2
  # A target that fits no step (another model) is an error, and no step is set aside for it.
  with pytest.warns(RuntimeWarning), pytest.raises(CheckpointRestoreError):
    ckpt.restore_latest({"v": np.zeros((3,), np.float32)})
  assert ckpt.all_steps() == [1, 2]
  # Nothing restorable: one error listing every step and why.
  for s in (1, 2):
    os.truncate(_largest_array_file(tmp_path / str(s)), 10)
  with (
    pytest.warns(RuntimeWarning),
    pytest.raises(
      CheckpointRestoreError, match=r"no checkpoint in .* can be restored: step 2: .*; step 1: "
    ),
  ):
    ckpt.restore_latest(target)
  ckpt.close()


# ----------------------------------------------------------------------------- subprocess runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """U: 8 devices, steps 1-6, uninterrupted. X: 8 devices to 3, then 4 devices to 6. Z: 4
  devices, uninterrupted (the reference of the multi-process test). D: 4 devices to 8 with the
  disk full during the save of step 6, then rerun (a new process, as a user would) on 8 devices.
  The 8-device runs are in this process, the 4-device ones in one subprocess."""
  base = tmp_path_factory.mktemp("faults")
  w = {k: base / k for k in "UXZD"}
  c = config()
  train.train_and_evaluate(c, w["U"], stop_at_step=6)
  train.train_and_evaluate(c, w["X"], stop_at_step=3)
  proc = subprocess.run(
    [sys.executable, WORKER, f"train:{w['X']}:6", f"train:{w['Z']}:6", f"disk_full:{w['D']}:6:8"],
    env=_env(4, base / "jax_cache"),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=400,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rerun = cli.main(["train", "--workdir", str(w["D"]), "--stop-at-step", "8"] + FLAGS)
  return dict(
    w, base=base, stdout=proc.stdout, stderr=proc.stderr, rerun=rerun, rerun_stdout=out.getvalue()
  )


def test_corrupted_latest_checkpoint_restores_the_previous_one(runs, tmp_path, capsys):
  work = tmp_path / "run"
  shutil.copytree(runs["U"], work)
  # Every array data file of step 6 cut short (OCDBT may keep unreferenced data files, so
  # cutting one chosen file is not sure to hit what a restore reads).
  files = glob.glob(f"{work}/checkpoints/6/state/**/d/*", recursive=True)
  assert files
  for f in files:
    os.truncate(f, os.path.getsize(f) // 2)
  with pytest.warns(RuntimeWarning, match=r"checkpoint step 6 in .* cannot be restored"):
    result = train.train_and_evaluate(config(), work, stop_at_step=6)
  assert "resumed from step 3" in capsys.readouterr().out
  assert result.step == 6 and (work / "checkpoints" / "6.unreadable").is_dir()
  _assert_same_run(work, runs["U"], 6, exact=True)  # steps 4-6 recomputed bit for bit


@pytest.mark.parametrize(
  "name, devices", [("X", [8, 8, 8, 4, 4, 4]), ("D", [4, 4, 4, 8, 8, 8, 8, 8])]
)
def test_resume_on_another_device_count_continues_the_same_run(runs, name, devices):
  assert list(_devices_per_record(runs[name]).values()) == devices
  _, meta = _tree(runs[name], 6)
  assert meta["batch_size"] == 32 and meta["input_position"] == 6
  _assert_same_run(runs[name], runs["U"], 6)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint_and_says_so(runs):
  ckpt_dir = runs["D"] / "checkpoints"
  assert "status: 2" in runs["stdout"]
  expected = (
    f"mmts train: error: checkpoint step 6 could not be written to "
    f"{ckpt_dir / '6'} (File too large); the previous checkpoint is usable: "
    f"step 3 in {ckpt_dir}\n"
  )
  # One message, written whole. orbax's background threads may print their own tracebacks
  # around it (even ending without a newline just before it), so it is searched, not split out.
  assert runs["stderr"].count("mmts train:") == 1, runs["stderr"]
  assert runs["stderr"].count(expected) == 1, runs["stderr"]
  # The rerun resumes from that checkpoint, finishes, and leaves no temporaries behind.
  assert runs["rerun"] == 0
  assert f"resumed from step 3 ({ckpt_dir})" in runs["rerun_stdout"]
  assert sorted(p.name for p in ckpt_dir.iterdir()) == ["3", "6", "8"]
  _assert_same_run(runs["D"], runs["Z"], 3, exact=True)  # step 3 as the 4-device run wrote it


# ----------------------------------------------------------------------------- two processes


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, stop: int, out, env) -> list[str]:
  port = _free_port()
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        WORKER,
        "mp",
        str(i),
        str(port),
        str(workdir),
        str(stop),
        str(out / f"p{i}_{stop}.json"),
      ],
      env=env,
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=300)[0])
  finally:
    for p in procs:  # a failed or hung peer: end both, by their ids
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, text in zip(procs, outputs, strict=True):
    assert p.returncode == 0, text[-3000:]
  return outputs


def test_two_processes_equal_the_single_process_run(runs, tmp_path):
  work = tmp_path / "mp"
  env = _env(2, runs["base"] / "jax_cache")  # 2 processes x 2 devices = 4 global devices
  _two_processes(work, 3, tmp_path, env)
  out = _two_processes(work, 6, tmp_path, env)  # both restarted: resume from step 3
  assert "resumed from step 3" in out[0]
  records = [json.loads((tmp_path / f"p{i}_6.json").read_text()) for i in range(2)]
  for i, r in enumerate(records):
    assert (
      r["process_index"],
      r["process_count"],
      r["devices"],
      r["local_devices"],
      r["step"],
    ) == (i, 2, 4, 2, 6)
    # The ring loss over both processes' devices = float64 dense loss of the global batch.
    np.testing.assert_allclose(r["ring"], r["dense"], rtol=1e-5)
  # Per-host input slicing: each process read its half of the single-process global batch.
  c = config()
  whole = next(
    sources.make_source(c.data, global_batch_size=int(c.batch_size), seed=int(c.seed)).iterate(
      0, 0, 1
    )
  )["index"]
  np.testing.assert_array_equal(
    records[0]["first_batch_index"] + records[1]["first_batch_index"], whole
  )
  # Both processes wrote their part of each checkpoint (OCDBT: one database per process).
  state = work / "checkpoints" / "6" / "state"
  assert (state / "ocdbt.process_0").is_dir() and (state / "ocdbt.process_1").is_dir()
  _assert_same_run(work, runs["Z"], 6)
