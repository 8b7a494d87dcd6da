"""The sigmoid (SigLIP) loss in the trainer: `configs/siglip_tiny.py` trains through
`train_and_evaluate` for the fixed and MM-TS rows (finite, decreasing loss; the learned bias
gets a gradient and moves), the step's first loss equals a float64 numpy reference of the
MM-TS temperatures and the model's bias, the ring over the 8-device mesh gives the dense
step's loss and update, a stopped and resumed run is bit-exact, every row gives the sigmoid
loss the temperatures it gives InfoNCE, the `clip` row learns SigLIP's t' and the bias, and the
paper-scale config builds."""

from __future__ import annotations

import math
import pathlib

import chex
import jax
import numpy as np
import pytest
from test_checkpointing import _restore

from mmts_jax import config_defaults, temperature, train
from mmts_jax.commands.train import load_config
from mmts_jax.metrics_log import read_metrics
from mmts_jax.models import build_model
from mmts_jax.train.step import make_embed_fn

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIGLIP = str(ROOT / "configs" / "siglip_tiny.py")
STEPS = 6


def _config(row: str, impl: str = "dense"):
  # One schedule for every run here (they share the compiled step of an equal config); the
  # runs end with stop_at_step. mesh.num_devices = 0: the whole 8-device test mesh.
  c = load_config(f"{SIGLIP}:{row}")
  c.total_steps, c.tensorboard = 100, False
  c.loss.impl = impl
  c.checkpoint.update(every_steps=3, keep=2, async_save=False)
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Workdirs: fixed and mmts straight for STEPS steps, mmts stopped at 3 and resumed."""
  out = {}
  for row in ("fixed", "mmts"):
    out[row] = tmp_path_factory.mktemp(row)
    result = train.train_and_evaluate(_config(row), out[row], stop_at_step=STEPS)
    assert result.step == STEPS
  out["resumed"] = tmp_path_factory.mktemp("resumed")
  train.train_and_evaluate(_config("mmts"), out["resumed"], stop_at_step=3)
  train.train_and_evaluate(_config("mmts"), out["resumed"], stop_at_step=STEPS)
  return out


def test_fixed_and_mmts_rows_train_and_the_bias_moves(runs):
  for row in ("fixed", "mmts"):
    records = read_metrics(runs[row])
    loss = [r["loss"] for r in records]
    assert len(loss) == STEPS and all(math.isfinite(v) for v in loss), (row, loss)
    assert loss[-1] < loss[0] - 0.5, (row, loss)  # b = -10: every positive starts near 10
    # The bias each step's forward pass used: the initial -10, then rising (the positives'
    # pull dominates at b = -10), as the checkpointed parameter.
    bias = [r["bias"] for r in records]
    assert bias[0] == -10.0 and bias[1] == -10.0, bias  # warmup: the first lr is 0
    assert bias[-1] > -10.0 + 1e-3, (row, bias)
    tree, _ = _restore(runs[row], STEPS)
    assert float(tree["params"]["logit_bias"]) > bias[-1], row
    assert all(r["grad_norm"] > 0 for r in records)
  fixed = read_metrics(runs["fixed"])
  assert {r["temperature_min"] for r in fixed} == {np.float32(0.1)}
  mmts = read_metrics(runs["mmts"])
  c = _config("mmts")
  assert min(r["temperature_min"] for r in mmts) >= c.mmts.sh_min - c.mmts.alpha / 2 - 1e-6
  assert max(r["temperature_max"] for r in mmts) <= c.mmts.sh_max + c.mmts.alpha / 2 + 1e-6


def _sigmoid_loss64(img, txt, tau, bias):
  """float64 docs/losses.md: 1/(2B) sum_ij [softplus(-z (s/tau_i + b)) + softplus(-z (s/tau_j
  + b))], z = +1 on the diagonal, -1 off it."""
  s = img @ txt.T
  z = 2 * np.eye(len(s)) - 1
  rows = np.logaddexp(0.0, -z * (s / tau[:, None] + bias))  # softplus
  cols = np.logaddexp(0.0, -z * (s / tau[None, :] + bias))
  return (rows.sum() + cols.sum()) / (2 * len(s))


def test_first_step_loss_is_the_float64_sigmoid_loss_of_mmts_temperatures_and_bias(runs):
  c = _config("mmts")
  run = train.setup(c)
  batch = next(run.batches(0))
  emb = make_embed_fn(run.model)(run.state.variables(), run.to_device(batch))
  img, txt = (np.asarray(jax.device_get(emb[k]), np.float64) for k in ("image", "text"))
  # Step 0 of MM-TS: alpha/2 cos(0) + sh(c_i), unchanged by the loss.
  tau = c.mmts.alpha / 2 + np.asarray(run.shift_table, np.float64)[batch["index"]]
  want = _sigmoid_loss64(img, txt, tau, c.loss.bias_init)
  first = read_metrics(runs["mmts"])[0]
  np.testing.assert_allclose(first["loss"], want, rtol=1e-5)
  np.testing.assert_allclose(first["temperature_mean"], tau.mean(), rtol=1e-6)


def _two_steps(impl):
  """The metrics of steps 1 and 2 and the update of step 2 (the warmup's first learning rate
  is 0: step 1 only fills Adam's moments, step 2 is the first update that moves anything)."""
  run = train.setup(_config("mmts", impl))
  batches = run.batches(0)
  state, first = run.step_fn(run.state, run.to_device(next(batches)))
  before = jax.device_get(state.params)
  state, second = run.step_fn(state, run.to_device(next(batches)))
  update = jax.tree.map(lambda a, b: a - b, jax.device_get(state.params), before)
  return jax.device_get(first), jax.device_get(second), update


def test_ring_over_the_mesh_gives_the_dense_step(runs):
  assert jax.device_count() == 8
  *dense, dense_update = _two_steps("dense")
  *ring, ring_update = _two_steps("ring")
  assert float(dense[1]["lr"]) > 0
  # float32 sums in another order: losses and gradient norms to 1e-6 / 1e-5 relative; the
  # update (Adam: lr * m / (sqrt(v) + eps), lr = 1.5e-3) to 1e-7 absolute.
  for d, r in zip(dense, ring, strict=True):
    np.testing.assert_allclose(r["loss"], d["loss"], rtol=1e-6)
    np.testing.assert_allclose(r["grad_norm"], d["grad_norm"], rtol=1e-5)
  chex.assert_trees_all_close(ring_update, dense_update, atol=1e-7, rtol=0)
  assert float(dense_update["logit_bias"]) > 0


def test_stopped_and_resumed_mmts_run_is_bit_exact(runs):
  straight, resumed = read_metrics(runs["mmts"]), read_metrics(runs["resumed"])
  assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
  for key in ("loss", "bias", "temperature_mean", "grad_norm"):
    assert [r[key] for r in straight] == [r[key] for r in resumed], key
  tree_a, meta_a = _restore(runs["mmts"], STEPS)
  tree_b, meta_b = _restore(runs["resumed"], STEPS)
  chex.assert_trees_all_equal(tree_a, tree_b)  # params (the bias too), optimizer, step, RNG
  assert meta_a == meta_b


def test_every_row_gives_the_sigmoid_loss_its_infonce_temperatures():
  # The schedule and shifts are the loss's temperature, whichever loss: the same policy.
  c = _config("mmts")
  # (iSogCLR learns its own temperatures and refuses the sigmoid loss: the last test.)
  for mode in (m for m in config_defaults.MODES if m != "isogclr"):
    t = dict(c.temperature.to_dict(), mode=mode)
    sigmoid = temperature.from_config(t, c.mmts, total_steps=100, loss="sigmoid")
    infonce = temperature.from_config(t, c.mmts, total_steps=100, loss="infonce")
    assert sigmoid == infonce and sigmoid.what == "temperature", mode


def test_clip_row_learns_siglips_t_prime_and_the_bias():
  run = train.setup(_config("clip"))
  params = jax.device_get(run.state.params)
  # SigLIP's t' (t = exp(t'), init log 10) is the learnable row's log(1/tau).
  assert float(params["log_inv_temperature"]) == pytest.approx(math.log(10.0))
  assert float(params["logit_bias"]) == -10.0
  batches, state = run.batches(0), run.state
  for _ in range(2):  # the warmup's first learning rate is 0
    state, metrics = run.step_fn(state, run.to_device(next(batches)))
  assert float(metrics["temperature_mean"]) == pytest.approx(0.1, rel=1e-6)
  new = jax.device_get(state.params)
  assert float(new["log_inv_temperature"]) != float(params["log_inv_temperature"])
  assert float(new["logit_bias"]) > -10.0


def test_paper_config_builds_a_bias_and_clip_models_are_refused_before_compiling():
  c = load_config(str(ROOT / "configs" / "siglip_vit_b16_cc3m.py") + ":clip")
  model = build_model(
    c.model,
    learnable_temperature=True,
    init_temperature=c.temperature.value,
    learnable_bias=True,
    init_bias=c.loss.bias_init,
  )
  batch = {
    "image": jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32),
    "text": jax.ShapeDtypeStruct((1, 77), np.int32),
  }
  shapes = jax.eval_shape(lambda b: model.init(jax.random.PRNGKey(0), b), batch)["params"]
  assert shapes["logit_bias"].shape == shapes["log_inv_temperature"].shape == ()
  assert c.loss.name == "sigmoid" and (c.mmts.alpha, c.mmts.sh_min, c.mmts.sh_max) == (
    0.04,
    0.05,
    0.10,
  )
  with pytest.raises(ValueError, match="no logit bias for loss 'sigmoid'"):
    build_model({"name": "clip"}, learnable_bias=True)
  with pytest.raises(ValueError, match="initial logit bias must be finite"):
    build_model(c.model, learnable_bias=True, init_bias=float("nan"))


def test_a_trained_sigmoid_workdir_loads_with_its_bias(runs):
  from mmts_jax.projects.ek100_features.restore import load_trained_model

  trained = load_trained_model(runs["mmts"])
  tree, _ = _restore(runs["mmts"], STEPS)
  batch = {k: v for k, v in next(train.setup(_config("mmts")).batches(0)).items() if k != "index"}
  out = trained.model.apply(trained.variables, batch)
  assert float(out["bias"]) == float(tree["params"]["logit_bias"]) > -10.0


def test_the_isogclr_row_refuses_the_sigmoid_loss_before_building():
  # iSogCLR is its own objective and never calls the configured loss: with loss "sigmoid" the
  # bias would get no gradient. `setup` asks such a policy (`check_loss`) first.
  with pytest.raises(ValueError, match="loss 'sigmoid' does not apply"):
    train.setup(_config("isogclr"))
