"""Checkpoints: a run stopped with `--stop-at-step` and resumed reproduces the uninterrupted run
bit for bit (parameters, optimizer, metrics); keep-last-K; a crash during a save (a real
SIGKILL) never corrupts the latest good checkpoint; a NaN loss stops with a clear message and
keeps the last good checkpoint; a resume with another shift table is refused."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from mmts_jax import cli, train
from mmts_jax.checkpointing import Checkpointer
from mmts_jax.commands.train import load_config
from mmts_jax.metrics_log import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
# One long schedule for every in-process run of the test session, so they share one compiled
# step (the optimizer's schedule depends on total_steps); runs end with --stop-at-step.
ARGS = [
  "--config",
  TINY,
  "--config.total_steps=100000",
  "--config.checkpoint.every_steps=3",
  "--config.checkpoint.keep=2",
  "--config.tensorboard=false",
  "--no-progress",
]


def _restore(workdir, step):
  tree, meta = Checkpointer(pathlib.Path(workdir) / "checkpoints", every_steps=1, keep=2).restore(
    step
  )
  return jax.device_get(tree), meta


@pytest.fixture(scope="module")
def straight_and_resumed(tmp_path_factory):
  straight = tmp_path_factory.mktemp("straight")
  resumed = tmp_path_factory.mktemp("resumed")
  assert cli.main(["train", "--workdir", str(straight), "--stop-at-step", "8"] + ARGS) == 0
  assert cli.main(["train", "--workdir", str(resumed), "--stop-at-step", "5"] + ARGS) == 0
  assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3, 4, 5]
  assert cli.main(["train", "--workdir", str(resumed), "--stop-at-step", "8"] + ARGS) == 0
  return straight, resumed


def test_stop_and_resume_reproduces_the_uninterrupted_run_exactly(straight_and_resumed):
  straight, resumed = straight_and_resumed
  a, b = read_metrics(straight), read_metrics(resumed)
  assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
  assert [r["loss"] for r in a] == [r["loss"] for r in b]
  assert [r["temperature_mean"] for r in a] == [r["temperature_mean"] for r in b]
  tree_a, meta_a = _restore(straight, 8)
  tree_b, meta_b = _restore(resumed, 8)
  chex.assert_trees_all_equal(tree_a, tree_b)  # params, optimizer state, step, RNG
  assert meta_a == meta_b and meta_a["input_position"] == 8
  assert int(tree_a["step"]) == 8


def test_keeps_the_last_k_checkpoints(straight_and_resumed):
  for workdir in straight_and_resumed:
    ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints", every_steps=1, keep=2)
    assert ckpt.all_steps() == [6, 8]


CRASH = r"""
import os, signal, sys
import numpy as np
from mmts_jax.checkpointing import Checkpointer
ckpt = Checkpointer(sys.argv[1], every_steps=1, keep=3)
ckpt.save(1, {"w": np.full((4,), 1.0, np.float32)}, {"input_position": 1}, force=True)
ckpt.wait()
big = np.ones((64, 1024, 1024), np.float32)          # 256 MiB: the write takes a while
ckpt.save(2, {"w": big}, {"input_position": 2}, force=True)
os.kill(os.getpid(), signal.SIGKILL)                  # die mid-save, as a lost machine does
"""


def test_a_crash_during_a_save_keeps_the_latest_good_checkpoint(tmp_path):
  directory = tmp_path / "ckpt"
  proc = subprocess.run(
    [sys.executable, "-c", CRASH, str(directory)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == -9, proc.stderr
  leftovers = sorted(p.name for p in directory.iterdir())
  assert "1" in leftovers and "2" not in leftovers, leftovers  # step 2 never committed
  ckpt = Checkpointer(directory, every_steps=1, keep=3)
  assert ckpt.latest_step() == 1
  tree, meta = ckpt.restore(1, {"w": np.zeros((4,), np.float32)})
  np.testing.assert_array_equal(tree["w"], np.ones(4, np.float32))
  assert meta == {"input_position": 1}
  ckpt.close()


def _nan_after(step):
  def factory(cfg, *, global_batch_size, seed):
    source = train.toy_features(cfg, global_batch_size=global_batch_size, seed=seed)
    iterate = source.iterate

    def poisoned(start_batch=0, process_index=0, process_count=1):
      for b, batch in enumerate(iterate(start_batch, process_index, process_count), start_batch):
        if b + 1 >= step:
          batch = dict(batch, image_features=np.full_like(batch["image_features"], np.nan))
        yield batch

    source.iterate = poisoned
    return source

  return factory


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
  tmp_path, monkeypatch
):
  monkeypatch.setitem(train.SOURCES, "nan_at_5", _nan_after(5))
  config = load_config(TINY)
  config.update(total_steps=100000, tensorboard=False)
  config.checkpoint.update(every_steps=2, keep=2)
  config.data.name = "nan_at_5"
  config.train.skip_nonfinite = False  # stop (the default skips: tests/test_faults.py)
  with pytest.raises(train.NonFiniteLossError, match=r"at step 5.*last good checkpoint is step 4"):
    train.train_and_evaluate(config, tmp_path, stop_at_step=8)
  tree, _ = _restore(tmp_path, 4)
  assert int(tree["step"]) == 4
  chex.assert_tree_all_finite(tree["params"])
  assert max(r["step"] for r in read_metrics(tmp_path)) == 4


def test_resume_with_another_shift_table_is_refused(straight_and_resumed):
  straight, _ = straight_and_resumed
  config = load_config(TINY)
  config.update(total_steps=100000, tensorboard=False)
  config.mmts.sh_max = 0.2
  with pytest.raises(ValueError, match="shift table"):
    train.train_and_evaluate(config, straight, stop_at_step=9, allow_config_change=True)


def test_resume_with_a_run_changing_config_is_refused_unless_allowed(tmp_path, capsys):
  workdir = tmp_path / "run"
  assert cli.main(["train", "--workdir", str(workdir), "--stop-at-step", "3"] + ARGS) == 0
  # Cadence and display keys do not change the run: resuming with them changed is fine.
  assert (
    cli.main(
      ["train", "--workdir", str(workdir), "--stop-at-step", "4", "--config.log_every=2"] + ARGS
    )
    == 0
  )
  assert "resumed from step 3" in capsys.readouterr().out
  assert (
    cli.main(
      [
        "train",
        "--workdir",
        str(workdir),
        "--stop-at-step",
        "5",
        "--config.optim.lr=0.1",
        "--config.seed=7",
      ]
      + ARGS
    )
    == 2
  )
  err = capsys.readouterr().err
  assert (
    "optim.lr: 0.003 -> 0.1" in err and "seed: 0 -> 7" in err and "--allow-config-change" in err
  )
  assert Checkpointer(workdir / "checkpoints", every_steps=1, keep=3).latest_step() == 4
  assert (
    cli.main(
      [
        "train",
        "--workdir",
        str(workdir),
        "--stop-at-step",
        "5",
        "--config.optim.lr=0.1",
        "--allow-config-change",
      ]
      + ARGS
    )
    == 0
  )
  history = [
    json.loads(line) for line in (workdir / "config_history.jsonl").read_text().splitlines()
  ]
  assert history[0]["step"] == 4
  assert history[0]["changes"] == {"optim.lr": {"old": 0.003, "new": 0.1}}
  assert json.loads((workdir / "config.json").read_text())["optim"]["lr"] == 0.1
