"""benchmarks/train_step_bench.py: a run derived from the first run's `setup` (`_derive`, used
for the MM-TS run beside the fixed one) is what `mmts_jax.train.setup` builds for its own
configuration (the same parameters, optimizer state, policy, shift table, policy state and
shardings) without initialising the parameters a second time; a mode with another parameter tree
is refused."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import chex
import jax
import numpy as np
import pytest

from mmts_jax import train

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "train_step_bench.py"
BATCH, TABLE = 8, 64


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("train_step_bench", _PATH)
  assert spec is not None and spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  # A model small enough to build in a second: 8 px images (one 8 x 8 patch), 5 tokens.
  module.MODELS["test"] = dict(
    image=dict(name="vit", variant="mu/8"),
    image_size=8,
    text=dict(
      name="transformer", vocab_size=50, max_len=5, width=16, depth=1, num_heads=2, mlp_dim=32
    ),
    embed_dim=8,
  )
  return module


def _first(bench):
  spec = bench.MODELS["test"]
  host = bench._batch(spec, BATCH, TABLE)
  sizes = np.random.default_rng(1).integers(1, 50, size=TABLE)
  # As `_build` does for the first run (without lowering its step: not needed here).
  c, _ = bench._config("test", "fast", "fixed", BATCH)
  c.mesh.num_devices, c.data.name = 1, "train_step_bench_test"
  train.SOURCES[c.data.name] = lambda cfg, **kw: bench._FixedBatchSource(host, sizes)
  return train.setup(c)


def _config(bench, first, mode):
  c, _ = bench._config("test", "fast", mode, BATCH)
  c.mesh.num_devices = 1
  c.data.name = first.config.data.name
  return c


def test_derived_mmts_run_equals_its_own_setup(bench):
  first = _first(bench)
  params_before = jax.tree.map(np.asarray, first.state.params)
  c = _config(bench, first, "mmts")
  derived = bench._derive(first, c)
  ref = train.setup(c)  # a second initialisation: what the bench no longer does
  assert derived.policy == ref.policy and derived.policy.name == "mmts"
  assert derived.shift_table_id == ref.shift_table_id != "none"
  np.testing.assert_array_equal(derived.shift_table, ref.shift_table)
  chex.assert_trees_all_equal(derived.state.checkpoint_tree(), ref.state.checkpoint_tree())
  chex.assert_trees_all_equal(
    jax.tree.map(lambda s: s.spec, derived.shardings.checkpoint_tree()),
    jax.tree.map(lambda s: s.spec, ref.shardings.checkpoint_tree()),
  )
  # The first run's own state is untouched (the derived one holds copies).
  assert first.policy.name == "fixed" and first.state.policy_state == {}
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, first.state.params), params_before)


def test_derive_refuses_a_mode_with_another_parameter_tree(bench):
  first = _first(bench)
  with pytest.raises(ValueError, match="learnable"):
    bench._derive(first, _config(bench, first, "learnable"))
