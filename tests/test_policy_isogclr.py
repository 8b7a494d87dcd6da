"""iSogCLR policy against an independent float64 numpy reference of its update, over steps."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmts_jax.policies.isogclr import ISogCLR


def _ref_side(sim_rows, tau, b_old, s_old, u_old, p):
  """Rows are anchors; returns (loss, d loss / d sim_rows, new tau, u, s, b), float64 loops."""
  n = sim_rows.shape[0]
  loss = 0.0
  dsim = np.zeros_like(sim_rows)
  out = {k: np.zeros(n) for k in ("tau", "u", "s", "b")}
  for i in range(n):
    d = sim_rows[i] - sim_rows[i, i]
    z = d / tau[i]
    b = max(b_old[i], z.max())
    e = np.exp(z - b)
    s = (1 - p.gamma) * s_old[i] * np.exp(b_old[i] - b) + p.gamma * e.sum() / (n - 1)
    w = e / (s + p.eps)
    loss += np.sum(w * d) / (n - 1) / n
    # d/d sim_rows[i, j] of w_j (sim_ij - sim_ii) / ((n-1) n), w held constant.
    dsim[i] += w / ((n - 1) * n)
    dsim[i, i] -= w.sum() / ((n - 1) * n)
    gt = np.log(s) + b + p.rho - np.sum(w * z) / (n - 1)
    u = (1 - p.beta) * u_old[i] + p.beta * np.clip(gt, -5, 5)
    out["tau"][i] = np.clip(tau[i] - p.eta * u, p.tau_min, p.tau_max)
    out["u"][i], out["s"][i], out["b"][i] = u, s, b
  return loss, dsim, out


def _ref_step(state, image, text, index, p):
  sim = image @ text.T
  new = {k: v.copy() for k, v in state.items()}
  total, grads = 0.0, {}
  for side, rows in (("image", sim), ("text", sim.T)):
    old = {k: state[f"{k}_{side}"][index] for k in ("tau", "b", "s", "u")}
    loss, dsim, upd = _ref_side(rows, old["tau"], old["b"], old["s"], old["u"], p)
    total += loss
    dsim = dsim if side == "image" else dsim.T
    grads["image"] = grads.get("image", 0) + dsim @ text
    grads["text"] = grads.get("text", 0) + dsim.T @ image
    for k, v in upd.items():
      new[f"{k}_{side}"][index] = v
  return total, grads, new


@pytest.mark.parametrize(
  "policy",
  [
    ISogCLR(tau_init=0.1, eta=0.05, rho=0.5),  # temperatures move a lot; exps of both signs
    ISogCLR(),  # the paper's defaults (tau 0.01: the bound and the b guard are exercised)
  ],
)
def test_three_steps_match_float64_reference(policy):
  rng = np.random.default_rng(0)
  n, bsz, dim = 10, 6, 5
  state = policy.init_state(n, None)
  ref = {k: np.asarray(v, np.float64) for k, v in state.items()}
  for step, index in enumerate(
    [np.array([0, 2, 4, 5, 6, 7]), np.array([4, 5, 6, 7, 8, 9]), np.array([9, 0, 4, 2, 7, 5])]
  ):
    image = rng.standard_normal((bsz, dim))
    text = image + 0.7 * rng.standard_normal((bsz, dim))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)

    def f(im, tx, state=state, index=index, step=step):
      loss, used, new = policy.loss(
        state, im, tx, step=step, index=jnp.asarray(index), loss_fn=None, model_temperature=None
      )
      return loss, (used, new)

    (loss, (used, new)), (g_im, g_tx) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
      jnp.asarray(image, jnp.float32), jnp.asarray(text, jnp.float32)
    )
    want_loss, want_grads, want_state = _ref_step(ref, image, text, index, policy)
    chex.assert_trees_all_close(float(loss), want_loss, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(np.asarray(g_im), want_grads["image"], rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(np.asarray(g_tx), want_grads["text"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
      np.asarray(used), 0.5 * (ref["tau_image"][index] + ref["tau_text"][index]), rtol=1e-6
    )
    for key, value in want_state.items():
      np.testing.assert_allclose(
        np.asarray(new[key]), value, rtol=2e-4, atol=1e-6, err_msg=f"step {step} {key}"
      )
    state, ref = new, want_state
  # Rows outside every batch were never touched; the temperatures did move.
  assert float(state["tau_image"][4]) != policy.tau_init
  for key in ("tau_text", "u_image", "s_text", "b_image"):
    np.testing.assert_array_equal(
      np.asarray(state[key])[[1, 3]], np.asarray(policy.init_state(2, None)[key])
    )


def test_jit_and_partition():
  policy = ISogCLR()
  state = policy.init_state(8, None)
  assert set(policy.state_partition()) == set(state)
  assert set(policy.state_partition().values()) == {"rows"}
  x = jnp.eye(4, 3)
  fn = jax.jit(lambda s, i: policy.loss(s, x, x, index=i)[2])
  new = fn(state, jnp.arange(4))
  assert all(v.shape == (8,) for v in new.values())
  assert hash(policy) == hash(ISogCLR())


def test_bad_hyper_parameters_and_losses():
  with pytest.raises(ValueError, match="tau_min <= tau_init"):
    ISogCLR(tau_init=2.0)
  with pytest.raises(ValueError, match="gamma"):
    ISogCLR(gamma=0.0)
  with pytest.raises(ValueError, match="max_margin"):
    ISogCLR.check_loss("max_margin")
  with pytest.raises(ValueError, match="at least 2"):
    ISogCLR().loss(
      ISogCLR().init_state(3, None), jnp.ones((1, 2)), jnp.ones((1, 2)), index=jnp.array([0])
    )
