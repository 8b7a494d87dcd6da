"""The pure train step: sharded (replicated and FSDP) == single device, the MM-TS per-sample
temperature inside it against a float64 reference, every ablation row's values, the non-finite
guard, learnable temperature, and the configuration checks that run before compiling."""

from __future__ import annotations

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmts_jax import losses, temperature, train
from mmts_jax.data import image_ops


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


def _setup(c, num_devices=1, param_sharding="replicated"):
  c.mesh.update(num_devices=num_devices, param_sharding=param_sharding)
  run = train.setup(c)
  batches = [b for b, _ in zip(run.batches(0), range(2), strict=False)]
  return run, batches


def _plain_step(run):
  """The step without donation, so a test can reuse its input state."""
  return jax.jit(
    functools.partial(train.train_step, policy=run.policy, loss_fn=run.loss_fn, lr_fn=run.lr_fn)
  )


def _run(run, batches):
  state, losses = run.state, []
  for b in batches:
    state, m = run.step_fn(state, run.to_device(b))
    losses.append(float(m["loss"]))
  return state, losses


@pytest.fixture(scope="module")
def single_device_run():
  run, batches = _setup(_config())
  state0 = run.state
  table = np.asarray(run.shift_table)
  out_state, losses = _run(dataclasses.replace(run, state=jax.tree.map(jnp.copy, state0)), batches)
  return run, state0, batches, table, out_state, losses


def test_sharded_replicated_and_fsdp_match_single_device(single_device_run):
  *_, ref_state, ref_losses = single_device_run
  for mode in ("replicated", "fsdp"):
    run, batches = _setup(_config(), 0, mode)
    assert run.mesh.size == 8
    specs = {tuple(s.spec) for s in jax.tree.leaves(run.shardings.params)}
    if mode == "fsdp":
      assert any("data" in s for s in specs), specs  # something really is sharded
    else:
      assert specs == {()}
    state, losses = _run(run, batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    chex.assert_trees_all_close(
      jax.device_get(state.params), jax.device_get(ref_state.params), rtol=2e-5, atol=1e-6
    )
    assert int(state.step) == 2


def test_step_uses_schedule_plus_gathered_shift_float64_reference(single_device_run):
  run, state, batches, table, _, _ = single_device_run
  t = 37
  state = state.replace(step=jnp.int32(t))
  batch = batches[1]
  out = jax.jit(functools.partial(train.eval_step, policy=run.policy, loss_fn=run.loss_fn))(
    state, batch
  )
  _, metrics = _plain_step(run)(state, batch)
  c = _config()
  period = c.total_steps / c.mmts.num_oscillations
  tau = c.mmts.alpha / 2 * math.cos(2 * math.pi * t / period) + table[batch["index"]].astype(
    np.float64
  )
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
  np.testing.assert_allclose(
    float(metrics["temperature_base"]),
    c.mmts.alpha / 2 * math.cos(2 * math.pi * t / period),
    atol=1e-7,
  )
  # The long tail: head clusters get larger temperatures than tail clusters.
  assert table.min() == pytest.approx(c.mmts.sh_min) and table.max() == pytest.approx(c.mmts.sh_max)


def test_nonfinite_loss_leaves_the_state_untouched(single_device_run):
  run, state, batches, _, _, _ = single_device_run
  bad = dict(batches[0], image_features=np.full_like(batches[0]["image_features"], np.nan))
  new, metrics = _plain_step(run)(state, bad)
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
    policy = temperature.from_config(
      {"mode": mode, "value": 0.07, "tau_min": 0.1, "tau_max": 1.0}, mmts, total_steps=steps
    )
    state = policy.init_state(3, table)
    assert set(state) == ({"shift_table"} if mode in ("ics", "mmts") else set())
    got = policy.values(state, step=t, index=index, model_temperature=None)
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=mode)
  policy = temperature.from_config({"mode": "clip"}, mmts, total_steps=steps)
  np.testing.assert_allclose(
    policy.values({}, step=t, index=index, model_temperature=0.03), np.full(4, 0.03), rtol=1e-6
  )


def test_learnable_temperature_is_trained():
  run, batches = _setup(_config(mode="learnable", value=0.07))
  state, step = run.state, _plain_step(run)
  before = float(state.params["log_inv_temperature"])
  assert before == pytest.approx(math.log(1 / 0.07))
  new, metrics = step(state, batches[0])  # warmup: the first learning rate is 0
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
  policy = temperature.from_config({"mode": "ics"}, dict(mmts, sh_min=0.05), total_steps=10)
  with pytest.raises(ValueError, match="another dataset"):
    temperature.check_shift_table(np.full(7, 0.1), policy, num_examples=8)
  with pytest.raises(ValueError, match="non-finite"):
    temperature.check_shift_table(np.array([0.1, np.nan]), policy)
  with pytest.raises(KeyError, match="no 'index'"):
    train.check_batch({"image_features": np.zeros((2, 3))}, 10)
  with pytest.raises(ValueError, match=r"outside the dataset"):
    train.check_batch({"index": np.array([0, 10])}, 10)
  with pytest.raises(ValueError, match="loss impl"):
    losses.get("infonce", impl="fancy")


