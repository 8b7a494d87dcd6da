r"""iSogCLR: individualised learnable temperatures (Qiu et al., ICML 2023) as a temperature policy.

"Not All Semantics are Created Equal: Contrastive Self-supervised Learning with Automatic
Temperature Individualization" gives every training sample its own temperature, one for the
sample as an image anchor (:math:`\tau^I_i`) and one as a text anchor (:math:`\tau^T_i`), and
learns them through a distributionally robust (KL-constrained) objective. For an image anchor
`i` with pair similarities :math:`s_{ij} = \langle x_i, y_j\rangle` and differences
:math:`d_{ij} = s_{ij} - s_{ii}`, the robust loss is

.. math::
  F_i(w, \tau_i) = \tau_i \log \frac{1}{|S_i|}\sum_{j \in S_i} e^{d_{ij}/\tau_i} + \tau_i \rho,

minimised in both the network weights `w` and :math:`\tau_i` (:math:`\rho` is the KL radius:
larger :math:`\rho`, smaller temperatures). The inner mean over the whole dataset is tracked per
sample by a moving average (the dataset-sized state), which is what makes it work with small
batches. One step on a batch of `B` pairs (the official code's update, text anchors the same with
columns in place of rows; every state entry is read and written at the batch's `index`):

1. :math:`z_{ij} = d_{ij} / \tau_i` with the gradient stopped, for all `j` of the batch (the
   positive `j = i` included, `z_{ii} = 0`; the official code sums over it too).
2. Overflow guard: :math:`b_i \leftarrow \max(b_i, \max_j z_{ij})` (a running maximum per sample).
3. Batch estimate :math:`g_i = \frac{1}{B-1}\sum_j e^{z_{ij} - b_i}` and moving average
   :math:`s_i \leftarrow (1-\gamma)\, s_i\, e^{b_i^{old} - b_i} + \gamma\, g_i` (the rescaling keeps
   `s` relative to the new `b`).
4. Weights :math:`p_{ij} = e^{z_{ij} - b_i} / (s_i + \epsilon)` (constants for autodiff) and the
   surrogate loss :math:`L = \frac{1}{B}\sum_i \frac{1}{B-1}\sum_j p_{ij}\, d_{ij}` + the same
   for text anchors. Its gradient in the embeddings is the robust loss's gradient with the
   dataset mean in place of the batch mean (the temperature cancels: no division by
   :math:`\tau`, unlike InfoNCE's logits). Its *value* is a surrogate, near 0 whatever the fit.
5. Temperature gradient :math:`\partial_\tau F_i \approx \log s_i + b_i + \rho
   - \frac{1}{B-1}\sum_j p_{ij} z_{ij}`, clipped to `[-5, 5]` and averaged by momentum
   :math:`u_i \leftarrow (1-\beta) u_i + \beta\, \mathrm{clip}(\partial_\tau F_i)`, then
   :math:`\tau_i \leftarrow \mathrm{clip}(\tau_i - \eta u_i, \tau_{min}, \tau_{max})`.

The anchors' temperatures used in a step are those *before* its update. Defaults are the
paper's CC3M script: :math:`\gamma = 0.8`, :math:`\rho = 6`, :math:`\tau_0 = 0.01`,
:math:`\eta = 0.03` (constant), :math:`\beta = 0.9`, bounds `[0.005, 1]`,
:math:`\epsilon = 10^{-10}`.

State (dataset-sized, sharded by rows over the data axis): `tau_image`, `tau_text` (init
:math:`\tau_0`), `u_image`, `u_text`, `s_image`, `s_text`, `b_image`, `b_text` (init 0).

Max-margin does not apply: the method *is* a temperature-scaled log-sum-exp objective, and a
hinge loss has neither a temperature nor a partition function to estimate, so `loss_fn` (the
configured InfoNCE or max-margin) is not called, and `check_loss("max_margin")` raises.

Example:
  >>> import jax.numpy as jnp
  >>> policy = ISogCLR()
  >>> state = policy.init_state(6, None)
  >>> x = jnp.eye(4, 6)
  >>> loss, tau, new = policy.loss(state, x, x, step=0, index=jnp.arange(4), loss_fn=None,
  ...                              model_temperature=None)
  >>> tau.shape, round(float(tau[0]), 6), round(float(new["tau_image"][0]), 6)
  ((4,), 0.01, 0.005)
  >>> round(float(new["tau_image"][5]), 6)  # not in the batch: untouched
  0.01
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from mmts_jax.temperature import Policy

__all__ = ["ISogCLR"]

_GRAD_CLIP = 5.0  # the official bound on the temperature gradient
_KEYS = ("tau", "u", "s", "b")


def _side(diff, tau, b_old, s_old, u_old, *, gamma, rho, eta, beta, eps, tau_min, tau_max):
  """One anchor side (rows of `diff` are anchors): surrogate loss, new per-anchor state."""
  n = diff.shape[1]
  z = jax.lax.stop_gradient(diff) / tau[:, None]
  b = jnp.maximum(b_old, jnp.max(z, axis=1))
  e = jnp.exp(z - b[:, None])
  g = jnp.sum(e, axis=1) / (n - 1)
  s = (1.0 - gamma) * s_old * jnp.exp(b_old - b) + gamma * g
  p = e / (s[:, None] + eps)
  loss = jnp.mean(jnp.sum(p * diff, axis=1) / (n - 1))
  grad_tau = jnp.log(s) + b + rho - jnp.sum(p * z, axis=1) / (n - 1)
  u = (1.0 - beta) * u_old + beta * jnp.clip(grad_tau, -_GRAD_CLIP, _GRAD_CLIP)
  new_tau = jnp.clip(tau - eta * u, tau_min, tau_max)
  return loss, {"tau": new_tau, "u": u, "s": s, "b": b}


@dataclasses.dataclass(frozen=True)
class ISogCLR(Policy):
  """The iSogCLR policy (see the module docstring for the update and its defaults): the
  trainer's `temperature.mode = "isogclr"` (hyper-parameters in `config.isogclr`).

  Attributes:
    gamma: moving-average weight of the batch estimate, in (0, 1].
    rho: KL radius of the robust objective, >= 0.
    tau_init, tau_min, tau_max: initial value and bounds of every temperature.
    eta: temperature learning rate (constant, the paper's `--eta_sched const`).
    beta: momentum weight of the temperature gradient, in (0, 1].
    eps: added to the moving average before dividing.
  """

  name: str = "isogclr"
  gamma: float = 0.8
  rho: float = 6.0
  tau_init: float = 0.01
  tau_min: float = 5e-3
  tau_max: float = 1.0
  eta: float = 0.03
  beta: float = 0.9
  eps: float = 1e-10

  def __post_init__(self):
    if self.what != "temperature":
      raise ValueError(
        f"ISogCLR: what must be 'temperature' (max-margin does not apply), got {self.what!r}"
      )
    for field in ("gamma", "rho", "tau_init", "tau_min", "tau_max", "eta", "beta", "eps"):
      if not math.isfinite(float(getattr(self, field))):
        raise ValueError(f"ISogCLR: {field} must be finite, got {getattr(self, field)}")
    if not (0 < self.gamma <= 1 and 0 < self.beta <= 1):
      raise ValueError(
        f"ISogCLR: gamma and beta must be in (0, 1], got gamma={self.gamma}, beta={self.beta}"
      )
    if not 0 < self.tau_min <= self.tau_init <= self.tau_max:
      raise ValueError(
        f"ISogCLR: need 0 < tau_min <= tau_init <= tau_max, got "
        f"{self.tau_min}, {self.tau_init}, {self.tau_max}"
      )
    if self.rho < 0 or self.eta < 0 or self.eps <= 0:
      raise ValueError(
        f"ISogCLR: need rho >= 0, eta >= 0, eps > 0, got rho={self.rho}, "
        f"eta={self.eta}, eps={self.eps}"
      )

  @staticmethod
  def check_loss(loss: str) -> None:
    """Raises for max-margin: the robust log-sum-exp objective has no margin form."""
    if loss != "infonce":
      raise ValueError(
        f"ISogCLR: the policy is its own InfoNCE-type objective; loss {loss!r} "
        "does not apply (a hinge has no temperature to individualise)"
      )

  def init_state(self, num_examples: int, shift_table=None) -> dict[str, jax.Array]:
    """Per-sample temperatures at `tau_init`, every estimator at 0; `shift_table` is unused."""
    if int(num_examples) < 1:
      raise ValueError(f"ISogCLR: num_examples must be >= 1, got {num_examples}")
    n = int(num_examples)
    state = {}
    for side in ("image", "text"):
      state[f"tau_{side}"] = jnp.full((n,), self.tau_init, jnp.float32)
      for key in ("u", "s", "b"):
        state[f"{key}_{side}"] = jnp.zeros((n,), jnp.float32)
    return state

  def state_partition(self) -> dict[str, str]:
    return {f"{k}_{side}": "rows" for side in ("image", "text") for k in _KEYS}

  def values(self, state, *, step=None, index, model_temperature=None) -> jax.Array:
    """`(B,)` reported temperature: the mean of the anchor's image and text temperatures."""
    return 0.5 * (jnp.take(state["tau_image"], index) + jnp.take(state["tau_text"], index))

  def loss(self, state, image, text, *, step=None, index, loss_fn=None, model_temperature=None):
    """`(surrogate loss, (B,) temperatures used, new state)` for a batch of unit embeddings."""
    if image.shape[0] < 2:
      raise ValueError(f"ISogCLR: needs a batch of at least 2, got {image.shape[0]}")
    hyper = dict(
      gamma=self.gamma,
      rho=self.rho,
      eta=self.eta,
      beta=self.beta,
      eps=self.eps,
      tau_min=self.tau_min,
      tau_max=self.tau_max,
    )
    sim = jnp.matmul(image, text.T, preferred_element_type=jnp.float32)
    diag = jnp.diagonal(sim)
    take = lambda key: jnp.take(state[key], index)
    loss_i, new_i = _side(
      sim - diag[:, None],
      take("tau_image"),
      take("b_image"),
      take("s_image"),
      take("u_image"),
      **hyper,
    )
    # Text anchor j: column j against its own positive, as rows of the transpose.
    loss_t, new_t = _side(
      sim.T - diag[:, None],
      take("tau_text"),
      take("b_text"),
      take("s_text"),
      take("u_text"),
      **hyper,
    )
    new_state = dict(state)
    for side, new in (("image", new_i), ("text", new_t)):
      for key in _KEYS:
        new_state[f"{key}_{side}"] = (
          state[f"{key}_{side}"].at[index].set(jax.lax.stop_gradient(new[key]))
        )
    used = 0.5 * (take("tau_image") + take("tau_text"))
    return loss_i + loss_t, used, new_state
