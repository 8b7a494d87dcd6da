"""The one place that routes a loss to its form: dense, blockwise, all-gather or ring.

`route` is called by every public entry point (`losses.infonce`, `losses.max_margin`, the sharded
losses of `make_sharded_loss`) and `get` builds a loss function from a config's loss name and
implementation once, so the choice between the forms is made here and nowhere else.

Forms (all compute the same function; see docs/losses.md):

| impl | where | memory |
| --- | --- | --- |
| "dense" | one device, or XLA-partitioned | the `(B, B)` logits |
| "blockwise" | one device, tiles with a hand-written backward | `O(B*D + tile)` |
| "gather" | under `shard_map`, the batch all-gathered | `(b, B)` logits per device |
| "ring" | under `shard_map`, blocks passed round the devices | own shard + one block |
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mmts_jax.losses import (
  _checks,
  blockwise,
  blockwise_sigmoid,
  dense,
  gathered,
  ring,
  sharding,
)
from mmts_jax.losses._traversal import axis_size, resolve_blocks

__all__ = [
  "AUTO_DENSE_MAX",
  "AUTO_GATHER_MAX",
  "IMPLS",
  "NAMES",
  "get",
  "make_sharded_loss",
  "route",
]

# impl="auto": the dense path up to this batch (its (B, B) logits are at most 64 MiB in f32),
# blockwise above. Sharded, sharded="auto": all-gather up to this global batch, ring above.
AUTO_DENSE_MAX = 4096
AUTO_GATHER_MAX = 8192

# name -> (what `values` are, {form: function}).
_FORMS = {
  "infonce": (
    "temperature",
    {
      "dense": dense.infonce_dense,
      "blockwise": blockwise.infonce_blockwise,
      "gather": gathered.infonce_gathered,
      "ring": ring.infonce_ring,
    },
  ),
  "max_margin": (
    "margin",
    {
      "dense": dense.max_margin_dense,
      "blockwise": blockwise.max_margin_blockwise,
      "gather": gathered.max_margin_gathered,
      "ring": ring.max_margin_ring,
    },
  ),
  "sigmoid": (
    "temperature",
    {
      "dense": dense.sigmoid_dense,
      "blockwise": blockwise_sigmoid.sigmoid_blockwise,
      "gather": gathered.sigmoid_gathered,
      "ring": ring.sigmoid_ring,
    },
  ),
}
NAMES = tuple(_FORMS)
# "auto" / "dense" / "blockwise": the loss of the global batch, which XLA partitions when the
# batch is sharded; "gather" / "ring": the per-device sharded loss under `shard_map`.
IMPLS = ("auto", "dense", "blockwise", "gather", "ring")
_LOCAL = ("auto", "dense", "blockwise")
_SHARDED = ("auto", "ring", "gather")

LossFn = Callable[..., jax.Array]


def _check_choice(value, allowed, what, fn):
  if value not in allowed:
    raise ValueError(f"{fn}: {what} must be one of {allowed}, got {value!r}")


def _check_extra(name, extra):
  want = set(_checks.EXTRA.get(name, ()))
  if set(extra) != want:
    raise TypeError(f"{name}: takes the keyword argument(s) {sorted(want)}, got {sorted(extra)}")


def route(
  name: str,
  image: jax.Array,
  text: jax.Array,
  values,
  *,
  axis_name=None,
  impl: str = "auto",
  block_size=None,
  sharded: str = "auto",
  precision=None,
  **extra,
) -> jax.Array:
  """Checks the inputs and computes loss `name` by the form `impl` / `sharded` selects.

  Args:
    name: one of `NAMES`.
    image, text: `(B, D)` embeddings (the local shard when `axis_name` is set).
    values: the per-anchor temperatures or margins, a scalar or `(B,)`.
    axis_name: inside `shard_map`/`pmap`, the batch axis: the result is the global-batch loss.
    impl: "auto", "dense" or "blockwise" (without `axis_name`).
    block_size: blockwise / ring tile, an int or `(rows, cols)`.
    sharded: with `axis_name`: "auto", "ring" or "gather".
    precision: matmul precision.
    **extra: the loss's own keyword arguments (`bias` of the sigmoid loss).

  Example:
    >>> import jax.numpy as jnp
    >>> round(float(route("infonce", jnp.eye(4), jnp.eye(4), 0.5, impl="blockwise")), 4)
    0.3408
  """
  _check_choice(name, NAMES, "loss name", "losses")
  what, forms = _FORMS[name]
  _check_choice(impl, _LOCAL, "impl", name)
  _check_choice(sharded, _SHARDED, "sharded", name)
  _check_extra(name, extra)
  _checks.check_pair(image, text, name)
  b = image.shape[0]
  _checks.check_per_anchor(values, b, what, name, strictly_positive=True)
  for key, value in extra.items():
    _checks.check_per_anchor(value, b, key, name, strictly_positive=False, signed=True)
  resolve_blocks(block_size, b, b, name)  # validates block_size before tracing
  if axis_name is not None:
    if sharded == "auto":
      sharded = "gather" if axis_size(axis_name) * b <= AUTO_GATHER_MAX else "ring"
    if sharded == "gather":
      return forms["gather"](image, text, values, axis_name, precision=precision, **extra)
    return forms["ring"](
      image, text, values, axis_name, block_size=block_size, precision=precision, **extra
    )
  if impl == "dense" or (impl == "auto" and b <= AUTO_DENSE_MAX and block_size is None):
    return forms["dense"](image, text, values, precision=precision, **extra)
  return forms["blockwise"](
    image, text, values, block_size=block_size, precision=precision, **extra
  )


def make_sharded_loss(
  mesh,
  loss: str = "infonce",
  *,
  axis_name=None,
  sharded: str = "ring",
  block_size=None,
  precision=None,
) -> LossFn:
  """The global-batch loss over `mesh`, the batch split along `axis_name` (`shard_map` inside).

  Args:
    mesh: the `jax.sharding.Mesh`.
    loss: one of `NAMES` (values = temperature or margin).
    axis_name: the mesh axis (or tuple of axes) the batch is split over; None uses all of them.
    sharded: "ring" (blocks passed round the devices), "gather" (all-gather) or "auto".
    block_size, precision: as in `route`.

  Returns:
    `loss_fn(image, text, value, **extra) -> scalar` on global `(B, D)` arrays (sharded over the
    batch axes, or not: `shard_map` reshards them), `value` a scalar or `(B,)`; B must be
    divisible by the devices along `axis_name`. The value equals the dense loss of the batch and
    `jax.grad` of it is the global gradient. Use it under `jax.jit`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import Mesh
    >>> mesh = Mesh(jax.devices(), ("batch",))
    >>> loss_fn = make_sharded_loss(mesh, "infonce")
    >>> x = jnp.ones((8 * len(jax.devices()), 4)) / 2
    >>> loss = jax.jit(loss_fn)(x, x, 0.07)
  """
  axis_name, n = sharding.batch_axes(mesh, axis_name, "make_sharded_loss")
  _check_choice(loss, NAMES, "loss", "make_sharded_loss")
  _check_choice(sharded, _SHARDED, "sharded", "make_sharded_loss")
  what = _FORMS[loss][0]
  spec = P(axis_name)
  keys = tuple(_checks.EXTRA.get(loss, ()))

  def local(image, text, value, *extra):
    return route(
      loss,
      image,
      text,
      value,
      axis_name=axis_name,
      sharded=sharded,
      block_size=block_size,
      precision=precision,
      **dict(zip(keys, extra, strict=True)),
    )

  mapped = sharding.shard_map(local, mesh=mesh, in_specs=(spec,) * (3 + len(keys)), out_specs=P())

  def loss_fn(image, text, value, **extra):
    _check_extra(loss, extra)
    _checks.check_pair(image, text, loss)
    b = image.shape[0]
    if b % n:
      raise ValueError(
        f"{loss}: the global batch {b} is not divisible by the {n} devices along {axis_name!r}"
      )
    _checks.check_per_anchor(value, b, what, loss, strictly_positive=True)
    dt = jnp.promote_types(image.dtype, jnp.float32)
    # Per-anchor vectors sharded like the batch: a scalar's gradient is the sum over the batch.
    vectors = [jnp.broadcast_to(jnp.asarray(value, dt), (b,))]
    for key in keys:
      _checks.check_per_anchor(extra[key], b, key, loss, strictly_positive=False, signed=True)
      vectors.append(jnp.broadcast_to(jnp.asarray(extra[key], dt), (b,)))
    return mapped(image, text, *vectors)

  return loss_fn


def get(
  name: str, *, impl: str = "auto", block_size=None, mesh=None, axis_name=None, precision=None
) -> LossFn:
  """Returns `loss_fn(image, text, values, **extra) -> scalar` for a loss named in a config.

  Args:
    name: "infonce" or "sigmoid" (`values` are temperatures; "sigmoid" takes `bias=` too, so
      its function is `loss_fn(image, text, values, *, bias)`), or "max_margin" (`values` are
      margins).
    impl: one of `IMPLS`. "gather" and "ring" need `mesh`.
    block_size: blockwise / ring tile, an int or `(rows, cols)`; None picks the default.
    mesh: the `jax.sharding.Mesh` the batch is split over ("gather" / "ring" only).
    axis_name: the mesh axis (or axes) of the batch; None: all of the mesh's axes.
    precision: matmul precision.

  Example:
    >>> import jax.numpy as jnp
    >>> loss_fn = get("infonce", impl="dense")
    >>> x = jnp.eye(4)
    >>> round(float(loss_fn(x, x, jnp.full((4,), 0.5))), 4)  # log(e^2 + 3) - 2
    0.3408
  """
  if name not in NAMES:
    raise ValueError(f"loss name must be one of {NAMES}, got {name!r}")
  if impl not in IMPLS:
    raise ValueError(f"loss impl must be one of {IMPLS}, got {impl!r}")
  if isinstance(block_size, list):
    block_size = tuple(block_size)
  if impl in ("gather", "ring"):
    if mesh is None:
      raise ValueError(f"loss impl {impl!r} needs the mesh")
    return make_sharded_loss(
      mesh, name, axis_name=axis_name, sharded=impl, block_size=block_size, precision=precision
    )
  resolve_blocks(block_size, 1, 1, name)  # a bad tile fails here, not at the first step

  def loss_fn(image, text, values, **extra):
    return route(
      name, image, text, values, impl=impl, block_size=block_size, precision=precision, **extra
    )

  return loss_fn
