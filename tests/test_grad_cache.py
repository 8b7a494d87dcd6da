"""GradCache (`mmts_jax.train.grad_cache`): on 8 simulated CPU devices, one micro-batched step
equals the single big-batch `train_step` (parameters after the update, loss, metrics, policy
state) within 1e-5 in float32, for InfoNCE with MM-TS per-sample temperatures (ring and
blockwise losses), CLIP's learnable temperature, the sigmoid loss with its learned bias (ring),
and max-margin with per-sample margins; plain
gradient accumulation, which loses the negatives across micro-batches, does not."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmts_jax import train
from mmts_jax.train import grad_cache

BATCH, MICRO = 32, 8  # 4 micro-batches, each split over the 8 devices


def _run(loss="infonce", impl="auto", row="mmts"):
  c = train.with_row(train.default_config(), row)
  c.total_steps, c.batch_size = 50, BATCH
  c.data.update(num_examples=128, num_clusters=6, image_dim=12, text="features")
  c.model.update(embed_dim=8)
  c.model.image = dict(name="features", hidden_dims=(16,))
  c.model.text = dict(name="features", hidden_dims=(16,))
  c.loss.update(name=loss, impl=impl)
  c.optim.warmup_steps = 1
  c.mesh.num_devices = 8
  run = train.setup(c)
  # Plain SGD (lr 1): the parameters after one step are `params - grad`, so they compare the
  # gradients themselves (Adam's first step, g / |g|, would amplify rounding of tiny entries).
  tx = optax.sgd(1.0)
  state = run.state.replace(tx=tx, opt_state=tx.init(run.state.params))
  return run, state, run.to_device(next(run.batches(0)))


def _steps(run, **micro_kw):
  deps = dict(policy=run.policy, loss_fn=run.loss_fn)
  big = jax.jit(functools.partial(train.train_step, **deps))
  micro = jax.jit(
    functools.partial(
      grad_cache.micro_batch_step, micro_batch_size=MICRO, mesh=run.mesh, **deps, **micro_kw
    )
  )
  return big, micro


def _max_param_diff(a, b) -> float:
  return max(
    float(jnp.max(jnp.abs(x - y)))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True)
  )


@pytest.mark.parametrize(
  "loss,impl,row",
  [
    ("infonce", "ring", "mmts"),
    ("infonce", "blockwise", "clip"),
    ("max_margin", "dense", "mmts"),
    ("sigmoid", "ring", "clip"),
  ],
)
def test_grad_cache_step_equals_the_big_batch_step(loss, impl, row):
  run, state, batch = _run(loss, impl, row)
  big, micro = _steps(run)
  s_big, m_big = big(state, batch)
  s_gc, m_gc = micro(state, batch)
  assert bool(m_big["finite"]) and bool(m_gc["finite"])
  assert _max_param_diff(s_big, state) > 1e-3  # the step moved the parameters
  chex.assert_trees_all_close(s_gc.params, s_big.params, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(s_gc.policy_state, s_big.policy_state, atol=1e-6)
  for key in ("loss", "grad_norm", "temperature_mean", "temperature_min", "temperature_max"):
    chex.assert_trees_all_close(m_gc[key], m_big[key], atol=1e-5, rtol=1e-5)
  if loss == "sigmoid":  # the learned bias: its gradient through the cached scalar outputs
    assert float(m_gc["bias"]) == float(m_big["bias"]) == -10.0
    assert abs(float(s_big.params["logit_bias"]) + 10.0) > 1e-3  # it moved (SGD, lr 1)
  if row == "mmts":  # per-sample values: the anchors' temperatures (margins) differ
    assert float(m_big["temperature_max"]) > float(m_big["temperature_min"]) + 1e-3
  assert int(s_gc.step) == int(s_big.step) == 1


def test_plain_accumulation_is_not_the_big_batch_step():
  run, state, batch = _run()
  big, plain = _steps(run, accumulation="plain")
  s_big, m_big = big(state, batch)
  s_plain, m_plain = plain(state, batch)
  # Each micro-batch of 8 sees 7 negatives instead of 31: a lower loss, another gradient.
  assert float(m_plain["loss"]) < float(m_big["loss"]) - 0.1
  assert _max_param_diff(s_plain, s_big) > 1e-3


def test_setup_runs_the_micro_batched_step_and_checks_its_size():
  c = train.default_config()
  c.total_steps, c.batch_size = 10, 16
  c.data.update(num_examples=64, text="features")
  c.model.text = dict(name="features", hidden_dims=(16,))
  c.optim.warmup_steps = 1
  c.mesh.num_devices = 8
  c.train.micro_batch_size = 8
  run = train.setup(c)
  state, metrics = run.step_fn(run.state, run.to_device(next(run.batches(0))))
  assert int(state.step) == 1 and bool(metrics["finite"])
  for bad, match in (
    (5, "does not divide"),
    (4, "multiple of the 8 devices"),
    (-8, "positive integer"),
  ):
    c.train.micro_batch_size = bad
    with pytest.raises(ValueError, match=match):
      train.setup(c)
  c.train.micro_batch_size, c.train.accumulation = 8, "sum"
  with pytest.raises(ValueError, match="train.accumulation"):
    train.setup(c)


def test_split_and_merge_are_inverse_and_spread_rows():
  x = np.arange(24).reshape(12, 2)
  parts = grad_cache.split_micro(jnp.asarray(x), 3)
  assert parts.shape == (3, 4, 2)
  np.testing.assert_array_equal(parts[1, :, 0], x[1::3, 0])
  np.testing.assert_array_equal(grad_cache.merge_micro(parts), x)


def test_the_micro_batches_are_read_in_place_without_a_transposed_copy():
  # The step reads micro-batch k from a reshaped view of the batch (`_strided` + `_take`): the
  # same rows as `split_micro`, and no (n, B / n, ...) transposed copy of an input is written.
  x = np.arange(48, dtype=np.float32).reshape(12, 2, 2)
  view = grad_cache._strided({"x": jnp.asarray(x)}, 3, None)
  for k in range(3):
    np.testing.assert_array_equal(grad_cache._take(view, k)["x"], x[k::3])
  run, state, batch = _run()
  for accumulation in grad_cache.ACCUMULATIONS:
    _, micro = _steps(run, accumulation=accumulation)
    text = micro.lower(state, batch).as_text()
    # The (32, 12) features viewed as (8, 4, 12), never transposed to (4, 8, 12).
    assert "tensor<8x4x12xf32>" in text and "tensor<4x8x12xf32>" not in text
