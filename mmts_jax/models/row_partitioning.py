r"""A partitioning rule for row-wise kernels: `custom_partitioning` of a function whose operands
and results are rows `(N, C)`, one number per row `(N,)`, per-feature vectors `(C,)`, or
arrays of any rank that lead with the rows (`batch(rank)`: e.g. attention's `(B, L, H, D)`).

A Pallas call is opaque to XLA's partitioner (GSPMD or Shardy): under a multi-device `jit` with
the rows sharded it would gather every operand on every device. `row_partitioned(fn, ...)`
tells the partitioner instead that the rows (the leading N axis) may stay sharded over any mesh
axes and the feature axis C must be replicated. Each device then runs `fn` on its own rows, and
a result that is a sum over the rows (`SUM`, e.g. a bias gradient :math:`db = \sum_N dh`) is
completed across devices:

.. math::
  db = \textstyle\sum_{d} \mathrm{psum}\big(\sum_{n \in \text{rows of } d} dh_n\big),

one all-reduce of a `(C,)` vector over the mesh axes the rows are split on, so it comes out
replicated. Per-row results (`ROWS`, `ROW`) keep the rows' sharding.

The rows' sharding is read from the first operand (always `ROWS`); the other operands are
resharded to match it (the partitioner inserts the collectives). Rows that the devices do not
split evenly (N not a multiple of the number of shards) would be padded, and the padding would
enter the sums, so such a call falls back to replicated rows: correct, with the all-gather this
module otherwise avoids. Shardy (the default partitioner since jax 0.7) reads `sharding_rule`;
GSPMD reads `infer_sharding_from_operands`; both end in the same `partition`. On one device,
and inside a `shard_map` where every axis is manual, `fn` runs as it is.

Example (two rows per device over a 4-device axis; the row sums all-reduced):
  >>> import jax.numpy as jnp, numpy as np
  >>> def scaled(k, x, s):
  ...   return x * s * k, jnp.sum(x, axis=0)
  >>> f = row_partitioned(scaled, (ROWS, FEATURES), (ROWS, SUM), num_static=1)
  >>> mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  >>> x = jnp.arange(16.0).reshape(8, 2)
  >>> run = jax.jit(lambda x, s: f(2.0, x, s),
  ...               in_shardings=(NamedSharding(mesh, P("data")), NamedSharding(mesh, P())))
  >>> y, total = run(x, jnp.ones(2))
  >>> total.tolist(), y.sharding.spec[0]
  ([56.0, 64.0], 'data')
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
  "FEATURES",
  "ROW",
  "ROWS",
  "SUM",
  "batch",
  "row_axes",
  "row_partitioned",
  "shard_body",
]

ROWS = "rows"  # (N, C): rows keep their sharding, features replicated
ROW = "row"  # (N,): one number per row, sharded as the rows
FEATURES = "features"  # (C,) operand: replicated
SUM = "sum"  # (C,) result: a sum over this device's rows, all-reduced over the row axes
_FACTORS = {ROWS: "n c", ROW: "n", FEATURES: "c", SUM: "c"}
_BATCH = "batch"


def batch(rank: int) -> str:
  """The kind of a rank-`rank` array (rank >= 2) whose leading axis is the rows, sharded as
  the rows, and whose other axes are replicated. Arrays of one rank share their factors, so
  they must share their shape past the rows (attention's q, k, v, o: `(B, L, H, D)`).

  Example:
    >>> batch(4)
    'batch4'
  """
  if int(rank) < 2:
    raise ValueError(f"row_partitioning.batch: rank must be >= 2 (ROW is rank 1), got {rank}")
  return f"{_BATCH}{int(rank)}"


def _rank(kind: str) -> int | None:
  """The rank of a `batch` kind, None for the others (and for a malformed one)."""
  tail = kind[len(_BATCH) :]
  return int(tail) if kind.startswith(_BATCH) and tail.isdigit() and int(tail) >= 2 else None


def _factors(kind: str) -> str:
  """The kind's factors in the Shardy rule: the rows "n", a batch kind's other axes one factor
  per (rank, axis), so that arrays of one rank share them and arrays of two ranks do not."""
  rank = _rank(kind)
  if rank is None:
    return _FACTORS[kind]
  return " ".join(["n"] + [f"a{rank}_{i}" for i in range(1, rank)])


def row_axes(mesh: Mesh, sharding, n: int) -> tuple[str, ...]:
  """The mesh axes the N rows of an operand with `sharding` are split over: () when they are
  replicated, not a `NamedSharding`, or not split evenly (N not a multiple of the shards).

  Example:
    >>> import numpy as np
    >>> mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    >>> row_axes(mesh, NamedSharding(mesh, P(("a", "b"), None)), 16)
    ('a', 'b')
    >>> row_axes(mesh, NamedSharding(mesh, P("a", "b")), 6)  # 6 rows over 4 shards: padded
    ()
  """
  if not isinstance(sharding, NamedSharding) or not len(sharding.spec):
    return ()
  entry = sharding.spec[0]
  if entry is None or entry is P.UNCONSTRAINED:
    return ()
  axes = tuple(entry) if isinstance(entry, tuple) else (entry,)
  shards = math.prod(mesh.shape[a] for a in axes)
  return axes if n % shards == 0 else ()


def _shardings(mesh: Mesh, kinds: Sequence[str], axes: tuple[str, ...]) -> tuple:
  rows = axes if axes else None
  spec = {ROWS: P(rows, None), ROW: P(rows), FEATURES: P(None), SUM: P(None)}

  def one(kind):
    rank = _rank(kind)
    return spec[kind] if rank is None else P(rows, *([None] * (rank - 1)))

  return tuple(NamedSharding(mesh, one(k)) for k in kinds)


def _is_rows(kind: str) -> bool:
  return kind == ROWS or _rank(kind) is not None


def _check_kinds(operands: Sequence[str], results: Sequence[str]) -> None:
  if not operands or not _is_rows(operands[0]):
    raise ValueError(
      f"row_partitioned: the first operand must be ROWS or batch(rank), got {tuple(operands)}"
    )
  if any(not _is_rows(k) and k not in (ROW, FEATURES) for k in operands):
    raise ValueError(
      f"row_partitioned: operands must be ROWS, ROW, FEATURES or batch(rank), got {operands}"
    )
  if not results or any(not _is_rows(k) and k not in (ROW, SUM) for k in results):
    raise ValueError(
      f"row_partitioned: results must be ROWS, ROW, SUM or batch(rank), got {results}"
    )


def shard_body(fn: Callable, static: Sequence, results: Sequence[str], axes: tuple[str, ...]):
  """What each device runs: `fn(*static, *its arrays)`, the `SUM` results all-reduced over
  the row axes `axes` (none: `fn` as it is). Named mesh axes must be in scope (`shard_map`, or
  the partitioner's own trace).

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    >>> body = shard_body(lambda x: (x, jnp.sum(x, axis=0)), (), (ROWS, SUM), ("data",))
    >>> run = jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=(P("data"), P()))
    >>> run(jnp.ones((4, 3)))[1].tolist()
    [4.0, 4.0, 4.0]
  """

  def body(*arrays):
    outs = fn(*static, *arrays)
    # Each device summed its own rows; the psum adds the other devices' rows (none of them
    # padding: `row_axes` replicates rows that do not split evenly).
    return tuple(
      jax.lax.psum(o, axes) if k == SUM and axes else o for o, k in zip(outs, results, strict=True)
    )

  return body


def row_partitioned(
  fn: Callable, operands: Sequence[str], results: Sequence[str], num_static: int = 0
) -> Callable:
  """`fn(*static, *arrays) -> tuple of arrays` as a `custom_partitioning` call with the
  row-wise rule of the module docstring; `operands` and `results` name each array's kind.

  The first `num_static` arguments are static (hashable: block sizes, dtypes, flags); they
  are fixed when the call is traced, so a later change of a module-level setting does not
  reach the compiled partitions. `fn` must return a tuple even for one result.

  Example:
    >>> import jax.numpy as jnp
    >>> f = row_partitioned(lambda x: (2 * x,), (ROWS,), (ROWS,))
    >>> f(jnp.ones((2, 3)))[0].tolist()  # one device: `fn` itself
    [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
  """
  _check_kinds(operands, results)
  operands, results = tuple(operands), tuple(results)

  def axes_of(mesh, arg_shapes):
    x = arg_shapes[0]
    return row_axes(mesh, x.sharding, x.shape[0])

  def infer(*args):
    mesh, arg_shapes, _ = args[num_static:]
    return _shardings(mesh, results, axes_of(mesh, arg_shapes))

  def partition(*args):
    static, (mesh, arg_shapes, _) = args[:num_static], args[num_static:]
    axes = axes_of(mesh, arg_shapes)
    return (
      mesh,
      shard_body(fn, static, results, axes),
      _shardings(mesh, results, axes),
      _shardings(mesh, operands, axes),
    )

  wrapped = custom_partitioning(fn, static_argnums=tuple(range(num_static)))
  rule = ", ".join(map(_factors, operands)) + " -> " + ", ".join(map(_factors, results))
  # Every factor but the rows' is replicated, in the order of first appearance (as Shardy
  # wants them).
  others = tuple(dict.fromkeys(f for k in (*operands, *results) for f in _factors(k).split()))
  wrapped.def_partition(
    partition,
    infer_sharding_from_operands=infer,
    sharding_rule=rule,
    need_replication_factors=tuple(f for f in others if f != "n"),
  )
  return wrapped
