"""Contrastive losses with per-anchor temperature (InfoNCE) or margin (max-margin).

Pure, differentiable in the embeddings and `jit`/`grad`/`vmap`-safe. This package imports only
jax and numpy: no TensorFlow, TFDS, transformers or scikit-learn.
"""
from __future__ import annotations

from mmts_jax.losses import _checks
from mmts_jax.losses.dense import cosine_normalize, infonce_dense, max_margin_dense

__all__ = ["infonce", "max_margin", "infonce_dense", "max_margin_dense", "cosine_normalize"]


def infonce(image, text, temperature, *, axis_name=None, impl: str = "auto", precision=None):
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
    impl: "auto" or "dense".
    precision: matmul precision passed to `jnp.matmul`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (4, 8))
    >>> x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    >>> loss = infonce(x, x, jnp.full((4,), 0.07))
  """
  _checks.check_pair(image, text, "infonce")
  _checks.check_per_anchor(temperature, image.shape[0], "temperature", "infonce",
                           strictly_positive=True)
  if impl not in ("auto", "dense"):
    raise ValueError(f"infonce: impl must be 'auto' or 'dense', got {impl!r}")
  if axis_name is not None:
    from mmts_jax.losses import gathered
    return gathered.infonce_gathered(image, text, temperature, axis_name, precision=precision)
  return infonce_dense(image, text, temperature, precision=precision)


def max_margin(image, text, margin, *, axis_name=None, impl: str = "auto", precision=None):
  r"""Bidirectional max-margin ranking loss with a per-anchor margin, on cosine similarities.

  .. math::
    L = \frac{1}{2B(B-1)}\sum_i\sum_{j\ne i}
        \big[m_i - s_{ii} + s_{ij}\big]_+ + \big[m_i - s_{ii} + s_{ji}\big]_+

  The embeddings are L2-normalised here (eps 1e-8), as the official code does.

  Args:
    image, text: `(B, D)` embeddings, `B >= 2`.
    margin: scalar or `(B,)` per-anchor margins, > 0.
    axis_name, impl, precision: as in `infonce`.
  """
  _checks.check_pair(image, text, "max_margin")
  _checks.check_per_anchor(margin, image.shape[0], "margin", "max_margin",
                           strictly_positive=True)
  if impl not in ("auto", "dense"):
    raise ValueError(f"max_margin: impl must be 'auto' or 'dense', got {impl!r}")
  if axis_name is not None:
    from mmts_jax.losses import gathered
    return gathered.max_margin_gathered(image, text, margin, axis_name, precision=precision)
  return max_margin_dense(image, text, margin, precision=precision)
