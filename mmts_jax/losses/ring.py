r"""Ring-sharded InfoNCE and max-margin: the global-batch loss without gathering the batch.

Called inside `shard_map` (or `pmap`) with `axis_name`, each of the `n` devices holds `b` rows of
each modality. The text blocks, with their per-anchor temperatures (or margins) and global
indices, travel around the ring (`lax.ppermute` to the next device); at every hop each device
multiplies its own image rows with the visiting block, tile by tile (`_traversal.sweep`):

* its rows' image->text statistics stay at home and accumulate over the `n` hops;
* the visiting columns' text->image statistics travel with their block, and one last hop brings
  them home, so every anchor's statistics cover the global batch.

The next block is sent before the current one is multiplied, so the transfer overlaps the tile
work; no device holds more than its own shard and one visiting block (plus its statistics), and
nothing is `O(B^2)` or even `O(B * D)`. The backward pass (`jax.custom_vjp`) goes round the same
way: the visiting block carries its final logsumexp and the cotangent, and the text gradient of
each block accumulates as it travels and comes home on the last hop.

The value is the global-batch loss (a `psum` of the per-device sums), equal to
`mmts_jax.losses.infonce_dense` of the concatenated batch; `jax.grad` inside `shard_map` gives the
local rows of the global gradient.
"""

from __future__ import annotations

from jax import lax

from mmts_jax.losses import blockwise, blockwise_sigmoid
from mmts_jax.losses._traversal import axis_size, resolve_blocks, ring_traverse

__all__ = ["infonce_ring", "max_margin_ring", "ring_traverse", "sigmoid_ring"]


def infonce_ring(image, text, temperature, axis_name, *, block_size=None, precision=None):
  """Global-batch symmetric InfoNCE from the local shard, passing text blocks round a ring.

  Args:
    image, text: the local `(b, D)` shard of the global `(n*b, D)` batch.
    temperature: scalar or the local `(b,)` per-anchor temperatures.
    axis_name: the `shard_map`/`pmap` axis (or tuple of axes) the batch is split over.
    block_size: local tile, as in `infonce_blockwise`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> mesh = Mesh(jax.devices(), ("batch",))
    >>> f = jax.shard_map(lambda x, y, t: infonce_ring(x, y, t, "batch"), mesh=mesh,
    ...                   in_specs=P("batch"), out_specs=P())
  """
  b = image.shape[0]
  blocks = resolve_blocks(block_size, b, b, "infonce")
  n = axis_size(axis_name)
  part = blockwise.infonce_partial_sum(image, text, temperature, blocks, precision, axis_name)
  return lax.psum(part, axis_name) / (2 * n * b)


def max_margin_ring(image, text, margin, axis_name, *, block_size=None, precision=None):
  """Global-batch max-margin loss from the local shard (ring), as `infonce_ring`."""
  b = image.shape[0]
  n = axis_size(axis_name)
  total = n * b
  if total < 2:
    raise ValueError("max_margin: needs a global batch of at least 2")
  blocks = resolve_blocks(block_size, b, b, "max_margin")
  part = blockwise.max_margin_partial_sum(image, text, margin, blocks, precision, axis_name)
  return lax.psum(part, axis_name) / float(2 * total * (total - 1))


def sigmoid_ring(image, text, temperature, axis_name, *, bias, block_size=None, precision=None):
  """Global-batch sigmoid loss from the local shard (ring), as `infonce_ring`.

  The visiting text blocks carry their temperatures, biases and global indices; the per-anchor
  sums of the columns travel with them and come home on the last hop.
  """
  b = image.shape[0]
  blocks = resolve_blocks(block_size, b, b, "sigmoid", default=blockwise_sigmoid.SIGMOID_BLOCK)
  n = axis_size(axis_name)
  part = blockwise_sigmoid.sigmoid_partial_sum(
    image, text, temperature, bias, blocks, precision, axis_name
  )
  return lax.psum(part, axis_name) / (2 * n * b)
