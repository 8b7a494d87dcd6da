r"""A linear generative model of two modalities with shared latent factors.

.. math::
  x = U_1 z + V_1 w_1 + \sigma e_1, \qquad \tilde x = U_2 z + V_2 w_2 + \sigma e_2,

`z ~ N(0, nu^2 I_r)` shared by a pair, `w_m ~ N(0, kappa^2 I_k)` modality-specific "spike" noise
along `V_m` (orthogonal to `U_m`), `e_m ~ N(0, I)`. All noises are independent across
modalities, so the population cross-covariance is `nu^2 U_1 U_2^T`: multimodal learning sees only
the shared factors. One modality alone has covariance `nu^2 U U^T + kappa^2 V V^T + sigma^2 I`,
whose top directions are the noise spikes when `kappa > nu`.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["LinearGenerativeModel", "make_model", "sample_pairs", "mismatch",
           "random_masking_views", "hidden_pair_pool"]


class LinearGenerativeModel(NamedTuple):
  u1: jax.Array  # (d1, r) orthonormal: shared factors in modality 1
  u2: jax.Array  # (d2, r)
  v1: jax.Array  # (d1, k) orthonormal, orthogonal to u1: noise spikes of modality 1
  v2: jax.Array  # (d2, k)
  signal: float  # nu, std of each shared factor
  spike: float  # kappa, std of each noise spike
  noise: float  # sigma, isotropic noise std


def _frame(key, d, r, k):
  q, _ = jnp.linalg.qr(jax.random.normal(key, (d, r + k)))
  return q[:, :r], q[:, r:]


def make_model(key, d1: int, d2: int, rank: int, *, noise_rank: int, signal: float = 1.0,
               spike: float = 2.0, noise: float = 0.5) -> LinearGenerativeModel:
  """Random orthonormal factor and spike directions.

  Example:
    >>> import jax
    >>> model = make_model(jax.random.PRNGKey(0), 20, 15, 3, noise_rank=3)
  """
  if rank + noise_rank > min(d1, d2):
    raise ValueError(f"make_model: rank + noise_rank = {rank + noise_rank} exceeds min(d1, d2) = "
                     f"{min(d1, d2)}")
  for name, v in (("signal", signal), ("spike", spike), ("noise", noise)):
    if v < 0:
      raise ValueError(f"make_model: {name} must be >= 0, got {v}")
  k1, k2 = jax.random.split(key)
  u1, v1 = _frame(k1, d1, rank, noise_rank)
  u2, v2 = _frame(k2, d2, rank, noise_rank)
  return LinearGenerativeModel(u1, u2, v1, v2, float(signal), float(spike), float(noise))


def _modality(key, z, u, v, spike, noise):
  k1, k2 = jax.random.split(key)
  n = z.shape[0]
  w = spike * jax.random.normal(k1, (n, v.shape[1]))
  e = noise * jax.random.normal(k2, (n, u.shape[0]))
  return z @ u.T + w @ v.T + e


def sample_pairs(model: LinearGenerativeModel, key, n: int):
  """`n` true pairs: returns `(x (n, d1), x_tilde (n, d2), z (n, r))`.

  Example:
    >>> import jax
    >>> model = make_model(jax.random.PRNGKey(0), 20, 15, 3, noise_rank=3)
    >>> x, xt, z = sample_pairs(model, jax.random.PRNGKey(1), 100)
  """
  kz, k1, k2 = jax.random.split(key, 3)
  z = model.signal * jax.random.normal(kz, (n, model.u1.shape[1]))
  x = _modality(k1, z, model.u1, model.v1, model.spike, model.noise)
  xt = _modality(k2, z, model.u2, model.v2, model.spike, model.noise)
  return x, xt, z


def mismatch(key, x_tilde, fraction: float):
  """Wrongly match a `fraction` of the pairs: a random subset is cyclically shifted.

  Returns `(x_tilde', matched)` with `matched[i]` False for the `round(fraction * n)` pairs whose
  partner was replaced by another sample's (every one of them is wrong when there are >= 2).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> xt, ok = mismatch(jax.random.PRNGKey(0), jnp.arange(10.0)[:, None], 0.3)
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"mismatch: fraction must be in [0, 1], got {fraction}")
  n = x_tilde.shape[0]
  m = int(round(fraction * n))
  chosen = jax.random.permutation(key, n)[:m]
  perm = jnp.arange(n).at[chosen].set(jnp.roll(chosen, 1))
  matched = jnp.ones((n,), bool).at[chosen].set(m < 2)
  return x_tilde[perm], matched


def random_masking_views(key, x):
  """Two augmented views `(A x, (I - A) x)`, `A = diag(Bernoulli(1/2))` drawn per sample.

  The augmentation of linear unimodal contrastive learning (Ji et al. 2021): the views share no
  coordinate, so their cross-covariance is the off-diagonal part of `Cov(x) / 4`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> a, b = random_masking_views(jax.random.PRNGKey(0), jnp.ones((4, 6)))
  """
  mask = jax.random.bernoulli(key, 0.5, x.shape).astype(x.dtype)
  return mask * x, (1 - mask) * x


def hidden_pair_pool(model: LinearGenerativeModel, key, n_hidden: int, n_extra: int):
  """Unpaired samples of each modality with `n_hidden` secret pairs among them.

  Each pool holds the `n_hidden` halves of true pairs plus `n_extra` unrelated samples (their
  own latent factors), shuffled independently. Returns `(x_pool, x_tilde_pool, match)` with
  `match[i]` the index in `x_tilde_pool` of `x_pool[i]`'s partner, or -1.

  Example:
    >>> import jax
    >>> model = make_model(jax.random.PRNGKey(0), 20, 15, 3, noise_rank=3)
    >>> xp, xtp, match = hidden_pair_pool(model, jax.random.PRNGKey(1), 50, 20)
  """
  kp, k1, k2, ks1, ks2 = jax.random.split(key, 5)
  x, xt, _ = sample_pairs(model, kp, n_hidden)
  x_extra, _, _ = sample_pairs(model, k1, n_extra)
  _, xt_extra, _ = sample_pairs(model, k2, n_extra)
  n = n_hidden + n_extra
  p1 = jax.random.permutation(ks1, n)  # pool position -> source row
  p2 = jax.random.permutation(ks2, n)
  x_pool = jnp.concatenate([x, x_extra])[p1]
  xt_pool = jnp.concatenate([xt, xt_extra])[p2]
  where_in_2 = jnp.argsort(p2)  # source row -> pool position in modality 2
  match = jnp.where(p1 < n_hidden, where_in_2[p1], -1)
  return x_pool, xt_pool, match
