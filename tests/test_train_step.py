"""The pure train step: sharded (replicated and FSDP) == single device, the MM-TS per-sample
temperature inside it against a float64 reference, every ablation row's values, the non-finite
guard, learnable temperature, and the configuration checks that run before compiling."""
from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmts_jax import mesh as mesh_lib
from mmts_jax import temperature, train
from mmts_jax.models import build_model


def _config(**temperature_kw):
  c = train.default_config()
  c.total_steps, c.batch_size = 50, 32
  c.data.update(num_examples=256, num_clusters=12, image_dim=64, text="features")
  c.model.update(embed_dim=16)
  # 64 x 256 kernels: large enough (>= 2**14 elements) for FSDP to shard them.
  c.model.image = dict(name="features", hidden_dims=(256,))
  c.model.text = dict(name="features", hidden_dims=(256,))
  c.optim.update(lr=1e-2, warmup_steps=1)
  c.temperature.update(**temperature_kw)
  return c


def _setup(c, mesh=None, param_sharding="replicated", impl="auto"):
  source = train.make_source(c.data, global_batch_size=c.batch_size, seed=0)
  spec = temperature.from_config(c.temperature, c.mmts, total_steps=c.total_steps,
                                 loss=c.loss.name)
  table = train.resolve_shift_table(c, source, spec)
  model = build_model(c.model, learnable_temperature=spec.learnable, init_temperature=spec.value)
  tx, lr = train.make_optimizer(c.optim, c.total_steps)
  loss = train.LossSpec(c.loss.name, impl, None, mesh)
  batches = [b for b, _ in zip(source.iterate(0), range(2))]
  state, shardings = train.init_train_state(
      model, tx, spec, loss, rng=jax.random.PRNGKey(0), sample_batch=batches[0],
      shift_table=table, mesh=mesh, param_sharding=param_sharding, lr_schedule=lr)
  return state, shardings, batches, table


def _run(state, shardings, batches, mesh):
  if mesh is None:
    step = jax.jit(train.train_step)
    put = lambda b: b
  else:
    step = train.compile_train_step(shardings, mesh)
    put = lambda b: mesh_lib.global_batch(b, mesh)
  losses = []
  for b in batches:
    state, m = step(state, put(b))
    losses.append(float(m["loss"]))
  return state, losses


@pytest.fixture(scope="module")
def single_device_run():
  state, _, batches, table = _setup(_config())
  return (state, batches, table) + _run(state, None, batches, None)


def test_sharded_replicated_and_fsdp_match_single_device(single_device_run):
  _, _, _, ref_state, ref_losses = single_device_run
  mesh = mesh_lib.make_mesh()
  assert mesh.size == 8
  for mode in ("replicated", "fsdp"):
    state, shardings, batches, _ = _setup(_config(), mesh, mode)
    specs = {tuple(s.spec) for s in jax.tree.leaves(shardings.params)}
    if mode == "fsdp":
      assert any("data" in s for s in specs), specs      # something really is sharded
    else:
      assert specs == {()}
    state, losses = _run(state, shardings, batches, mesh)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    chex.assert_trees_all_close(jax.device_get(state.params), jax.device_get(ref_state.params),
                                rtol=2e-5, atol=1e-6)
    assert int(state.step) == 2


def test_step_uses_schedule_plus_gathered_shift_float64_reference(single_device_run):
  state, batches, table, _, _ = single_device_run
  t = 37
  state = state.replace(step=jnp.int32(t))
  batch = batches[1]
  out = jax.jit(lambda s, b: train.eval_step(s, b))(state, batch)
  _, metrics = jax.jit(train.train_step)(state, batch)
  c = _config()
  period = c.total_steps / c.mmts.num_oscillations
  tau = c.mmts.alpha / 2 * math.cos(2 * math.pi * t / period) + table[batch["index"]].astype(
      np.float64)
  img, txt = (np.asarray(out[k], np.float64) for k in ("image", "text"))
  s = img @ txt.T
  def ce(logits):
    m = logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(axis=1)) + m[:, 0]
    return np.mean(lse - np.diagonal(logits))
  expected = 0.5 * (ce(s / tau[:, None]) + ce(s.T / tau[:, None]))
  np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["temperature_min"]), tau.min(), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["temperature_max"]), tau.max(), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["temperature_mean"]), tau.mean(), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["temperature_base"]),
                             c.mmts.alpha / 2 * math.cos(2 * math.pi * t / period), atol=1e-7)
  # The long tail: head clusters get larger temperatures than tail clusters.
  assert table.min() == pytest.approx(c.mmts.sh_min) and table.max() == pytest.approx(
      c.mmts.sh_max)


