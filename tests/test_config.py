"""Config as data: config files import no JAX stack, every config takes the ablation row, and
`config.init.checkpoint` restores a model's parameters from an orbax `{"params": ...}` tree."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import warnings

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmts_jax import config_defaults, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")
HEAVY = ("jax", "flax", "optax", "orbax", "orbax.checkpoint", "tensorflow", "torch")


def test_importing_configs_imports_no_jax_flax_optax_orbax():
  code = (
    "import sys\n"
    f"import {', '.join('configs.' + name for name in CONFIGS)}\n"
    "import configs.tiny as t\n"
    "t.get_config('clip')\n"
    f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_takes_every_ablation_row(name):
  spec = importlib.util.spec_from_file_location(f"_cfg_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for row, mode in (
    ("", "mmts"),
    ("fixed", "fixed"),
    ("clip", "learnable"),
    ("ts", "ts"),
    ("ics", "ics"),
    ("mmts", "mmts"),
  ):
    assert module.get_config(row).temperature.mode == mode, (name, row)
  with pytest.raises(ValueError, match="ablation row"):
    module.get_config("nope")


def test_one_alias_table():
  from mmts_jax import temperature

  assert train.ABLATION_ROWS is config_defaults.ROW_ALIASES
  assert set(config_defaults.ROW_ALIASES.values()) == set(config_defaults.MODES)
  assert set(config_defaults.MODES) <= set(temperature.POLICIES)


def _small_config():
  c = train.default_config()
  c.total_steps, c.batch_size, c.progress_bar, c.tensorboard = 10, 16, False, False
  c.data.update(num_examples=64, text="features", image_dim=8)
  c.model.image = dict(name="features", hidden_dims=(8,))
  c.model.text = dict(name="features", hidden_dims=(8,))
  c.model.update(embed_dim=4)
  c.optim.warmup_steps = 1
  c.temperature.mode = "learnable"
  return c


def test_init_checkpoint_restores_the_saved_params(tmp_path):
  fresh = train.setup(_small_config())
  params = jax.device_get(fresh.state.params)
  saved = jax.tree.map(lambda p: np.full_like(p, 0.5), params)
  del saved["log_inv_temperature"]  # a converted tower has no CLIP temperature
  with ocp.StandardCheckpointer() as writer:
    writer.save(tmp_path / "init", {"params": saved})
  c = _small_config()
  c.init.checkpoint = str(tmp_path / "init")
  run = train.setup(c)
  got = jax.device_get(run.state.params)
  assert float(got["log_inv_temperature"]) == float(params["log_inv_temperature"])
  del got["log_inv_temperature"]
  chex.assert_trees_all_equal(got, saved)
  state, metrics = run.step_fn(run.state, run.to_device(next(run.batches(0))))
  assert bool(metrics["finite"])

  wrong = jax.tree.map(lambda p: np.zeros(p.shape + (2,), p.dtype), saved)
  with ocp.StandardCheckpointer() as writer:
    writer.save(tmp_path / "wrong", {"params": wrong})
  c.init.checkpoint = str(tmp_path / "wrong")
  with pytest.raises(ValueError, match="has shape"):
    train.setup(c)
  c.init.checkpoint = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="missing"):
    train.setup(c)


def _documented_rows(name: str) -> list[str]:
  """The rows a config's docstring lists after `ROW:` (`fixed | clip (learnable ...) | ts ...`)."""
  doc = ast.get_docstring(ast.parse((ROOT / "configs" / f"{name}.py").read_text())) or ""
  found = re.search(r"ROW: (.*?)(?:\n\s*\n|\Z)", doc, re.S)
  assert found, f"configs/{name}.py documents no `ROW: a | b | ...` line"
  text = re.sub(r"\([^)]*\)", " ", found.group(1).replace("#", " "))
  return [chunk.split()[0].rstrip(".") for chunk in text.split("|") if chunk.split()]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_documented_row_parses_as_the_cli_reads_it(name):
  # `FILE.py:ROW` through the command line's own parser (ml_collections' config_flags), which
  # calls get_config(ROW): a config without the argument failed here.
  from mmts_jax.commands.train import parse_config

  rows = _documented_rows(name)
  assert {"fixed", "ts", "ics", "mmts"} <= set(rows), rows
  for row in rows:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      config = parse_config(f"{ROOT / 'configs' / name}.py:{row}")
    assert config.temperature.mode == config_defaults.canonical_mode(row), (name, row)
    assert [str(w.message) for w in caught] == [], (name, row)  # no warning wall in `make test`


def test_tiny_ts_row_trains_from_the_command_line(tmp_path):
  proc = subprocess.run(
    [sys.executable, "-m", "mmts_jax.cli", "train", "--config", "configs/tiny.py:ts"]
    + ["--workdir", str(tmp_path / "run"), "--config.total_steps=3"]
    + ["--config.optim.warmup_steps=1", "--config.tensorboard=false"],
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=str(ROOT)),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("step 3/3 (done)"), proc.stdout
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["temperature"]["mode"] == "ts"
