"""`_traversal.sweep`: every (row block, column block) pair once, in order, wherever the column
state is kept (`COLUMN_STATE`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmts_jax.losses import _traversal


def _run(rows, cols, rs0, cs0):
  def tile(r, c, rs, cs):
    # Order-sensitive updates: a visit out of order or twice changes the result.
    s = r[:, None] * c[None, :]
    return rs * 1.5 + s.sum(1), cs * 0.5 + s.sum(0)

  return jax.jit(lambda *a: _traversal.sweep(tile, *a))(rows, cols, rs0, cs0)


def _reference(rows, cols, rs0, cs0):
  rs, cs = np.array(rs0, np.float64), np.array(cs0, np.float64)
  for i in range(rows.shape[0]):
    for j in range(cols.shape[0]):
      s = np.outer(rows[i], cols[j])
      rs[i] = rs[i] * 1.5 + s.sum(1)
      cs[j] = cs[j] * 0.5 + s.sum(0)
  return rs, cs


@pytest.mark.parametrize("where", ["carry", "scan"])
def test_sweep_visits_every_pair_once_in_order(monkeypatch, where):
  monkeypatch.setattr(_traversal, "COLUMN_STATE", where)
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  rows, cols = jax.random.normal(k[0], (3, 5)), jax.random.normal(k[1], (4, 6))
  rs0, cs0 = jax.random.normal(k[2], (3, 5)), jax.random.normal(k[3], (4, 6))
  rs, cs = _run(rows, cols, rs0, cs0)
  want_rs, want_cs = _reference(*(np.asarray(a, np.float64) for a in (rows, cols, rs0, cs0)))
  np.testing.assert_allclose(np.asarray(rs), want_rs, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(cs), want_cs, rtol=1e-5, atol=1e-5)


def test_an_unknown_column_state_is_refused(monkeypatch):
  monkeypatch.setattr(_traversal, "COLUMN_STATE", "ys")
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="COLUMN_STATE must be 'carry' or 'scan', got 'ys'"):
    _run(x, x, x, x)
