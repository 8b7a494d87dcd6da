"""Contrastive losses with per-anchor temperature (InfoNCE) or margin (max-margin).

Pure, differentiable in the embeddings and `jit`/`grad`/`vmap`-safe. This package imports only
jax and numpy: no TensorFlow, TFDS, transformers or scikit-learn.
"""
from __future__ import annotations

from mmts_jax.losses import _checks
from mmts_jax.losses.blockwise import infonce_blockwise, max_margin_blockwise
from mmts_jax.losses.dense import cosine_normalize, infonce_dense, max_margin_dense
from mmts_jax.losses.dispatch import get
from mmts_jax.losses.nonlinear import nonlinear_mmcl

__all__ = ["get", "infonce", "max_margin", "infonce_dense", "max_margin_dense", "infonce_blockwise",
           "max_margin_blockwise", "cosine_normalize", "make_sharded_loss", "AUTO_DENSE_MAX",
           "AUTO_GATHER_MAX", "nonlinear_mmcl"]

# impl="auto": the dense path up to this batch (its (B, B) logits are at most 64 MiB in f32),
# blockwise above. Sharded, sharded="auto": all-gather up to this global batch, ring above.
AUTO_DENSE_MAX = 4096
AUTO_GATHER_MAX = 8192

_IMPLS = ("auto", "dense", "blockwise")
_SHARDED = ("auto", "ring", "gather")


def make_sharded_loss(*args, **kwargs):
  """See `mmts_jax.losses.sharding.make_sharded_loss` (imported lazily: it needs a Mesh)."""
  from mmts_jax.losses import sharding
  return sharding.make_sharded_loss(*args, **kwargs)


def _check_choice(value, allowed, name, fn):
  if value not in allowed:
    raise ValueError(f"{fn}: {name} must be one of {allowed}, got {value!r}")


def _dispatch(fn, image, text, value, axis_name, impl, block_size, sharded, precision):
  """Routes to the dense, blockwise, ring or all-gather path (all checks happen before)."""
  from mmts_jax.losses import blockwise
  _check_choice(impl, _IMPLS, "impl", fn)
  _check_choice(sharded, _SHARDED, "sharded", fn)
  b = image.shape[0]
  blockwise.resolve_blocks(block_size, b, b, fn)  # validates block_size
  if axis_name is not None:
    from mmts_jax.losses import gathered, ring
    n = blockwise._axis_size(axis_name)
    if sharded == "auto":
      sharded = "gather" if n * b <= AUTO_GATHER_MAX else "ring"
    if sharded == "gather":
      f = gathered.infonce_gathered if fn == "infonce" else gathered.max_margin_gathered
      return f(image, text, value, axis_name, precision=precision)
    f = ring.infonce_ring if fn == "infonce" else ring.max_margin_ring
    return f(image, text, value, axis_name, block_size=block_size, precision=precision)
  if impl == "dense" or (impl == "auto" and b <= AUTO_DENSE_MAX and block_size is None):
    f = infonce_dense if fn == "infonce" else max_margin_dense
    return f(image, text, value, precision=precision)
  f = infonce_blockwise if fn == "infonce" else max_margin_blockwise
  return f(image, text, value, block_size=block_size, precision=precision)


def infonce(image, text, temperature, *, axis_name=None, impl: str = "auto", block_size=None,
            sharded: str = "auto", precision=None):
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
      `O(B*D + tile)`); "auto" (default) is dense up to `AUTO_DENSE_MAX` samples unless a
      `block_size` is given, blockwise otherwise.
    block_size: blockwise tile: an int (square) or `(rows, cols)`; None picks
      `blockwise.DEFAULT_BLOCK` clipped to B. Any B works, not only multiples of the tile.
    sharded: with `axis_name`: "ring" passes blocks of the other modality round the devices
      (`ppermute`, no global logits or gathered batch on any device), "gather" all-gathers the
      batch (fine for small batches), "auto" gathers up to `AUTO_GATHER_MAX` global samples.
    precision: matmul precision passed to the matmuls.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (4, 8))
    >>> x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    >>> loss = infonce(x, x, jnp.full((4,), 0.07))
  """
  _checks.check_pair(image, text, "infonce")
  _checks.check_per_anchor(temperature, image.shape[0], "temperature", "infonce",
                           strictly_positive=True)
  return _dispatch("infonce", image, text, temperature, axis_name, impl, block_size, sharded,
                   precision)


def max_margin(image, text, margin, *, axis_name=None, impl: str = "auto", block_size=None,
               sharded: str = "auto", precision=None):
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
  _checks.check_pair(image, text, "max_margin")
  _checks.check_per_anchor(margin, image.shape[0], "margin", "max_margin",
                           strictly_positive=True)
  return _dispatch("max_margin", image, text, margin, axis_name, impl, block_size, sharded,
                   precision)
