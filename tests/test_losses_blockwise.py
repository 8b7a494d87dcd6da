"""Blockwise InfoNCE / max-margin against the dense reference and the official cases.

Tolerances: f32 blockwise vs the official float64 outputs or a float64 dense evaluation of the same
inputs, relative 1e-4 (gradients: max error over the largest entry). bf16 inputs: 1e-2. Memory:
the compiled temporaries of value_and_grad grow at most linearly with B (dense grows as B^2).
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmts_jax import losses
from mmts_jax.losses import blockwise, dense

TOL = 1e-4


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.all(np.isfinite(got)), "non-finite output"
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _inputs(key, b, d, normalise=True):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(key), 3)
  x = jax.random.normal(k1, (b, d))
  y = x[::-1] * 0.5 + jax.random.normal(k2, (b, d))  # correlated pairs: some hinges active
  if normalise:
    x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    y = y / jnp.linalg.norm(y, axis=1, keepdims=True)
  tau = 0.03 + 0.1 * jax.random.uniform(k3, (b,))
  return x, y, tau


def _f64_dense(fn, x, y, v):
  """value and gradients w.r.t. (x, y, v) of the dense loss, evaluated in float64."""
  with jax.enable_x64(True):
    args = [jnp.asarray(np.asarray(a, np.float64)) for a in (x, y, v)]
    val, grads = jax.value_and_grad(fn, argnums=(0, 1, 2))(*args)
    return np.asarray(val), [np.asarray(g) for g in grads]


def _assert_close(got, want, tol, what):
  (v, g), (v0, g0) = got, want
  assert _rel(v, v0) <= tol, (what, float(v), float(v0))
  for name, a, b in zip(("image", "text", "value"), g, g0):
    assert _rel(a, b) <= tol, (what, name, _rel(a, b))


# ---------------------------------------------------------------------------------------------
# The official MM-TS cases (float64 outputs of the PyTorch code), through the public API.


def _cases(shared_dir):
  data = np.load(shared_dir / "reference" / "mmts_official_cases.npz")
  ids = sorted({k.split("/")[0] for k in data.files})
  return [{k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(i + "/")} for i in ids]


LOSSES = (("mmts_infonce", losses.infonce, None), ("mmts_max_margin", losses.max_margin, None),
          ("infonce_fixed", losses.infonce, 0.07), ("max_margin_fixed", losses.max_margin, 0.2))


def test_official_cases(shared_dir):
  cases = _cases(shared_dir)
  assert len(cases) == 5
  for i, case in enumerate(cases):
    b = case["image"].shape[0]
    # Per-anchor values on every case; the scalar-value losses (same path, broadcast) on one.
    names = LOSSES if i == 0 else LOSSES[:2]
    block = (b // 3 + 1, b // 2 + 1)  # never divides B: the last tile of each kind is masked
    x, y = (jnp.asarray(case[k], jnp.float32) for k in ("image", "text"))
    tau = jnp.asarray(case["tau"], jnp.float32)

    @jax.jit
    def all_losses(x, y, tau):
      out = {}
      for name, fn, v in names:
        v = tau if v is None else v

        def f(x, y, fn=fn, v=v):
          return fn(x, y, v, impl="blockwise", block_size=block)
        out[name] = jax.value_and_grad(f, argnums=(0, 1))(x, y)
      return out

    for name, (v, (gx, gy)) in all_losses(x, y, tau).items():
      assert v.dtype == jnp.float32
      assert _rel(v, case[name]) <= TOL, (b, name, float(v), float(case[name]))
      assert _rel(gx, case[name + "_grad_image"]) <= TOL, (b, name)
      assert _rel(gy, case[name + "_grad_text"]) <= TOL, (b, name)


# ---------------------------------------------------------------------------------------------
# Random shapes: B not divisible by the tile, square and rectangular tiles, unnormalised inputs
# for max-margin (it must normalise as the dense one does); gradients include the per-anchor
# temperature / margin.


def _both_losses(block, with_max_margin=True):
  def f(x, y, tau, m):
    nce = jax.value_and_grad(
        lambda x, y, t: losses.infonce(x, y, t, impl="blockwise", block_size=block),
        argnums=(0, 1, 2))(x, y, tau)
    if not with_max_margin:
      return nce, None
    mm = jax.value_and_grad(
        lambda x, y, m: losses.max_margin(x, y, m, impl="blockwise", block_size=block),
        argnums=(0, 1, 2))(x * 3, y, m)
    return nce, mm
  return jax.jit(f)


def test_random_shapes_equal_dense():
  b, block = 37, (8, 16)  # 5 x 3 tiles, the last row and column tiles partly padding
  x, y, tau = _inputs(b, b, 24)
  m = 0.1 + 2 * tau  # margins 0.16 .. 0.36: a mix of active and inactive hinges
  nce, mm = _both_losses(block)(x, y, tau, m)
  _assert_close(nce, _f64_dense(dense.infonce_dense, x, y, tau), TOL, ("infonce", b))
  want = _f64_dense(dense.max_margin_dense, x * 3, y, m)
  assert float(want[0]) > 0  # the case exercises the hinge
  _assert_close(mm, want, TOL, ("max_margin", b))


def test_smallest_batches():
  # B = 1: InfoNCE is exactly 0 with zero gradients (the only logit is the positive one);
  # B = 2 is the smallest max-margin batch. Tiles of 1 and 4 (larger than B).
  x, y, tau = _inputs(9, 2, 8)
  nce, _ = _both_losses(4, with_max_margin=False)(x[:1], y[:1], tau[:1], tau[:1])
  assert abs(float(nce[0])) <= 1e-6
  assert all(float(jnp.max(jnp.abs(g))) <= 1e-6 for g in nce[1])
  nce, mm = _both_losses(1)(x, y, tau, 0.3 + tau)
  _assert_close(nce, _f64_dense(dense.infonce_dense, x, y, tau), TOL, ("infonce", 2))
  _assert_close(mm, _f64_dense(dense.max_margin_dense, x * 3, y, 0.3 + tau), TOL,
                ("max_margin", 2))


def test_bf16_inputs_close_to_f32():
  x, y, tau = _inputs(3, 24, 32)
  x16, y16 = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
  v16, g16 = jax.jit(jax.value_and_grad(
      lambda x, y: losses.infonce(x, y, tau, impl="blockwise", block_size=(8, 5)),
      argnums=(0, 1)))(x16, y16)
  # The f32 dense loss of the same (bf16-rounded) embeddings.
  v32, g32 = jax.value_and_grad(dense.infonce_dense, argnums=(0, 1))(
      x16.astype(jnp.float32), y16.astype(jnp.float32), tau)
  assert v16.dtype == jnp.float32  # accumulation and the loss stay in f32
  chex.assert_trees_all_equal_dtypes(g16, (x16, y16))
  assert _rel(v16, v32) <= 1e-2
  for a, b in zip(g16, g32):
    assert _rel(a, b) <= 5e-2


def test_auto_picks_dense_for_small_batches_and_blockwise_when_asked():
  x, y, tau = _inputs(4, 16, 8)
  jaxpr_auto = str(jax.make_jaxpr(lambda x, y: losses.infonce(x, y, tau))(x, y))
  jaxpr_bw = str(jax.make_jaxpr(lambda x, y: losses.infonce(x, y, tau, block_size=4))(x, y))
  assert "custom_vjp" not in jaxpr_auto and "scan" not in jaxpr_auto
  assert "custom_vjp" in jaxpr_bw and "scan" in jaxpr_bw
  assert losses.AUTO_DENSE_MAX >= 16


def test_vmap_over_independent_problems():
  # A scalar temperature, batched: also covers the scalar-value path.
  xs, ys, _ = zip(*(_inputs(k, 9, 8) for k in (5, 6)))
  x, y, t = jnp.stack(xs), jnp.stack(ys), jnp.asarray([0.05, 0.2])
  got = jax.jit(jax.vmap(lambda x, y, t: losses.infonce(x, y, t, impl="blockwise",
                                                        block_size=4)))(x, y, t)
  want = jnp.stack([dense.infonce_dense(a, b, c) for a, b, c in zip(xs, ys, t)])
  chex.assert_trees_all_close(got, want, rtol=TOL)


def test_bad_arguments_name_the_value():
  x, y, tau = _inputs(7, 8, 4)
  with pytest.raises(ValueError, match="'sparse'"):
    losses.infonce(x, y, tau, impl="sparse")
  with pytest.raises(ValueError, match="'scatter'"):
    losses.infonce(x, y, tau, sharded="scatter", axis_name=None)
  with pytest.raises(ValueError, match="0"):
    losses.infonce(x, y, tau, impl="blockwise", block_size=0)
  with pytest.raises(ValueError, match=r"\(4, 4, 4\)"):
    losses.max_margin(x, y, 0.2, impl="blockwise", block_size=(4, 4, 4))
  with pytest.raises(TypeError, match="2.5"):
    losses.infonce(x, y, tau, impl="blockwise", block_size=2.5)
  with pytest.raises(ValueError, match="-0.1"):  # the existing checks still run first
    losses.infonce(x, y, -0.1, impl="blockwise")
  with pytest.raises(ValueError, match="at least 2"):
    losses.max_margin(x[:1], y[:1], 0.2, impl="blockwise")


# ---------------------------------------------------------------------------------------------
# Memory: compiled temporaries of value_and_grad, blockwise (linear in B) vs dense (B^2).


def _temp_bytes(fn, b, d=16):
  x = jnp.ones((b, d), jnp.float32) / 4
  t = jnp.full((b,), 0.1, jnp.float32)
  compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(x, x, t).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("loss", ["infonce", "max_margin"])
def test_temporary_memory_grows_linearly(loss):
  fn = getattr(losses, loss)

  def blockwise_loss(x, y, t):
    return fn(x, y, t, impl="blockwise", block_size=64)

  small, large = _temp_bytes(blockwise_loss, 512), _temp_bytes(blockwise_loss, 2048)
  # 4x the batch: linear growth is <= 4x (plus slack for fixed tile buffers); B^2 would be 16x.
  assert large <= 4.5 * small, (small, large)
  # And far below one (B, B) f32 matrix, which the dense path needs several of.
  assert large < 2048 * 2048 * 4 / 8, large
