r"""Linear encoders `G1: (r, d1)`, `G2: (r, d2)` trained with `nonlinear_mmcl`, in closed form.

Similarities `s_ij = <G1 x_i, G2 x~_j> = x_i^T G1^T G2 x~_j`. With the weights `beta` of
`cross_covariance.loss_weights` (`dL/ds_ij = (beta_ij [i != j] - beta_ii [i == j]) / n`):

.. math::
  \nabla_{G_1} L = -G_2 S(\beta)^\top + \rho\, G_2 G_2^\top G_1, \qquad
  \nabla_{G_2} L = -G_1 S(\beta) + \rho\, G_1 G_1^\top G_2,

where the last terms come from the regulariser `R = (rho/2) ||G1^T G2||_F^2`. For the linear loss
`beta` is constant, `L = -<G1^T G2, S> + R`, and the minimisers are `G1^T G2 = SVD_r(S) / rho`:
the rows of `G1` (`G2`) span the top-r left (right) singular vectors of `S`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mmts_jax.losses.nonlinear import nonlinear_mmcl_similarity
from mmts_jax.projects.nakada.cross_covariance import cross_covariance, loss_weights

__all__ = [
  "LinearEncoders",
  "init_encoders",
  "embed",
  "similarities",
  "regulariser",
  "loss",
  "closed_form_grad",
  "gradient_descent",
  "linear_minimiser",
  "unimodal_minimiser",
  "identity",
]


def identity(u):
  """`phi = psi = identity` gives the linear loss."""
  return u


class LinearEncoders(NamedTuple):
  """`g1: (r, d1)` maps modality 1 to `R^r`, `g2: (r, d2)` modality 2."""

  g1: jax.Array
  g2: jax.Array


def init_encoders(key, d1: int, d2: int, rank: int, scale: float = 0.1, dtype=jnp.float32):
  """Gaussian encoders with entries of standard deviation `scale / sqrt(d)`.

  Example:
    >>> import jax
    >>> enc = init_encoders(jax.random.PRNGKey(0), 6, 5, 2)
    >>> enc.g1.shape, enc.g2.shape
    ((2, 6), (2, 5))
  """
  if rank < 1 or rank > min(d1, d2):
    raise ValueError(f"init_encoders: rank must be in [1, min(d1, d2) = {min(d1, d2)}], got {rank}")
  k1, k2 = jax.random.split(key)
  return LinearEncoders(
    scale * jax.random.normal(k1, (rank, d1), dtype) / jnp.sqrt(d1),
    scale * jax.random.normal(k2, (rank, d2), dtype) / jnp.sqrt(d2),
  )


def embed(enc: LinearEncoders, x, x_tilde):
  """`(x G1^T, x~ G2^T)`: the `(n, r)` embeddings of both modalities."""
  return x @ enc.g1.T, x_tilde @ enc.g2.T


def similarities(enc: LinearEncoders, x, x_tilde):
  """`s_ij = <G1 x_i, G2 x~_j>`, `(n, n)`."""
  e1, e2 = embed(enc, x, x_tilde)
  return e1 @ e2.T


def regulariser(enc: LinearEncoders, rho):
  """`(rho/2) ||G1^T G2||_F^2`, computed as `(rho/2) <G1 G1^T, G2 G2^T>` in `O(r^2 d)`."""
  return 0.5 * rho * jnp.sum((enc.g1 @ enc.g1.T) * (enc.g2 @ enc.g2.T))


def loss(enc: LinearEncoders, x, x_tilde, temperature, *, phi, psi, rho):
  """`nonlinear_mmcl(phi, psi)` of the linear embeddings plus the regulariser.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> enc = init_encoders(jax.random.PRNGKey(0), 6, 5, 2)
    >>> x, xt = jnp.ones((4, 6)), jnp.ones((4, 5))
    >>> value = loss(enc, x, xt, 1.0, phi=jnp.log1p, psi=jnp.exp, rho=0.1)
  """
  s = similarities(enc, x, x_tilde)
  return nonlinear_mmcl_similarity(s, temperature, phi=phi, psi=psi) + regulariser(enc, rho)


def _reg_grad(enc: LinearEncoders, rho):
  return LinearEncoders(rho * enc.g2 @ (enc.g2.T @ enc.g1), rho * enc.g1 @ (enc.g1.T @ enc.g2))


def closed_form_grad(enc: LinearEncoders, x, x_tilde, temperature, *, phi, psi, rho):
  """`(-G2 S(beta)^T + rho G2 G2^T G1, -G1 S(beta) + rho G1 G1^T G2)`, beta at the current `s`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> enc = init_encoders(jax.random.PRNGKey(0), 6, 5, 2)
    >>> g = closed_form_grad(enc, jnp.ones((4, 6)), jnp.ones((4, 5)), 1.0,
    ...                      phi=identity, psi=identity, rho=0.1)
  """
  beta = loss_weights(similarities(enc, x, x_tilde), temperature, phi=phi, psi=psi)
  s_mat = cross_covariance(x, x_tilde, beta)
  reg = _reg_grad(enc, rho)
  return LinearEncoders(-enc.g2 @ s_mat.T + reg.g1, -enc.g1 @ s_mat + reg.g2)


def gradient_descent(
  enc: LinearEncoders,
  x,
  x_tilde,
  temperature,
  *,
  phi,
  psi,
  rho,
  lr,
  steps: int,
  grad_fn: Callable | None = None,
):
  """`steps` steps of full-batch gradient descent with the closed-form gradient (jit, scan).

  Returns `(encoders, loss per step)`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> enc = init_encoders(jax.random.PRNGKey(0), 6, 5, 2)
    >>> x = jax.random.normal(jax.random.PRNGKey(1), (8, 6))
    >>> enc, trace = gradient_descent(enc, x, x[:, :5], 1.0, phi=identity, psi=identity,
    ...                               rho=1.0, lr=0.1, steps=10)
  """
  if steps < 1:
    raise ValueError(f"gradient_descent: steps must be >= 1, got {steps}")
  if not lr > 0:
    raise ValueError(f"gradient_descent: lr must be > 0, got {lr}")
  grad_fn = closed_form_grad if grad_fn is None else grad_fn

  def step(e, _):
    value = loss(e, x, x_tilde, temperature, phi=phi, psi=psi, rho=rho)
    g = grad_fn(e, x, x_tilde, temperature, phi=phi, psi=psi, rho=rho)
    return jax.tree.map(lambda p, d: p - lr * d, e, g), value

  return jax.jit(lambda e: jax.lax.scan(step, e, None, length=steps))(enc)


def linear_minimiser(s_mat, rank: int, rho) -> LinearEncoders:
  r"""A global minimiser of `-<G1^T G2, S> + (rho/2)||G1^T G2||_F^2` over rank-r encoders.

  `G1 = diag(sqrt(sigma/rho)) U_r^T`, `G2 = diag(sqrt(sigma/rho)) V_r^T`, so that
  `G1^T G2 = U_r diag(sigma) V_r^T / rho` (Eckart-Young); unique up to `G1 -> Q G1, G2 -> Q G2`.

  Example:
    >>> import jax.numpy as jnp
    >>> enc = linear_minimiser(jnp.diag(jnp.array([3.0, 2.0, 1.0])), 2, 1.0)
    >>> enc.g1.shape, enc.g2.shape
    ((2, 3), (2, 3))
  """
  u, sv, vt = jnp.linalg.svd(s_mat, full_matrices=False)
  scale = jnp.sqrt(sv[:rank] / rho)[:, None]
  return LinearEncoders(scale * u[:, :rank].T, scale * vt[:rank])


def unimodal_minimiser(s_mat, rank: int, rho):
  r"""Shared encoder `G: (r, d)` minimising `-<G^T G, S> + (rho/2)||G^T G||_F^2` (one modality).

  Unimodal contrastive learning of two augmented views with one linear encoder: `G^T G` is the
  positive part of the top-r eigen-decomposition of `(S + S^T)/2`, divided by `rho`.

  Example:
    >>> import jax.numpy as jnp
    >>> g = unimodal_minimiser(jnp.diag(jnp.array([3.0, 2.0, 1.0])), 2, 1.0)
    >>> g.shape
    (2, 3)
  """
  sym = 0.5 * (s_mat + s_mat.T)
  w, v = jnp.linalg.eigh(sym)
  w, v = w[::-1][:rank], v[:, ::-1][:, :rank]
  return jnp.sqrt(jnp.maximum(w, 0.0) / rho)[:, None] * v.T
