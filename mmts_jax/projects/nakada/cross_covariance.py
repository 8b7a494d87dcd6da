r"""The contrastive cross-covariance `S(beta)` of Nakada et al. and the weights `beta`.

For paired samples `(x_i, x~_i)`, `i = 1..n`, and weights `beta`:

.. math::
  S(\beta) = \frac1n\sum_i \beta_{ii}\, x_i \tilde x_i^\top
             - \frac1n\sum_{i\ne j} \beta_{ij}\, x_i \tilde x_j^\top \in \mathbb R^{d_1\times d_2}.

`beta` is read off the loss at the current similarities `s_ij = <G1 x_i, G2 x~_j>`:
`dL/ds_ij = (beta_ij [i != j] - beta_ii [i == j]) / n`, so that
`dL/dG1 = -G2 S(beta)^T` and `dL/dG2 = -G1 S(beta)` (docs/nonlinear_mmcl.md derives it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmts_jax.losses.nonlinear import nonlinear_mmcl_similarity

__all__ = [
  "loss_weights",
  "infonce_weights",
  "linear_weights",
  "cross_covariance",
  "centered_cross_covariance",
]


def _signed(beta):
  """`C = diag(beta_ii) - offdiag(beta)`: the matrix with `S = X^T C X~ / n`."""
  eye = jnp.eye(beta.shape[0], dtype=bool)
  return jnp.where(eye, beta, -beta)


def loss_weights(s, temperature, *, phi, psi):
  """`beta` of the loss `nonlinear_mmcl(phi, psi)` at similarities `s`, by autodiff in `s`.

  `beta_ij = n dL/ds_ij` off the diagonal (the weight of negative pair (i, j)) and
  `beta_ii = -n dL/ds_ii` (the weight of positive pair i); both are >= 0 for increasing phi, psi.

  Example:
    >>> import jax.numpy as jnp
    >>> beta = loss_weights(jnp.eye(3), 1.0, phi=jnp.log1p, psi=jnp.exp)
    >>> beta.shape
    (3, 3)
  """
  n = s.shape[0]
  g = jax.grad(lambda t: nonlinear_mmcl_similarity(t, temperature, phi=phi, psi=psi))(s)
  return -n * _signed(g)


def infonce_weights(s, temperature):
  r"""Closed form of `beta` for InfoNCE (`phi = log1p`, `psi = exp`).

  With `P = softmax_j(s_ij / tau_i)` (image anchors) and `Q = softmax_j(s_ji / tau_i)` (text
  anchors): `beta_ij = (P_ij / tau_i + Q_ji / tau_j) / 2` for `i != j` and
  `beta_ii = ((1 - P_ii) + (1 - Q_ii)) / (2 tau_i)`.

  Example:
    >>> import jax.numpy as jnp
    >>> beta = infonce_weights(jnp.eye(3), 0.1)
    >>> beta.shape, beta.dtype
    ((3, 3), dtype('float32'))
  """
  n = s.shape[0]
  tau = jnp.broadcast_to(jnp.asarray(temperature, s.dtype), (n,))
  p = jax.nn.softmax(s / tau[:, None], axis=1)
  q = jax.nn.softmax(s.T / tau[:, None], axis=1)
  off = 0.5 * (p / tau[:, None] + q.T / tau[None, :])
  diag = 0.5 * ((1 - jnp.diagonal(p)) + (1 - jnp.diagonal(q))) / tau
  return jnp.where(jnp.eye(n, dtype=bool), diag[:, None], off)


def linear_weights(n: int, temperature=1.0, dtype=jnp.float32):
  """`beta` of the linear loss (`phi = psi = identity`): constant in the similarities.

  `beta_ij = (1/tau_i + 1/tau_j) / 2` for `i != j`, `beta_ii = (n - 1) / tau_i`.

  Example:
    >>> linear_weights(4, 0.5).tolist()  # (n - 1) / tau on the diagonal, 1 / tau off it
    [[6.0, 2.0, 2.0, 2.0], [2.0, 6.0, 2.0, 2.0], [2.0, 2.0, 6.0, 2.0], [2.0, 2.0, 2.0, 6.0]]
  """
  inv = 1.0 / jnp.broadcast_to(jnp.asarray(temperature, dtype), (n,))
  off = 0.5 * (inv[:, None] + inv[None, :])
  return jnp.where(jnp.eye(n, dtype=bool), ((n - 1) * inv)[:, None], off)


def cross_covariance(x, x_tilde, beta):
  """`S(beta)` for `x: (n, d1)`, `x_tilde: (n, d2)`, `beta: (n, n)`; returns `(d1, d2)`.

  Computed as `X^T C X~ / n` with `C = diag(beta_ii) - offdiag(beta)`, without a Python loop.

  Example:
    >>> import jax.numpy as jnp
    >>> s = cross_covariance(jnp.eye(3), jnp.eye(3), linear_weights(3))
    >>> s.shape
    (3, 3)
  """
  n = x.shape[0]
  if x_tilde.shape[0] != n or beta.shape != (n, n):
    raise ValueError(
      f"cross_covariance: need x (n, d1), x_tilde (n, d2), beta (n, n); got "
      f"{tuple(x.shape)}, {tuple(x_tilde.shape)}, {tuple(beta.shape)}"
    )
  return x.T @ (_signed(beta) @ x_tilde) / n


def centered_cross_covariance(x, x_tilde):
  r"""`S` of the linear loss at `tau = 1`, divided by `n - 1`: size-independent.

  .. math::
    \hat S = \frac1n\sum_i x_i\tilde x_i^\top - \frac{1}{n(n-1)}\sum_{i\ne j} x_i\tilde x_j^\top

  It is what `cross_covariance(x, x_tilde, linear_weights(n)) / (n - 1)` gives, in `O(n d1 d2)`.

  Example:
    >>> import jax.numpy as jnp
    >>> s = centered_cross_covariance(jnp.eye(3), jnp.eye(3))
    >>> s.shape
    (3, 3)
  """
  n = x.shape[0]
  if n < 2 or x_tilde.shape[0] != n:
    raise ValueError(
      f"centered_cross_covariance: need n >= 2 pairs, got x {tuple(x.shape)} and "
      f"x_tilde {tuple(x_tilde.shape)}"
    )
  paired = x.T @ x_tilde / n
  sx, st = jnp.sum(x, axis=0), jnp.sum(x_tilde, axis=0)
  # sum_{i != j} x_i x~_j^T = (sum x)(sum x~)^T - sum_i x_i x~_i^T
  negatives = (jnp.outer(sx, st) - x.T @ x_tilde) / (n * (n - 1))
  return paired - negatives
