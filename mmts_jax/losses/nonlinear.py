r"""The general nonlinear multimodal contrastive loss of Nakada et al. (AISTATS 2023).

.. math::
  L = \frac12\Big[
      \frac1B\sum_i \phi\Big(\sum_{j\ne i}\psi\big(\tfrac{s_{ij}-s_{ii}}{\tau_i}\big)\Big)
      + \frac1B\sum_i \phi\Big(\sum_{j\ne i}\psi\big(\tfrac{s_{ji}-s_{ii}}{\tau_i}\big)\Big)\Big],
  \qquad s_{ij} = \langle x_i, y_j\rangle .

`phi = log1p, psi = exp` is InfoNCE/CLIP: `log1p(sum_{j!=i} exp(a_ij)) = logsumexp_j a_ij` with
`a_ii = 0`, which is how it is computed here (stable down to tau = 0.005 and below).
`phi = psi = identity` is the linear loss, whose minimiser is an SVD (see
`mmts_jax.projects.nakada`).

Every anchor's term is a sum over the other modality's columns, so the columns can be visited in
blocks of `block_size` (a `lax.scan` whose body is rematerialised in the backward pass): memory
is `O(B * block_size)` instead of `O(B^2)`, for any `phi`/`psi`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmts_jax.losses import _checks
from mmts_jax.losses.dense import compute_dtype, similarity

__all__ = ["is_infonce_pair", "nonlinear_mmcl", "nonlinear_mmcl_similarity"]

Elementwise = Callable[[jax.Array], jax.Array]

# The (phi, psi) pairs recognised as InfoNCE and routed to the logsumexp formulation.
_LOG1P = (jnp.log1p, np.log1p, jax.lax.log1p)
_EXP = (jnp.exp, np.exp, jax.lax.exp)


def is_infonce_pair(phi, psi) -> bool:
  """True when `(phi, psi)` is `(log1p, exp)`, the pair computed as a logsumexp."""
  return any(phi is f for f in _LOG1P) and any(psi is f for f in _EXP)


def _check_fns(phi, psi, fn: str) -> None:
  for name, f in (("phi", phi), ("psi", psi)):
    if not callable(f):
      raise TypeError(
        f"{fn}: {name} must be a callable applied elementwise, got {type(f).__name__}"
      )


def _check_block(block_size, fn: str) -> None:
  if block_size is None:
    return
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
    raise TypeError(f"{fn}: block_size must be an int or None, got {type(block_size).__name__}")
  if block_size < 1:
    raise ValueError(f"{fn}: block_size must be >= 1, got {block_size}")


class _RowAccumulator:
  """Accumulates `sum_{j != i} psi(a_ij)` (or its log, for InfoNCE) over blocks of columns."""

  def __init__(self, phi, psi):
    self.phi, self.psi = phi, psi
    self.lse = is_infonce_pair(phi, psi)

  def init(self, pos):
    # Shaped like the anchors' positives (and, inside shard_map, varying like them).
    if self.lse:
      # Running (max, sum) of a logsumexp that already holds the a_ii = 0 term: exp(0 - 0) = 1.
      return jnp.zeros_like(pos), jnp.ones_like(pos)
    return jnp.zeros_like(pos)

  def update(self, carry, a, valid):
    if self.lse:
      m, s = carry
      a = jnp.where(valid, a, -jnp.inf)
      # The result does not depend on the shift m, so its gradient is not needed (exactly).
      m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(a, axis=1)))
      s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(a - m_new[:, None]), axis=1)
      return m_new, s
    # `where` on the input as well: psi of a masked entry must not leak NaN into the gradient.
    terms = jnp.where(valid, self.psi(jnp.where(valid, a, 0)), 0)
    return carry + jnp.sum(terms, axis=1, dtype=carry.dtype)

  def finish(self, carry):
    if self.lse:
      m, s = carry
      return m + jnp.log(s)
    return self.phi(carry)


def _scores(s, pos, inv_tau):
  """`a_ij = (s_ij - s_ii) / tau_i` for a block of columns."""
  return (s - pos[:, None]) * inv_tau[:, None]


def _valid(row_ids, col_ids, n):
  return (col_ids[None, :] < n) & (col_ids[None, :] != row_ids[:, None])


def _anchor_terms_dense(s_rows, pos, inv_tau, row_ids, phi, psi):
  """Per-anchor `phi(sum_{j != i} psi(a_ij))` from the rows of a materialised similarity."""
  acc = _RowAccumulator(phi, psi)
  n = s_rows.shape[1]
  col_ids = jnp.arange(n)
  carry = acc.update(acc.init(pos), _scores(s_rows, pos, inv_tau), _valid(row_ids, col_ids, n))
  return acc.finish(carry)


def _anchor_terms_blockwise(
  anchors, others, pos, inv_tau, row_ids, phi, psi, block_size, precision
):
  """As `_anchor_terms_dense`, visiting `others` in column blocks; never holds `(b, n)`."""
  acc = _RowAccumulator(phi, psi)
  n, d = others.shape
  num_blocks = -(-n // block_size)
  pad = num_blocks * block_size - n
  blocks = jnp.pad(others, ((0, pad), (0, 0))).reshape(num_blocks, block_size, d)
  starts = jnp.arange(num_blocks) * block_size

  @jax.checkpoint
  def body(carry, xs):
    blk, start = xs
    s = similarity(anchors, blk, precision)
    col_ids = start + jnp.arange(block_size)
    return acc.update(carry, _scores(s, pos, inv_tau), _valid(row_ids, col_ids, n)), None

  carry, _ = jax.lax.scan(body, acc.init(pos), (blocks, starts))
  return acc.finish(carry)


def _inv_tau(temperature, b, dtype):
  return 1.0 / jnp.broadcast_to(jnp.asarray(temperature, dtype), (b,))


def nonlinear_mmcl_similarity(s, temperature, *, phi: Elementwise, psi: Elementwise):
  """The loss of `nonlinear_mmcl` from a square similarity matrix `s_ij = <x_i, y_j>`.

  Used where the similarity is not an inner product of the two arguments (linear encoders,
  `jax.grad` with respect to `s` to get the weights beta of the contrastive cross-covariance).

  Example:
    >>> import jax.numpy as jnp
    >>> s = jnp.array([[1.0, 0.2], [0.1, 0.9]])
    >>> loss = nonlinear_mmcl_similarity(s, 0.5, phi=jnp.log1p, psi=jnp.exp)
  """
  fn = "nonlinear_mmcl_similarity"
  _check_fns(phi, psi, fn)
  if not hasattr(s, "ndim") or s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] < 1:
    raise ValueError(
      f"{fn}: s must be a non-empty square (B, B) matrix, got shape {tuple(np.shape(s))}"
    )
  b = s.shape[0]
  _checks.check_per_anchor(temperature, b, "temperature", fn, strictly_positive=True)
  s = s.astype(compute_dtype(s))
  inv_tau = _inv_tau(temperature, b, s.dtype)
  pos = jnp.diagonal(s)
  rows = jnp.arange(b)
  i2t = _anchor_terms_dense(s, pos, inv_tau, rows, phi, psi)
  t2i = _anchor_terms_dense(s.T, pos, inv_tau, rows, phi, psi)
  return 0.5 * (jnp.mean(i2t) + jnp.mean(t2i))


def nonlinear_mmcl(
  image,
  text,
  temperature,
  *,
  phi: Elementwise,
  psi: Elementwise,
  axis_name=None,
  block_size: int | None = None,
  precision=None,
):
  r"""Nakada et al.'s general multimodal contrastive loss, with per-anchor temperature.

  .. math::
    L = \frac{1}{2B}\sum_i \Big[\phi\Big(\sum_{j\ne i}\psi(\tfrac{s_{ij}-s_{ii}}{\tau_i})\Big)
        + \phi\Big(\sum_{j\ne i}\psi(\tfrac{s_{ji}-s_{ii}}{\tau_i})\Big)\Big]

  `phi = jnp.log1p, psi = jnp.exp` equals `mmts_jax.losses.infonce` (computed as a logsumexp);
  `phi = psi = identity` is the linear loss. Any other elementwise `phi`, `psi` (jax functions)
  use the direct formula, whose range is the caller's concern (e.g. `psi = exp` with `phi = sqrt`
  overflows where `exp` does).

  Args:
    image, text: `(B, D)` embeddings, used as given.
    temperature: scalar or `(B,)` per-anchor temperatures, > 0; row i of both directions is
      divided by `tau_i`.
    phi, psi: elementwise callables (`phi` applied to the per-anchor sum, `psi` to each term).
    axis_name: inside `shard_map`/`pmap`, the mapped axis: the inputs are the local shard, the
      other modality is all-gathered and the result is the loss of the global batch.
    block_size: visit the other modality in blocks of this many columns (memory `O(B*block)`);
      None materialises the `(B, B)` similarity.
    precision: matmul precision passed to `jnp.matmul`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (4, 8))
    >>> x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    >>> clip = nonlinear_mmcl(x, x, 0.07, phi=jnp.log1p, psi=jnp.exp)
    >>> linear = nonlinear_mmcl(x, x, 1.0, phi=lambda u: u, psi=lambda a: a)
  """
  fn = "nonlinear_mmcl"
  _checks.check_pair(image, text, fn)
  _checks.check_per_anchor(temperature, image.shape[0], "temperature", fn, strictly_positive=True)
  _check_fns(phi, psi, fn)
  _check_block(block_size, fn)
  if axis_name is None and block_size is None:
    return nonlinear_mmcl_similarity(
      similarity(image, text, precision), temperature, phi=phi, psi=psi
    )
  b = image.shape[0]
  dt = compute_dtype(image, text)
  inv_tau = _inv_tau(temperature, b, dt)
  pos = jnp.sum(image.astype(dt) * text.astype(dt), axis=1)
  if axis_name is None:
    all_image, all_text, offset = image, text, 0
  else:
    all_image = jax.lax.all_gather(image, axis_name, axis=0, tiled=True)
    all_text = jax.lax.all_gather(text, axis_name, axis=0, tiled=True)
    offset = jax.lax.axis_index(axis_name) * b
  n = all_image.shape[0]
  rows = offset + jnp.arange(b)
  blk = n if block_size is None else min(int(block_size), n)
  part = jnp.sum(
    _anchor_terms_blockwise(image, all_text, pos, inv_tau, rows, phi, psi, blk, precision)
  ) + jnp.sum(
    _anchor_terms_blockwise(text, all_image, pos, inv_tau, rows, phi, psi, blk, precision)
  )
  if axis_name is not None:
    part = jax.lax.psum(part, axis_name)
  return part / (2 * n)
