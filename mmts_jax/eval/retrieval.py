r"""Image-text retrieval: R@K and median rank, blockwise on the device, one or several captions.

Text->image: each caption has one ground-truth image, `text_to_image[m]`. Image->text: an image
is retrieved correctly at rank `r` if its *first* caption in the ranking is at rank `r` (COCO /
Flickr30K protocol: 5 captions per image, a hit at K if any of them is in the top K).

For a query `q` with positive set `P_q`, the rank is that of the best positive `k*` (highest
similarity, lowest index among equal ones) among the non-positives:

.. math::
  \mathrm{rank}_q = 1 + \#\{k \notin P_q : s_{qk} > s_{qk^*}\}
                      + \#\{k \notin P_q : s_{qk} = s_{qk^*},\ k < k^*\},

i.e. the position of the first positive in a stable descending sort of the row. The similarity
`s = <q, k>` (cosine by default) is computed in tiles of `query_block x key_block` inside
`jax.jit`: one pass over the key tiles finds `s_{qk*}` (from the same tile products that the
counting pass recomputes, so the comparison is exact), a second pass counts. Memory on the
device is `O((N + M) D + query_block * key_block)`; only the ranks come back to the host.

Example:
  >>> import numpy as np
  >>> image_emb = np.eye(3, dtype=np.float32)  # 3 images, 2 captions each
  >>> text_emb = image_emb[[0, 0, 1, 1, 2, 0]]  # the last caption looks like image 0
  >>> m = retrieval_metrics(image_emb, text_emb, np.array([0, 0, 1, 1, 2, 2]), ks=(1, 5))
  >>> round(m["t2i/R@1"], 4), m["i2t/R@1"], m["t2i/medR"]
  (0.8333, 1.0, 1.0)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from mmts_jax.losses.dense import cosine_normalize

__all__ = ["RetrievalRanks", "retrieval_ranks", "recall_metrics", "retrieval_metrics"]

# A (1024 x 8192) float32 tile is 32 MiB: small next to a GPU's memory, big enough for its
# matrix units; `block_size` overrides it.
DEFAULT_BLOCK = (1024, 8192)


class RetrievalRanks(NamedTuple):
  """1-based rank of the first positive per query; 0 where the query has no positive."""

  t2i: np.ndarray  # (M,) one per caption
  i2t: np.ndarray  # (N,) one per image


def _check_embeddings(image_emb, text_emb, text_to_image):
  for name, x in (("image_emb", image_emb), ("text_emb", text_emb)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"retrieval: {name} must be an array, got {type(x).__name__}")
    if len(x.shape) != 2:
      raise ValueError(f"retrieval: {name} must be (items, dim), got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"retrieval: {name} must be floating point, got dtype {x.dtype}")
    if x.shape[0] < 1:
      raise ValueError(f"retrieval: {name} is empty")
  if image_emb.shape[1] != text_emb.shape[1]:
    raise ValueError(
      f"retrieval: image_emb and text_emb must have the same dim, got shapes "
      f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
    )
  mapping = np.asarray(text_to_image)
  if mapping.shape != (text_emb.shape[0],):
    raise ValueError(
      f"retrieval: text_to_image must have one image index per caption, shape "
      f"({text_emb.shape[0]},), got {mapping.shape}"
    )
  if not np.issubdtype(mapping.dtype, np.integer):
    raise TypeError(f"retrieval: text_to_image must be integer, got dtype {mapping.dtype}")
  n = image_emb.shape[0]
  bad = np.flatnonzero((mapping < 0) | (mapping >= n))
  if len(bad):
    raise ValueError(
      f"retrieval: text_to_image must index the {n} images, got {len(bad)} caption(s) out of "
      f"range, e.g. caption {int(bad[0])} -> {int(mapping[bad[0]])}"
    )
  for name, x in (("image_emb", image_emb), ("text_emb", text_emb)):
    # On the device for device arrays: only the (n,) flags come to the host.
    finite = np.asarray(
      jnp.isfinite(x).all(axis=1) if isinstance(x, jax.Array) else np.isfinite(x).all(axis=1)
    )
    if not finite.all():
      rows = np.flatnonzero(~finite)
      raise ValueError(
        f"retrieval: {name} has {len(rows)} row(s) with NaN/inf, first {rows[:5].tolist()}"
      )
  return mapping.astype(np.int32)


def _resolve_block(block_size, num_queries: int, num_keys: int, shards: int = 1) -> tuple[int, int]:
  if block_size is None:
    block_size = DEFAULT_BLOCK
  if isinstance(block_size, int):
    block_size = (block_size, block_size)
  if (
    not isinstance(block_size, (tuple, list))
    or len(block_size) != 2
    or not all(isinstance(b, int) and b > 0 for b in block_size)
  ):
    raise ValueError(
      f"retrieval: block_size must be a positive int or (query_block, key_block), got "
      f"{block_size!r}"
    )
  return min(block_size[0], -(-num_queries // shards)), min(block_size[1], num_keys)


def _pad_rows(x, multiple: int, value):
  pad = (-x.shape[0]) % multiple
  if pad == 0:
    return x
  widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
  return jnp.pad(x, widths, constant_values=value)


def _ranks_body(q, ql, keys, key_label, *, query_block: int, key_block: int, precision):
  """Ranks of the first positive for queries `q` (a multiple of `query_block` rows).

  `keys` are all keys, so key indices are global; padded queries (label -2) get rank 0.
  """
  num_k = keys.shape[0]
  # Padded keys get label -1 and are masked out of both passes.
  k = _pad_rows(keys, key_block, 0).reshape(-1, key_block, keys.shape[1])
  kl = _pad_rows(key_label, key_block, -1).reshape(-1, key_block)
  kidx = jnp.arange(k.shape[0] * key_block, dtype=jnp.int32).reshape(-1, key_block)
  valid = kidx < num_k
  big = jnp.iinfo(jnp.int32).max

  def tile(qb, kb):
    return jnp.einsum("qd,kd->qk", qb, kb, precision=precision, preferred_element_type=jnp.float32)

  def per_block(args):
    qb, qlb = args

    def best_positive(carry, chunk):
      best, first = carry
      kb, klb, ib, vb = chunk
      s = tile(qb, kb)
      pos = (qlb[:, None] == klb[None, :]) & vb[None, :]
      cmax = jnp.max(jnp.where(pos, s, -jnp.inf), axis=1)
      cfirst = jnp.min(jnp.where(pos & (s == cmax[:, None]), ib[None, :], big), axis=1)
      first = jnp.where(
        cmax > best, cfirst, jnp.where(cmax == best, jnp.minimum(first, cfirst), first)
      )
      return (jnp.maximum(best, cmax), first), None

    # Carries start from the query labels, so that under shard_map they vary like the queries.
    none = jnp.zeros_like(qlb)
    init = ((none - jnp.inf).astype(jnp.float32), none + big)
    (best, first), _ = lax.scan(best_positive, init, (k, kl, kidx, valid))

    def count_before(count, chunk):
      kb, klb, ib, vb = chunk
      s = tile(qb, kb)
      negative = (qlb[:, None] != klb[None, :]) & vb[None, :]
      before = (s > best[:, None]) | ((s == best[:, None]) & (ib[None, :] < first[:, None]))
      return count + jnp.sum(negative & before, axis=1, dtype=jnp.int32), None

    count, _ = lax.scan(count_before, none, (k, kl, kidx, valid))
    return jnp.where(first < big, count + 1, 0)

  ranks = lax.map(per_block, (q.reshape(-1, query_block, q.shape[1]), ql.reshape(-1, query_block)))
  return ranks.reshape(-1)


@functools.partial(jax.jit, static_argnames=("query_block", "key_block", "precision", "mesh"))
def _first_positive_ranks(
  queries, keys, query_label, key_label, *, query_block: int, key_block: int, precision, mesh=None
):
  """Rank of the first positive (key_label == query_label) of each query; 0 if it has none."""
  num_q = queries.shape[0]
  shards = 1 if mesh is None else mesh.size
  q = _pad_rows(queries, query_block * shards, 0)
  ql = _pad_rows(query_label, query_block * shards, -2)
  body = functools.partial(
    _ranks_body, query_block=query_block, key_block=key_block, precision=precision
  )
  if mesh is None:
    return body(q, ql, keys, key_label)[:num_q]
  # Queries are split over every device of the mesh; keys are replicated, so each device ranks
  # its queries against all keys and only the ranks are gathered.
  from mmts_jax.losses.sharding import shard_map

  axes = P(tuple(mesh.axis_names))
  sharded = shard_map(body, mesh=mesh, in_specs=(axes, axes, P(), P()), out_specs=axes)
  return sharded(q, ql, keys, key_label)[:num_q]


def retrieval_ranks(
  image_emb,
  text_emb,
  text_to_image,
  *,
  block_size=None,
  normalize: bool = True,
  precision=lax.Precision.HIGHEST,
  mesh: jax.sharding.Mesh | None = None,
) -> RetrievalRanks:
  """Ranks of the ground truth, text->image per caption and image->text per image.

  Args:
    image_emb: (N, D) image embeddings.
    text_emb: (M, D) caption embeddings.
    text_to_image: (M,) int, the image of each caption (several captions may share one).
    block_size: `(query_block, key_block)` tile of the similarity matrix, or an int for both.
    normalize: L2-normalise both sides first (cosine similarity, as CLIP evaluates).
    precision: matmul precision of the tiles; HIGHEST keeps float32 on GPUs/TPUs (no TF32).
    mesh: split the queries over all devices of this mesh (keys replicated on each); the
      ranks are the same as on one device.

  Returns:
    `RetrievalRanks(t2i (M,), i2t (N,))`, int32 numpy, 1-based; an image without any caption
    has i2t rank 0 and is left out of the metrics.

  Example:
    >>> img = np.eye(3, dtype=np.float32)
    >>> retrieval_ranks(img, img[[0, 0, 1]], np.array([0, 0, 1])).i2t
    array([1, 1, 0], dtype=int32)
  """
  mapping = _check_embeddings(image_emb, text_emb, text_to_image)
  image, text = jnp.asarray(image_emb), jnp.asarray(text_emb)
  if normalize:
    image, text = cosine_normalize(image), cosine_normalize(text)
  n, m = image.shape[0], text.shape[0]
  images = jnp.arange(n, dtype=jnp.int32)
  mapping = jnp.asarray(mapping)
  shards = 1 if mesh is None else mesh.size
  qb, kb = _resolve_block(block_size, m, n, shards)
  t2i = _first_positive_ranks(
    text, image, mapping, images, query_block=qb, key_block=kb, precision=precision, mesh=mesh
  )
  qb, kb = _resolve_block(block_size, n, m, shards)
  i2t = _first_positive_ranks(
    image, text, images, mapping, query_block=qb, key_block=kb, precision=precision, mesh=mesh
  )
  return RetrievalRanks(np.asarray(t2i), np.asarray(i2t))


def recall_metrics(ranks, ks: Sequence[int] = (1, 5, 10), mask=None, prefix: str = "") -> dict:
  """R@K (fraction of queries with rank <= K), median and mean rank of the ranked queries.

  Queries with rank 0 (no positive) and those outside `mask` are left out; `num_queries` says
  how many count.

  Example:
    >>> m = recall_metrics(np.array([1, 3, 12]), ks=(1, 5))
    >>> m["R@5"], m["medR"], m["num_queries"]
    (0.6666666666666666, 3.0, 3)
  """
  ranks = np.asarray(ranks)
  keep = ranks > 0
  if mask is not None:
    mask = np.asarray(mask, bool)
    if mask.shape != ranks.shape:
      raise ValueError(f"recall_metrics: mask must have shape {ranks.shape}, got {mask.shape}")
    keep &= mask
  if not ks or any(not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
    raise ValueError(f"recall_metrics: ks must be positive ints, got {ks!r}")
  r = ranks[keep]
  out = {f"{prefix}R@{k}": float(np.mean(r <= k)) if len(r) else float("nan") for k in ks}
  out[f"{prefix}medR"] = float(np.median(r)) if len(r) else float("nan")
  out[f"{prefix}meanR"] = float(np.mean(r)) if len(r) else float("nan")
  out[f"{prefix}num_queries"] = int(len(r))
  return out


def retrieval_metrics(
  image_emb,
  text_emb,
  text_to_image,
  *,
  ks: Sequence[int] = (1, 5, 10),
  block_size=None,
  normalize: bool = True,
  subsets: Mapping[str, np.ndarray] | None = None,
  precision=lax.Precision.HIGHEST,
  mesh: jax.sharding.Mesh | None = None,
) -> dict:
  """Text->image and image->text R@K, median / mean rank, rsum; optionally per image subset.

  Args:
    image_emb, text_emb, text_to_image, block_size, normalize, precision, mesh: see
      `retrieval_ranks`.
    ks: the K of R@K.
    subsets: name -> (N,) bool mask over images (e.g. head / tail classes). A caption belongs
      to the subset of its image. Adds `"<name>/t2i/R@1"` etc.

  Returns:
    A flat dict of floats: `"t2i/R@1"`, ..., `"t2i/medR"`, `"t2i/meanR"`, `"t2i/num_queries"`,
    the same for `"i2t/"`, and `"rsum"` (the sum of all R@K of both directions, in percent as
    papers report it). R@K are fractions in [0, 1].

  Example:
    >>> img = np.eye(2, dtype=np.float32)
    >>> m = retrieval_metrics(img, img[[0, 0, 1]], np.array([0, 1, 1]), ks=(1,))
    >>> round(m["t2i/R@1"], 4), m["i2t/R@1"], round(m["rsum"], 2)
    (0.6667, 1.0, 166.67)
  """
  ranks = retrieval_ranks(
    image_emb,
    text_emb,
    text_to_image,
    block_size=block_size,
    normalize=normalize,
    precision=precision,
    mesh=mesh,
  )
  mapping = np.asarray(text_to_image)
  groups: dict[str, np.ndarray | None] = {"": None}
  for name, mask in (subsets or {}).items():
    mask = np.asarray(mask)
    if mask.shape != (ranks.i2t.shape[0],) or mask.dtype != bool:
      raise ValueError(
        f"retrieval_metrics: subset {name!r} must be a bool mask over the "
        f"{ranks.i2t.shape[0]} images, got dtype {mask.dtype} shape {mask.shape}"
      )
    groups[f"{name}/"] = mask
  out = {}
  for prefix, mask in groups.items():
    t2i = recall_metrics(ranks.t2i, ks, None if mask is None else mask[mapping], f"{prefix}t2i/")
    i2t = recall_metrics(ranks.i2t, ks, mask, f"{prefix}i2t/")
    out.update(t2i)
    out.update(i2t)
    out[f"{prefix}rsum"] = 100.0 * sum(
      d[f"{prefix}{side}/R@{k}"] for side, d in (("t2i", t2i), ("i2t", i2t)) for k in ks
    )
  return out
