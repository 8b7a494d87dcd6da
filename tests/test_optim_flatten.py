"""`optim.flatten`: clipping and Adam's moments on one flat vector give the default optimizer's
values (against an independent float64 AdamW), the trainer's steps and logged gradient norm
match the default path on 1 and 8 devices, and the compiled update really is a few reductions
instead of one per parameter (the point of the option)."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmts_jax import train
from mmts_jax.train import optim


def _optim_cfg(**kw):
  """The default `config.optim` (clipping on, weight decay, warmup + cosine) with `kw`."""
  c = train.default_config().optim
  c.update(lr=1e-2, warmup_steps=2, end_lr_factor=0.1, **kw)
  return c


def _tree(rng):
  return {
    "dense": {"kernel": rng.normal(size=(5, 3)), "bias": rng.normal(size=(3,))},
    "scale": rng.normal(size=()),
    "proj": rng.normal(size=(2, 3, 4)),
  }


def _adamw_float64(cfg, total_steps, params, grads_list):
  """AdamW as written in its paper (and optax): clip by the global norm, Adam moments with bias
  correction, decoupled weight decay on >= 2-D leaves, warmup + cosine learning rate."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  peak, warm = cfg.lr, cfg.warmup_steps
  for t, g in enumerate(grads_list):
    g = {k: np.asarray(x, np.float64) for k, x in g.items()}
    norm = np.sqrt(sum(np.sum(x * x) for x in g.values()))
    if cfg.grad_clip_norm and norm > cfg.grad_clip_norm:
      g = {k: x * cfg.grad_clip_norm / norm for k, x in g.items()}
    if t < warm:
      lr = peak * t / warm
    else:
      frac = (t - warm) / (total_steps - warm)
      end = peak * cfg.end_lr_factor
      lr = end + (peak - end) * 0.5 * (1 + np.cos(np.pi * frac))
    for k in p:
      m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * g[k]
      v2[k] = cfg.b2 * v2[k] + (1 - cfg.b2) * g[k] ** 2
      mhat = m[k] / (1 - cfg.b1 ** (t + 1))
      vhat = v2[k] / (1 - cfg.b2 ** (t + 1))
      u = mhat / (np.sqrt(vhat) + cfg.eps)
      if p[k].ndim >= 2:
        u = u + cfg.weight_decay * p[k]
      p[k] = p[k] - lr * u
  return p


def _flat_leaves(tree):
  return {
    "/".join(str(getattr(k, "key", k)) for k in path): v
    for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


@pytest.mark.parametrize("grad_scale", [0.05, 10.0])  # clipping inactive / active
def test_flat_and_tree_adamw_match_a_float64_reference(grad_scale):
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _tree(rng))
  grads_list = [
    jax.tree.map(lambda x: jnp.asarray(grad_scale * x, jnp.float32), _tree(rng)) for _ in range(6)
  ]
  total = 10
  ref = _adamw_float64(
    _optim_cfg(), total, _flat_leaves(params), [_flat_leaves(g) for g in grads_list]
  )
  for flatten in (False, True):
    tx, _ = optim.make_optimizer(_optim_cfg(flatten=flatten), total)
    # One compiled update (as in the train step), not dozens of op-by-op compilations.
    update = jax.jit(tx.update)
    p, s = params, tx.init(params)
    for g in grads_list:
      u, s = update(g, s, p)
      p = jax.tree.map(lambda a, b: a + b, p, u)
    got = _flat_leaves(p)
    for k, want in ref.items():
      np.testing.assert_allclose(
        np.asarray(got[k], np.float64),
        want,
        rtol=2e-5,
        atol=2e-6,
        err_msg=f"flatten={flatten}, leaf {k}",
      )
  # The flat optimizer's moments really are flat: one vector of every parameter.
  tx, _ = optim.make_optimizer(_optim_cfg(flatten=True), total)
  sizes = {np.shape(x) for x in jax.tree.leaves(tx.init(params)) if np.ndim(x) > 0}
  assert sizes == {(5 * 3 + 3 + 1 + 2 * 3 * 4,)}, sizes


def _trainer_config(flatten: bool):
  c = train.default_config()
  c.total_steps, c.batch_size = 20, 32
  c.data.update(num_examples=256, num_clusters=12, image_dim=64, text="features")
  c.model.update(embed_dim=16)
  c.model.image = dict(name="features", hidden_dims=(256,))
  c.model.text = dict(name="features", hidden_dims=(256,))
  c.optim.update(lr=1e-2, warmup_steps=1, flatten=flatten, grad_clip_norm=0.5)
  return c


def _train(c, devices: int, steps: int = 3):
  c.mesh.update(num_devices=devices, param_sharding="replicated")
  run = train.setup(c)
  state, norms, losses = run.state, [], []
  for b, _ in zip(run.batches(0), range(steps), strict=False):
    state, m = run.step_fn(state, run.to_device(b))
    norms.append(float(m["grad_norm"]))
    losses.append(float(m["loss"]))
  return run, state, norms, losses


@pytest.fixture(scope="module")
def tree_run():
  return _train(_trainer_config(False), 1)


@pytest.mark.parametrize("devices", [1, 8])
def test_trainer_with_flat_optimizer_matches_the_default(tree_run, devices):
  _, ref_state, ref_norms, ref_losses = tree_run
  run, state, norms, losses = _train(_trainer_config(True), devices)
  assert run.mesh.size == devices
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  np.testing.assert_allclose(norms, ref_norms, rtol=1e-5)
  assert ref_norms[0] > 0.5  # the clipping was active in the first step
  chex.assert_trees_all_close(
    jax.device_get(state.params), jax.device_get(ref_state.params), rtol=2e-5, atol=1e-6
  )


def _optimizer_reductions(c) -> int:
  """Scalar-result reductions (the per-parameter squared norms) in the compiled step."""
  c.mesh.update(num_devices=1, param_sharding="replicated")
  run = train.setup(c)
  batch = run.to_device(next(iter(run.batches(0))))
  hlo = run.step_fn.lower(run.state, batch).compile().as_text()
  return len(re.findall(r"f32\[\] reduce\(", hlo))


def test_flat_optimizer_compiles_to_fewer_norm_reductions():
  # A deeper tower so that the parameter count dominates: 2 x (4 kernels + 4 biases) leaves.
  counts = {}
  for flatten in (False, True):
    c = _trainer_config(flatten)
    c.model.image = dict(name="features", hidden_dims=(32, 32, 32))
    c.model.text = dict(name="features", hidden_dims=(32, 32, 32))
    counts[flatten] = _optimizer_reductions(c)
  assert counts[True] < counts[False], counts
  assert counts[True] <= counts[False] // 2, counts