def test_nonfinite_loss_leaves_the_state_untouched(single_device_run):
  state, batches, _, _, _ = single_device_run
  bad = dict(batches[0], image_features=np.full_like(batches[0]["image_features"], np.nan))
  new, metrics = jax.jit(train.train_step)(state, bad)
  assert not bool(metrics["finite"])
  chex.assert_trees_all_equal(jax.device_get(new.params), jax.device_get(state.params))
  assert int(new.step) == int(state.step)


def test_every_ablation_row_against_float64_formulas():
  steps, t, alpha, lo, hi = 100, 13, 0.04, 0.05, 0.10
  period = steps / 5
  table = np.array([0.05, 0.07, 0.10], np.float32)
  index = np.array([2, 0, 1, 2])
  mmts = {"alpha": alpha, "sh_min": lo, "sh_max": hi, "num_oscillations": 5}
  wave = math.cos(2 * math.pi * t / period)
  expected = {
      "fixed": np.full(4, 0.07),
      "ts": np.full(4, 0.1 + 0.9 * (1 + wave) / 2),
      "ics": table[index].astype(np.float64),
      "mmts": alpha / 2 * wave + table[index].astype(np.float64),
  }
  for mode, want in expected.items():
    spec = temperature.from_config({"mode": mode, "value": 0.07, "tau_min": 0.1, "tau_max": 1.0},
                                   mmts, total_steps=steps)
    np.testing.assert_allclose(spec(t, index, table), want, rtol=1e-6, err_msg=mode)
  spec = temperature.from_config({"mode": "clip"}, mmts, total_steps=steps)
  np.testing.assert_allclose(spec(t, index, learned=0.03), np.full(4, 0.03), rtol=1e-6)


def test_learnable_temperature_is_trained():
  state, _, batches, _ = _setup(_config(mode="learnable", value=0.07))
  step = jax.jit(train.train_step)
  before = float(state.params["log_inv_temperature"])
  assert before == pytest.approx(math.log(1 / 0.07))
  new, metrics = step(state, batches[0])          # warmup: the first learning rate is 0
  np.testing.assert_allclose(float(metrics["temperature_mean"]), 0.07, rtol=1e-6)
  new, metrics = step(new, batches[1])
  assert float(metrics["lr"]) > 0
  assert float(new.params["log_inv_temperature"]) != before


def test_bad_configurations_fail_before_compiling():
  mmts = {"alpha": 0.2, "sh_min": 0.1, "sh_max": 0.3, "num_oscillations": 5}
  with pytest.raises(ValueError, match=r"sh_min - alpha/2 = 0\.1 - 0\.2/2"):
    temperature.from_config({"mode": "mmts"}, mmts, total_steps=10, loss="max_margin")
  with pytest.raises(ValueError, match="only applies to loss 'infonce'"):
    temperature.from_config({"mode": "learnable"}, mmts, total_steps=10, loss="max_margin")
  with pytest.raises(ValueError, match="tau_min"):
    temperature.from_config({"mode": "ts", "tau_min": 0.0}, mmts, total_steps=10)
  with pytest.raises(ValueError, match="temperature.mode"):
    temperature.from_config({"mode": "cosine"}, mmts, total_steps=10)
  spec = temperature.from_config({"mode": "ics"}, dict(mmts, sh_min=0.05), total_steps=10)
  with pytest.raises(ValueError, match="another dataset"):
    temperature.check_shift_table(np.full(7, 0.1), spec, num_examples=8)
  with pytest.raises(ValueError, match="non-finite"):
    temperature.check_shift_table(np.array([0.1, np.nan]), spec)
  with pytest.raises(KeyError, match="no 'index'"):
    train.check_batch({"image_features": np.zeros((2, 3))}, 10)
  with pytest.raises(ValueError, match=r"outside the dataset"):
    train.check_batch({"index": np.array([0, 10])}, 10)
  with pytest.raises(ValueError, match="loss.impl"):
    train.LossSpec("infonce", "fancy")


def test_source_hosts_partition_each_global_batch_and_resume_by_position():
  c = _config()
  source = train.make_source(c.data, global_batch_size=32, seed=3)
  whole = [b for b, _ in zip(source.iterate(0), range(10))]        # 10 batches > 1 epoch (8)
  hosts = [[b for b, _ in zip(source.iterate(0, p, 2), range(10))] for p in range(2)]
  for g, (h0, h1) in zip(whole, zip(*hosts)):
    np.testing.assert_array_equal(np.concatenate([h0["index"], h1["index"]]), g["index"])
  resumed = next(source.iterate(9))
  for k in whole[9]:
    np.testing.assert_array_equal(resumed[k], whole[9][k])
  epoch = np.concatenate([b["index"] for b in whole[:8]])
  assert sorted(epoch.tolist()) == list(range(256))                # each example once per epoch
  assert not np.array_equal(whole[8]["index"], whole[0]["index"])  # reshuffled next epoch
