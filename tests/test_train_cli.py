"""`mmts train`: config overrides and their errors, the metrics it logs, the cluster-table
wiring, bad input (temperature <= 0, a table of another dataset) and SIGTERM (a real signal to a
real subprocess leaves a checkpoint that resumes)."""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mmts_jax import cli
from mmts_jax.checkpointing import Checkpointer
from mmts_jax.clusters.table import ClusterTable
from mmts_jax.commands.train import load_config, parse_config
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


def test_overrides_are_typed_and_unknown_keys_are_named():
  config = parse_config(
    TINY,
    [
      ("optim.lr", "1e-2"),
      ("model.image.hidden_dims", "(8, 4)"),
      ("checkpoint.async_save", "false"),
      ("loss.block_size", "64"),
    ],
  )
  assert config.optim.lr == 0.01 and config.model.image.hidden_dims == (8, 4)
  assert config.checkpoint.async_save is False and config.loss.block_size == 64
  assert load_config(TINY + ":ts").temperature.mode == "ts"  # the row argument
  with pytest.raises(ValueError, match=r"unknown key 'lrr' in optim \(known: \['b1'"):
    parse_config(TINY, [("optim.lrr", "1")])
  with pytest.raises(ValueError, match=r"--config.total_steps.*'ten'"):
    parse_config(TINY, [("total_steps", "ten")])
  with pytest.raises(ValueError, match="is a section"):
    parse_config(TINY, [("optim", "1")])
  with pytest.raises(ValueError, match="nope"):
    load_config(TINY + ":nope")


def test_cli_rejects_bad_input_with_status_2(tmp_path, capsys):
  assert cli.main(["train", "--workdir", str(tmp_path), "--config.nope=1"] + ARGS) == 2
  assert "unknown key 'nope'" in capsys.readouterr().err
  # A schedule whose temperature reaches <= 0 is rejected before anything is compiled.
  assert cli.main(["train", "--workdir", str(tmp_path), "--config.mmts.sh_min=0.01"] + ARGS) == 2
  assert "sh_min - alpha/2 = 0.01 - 0.04/2" in capsys.readouterr().err
  # A cluster table built for another dataset (100 samples; the tiny dataset has 512).
  other = tmp_path / "other.npz"
  ClusterTable.from_sizes(np.zeros(100, int), [100]).save(other)
  assert (
    cli.main(["train", "--workdir", str(tmp_path), f"--config.mmts.cluster_table={other}"] + ARGS)
    == 2
  )
  assert "built for 100 samples" in capsys.readouterr().err
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_cli_logs_every_step_and_uses_the_cluster_table(tmp_path, capsys):
  labels = np.arange(512) % 4  # 4 clusters of 128, then make one a tail
  labels[:120] = 0
  table_path = tmp_path / "table.npz"
  ClusterTable.from_labels(labels.tolist()).save(table_path)
  table = ClusterTable.load(table_path).shift_table(0.05, 0.10)
  workdir = tmp_path / "run"
  assert (
    cli.main(
      [
        "train",
        "--workdir",
        str(workdir),
        "--stop-at-step",
        "3",
        f"--config.mmts.cluster_table={table_path}",
      ]
      + ARGS
    )
    == 0
  )
  out = capsys.readouterr().out
  assert "step 3/100000 (stopped)" in out and "metrics.jsonl" in out
  records = read_metrics(workdir)
  assert [r["step"] for r in records] == [1, 2, 3]
  for r in records:
    for key in (
      "loss",
      "temperature_mean",
      "temperature_min",
      "temperature_max",
      "examples_per_sec",
      "examples_per_sec_per_device",
      "lr",
      "grad_norm",
    ):
      assert isinstance(r[key], float), (key, r)
    assert r["temperature_min"] <= r["temperature_mean"] <= r["temperature_max"]
    base = r["temperature_base"]
    assert table.min() + base - 1e-6 <= r["temperature_min"]
    assert r["temperature_max"] <= table.max() + base + 1e-6
  assert records[0]["temperature_base"] == pytest.approx(0.02)  # alpha/2 at step 0
  assert (workdir / "config.json").exists()


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
  workdir = tmp_path / "run"
  args = ARGS + ["--workdir", str(workdir), "--config.checkpoint.every_steps=100000"]
  proc = subprocess.Popen(
    [sys.executable, "-m", "mmts_jax.cli", "train"] + args,
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 300
  while len(read_metrics(workdir)) < 3 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err
  assert "rerun the same command to resume" in err
  last = read_metrics(workdir)[-1]["step"]
  assert last >= 3
  assert Checkpointer(workdir / "checkpoints", every_steps=1, keep=3).latest_step() == last
  assert cli.main(["train"] + args + ["--stop-at-step", str(last + 2)]) == 0
  steps = [r["step"] for r in read_metrics(workdir)]
  assert steps == list(range(1, last + 3))


def test_eval_fn_scalars_join_the_step_record(tmp_path):
  from mmts_jax import train

  config = load_config(TINY)
  config.update(total_steps=100000, tensorboard=False)
  config.checkpoint.update(every_steps=3, keep=2)
  config.eval.every_steps = 2
  batch = next(train.make_source(config.data, global_batch_size=32, seed=0).iterate(0))

  def eval_fn(step, embed, variables):
    out = embed(variables, batch)
    # In-batch image->text top-1 accuracy, with unit-norm embeddings.
    norms = np.linalg.norm(np.asarray(out["image"]), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    hits = np.argmax(np.asarray(out["image"]) @ np.asarray(out["text"]).T, axis=1)
    return {"eval/top1": float(np.mean(hits == np.arange(len(hits))))}

  train.train_and_evaluate(config, tmp_path, stop_at_step=4, eval_fn=eval_fn)
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert [("eval/top1" in r) for r in records] == [False, True, False, True]
  assert all("loss" in r for r in records)