def test_source_hosts_partition_each_global_batch_and_resume_by_position():
  c = _config()
  source = train.make_source(c.data, global_batch_size=32, seed=3)
  whole = [
    b for b, _ in zip(source.iterate(0), range(10), strict=False)
  ]  # 10 batches > 1 epoch (8)
  hosts = [[b for b, _ in zip(source.iterate(0, p, 2), range(10), strict=False)] for p in range(2)]
  for g, (h0, h1) in zip(whole, zip(*hosts, strict=True), strict=True):
    np.testing.assert_array_equal(np.concatenate([h0["index"], h1["index"]]), g["index"])
  resumed = next(source.iterate(9))
  for k in whole[9]:
    np.testing.assert_array_equal(resumed[k], whole[9][k])
  epoch = np.concatenate([b["index"] for b in whole[:8]])
  assert sorted(epoch.tolist()) == list(range(256))  # each example once per epoch
  assert not np.array_equal(whole[8]["index"], whole[0]["index"])  # reshuffled next epoch


def test_learnable_temperature_moves_back_from_its_bound():
  """The bound tau >= 0.01 clamps the parameter after the update, not the forward pass: at the
  bound the gradient is not zero, so a loss that wants a larger temperature moves it back."""
  run, batches = _setup(_config(mode="learnable", value=0.07))
  bound = math.log(1 / run.model.min_temperature)
  state = run.state.replace(params=dict(run.state.params, log_inv_temperature=jnp.float32(bound)))
  step = _plain_step(run)
  # Compiled once (op by op it is ~100 small compilations, 5 s of the test).
  grad = jax.jit(
    jax.grad(
      lambda p: train.eval_step(
        state.replace(params=p), batches[0], policy=run.policy, loss_fn=run.loss_fn
      )["loss"]
    )
  )(state.params)["log_inv_temperature"]
  assert float(grad) > 0  # random embeddings: the loss wants a higher temperature
  for b in batches:  # warmup (lr 0), then one real update
    state, metrics = step(state, b)
  assert float(metrics["lr"]) > 0
  assert float(state.params["log_inv_temperature"]) < bound - 1e-4  # moved back from it
  # Pushed past the bound, the update lands exactly on it.
  tx = train.make_optimizer(_config().optim, 50, max_log_inv_temperature=bound)[0]
  params = {"log_inv_temperature": jnp.float32(bound - 1e-3)}
  opt = tx.init(params)
  for _ in range(3):
    updates, opt = tx.update({"log_inv_temperature": jnp.float32(-10.0)}, opt, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(float(params["log_inv_temperature"]), bound, rtol=1e-6)


def test_raw_uint8_pixels_never_reach_the_towers():
  run, _ = _setup(_config())
  pixels = np.random.default_rng(0).integers(0, 256, size=(8, 4, 4, 3), dtype=np.uint8)
  out = run.to_device({"image": pixels, "index": np.arange(8, dtype=np.int32)})
  assert out["image"].dtype == jnp.float32
  reference = np.stack([image_ops.normalize(p) for p in pixels])
  np.testing.assert_allclose(np.asarray(out["image"]), reference, rtol=1e-6, atol=1e-6)
  assert out["index"].dtype == jnp.int32
  with pytest.raises(TypeError, match="raw uint8 pixels"):
    train.train_step(
      run.state,
      {"image_features": jnp.zeros((8, 4, 4, 3), jnp.uint8), "index": jnp.arange(8)},
      policy=run.policy,
      loss_fn=run.loss_fn,
    )


@dataclasses.dataclass(frozen=True)
class _CountingPolicy(temperature.Fixed):
  """A policy with dataset-sized state sharded by rows: how often each example was an anchor."""

  name: str = "counting"

  def init_state(self, num_examples, shift_table):
    return {"seen": jnp.zeros((num_examples,), jnp.float32)}

  def state_partition(self):
    return {"seen": "rows"}

  def loss(self, state, image, text, *, step, index, loss_fn, model_temperature):
    values = self.values(state, step=step, index=index, model_temperature=model_temperature)
    return loss_fn(image, text, values), values, {"seen": state["seen"].at[index].add(1.0)}


def test_policy_state_is_sharded_by_rows_updated_and_checkpointed(tmp_path, monkeypatch):
  monkeypatch.setitem(temperature.POLICIES, "counting", lambda t, m, **kw: _CountingPolicy())
  c = _config(mode="counting")
  c.update(log_every=1, progress_bar=False, tensorboard=False)
  c.checkpoint.update(every_steps=3, async_save=False)
  run, batches = _setup(c, 0)
  assert run.shardings.policy_state["seen"].spec == jax.sharding.PartitionSpec("data")
  state, _ = _run(run, batches)
  seen = np.asarray(state.policy_state["seen"])
  expected = np.zeros(256)
  for b in batches:
    np.add.at(expected, b["index"], 1.0)
  np.testing.assert_array_equal(seen, expected)
  # Saved with the rest and restored bit for bit by a resumed run.
  train.train_and_evaluate(c, tmp_path, stop_at_step=3)
  resumed = train.setup(c, workdir=tmp_path)
  assert resumed.start_step == 3
  assert float(np.asarray(resumed.state.policy_state["seen"]).sum()) == 3 * c.batch_size
