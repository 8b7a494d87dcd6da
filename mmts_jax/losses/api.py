"""The public MM-TS losses, one function per loss; each routes through `dispatch.route`."""

from __future__ import annotations

import jax

from mmts_jax.losses.dispatch import route

__all__ = ["infonce", "max_margin", "sigmoid"]


def infonce(
  image: jax.Array,
  text: jax.Array,
  temperature,
  *,
  axis_name=None,
  impl: str = "auto",
  block_size=None,
  sharded: str = "auto",
  precision=None,
) -> jax.Array:
  r"""Symmetric InfoNCE with a per-anchor temperature.

  .. math::
    L = \frac{1}{2B}\sum_i \Big[\mathrm{lse}_j\frac{s_{ij}}{\tau_i} - \frac{s_{ii}}{\tau_i}\Big]
      + \frac{1}{2B}\sum_i \Big[\mathrm{lse}_j\frac{s_{ji}}{\tau_i} - \frac{s_{ii}}{\tau_i}\Big],
    \quad s_{ij} = \langle x_i, y_j\rangle

  Args:
    image, text: `(B, D)` embeddings, used as given (normalise them first, as CLIP does). bf16
      inputs are accepted; accumulation is float32.
    temperature: scalar or `(B,)` per-anchor temperatures, > 0.
    axis_name: inside `shard_map`/`pmap`, the mapped axis: the inputs are the local shard and the
      result is the loss of the global batch.
    impl: "dense" materialises the `(B, B)` logits; "blockwise" streams over tiles of
      `block_size` with an online logsumexp and a hand-written backward (memory
      `O(B*D + tile)`); "auto" (default) is dense up to `dispatch.AUTO_DENSE_MAX` samples unless a
      `block_size` is given, blockwise otherwise.
    block_size: blockwise tile: an int (square) or `(rows, cols)`; None picks
      `DEFAULT_BLOCK` (`LARGE_BATCH_BLOCK` from `LARGE_BATCH` rows per device up) clipped to B.
      Any B works, not only multiples of the tile.
    sharded: with `axis_name`: "ring" passes blocks of the other modality round the devices
      (`ppermute`, no global logits or gathered batch on any device), "gather" all-gathers the
      batch (fine for small batches), "auto" gathers up to `dispatch.AUTO_GATHER_MAX` global
      samples.
    precision: matmul precision passed to the matmuls.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (4, 8))
    >>> x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    >>> loss = infonce(x, x, jnp.full((4,), 0.07))
  """
  return route(
    "infonce",
    image,
    text,
    temperature,
    axis_name=axis_name,
    impl=impl,
    block_size=block_size,
    sharded=sharded,
    precision=precision,
  )


def max_margin(
  image: jax.Array,
  text: jax.Array,
  margin,
  *,
  axis_name=None,
  impl: str = "auto",
  block_size=None,
  sharded: str = "auto",
  precision=None,
) -> jax.Array:
  r"""Bidirectional max-margin ranking loss with a per-anchor margin, on cosine similarities.

  .. math::
    L = \frac{1}{2B(B-1)}\sum_i\sum_{j\ne i}
        \big[m_i - s_{ii} + s_{ij}\big]_+ + \big[m_i - s_{ii} + s_{ji}\big]_+

  The embeddings are L2-normalised here (eps 1e-8), as the official code does.

  Args:
    image, text: `(B, D)` embeddings, `B >= 2`.
    margin: scalar or `(B,)` per-anchor margins, > 0.
    axis_name, impl, block_size, sharded, precision: as in `infonce`.
  """
  return route(
    "max_margin",
    image,
    text,
    margin,
    axis_name=axis_name,
    impl=impl,
    block_size=block_size,
    sharded=sharded,
    precision=precision,
  )


def sigmoid(
  image: jax.Array,
  text: jax.Array,
  temperature,
  *,
  bias,
  axis_name=None,
  impl: str = "auto",
  block_size=None,
  sharded: str = "auto",
  precision=None,
) -> jax.Array:
  r"""The sigmoid (SigLIP) loss with a per-anchor temperature and a bias.

  .. math::
    L = \frac{1}{2B}\sum_{i,j}\Big[\log\big(1 + e^{-z_{ij}(s_{ij}/\tau_i + b_i)}\big)
        + \log\big(1 + e^{-z_{ij}(s_{ij}/\tau_j + b_j)}\big)\Big],
    \quad z_{ij} = \begin{cases} +1 & i = j \\ -1 & i \ne j \end{cases},
    \quad s_{ij} = \langle x_i, y_j\rangle

  i.e. `-log sigmoid(z_ij (s_ij / tau + b))` over all B^2 pairs, each pair counted once as a
  pair of image anchor `i` (with `tau_i`, `b_i`) and once as a pair of text anchor `j` (with
  `tau_j`, `b_j`), divided by `2B`. This is how MM-TS gives each sample its temperature in both
  directions of InfoNCE. With a scalar temperature and bias both terms are equal and
  `L = -(1/B) sum_ij log sigmoid(z_ij (t s_ij + b))`, `t = 1/tau`: SigLIP's loss (Zhai et al.
  2023, one direction over the full matrix, `t = exp(t')` learnt, init `t' = log 10`, `b = -10`).
  A per-anchor `tau` (the MM-TS schedule and shifts, unchanged) then multiplies the logits of
  every pair of anchor `i` by `1/tau_i`.

  Args:
    image, text: `(B, D)` embeddings, used as given (normalise them first, as SigLIP does).
      bf16 inputs are accepted; accumulation is float32.
    temperature: scalar or `(B,)` per-anchor temperatures, > 0.
    bias: scalar (SigLIP's learnt `b`) or `(B,)` per-anchor bias, finite; differentiable.
    axis_name, impl, block_size, sharded, precision: as in `infonce`.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.eye(3)
    >>> round(float(sigmoid(x, x, 0.1, bias=-5.0)), 4)  # every |u| = 5: 9 log(1 + e^-5) / 3
    0.0201
  """
  return route(
    "sigmoid",
    image,
    text,
    temperature,
    axis_name=axis_name,
    impl=impl,
    block_size=block_size,
    sharded=sharded,
    precision=precision,
    bias=bias,
  )
