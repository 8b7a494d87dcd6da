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
from mmts_jax.train.step import compile_train_step

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


def test_derived_run_at_another_batch_size_equals_its_own_setup(bench):
  # The bench runs one `setup` per process: a run at another batch size (and mode) is derived.
  first = _first(bench)
  c = _config(bench, first, "mmts")
  c.batch_size = 2 * BATCH
  derived = bench._derive(first, c)
  assert derived is not first and derived.global_batch_size == 2 * BATCH
  host = bench._batch(bench.MODELS["test"], 2 * BATCH, TABLE)
  sizes = np.random.default_rng(1).integers(1, 50, size=TABLE)
  c.data.name = "train_step_bench_test_2x"
  train.SOURCES[c.data.name] = lambda cfg, **kw: bench._FixedBatchSource(host, sizes)
  ref = train.setup(c)
  assert derived.policy == ref.policy and derived.shift_table_id == ref.shift_table_id
  chex.assert_trees_all_equal(derived.state.checkpoint_tree(), ref.state.checkpoint_tree())
  # The derived run's step takes the bigger batch and gives the reference's update.
  step = compile_train_step(
    derived.shardings.replace(apply_fn=derived.state.apply_fn),
    derived.mesh,
    policy=derived.policy,
    loss_fn=derived.loss_fn,
    lr_fn=derived.lr_fn,
    skip_nonfinite=True,
  )
  got, _ = step(derived.state, derived.to_device(host))
  want, _ = ref.step_fn(ref.state, ref.to_device(host))
  chex.assert_trees_all_close(got.params, want.params, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("thread_alive", [False, True])
def test_exit_keeps_the_code_and_output_with_a_compile_thread_alive(tmp_path, thread_alive):
  """`_exit` ends the process with main's code and flushed output, also while a (daemon) thread
  is still running, the state in which run 24's bench crashed at interpreter teardown."""
  import subprocess

  script = tmp_path / "exit_check.py"
  script.write_text(
    "import importlib.util, sys, threading, time\n"
    f"spec = importlib.util.spec_from_file_location('tsb', {str(_PATH)!r})\n"
    "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
    f"if {thread_alive}:\n"
    "  threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
    "print('result line', end='')\n"
    "m._exit(3)\n"
  )
  done = subprocess.run(
    [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
  )
  assert done.returncode == 3, done.stderr[-2000:]
  assert done.stdout == "result line"
