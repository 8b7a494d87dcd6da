"""All-gather variant of the sharded losses, for small global batches.

Each device gathers the other modality (and every anchor's temperature), computes its own rows of
both directions, and the partial sums are `psum`-ed, so the value equals the global-batch loss and
`jax.grad` inside `shard_map` gives the local slice of the global gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmts_jax.losses._checks import nan_unless_valid
from mmts_jax.losses.dense import compute_dtype, cosine_normalize, similarity


def _gather(x, axis_name):
  return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def _local_offset(local_b, axis_name):
  return jax.lax.axis_index(axis_name) * local_b


def infonce_gathered(image, text, temperature, axis_name, precision=None):
  b = image.shape[0]
  dt = compute_dtype(image, text)
  tau = jnp.broadcast_to(jnp.asarray(temperature, dt), (b,))
  all_image = _gather(image, axis_name)
  all_text = _gather(text, axis_name)
  n = all_image.shape[0]
  s_i2t = similarity(image, all_text, precision) / tau[:, None]  # local image anchors
  s_t2i = similarity(text, all_image, precision) / tau[:, None]  # local text anchors
  diag = jnp.sum(image.astype(dt) * text.astype(dt), axis=1) / tau
  part = nan_unless_valid(
    jnp.sum(jax.nn.logsumexp(s_i2t, axis=1) - diag)
    + jnp.sum(jax.nn.logsumexp(s_t2i, axis=1) - diag),
    positive=(tau,),
    axis_name=axis_name,
  )
  return jax.lax.psum(part, axis_name) / (2 * n)


def max_margin_gathered(image, text, margin, axis_name, precision=None):
  b = image.shape[0]
  image = cosine_normalize(image)
  text = cosine_normalize(text)
  dt = image.dtype
  m = jnp.broadcast_to(jnp.asarray(margin, dt), (b,))
  all_image = _gather(image, axis_name)
  all_text = _gather(text, axis_name)
  n = all_image.shape[0]
  if n < 2:
    raise ValueError("max_margin: needs a global batch of at least 2")
  cols = jnp.arange(n)[None, :]
  rows = _local_offset(b, axis_name) + jnp.arange(b)[:, None]
  off = cols != rows
  pos = jnp.sum(image * text, axis=1)
  h1 = jax.nn.relu(m[:, None] - pos[:, None] + similarity(image, all_text, precision))
  h2 = jax.nn.relu(m[:, None] - pos[:, None] + similarity(text, all_image, precision))
  part = nan_unless_valid(jnp.sum(jnp.where(off, h1 + h2, 0)), positive=(m,), axis_name=axis_name)
  return jax.lax.psum(part, axis_name) / float(2 * n * (n - 1))


def sigmoid_gathered(image, text, temperature, axis_name, *, bias, precision=None):
  b = image.shape[0]
  dt = compute_dtype(image, text)
  tau = jnp.broadcast_to(jnp.asarray(temperature, dt), (b,))
  c = jnp.broadcast_to(jnp.asarray(bias, dt), (b,))
  all_image = _gather(image, axis_name)
  all_text = _gather(text, axis_name)
  n = all_image.shape[0]
  # z = +1 where a local anchor meets its own pair in the gathered batch.
  z = jnp.where(
    jnp.arange(n)[None, :] == _local_offset(b, axis_name) + jnp.arange(b)[:, None], 1.0, -1.0
  ).astype(dt)
  # Local image anchors against all texts, local text anchors against all images, each with its
  # own temperature and bias (the rows of both products).
  u_i2t = z * (similarity(image, all_text, precision) / tau[:, None] + c[:, None])
  u_t2i = z * (similarity(text, all_image, precision) / tau[:, None] + c[:, None])
  part = nan_unless_valid(
    jnp.sum(jax.nn.softplus(-u_i2t)) + jnp.sum(jax.nn.softplus(-u_t2i)),
    positive=(tau,),
    finite=(c,),
    axis_name=axis_name,
  )
  return jax.lax.psum(part, axis_name) / (2 * n)
