"""`mmts train --config configs/tiny.py:isogclr`: the trainer runs the iSogCLR policy (its
dataset-sized state in the train state) and a stopped run resumes to the same numbers as an
uninterrupted one; the level-matched rows build from the config."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from mmts_jax import cli, temperature
from mmts_jax.commands.train import load_config
from mmts_jax.metrics_log import read_metrics
from mmts_jax.policies.isogclr import ISogCLR

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = [
  "--config",
  str(ROOT / "configs" / "tiny.py") + ":isogclr",
  "--config.total_steps=100000",
  "--config.checkpoint.every_steps=3",
  "--config.checkpoint.keep=2",
  "--config.tensorboard=false",
  "--no-progress",
  "--config.isogclr.tau_init=0.07",
  "--config.isogclr.rho=0.5",
  "--config.data.num_examples=64",
]
_DROP = ("examples_per_sec", "examples_per_sec_per_device")


def _records(workdir):
  return [{k: v for k, v in r.items() if k not in _DROP} for r in read_metrics(workdir)]


def test_isogclr_trains_and_resumes_like_an_uninterrupted_run(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  assert cli.main(["train"] + ARGS + ["--workdir", str(straight), "--stop-at-step", "6"]) == 0
  assert cli.main(["train"] + ARGS + ["--workdir", str(resumed), "--stop-at-step", "3"]) == 0
  assert cli.main(["train"] + ARGS + ["--workdir", str(resumed), "--stop-at-step", "6"]) == 0
  a, b = _records(straight), _records(resumed)
  assert [r["step"] for r in b] == list(range(1, 7))
  assert a == b  # bit-exact: losses, gradient norms and temperatures of every step
  # The temperatures are learned per sample: once samples repeat (2 batches an epoch) the ones
  # used have left their initial value.
  assert not np.allclose([r["temperature_max"] for r in a[3:]], 0.07)


def test_config_rows_build_the_policies():
  policy = temperature.from_config(
    {"mode": "isogclr"}, {}, total_steps=10, isogclr={"rho": 0.5, "tau_init": 0.07}
  )
  assert isinstance(policy, ISogCLR) and policy.rho == 0.5 and policy.tau_init == 0.07
  with pytest.raises(ValueError, match="max_margin"):
    temperature.from_config({"mode": "isogclr"}, {}, total_steps=10, loss="max_margin")
  lm = temperature.from_config(
    {"mode": "mmts_lm", "value": 0.2},
    {"alpha": 0.04, "sh_min": 0.05, "sh_max": 0.1},
    total_steps=10,
  )
  table = np.array([0.05, 0.05, 0.1, 0.1, 0.1], np.float32)
  state = lm.init_state(5, table)
  np.testing.assert_allclose(np.mean(np.asarray(state["shift_table"], np.float64)), 0.2, atol=1e-6)
  np.testing.assert_allclose(np.ptp(np.asarray(state["shift_table"])), 0.05, atol=1e-6)
  assert load_config(str(ROOT / "configs" / "tiny.py") + ":mmts_lm").temperature.mode == "mmts_lm"
