r"""Subspace distances: `||sin Theta(A, B)||` between column spans, and row spans of encoders.

For orthonormal bases `Q_A, Q_B` of two r-dimensional subspaces, the sines of the principal
angles are the singular values of `(I - Q_B Q_B^T) Q_A`; `sin_theta` returns the largest
(spectral) or their root-mean-square (Frobenius / sqrt(r)). Both are 0 for equal spans and 1 for
orthogonal ones, and do not depend on the bases chosen.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["orthonormal_basis", "row_space", "sin_theta"]


def orthonormal_basis(a, rank: int | None = None):
  """An orthonormal basis `(d, rank)` of the span of the columns of `a: (d, k)` (via SVD).

  Example:
    >>> import jax.numpy as jnp
    >>> q = orthonormal_basis(jnp.array([[2.0, 0.0], [0.0, 3.0], [0.0, 0.0]]))
    >>> q.shape, jnp.round(q.T @ q, 4).tolist()
    ((3, 2), [[1.0, 0.0], [0.0, 1.0]])
  """
  rank = a.shape[1] if rank is None else rank
  u, _, _ = jnp.linalg.svd(a, full_matrices=False)
  return u[:, :rank]


def row_space(g, rank: int | None = None):
  """Orthonormal basis `(d, r)` of the row space of an encoder `g: (r, d)`.

  Example:
    >>> import jax.numpy as jnp
    >>> q = row_space(jnp.eye(2, 5))
    >>> q.shape
    (5, 2)
  """
  return orthonormal_basis(g.T, rank)


def sin_theta(a, b, norm: str = "spectral"):
  """`||sin Theta||` between the column spans of `a: (d, r)` and `b: (d, r)` (any bases).

  Example:
    >>> import jax.numpy as jnp
    >>> float(sin_theta(jnp.eye(3, 1), jnp.eye(3, 1)))
    0.0
  """
  if a.shape != b.shape:
    raise ValueError(
      f"sin_theta: a and b must both be (d, r), got {tuple(a.shape)} and {tuple(b.shape)}"
    )
  if norm not in ("spectral", "frobenius"):
    raise ValueError(f"sin_theta: norm must be 'spectral' or 'frobenius', got {norm!r}")
  qa, qb = orthonormal_basis(a), orthonormal_basis(b)
  resid = qa - qb @ (qb.T @ qa)
  sv = jnp.clip(jnp.linalg.svd(resid, compute_uv=False), 0.0, 1.0)
  if norm == "spectral":
    return jnp.max(sv)
  return jnp.sqrt(jnp.mean(sv**2))
