r"""A linear generative model of two modalities with shared latent factors.

.. math::
  x = U_1 z + V_1 w_1 + \sigma e_1, \qquad \tilde x = U_2 z + V_2 w_2 + \sigma e_2,

`z ~ N(0, nu^2 I_r)` shared by a pair, `w_m ~ N(0, kappa^2 I_k)` modality-specific "spike" noise
along `V_m` (orthogonal to `U_m`), `e_m ~ N(0, I)`. All noises are independent across
modalities, so the population cross-covariance is `nu^2 U_1 U_2^T`: multimodal learning sees only
the shared factors. One modality alone has covariance `nu^2 U U^T + kappa^2 V V^T + sigma^2 I`,
whose top directions are the noise spikes when `kappa > nu`.

Data are drawn on the host with numpy (`rng`: a seed or a `np.random.Generator`) and returned as
float32 arrays; sampling is not part of any compiled step, and numpy avoids compiling a random
number generator for every shape.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
  "LinearGenerativeModel",
  "make_model",
  "sample_pairs",
  "mismatch",
  "random_masking_views",
  "hidden_pair_pool",
]


class LinearGenerativeModel(NamedTuple):
  u1: np.ndarray  # (d1, r) orthonormal: shared factors in modality 1
  u2: np.ndarray  # (d2, r)
  v1: np.ndarray  # (d1, k) orthonormal, orthogonal to u1: noise spikes of modality 1
  v2: np.ndarray  # (d2, k)
  signal: float  # nu, std of each shared factor
  spike: float  # kappa, std of each noise spike
  noise: float  # sigma, isotropic noise std


def _rng(rng) -> np.random.Generator:
  if isinstance(rng, np.random.Generator):
    return rng
  if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
    return np.random.default_rng(int(rng))
  raise TypeError(
    f"rng must be an int seed or a numpy Generator (host-side sampling), got {type(rng).__name__}"
  )


def _frame(rng, d, r, k):
  q, _ = np.linalg.qr(rng.normal(size=(d, r + k)))
  return q[:, :r].astype(np.float32), q[:, r:].astype(np.float32)


def make_model(
  rng,
  d1: int,
  d2: int,
  rank: int,
  *,
  noise_rank: int,
  signal: float = 1.0,
  spike: float = 2.0,
  noise: float = 0.5,
) -> LinearGenerativeModel:
  """Random orthonormal factor and spike directions.

  Example:
    >>> model = make_model(0, 20, 15, 3, noise_rank=3)
  """
  if rank < 1 or noise_rank < 0 or rank + noise_rank > min(d1, d2):
    raise ValueError(
      f"make_model: need 1 <= rank and rank + noise_rank <= min(d1, d2) = "
      f"{min(d1, d2)}, got rank={rank}, noise_rank={noise_rank}"
    )
  for name, v in (("signal", signal), ("spike", spike), ("noise", noise)):
    if v < 0:
      raise ValueError(f"make_model: {name} must be >= 0, got {v}")
  rng = _rng(rng)
  u1, v1 = _frame(rng, d1, rank, noise_rank)
  u2, v2 = _frame(rng, d2, rank, noise_rank)
  return LinearGenerativeModel(u1, u2, v1, v2, float(signal), float(spike), float(noise))


def _modality(rng, z, u, v, spike, noise):
  n = z.shape[0]
  w = spike * rng.normal(size=(n, v.shape[1]))
  e = noise * rng.normal(size=(n, u.shape[0]))
  return (z @ u.T + w @ v.T + e).astype(np.float32)


def sample_pairs(model: LinearGenerativeModel, rng, n: int):
  """`n` true pairs: returns `(x (n, d1), x_tilde (n, d2), z (n, r))`, float32.

  Example:
    >>> model = make_model(0, 20, 15, 3, noise_rank=3)
    >>> x, xt, z = sample_pairs(model, 1, 100)
  """
  rng = _rng(rng)
  z = model.signal * rng.normal(size=(n, model.u1.shape[1]))
  x = _modality(rng, z, model.u1, model.v1, model.spike, model.noise)
  xt = _modality(rng, z, model.u2, model.v2, model.spike, model.noise)
  return x, xt, z.astype(np.float32)


def mismatch(rng, x_tilde, fraction: float):
  """Wrongly match a `fraction` of the pairs: a random subset is cyclically shifted.

  Returns `(x_tilde', matched)` with `matched[i]` False for the `round(fraction * n)` pairs whose
  partner was replaced by another sample's (every one of them is wrong when there are >= 2).

  Example:
    >>> import numpy as np
    >>> xt, ok = mismatch(0, np.arange(10.0)[:, None], 0.3)
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"mismatch: fraction must be in [0, 1], got {fraction}")
  x_tilde = np.asarray(x_tilde)
  n = x_tilde.shape[0]
  m = int(round(fraction * n))
  chosen = _rng(rng).permutation(n)[:m]
  perm = np.arange(n)
  perm[chosen] = np.roll(chosen, 1)
  matched = np.ones((n,), bool)
  matched[chosen] = m < 2
  return x_tilde[perm], matched


def random_masking_views(rng, x):
  """Two augmented views `(A x, (I - A) x)`, `A = diag(Bernoulli(1/2))` drawn per sample.

  The augmentation of linear unimodal contrastive learning (Ji et al. 2021): the views share no
  coordinate, so their cross-covariance is the off-diagonal part of `Cov(x) / 4`.

  Example:
    >>> import numpy as np
    >>> a, b = random_masking_views(0, np.ones((4, 6), np.float32))
  """
  x = np.asarray(x)
  mask = (_rng(rng).random(x.shape) < 0.5).astype(x.dtype)
  return mask * x, (1 - mask) * x


def hidden_pair_pool(model: LinearGenerativeModel, rng, n_hidden: int, n_extra: int):
  """Unpaired samples of each modality with `n_hidden` secret pairs among them.

  Each pool holds the `n_hidden` halves of true pairs plus `n_extra` unrelated samples (their
  own latent factors), shuffled independently. Returns `(x_pool, x_tilde_pool, match)` with
  `match[i]` the index in `x_tilde_pool` of `x_pool[i]`'s partner, or -1.

  Example:
    >>> model = make_model(0, 20, 15, 3, noise_rank=3)
    >>> xp, xtp, match = hidden_pair_pool(model, 1, 50, 20)
  """
  rng = _rng(rng)
  x, xt, _ = sample_pairs(model, rng, n_hidden)
  x_extra, _, _ = sample_pairs(model, rng, n_extra)
  _, xt_extra, _ = sample_pairs(model, rng, n_extra)
  n = n_hidden + n_extra
  p1 = rng.permutation(n)  # pool position -> source row
  p2 = rng.permutation(n)
  x_pool = np.concatenate([x, x_extra])[p1]
  xt_pool = np.concatenate([xt, xt_extra])[p2]
  where_in_2 = np.argsort(p2)  # source row -> pool position in modality 2
  match = np.where(p1 < n_hidden, where_in_2[p1], -1)
  return x_pool, xt_pool, match
