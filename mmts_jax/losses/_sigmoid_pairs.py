r"""The sigmoid (SigLIP) loss's per-pair terms of one similarity tile, in one place.

Both tile kernels of the blockwise sigmoid loss call these on a tile `s` of similarities (the XLA
tiles of `mmts_jax.losses.blockwise_sigmoid` and the fused Pallas tiles of
`mmts_jax.losses._pallas_tiles`), so the two compute the same expressions element by element;
`mmts_jax.losses.dense.sigmoid_dense` stays the reference they are tested against.

For the pair `(i, j)` of row (image) anchor `i` and column (text) anchor `j`, with per-anchor
`a = 1/tau` and bias `c`, the two signed logits and their terms are

.. math::
  u^r_{ij} = z_{ij}\,(a_i s_{ij} + c_i), \quad u^c_{ij} = z_{ij}\,(a_j s_{ij} + c_j), \quad
  \ell(u) = \log(1 + e^{-u}) = \mathrm{softplus}(-u),

`z_ij = +1` where the global indices agree (the positive pair) and `-1` elsewhere; pairs with a
negative index (the padding of a ragged last tile) are dropped. The slope of a term with respect
to its logit before the sign, `p = d l / d(a s + c) = -z sigma(-u)`, gives the tile's cotangent

.. math::
  \frac{\partial L}{\partial s_{ij}} = w^r_i\,p^r_{ij} + w^c_j\,p^c_{ij}, \qquad
  w^r_i = g^r_i a_i,\; w^c_j = g^c_j a_j,

and the gradients of `a` and `c` are the per-anchor sums of `p s` and `p`. `softplus` (a max
plus `log1p(exp(-|x|))`) and `sigmoid` (`1 / (1 + e^{-x})`) stay finite for any logit, so a
temperature of 0.005 (logits of +-200) gives finite terms and slopes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["pair_cotangent", "pair_logits", "pair_losses", "pair_slopes"]


def pair_logits(s, rid, cid, ar, cr, ac, cc):
  """`(z, u^r, u^c, valid)` of a `(rows, cols)` tile `s`; `rid`, `cid` the global indices (< 0:
  padding), `ar`, `cr` the rows' `1/tau` and bias, `ac`, `cc` the columns'.

  Example:
    >>> import jax.numpy as jnp
    >>> z, ur, uc, valid = pair_logits(
    ...   jnp.ones((1, 2)), jnp.array([0]), jnp.array([0, -1]),
    ...   jnp.array([2.0]), jnp.array([-1.0]), jnp.array([4.0, 4.0]), jnp.array([0.0, 0.0]))
    >>> z.tolist(), ur.tolist(), uc.tolist(), valid.tolist()
    ([[1.0, -1.0]], [[1.0, -1.0]], [[4.0, -4.0]], [[True, False]])
  """
  z = jnp.where(rid[:, None] == cid[None, :], 1.0, -1.0).astype(s.dtype)
  valid = (rid[:, None] >= 0) & (cid[None, :] >= 0)
  ur = z * (s * ar[:, None] + cr[:, None])
  uc = z * (s * ac[None, :] + cc[None, :])
  return z, ur, uc, valid


def pair_losses(s, rid, cid, ar, cr, ac, cc, softplus=jax.nn.softplus):
  """`(l(u^r), l(u^c))`, the terms of the row and the column anchor of every pair (0 for
  padding): sum the first along the columns, the second along the rows. `softplus`: its
  implementation (the fused GPU tiles pass one of fewer instructions).

  Example:
    >>> import jax.numpy as jnp
    >>> ids = jnp.arange(2)
    >>> lr, lc = pair_losses(jnp.eye(2), ids, ids, *(jnp.array([1.0, 1.0]),) * 2,
    ...                      *(jnp.array([1.0, 1.0]),) * 2)
    >>> [round(v, 4) for v in lr[0].tolist()]  # log(1 + e^-2), log(1 + e^1)
    [0.1269, 1.3133]
  """
  _, ur, uc, valid = pair_logits(s, rid, cid, ar, cr, ac, cc)
  # softplus(-u) = log(1 + e^{-u}) = -log sigmoid(u), stable for any sign of u.
  lr = jnp.where(valid, softplus(-ur), 0.0)
  lc = jnp.where(valid, softplus(-uc), 0.0)
  return lr, lc


def pair_slopes(s, rid, cid, ar, cr, ac, cc, sigmoid=jax.nn.sigmoid):
  """`(p^r, p^c)`: `d l / d(a s + c) = -z sigma(-u)` of both anchors of every pair (0 for padding);
  `sigmoid`: its implementation.

  Example:
    >>> import jax.numpy as jnp
    >>> ids = jnp.arange(2)
    >>> pr, _ = pair_slopes(jnp.zeros((2, 2)), ids, ids, *(jnp.zeros(2),) * 4)
    >>> pr.tolist()  # u = 0: -z / 2
    [[-0.5, 0.5], [0.5, -0.5]]
  """
  z, ur, uc, valid = pair_logits(s, rid, cid, ar, cr, ac, cc)
  pr = jnp.where(valid, -z * sigmoid(-ur), 0.0)
  pc = jnp.where(valid, -z * sigmoid(-uc), 0.0)
  return pr, pc


def pair_cotangent(pr, pc, wr, wc):
  """`dL/ds = w^r_i p^r_ij + w^c_j p^c_ij` with `w = g / tau` per anchor (`g` the cotangents of
  the per-anchor sums).

  Example:
    >>> import jax.numpy as jnp
    >>> pair_cotangent(jnp.ones((1, 2)), jnp.ones((1, 2)), jnp.array([2.0]),
    ...                jnp.array([1.0, 3.0])).tolist()
    [[3.0, 5.0]]
  """
  return wr[:, None] * pr + wc[None, :] * pc
