r"""Learning from unpaired data: detect the pairs hidden in unpaired samples, then train on them.

Given paired data `(X, X~)` and pools `P` (modality 1) and `P~` (modality 2) that secretly hold
true pairs among unrelated samples:

1. fit encoders on the paired data;
2. embed both pools, `e_a = G1 p_a`, `f_b = G2 p~_b`, and score every candidate by the cosine
   `c_ab = <e_a, f_b> / (|e_a| |f_b|)`; keep pairs that are mutual nearest neighbours (or that an
   optimal one-to-one assignment picks) and whose cosine is at least `threshold`;
3. add the pseudo-pairs to the loss with a weight `w`:
   `L = L(X, X~) + w L(P_sel, P~_sel) + (rho/2) ||G1^T G2||_F^2`;
4. repeat from 2 with the new encoders (pseudo-pairs are re-detected from scratch each round).

Because `S(beta)` is linear in the data set, the gradient of the combined loss is
`-G2 (S_paired + w S_pseudo)^T + rho G2 G2^T G1` (and likewise for `G2`). Detection runs on the
host (numpy/scipy): it is a discrete step between training rounds, not part of a jitted step.
"""

from __future__ import annotations

import numpy as np

from mmts_jax.losses.nonlinear import nonlinear_mmcl
from mmts_jax.projects.nakada.cross_covariance import centered_cross_covariance
from mmts_jax.projects.nakada.linear_model import (
  LinearEncoders,
  embed,
  linear_minimiser,
  regulariser,
)

__all__ = ["detect_pairs", "pair_metrics", "combined_loss", "self_train_linear"]

_METHODS = ("mutual_nn", "assignment")


def _cosine(e1, e2):
  e1 = np.asarray(e1, np.float64)
  e2 = np.asarray(e2, np.float64)
  e1 = e1 / np.maximum(np.linalg.norm(e1, axis=1, keepdims=True), 1e-12)
  e2 = e2 / np.maximum(np.linalg.norm(e2, axis=1, keepdims=True), 1e-12)
  return e1 @ e2.T


def detect_pairs(e1, e2, *, threshold: float, method: str = "mutual_nn"):
  """Pseudo-pairs `(i, j, cosine)` between embeddings `e1: (n1, r)` and `e2: (n2, r)`.

  `mutual_nn`: `j` is `i`'s most similar and `i` is `j`'s. `assignment`: the one-to-one matching
  of maximal total cosine (Hungarian algorithm). Either way only pairs with cosine >= threshold
  are kept, so every sample is in at most one pair.

  Example:
    >>> import numpy as np
    >>> i, j, c = detect_pairs(np.eye(3), np.eye(3)[[2, 0, 1]], threshold=0.9)
    >>> list(zip(i.tolist(), j.tolist()))
    [(0, 1), (1, 2), (2, 0)]
  """
  if method not in _METHODS:
    raise ValueError(f"detect_pairs: method must be one of {_METHODS}, got {method!r}")
  if not -1.0 <= threshold <= 1.0:
    raise ValueError(f"detect_pairs: threshold is a cosine in [-1, 1], got {threshold}")
  cos = _cosine(e1, e2)
  if method == "mutual_nn":
    best_j = np.argmax(cos, axis=1)
    best_i = np.argmax(cos, axis=0)
    i = np.nonzero(best_i[best_j] == np.arange(cos.shape[0]))[0]
    j = best_j[i]
  else:
    from scipy.optimize import linear_sum_assignment  # host-only dependency, imported lazily

    i, j = linear_sum_assignment(-cos)
  c = cos[i, j]
  keep = c >= threshold
  return i[keep], j[keep], c[keep]


def pair_metrics(i, j, match) -> dict:
  """Precision and recall of detected pairs `(i, j)` against `match` (partner index or -1).

  Example:
    >>> import numpy as np
    >>> pair_metrics(np.array([0, 1]), np.array([1, 0]), np.array([1, 2, -1]))["precision"]
    0.5
  """
  match = np.asarray(match)
  i, j = np.asarray(i), np.asarray(j)
  correct = int(np.sum(match[i] == j)) if i.size else 0
  hidden = int(np.sum(match >= 0))
  return {
    "detected": int(i.size),
    "correct": correct,
    "hidden": hidden,
    "precision": correct / i.size if i.size else 1.0,
    "recall": correct / hidden if hidden else 1.0,
  }


def combined_loss(
  enc: LinearEncoders, paired, pseudo, temperature, *, phi, psi, rho, weight: float
):
  """`L(paired) + weight * L(pseudo) + (rho/2)||G1^T G2||_F^2` for linear encoders.

  `paired` and `pseudo` are `(x, x_tilde)` tuples; each set supplies its own negatives.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from mmts_jax.projects.nakada.linear_model import init_encoders
    >>> enc = init_encoders(jax.random.PRNGKey(0), 6, 5, 2)
    >>> p = (jnp.ones((4, 6)), jnp.ones((4, 5)))
    >>> v = combined_loss(enc, p, p, 1.0, phi=jnp.log1p, psi=jnp.exp, rho=0.1, weight=0.5)
  """
  if weight < 0:
    raise ValueError(f"combined_loss: weight must be >= 0, got {weight}")

  def one(pair):
    e1, e2 = embed(enc, *pair)
    return nonlinear_mmcl(e1, e2, temperature, phi=phi, psi=psi)

  value = one(paired) + regulariser(enc, rho)
  if pseudo is not None and pseudo[0].shape[0] > 0:
    value = value + weight * one(pseudo)
  return value


def self_train_linear(
  x,
  x_tilde,
  x_pool,
  x_tilde_pool,
  *,
  rank: int,
  rho: float = 1.0,
  weight: float = 1.0,
  rounds: int = 3,
  threshold: float = 0.9,
  method: str = "mutual_nn",
  match=None,
):
  r"""Steps 1-4 with the linear loss, each fit in closed form (`linear_minimiser`).

  Each set's linear loss is divided by its `n - 1`, so that its `S` is the size-independent
  `centered_cross_covariance` and `weight` is the relative weight of the pseudo-pairs:
  `S = S^_paired + weight * S^_pseudo`. Returns `(encoders after the last round, history)`,
  `history[k]` the detection of round k (with precision/recall when `match` is given).

  Example:
    >>> from mmts_jax.projects.nakada import gaussian_sampler as synthetic
    >>> m = synthetic.make_model(0, 12, 12, 2, noise_rank=2)
    >>> x, xt, _ = synthetic.sample_pairs(m, 1, 40)
    >>> xp, xtp, match = synthetic.hidden_pair_pool(m, 2, 60, 20)
    >>> enc, hist = self_train_linear(x, xt, xp, xtp, rank=2, rounds=2, match=match)
  """
  if rounds < 0:
    raise ValueError(f"self_train_linear: rounds must be >= 0, got {rounds}")
  s_paired = centered_cross_covariance(x, x_tilde)
  enc = linear_minimiser(s_paired, rank, rho)
  history = []
  for _ in range(rounds):
    e1, e2 = embed(enc, x_pool, x_tilde_pool)
    i, j, c = detect_pairs(e1, e2, threshold=threshold, method=method)
    record = {"detected": int(i.size)}
    if match is not None:
      record = pair_metrics(i, j, match)
    history.append(record)
    s_mat = s_paired
    if i.size >= 2:
      s_mat = s_paired + weight * centered_cross_covariance(x_pool[i], x_tilde_pool[j])
    enc = linear_minimiser(s_mat, rank, rho)
  return enc, history
