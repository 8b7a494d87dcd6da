"""Float64 references of one similarity tile's partials, for the kernel checks.

The tests (`tests/test_losses_mosaic_tiles.py`) and the GPU checks of
`benchmarks/mosaic_tiles_bench.py` compare the Mosaic GPU and Triton tile kernels with these:
NumPy in float64 on the kernels' own (rounded) inputs, written from the equations of
`_mosaic_tiles` / `_pallas_tiles`, not from the kernels.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Hinge", "hinge_inputs", "hinge_tile"]


class Hinge(NamedTuple):
  """A max-margin tile in float64: cosines `s`, the row / column hinge tiles (zero on the
  diagonal), with cotangents the tile `dS r q^T` the kernels write, and `tie`: the entries off
  the diagonal whose hinge argument `ro_i + s_ij` or `co_j + s_ij` lies within `tie_eps` of 0,
  where a kernel's float32 cosine may fall on either side (on the GPU, run 10's check met one
  such entry at 2e-8 from its hinge in a 2,048^2 tile: benchmarks/results/mosaic_tiles_h200/)."""

  s: np.ndarray
  hr: np.ndarray
  hc: np.ndarray
  dsw: np.ndarray | None
  tie: np.ndarray


def hinge_inputs(n: int, d: int, seed: int, id_shift: int):
  """A max-margin tile's inputs: raw bf16 rows `x`, `y` of `(n, d)`, their inverse norms, offsets
  `m - s_ii` from -0.05 to 0.15 (so some hinges are active), row ids `0..n-1` and column ids
  shifted by `id_shift` (mod n), so the diagonal crosses the tile off its centre.

  Returns `((x, y), (rr, qc, ro, co), (rid, cid))`, the vectors in float64, the ids int32.
  """
  import jax
  import jax.numpy as jnp

  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = jax.random.normal(k[0], (n, d)).astype(jnp.bfloat16)
  y = jax.random.normal(k[1], (n, d)).astype(jnp.bfloat16)
  xs, ys = np.asarray(x, np.float64), np.asarray(y, np.float64)
  rr, qc = 1 / np.linalg.norm(xs, axis=1), 1 / np.linalg.norm(ys, axis=1)
  ro = np.asarray(jax.random.uniform(k[2], (n,)), np.float64) * 0.2 - 0.05
  co = np.asarray(jax.random.uniform(k[3], (n,)), np.float64) * 0.2 - 0.05
  rid = np.arange(n, dtype=np.int32)
  return (x, y), (rr, qc, ro, co), (rid, (rid + id_shift) % n)


def hinge_tile(x, y, rr, qc, ro, co, rid, cid, gr=None, gc=None, tie_eps=1e-6) -> Hinge:
  """`s_ij = <x_i, y_j> r_i q_j`, `hr = [ro_i + s_ij]_+`, `hc = [co_j + s_ij]_+` where
  `rid_i != cid_j`; with `gr`, `gc`: `dS = gr_i [ro_i + s_ij > 0] + gc_j [co_j + s_ij > 0]` (off
  the diagonal), `dsw = dS r_i q_j`.

  Example:
    >>> import numpy as np
    >>> t = hinge_tile(np.eye(2), np.eye(2), np.ones(2), np.ones(2), np.full(2, 0.1),
    ...                np.full(2, 0.1), np.arange(2), np.arange(2))
    >>> t.hr.tolist()  # the diagonal is excluded; off it s = 0, so the hinge is the offset
    [[0.0, 0.1], [0.1, 0.0]]
  """
  f = lambda v: np.asarray(v, np.float64)  # noqa: E731
  rr, qc, ro, co = f(rr), f(qc), f(ro), f(co)
  s = f(x) @ f(y).T * rr[:, None] * qc[None, :]
  keep = np.asarray(rid)[:, None] != np.asarray(cid)[None, :]
  hr = np.where(keep, np.maximum(ro[:, None] + s, 0), 0)
  hc = np.where(keep, np.maximum(co[None, :] + s, 0), 0)
  near = np.minimum(np.abs(ro[:, None] + s), np.abs(co[None, :] + s)) < tie_eps
  tie = keep & near
  if gr is None or gc is None:
    return Hinge(s, hr, hc, None, tie)
  ds = np.where(keep & (ro[:, None] + s > 0), f(gr)[:, None], 0)
  ds = ds + np.where(keep & (co[None, :] + s > 0), f(gc)[None, :], 0)
  return Hinge(s, hr, hc, ds * rr[:, None] * qc[None, :], tie)
