"""`_traversal.sweep`: every (row block, column block) pair once, rows outer, columns inner."""

import jax
import numpy as np

from mmts_jax.losses import _traversal


def test_sweep_visits_every_pair_once_in_order():
  def tile(r, c, rs, cs):
    # Order-sensitive updates: a pair visited out of order, twice or not at all changes them.
    s = r[:, None] * c[None, :]
    return rs * 1.5 + s.sum(1), cs * 0.5 + s.sum(0)

  k = jax.random.split(jax.random.PRNGKey(0), 4)
  rows, cols = jax.random.normal(k[0], (3, 5)), jax.random.normal(k[1], (4, 6))
  rs0, cs0 = jax.random.normal(k[2], (3, 5)), jax.random.normal(k[3], (4, 6))
  rs, cs = jax.jit(lambda *a: _traversal.sweep(tile, *a))(rows, cols, rs0, cs0)
  want_rs, want_cs = (np.array(a, np.float64) for a in (rs0, cs0))
  r64, c64 = np.asarray(rows, np.float64), np.asarray(cols, np.float64)
  for i in range(3):
    for j in range(4):
      s = np.outer(r64[i], c64[j])
      want_rs[i] = want_rs[i] * 1.5 + s.sum(1)
      want_cs[j] = want_cs[j] * 0.5 + s.sum(0)
  # float32 against float64 over 12 order-dependent updates of O(1) values.
  np.testing.assert_allclose(np.asarray(rs), want_rs, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(cs), want_cs, rtol=1e-5, atol=1e-5)
