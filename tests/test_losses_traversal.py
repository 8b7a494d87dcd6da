"""`_traversal.sweep`: every (row block, column block) pair once, rows outer, columns inner."""

import chex
import jax
import jax.numpy as jnp
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


def test_prepared_and_finished_rows_match_the_plain_sweep():
  # prepare_rows's entries reach every tile of their row block; finish_rows turns each row
  # block's state into its output once all columns are done, with the column state unchanged.
  def tile(r, c, rs, cs, *, scale=1.0):
    s = (r * scale)[:, None] * c[None, :]
    return rs * 1.5 + s.sum(1), cs * 0.5 + s.sum(0)

  def finish(rs, i):
    return (rs * 2.0).astype(jnp.bfloat16), rs.sum() + i

  k = jax.random.split(jax.random.PRNGKey(1), 4)
  rows, cols = jax.random.normal(k[0], (3, 5)), jax.random.normal(k[1], (4, 6))
  rs0, cs0 = jnp.zeros((3, 5)), jax.random.normal(k[3], (4, 6))

  def prepare(r):
    return {"scale": r.max()}

  plain = jax.jit(
    lambda *a: _traversal.sweep(lambda r, c, rs, cs: tile(r, c, rs, cs, scale=r.max()), *a)
  )(rows, cols, rs0, cs0)
  got = jax.jit(lambda *a: _traversal.sweep(tile, *a, prepare_rows=prepare, finish_rows=finish))(
    rows, cols, rs0, cs0
  )
  want = jax.vmap(finish)(plain[0], jnp.arange(3))
  chex.assert_trees_all_close(got[0], want, rtol=1e-6)
  chex.assert_trees_all_close(got[1], plain[1], rtol=1e-6)
  assert got[0][0].dtype == jnp.bfloat16


def test_infonce_backward_keeps_no_float32_row_state_for_every_block():
  # XLA's own accounting of the compiled gradient (CPU, XLA tiles): with the column state in the
  # loops' carry and each row block finished in bf16 as its sweep ends, the temporaries stay
  # under 5.5 float32 copies of the embeddings; keeping a float32 gradient state for every row
  # block (and the column state as scan xs/ys) took 6.4 (102.5 MiB here).
  from mmts_jax.losses import blockwise

  b, d = 16384, 256
  x = jax.ShapeDtypeStruct((b, d), jnp.bfloat16)
  t = jax.ShapeDtypeStruct((b,), jnp.float32)

  def loss(x, y, t):
    return blockwise.infonce_blockwise(x, y, t, block_size=(2048, 2048)).mean()

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  mem = grad.lower(x, x, t).compile().memory_analysis()
  state = b * d * 4
  assert mem.temp_size_in_bytes < 5.5 * state, mem.temp_size_in_bytes / state


def _common_component_blocks(seed):
  """bf16 row / column blocks sharing a large common component (near-duplicates), and a dS
  whose rows and columns nearly cancel it, as a softmax gradient does."""
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  common = jax.random.normal(k[0], (64,))
  x = (common + 0.02 * jax.random.normal(k[1], (3, 48, 64))).astype(jax.numpy.bfloat16)
  y = (common + 0.02 * jax.random.normal(k[2], (2, 40, 64))).astype(jax.numpy.bfloat16)
  ds = jax.random.normal(k[3], (3, 2, 48, 40)) * 1e-2
  ds = ds - ds.mean(axis=(1, 3), keepdims=True)  # each row of the global dS sums to ~0
  return x, y, ds


def test_centred_gradient_state_matches_float64_products():
  # grad_zeros / grad_update over every tile, then grad_finish, give dS Y and dS^T X of the
  # whole (bf16-rounded) batch; the centre is the batch's means, one vector for every tile.
  x, y, ds = _common_component_blocks(seed=0)
  centre = _traversal.gradient_centre(x.reshape(-1, 64), y.reshape(-1, 64))
  assert centre is not None and centre.x.shape == centre.y.shape == (64,)
  dx = _traversal.grad_zeros((3, 48), 64, jax.numpy.float32, centre)
  dy = _traversal.grad_zeros((2, 40), 64, jax.numpy.float32, centre)
  for i in range(3):
    for j in range(2):
      rs = jax.tree.map(lambda a, i=i: a[i], dx)
      cs = jax.tree.map(lambda a, j=j: a[j], dy)
      rs, cs = _traversal.grad_update(rs, cs, ds[i, j], x[i], y[j], None, centre)
      dx = jax.tree.map(lambda a, v, i=i: a.at[i].set(v), dx, rs)
      dy = jax.tree.map(lambda a, v, j=j: a.at[j].set(v), dy, cs)
  gx, gy = _traversal.grad_finish(dx, dy, centre)
  ds64 = np.asarray(ds, np.float64).transpose(0, 2, 1, 3).reshape(144, 80)
  x64, y64 = np.asarray(x, np.float64).reshape(144, 64), np.asarray(y, np.float64).reshape(80, 64)
  want_x, want_y = ds64 @ y64, ds64.T @ x64

  def rel(got, want):
    return np.abs(np.asarray(got, np.float64).reshape(want.shape) - want).max() / np.abs(want).max()

  # The centred bf16 products stay within 1e-2 of float64; without a centre (the same dS
  # rounded to bf16 against the raw embeddings) the common component's rounding error is
  # several times larger, so the bound tests the centring.
  assert rel(gx, want_x) < 1e-2 and rel(gy, want_y) < 1e-2, (rel(gx, want_x), rel(gy, want_y))
  plain = [
    _traversal.grad_products(ds[i, j], x[i], y[j], None, None) for i in range(3) for j in range(2)
  ]
  plain_x = np.concatenate(
    [sum(np.asarray(plain[2 * i + j][0]) for j in range(2)) for i in range(3)]
  )
  assert rel(plain_x, want_x) > 3 * rel(gx, want_x), (rel(plain_x, want_x), rel(gx, want_x))


def test_no_centre_for_float32_or_when_switched_off(monkeypatch):
  x = jax.numpy.ones((4, 8))
  assert _traversal.gradient_centre(x, x) is None
  monkeypatch.setattr(_traversal, "CENTRE_LOW_PRECISION", False)
  assert (
    _traversal.gradient_centre(x.astype(jax.numpy.bfloat16), x.astype(jax.numpy.bfloat16)) is None
  )


def test_k_major_float32_products_match_float64_and_the_blockwise_gradients(monkeypatch):
  # The transposed (K-major) operands of the float32 gradient products change their layout,
  # not their values: both products against float64, and the blockwise InfoNCE's gradients
  # with the switch on against those with it off (CPU: "auto" would leave it off).
  from mmts_jax.losses import blockwise

  k = jax.random.split(jax.random.PRNGKey(3), 3)
  ds = jax.random.normal(k[0], (96, 64))
  x, y = jax.random.normal(k[1], (96, 32)), jax.random.normal(k[2], (64, 32))
  ds64, x64, y64 = (np.asarray(a, np.float64) for a in (ds, x, y))
  monkeypatch.setattr(_traversal, "K_MAJOR_F32", True)
  assert _traversal._k_major(jnp.float32) and not _traversal._k_major(jnp.bfloat16)
  hi = jax.lax.Precision.HIGHEST
  dx, dy = jax.jit(lambda *a: _traversal.grad_products(*a, hi, None))(ds, x, y)
  chex.assert_shape((dx, dy), [(96, 32), (64, 32)])
  # float32 products of 64 / 96 terms of O(1) against float64.
  np.testing.assert_allclose(np.asarray(dx), ds64 @ y64, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dy), ds64.T @ x64, rtol=1e-5, atol=1e-4)

  def grads():
    img = jax.random.normal(k[1], (200, 32))
    txt = jax.random.normal(k[2], (200, 32))
    img, txt = (v / jnp.linalg.norm(v, axis=1, keepdims=True) for v in (img, txt))
    tau = jnp.linspace(0.03, 0.1, 200)

    def loss(i, t, tau):
      return blockwise.infonce_blockwise(i, t, tau, block_size=64, precision=hi)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(img, txt, tau)

  on = grads()
  monkeypatch.setattr(_traversal, "K_MAJOR_F32", False)
  off = grads()
  # The same sums in another layout: float32 rounding apart at most.
  for a, b in zip(on, off, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_k_major_auto_is_hopper_only(monkeypatch):
  # "auto" takes the transposed operands where they were measured (compute capability 9.x),
  # for float32 only; the CPU here, an Ampere GPU and bf16 keep the plain layout.
  class Dev:
    def __init__(self, platform, cc):
      self.platform, self.compute_capability = platform, cc

  assert _traversal.K_MAJOR_F32 == "auto" and not _traversal._k_major(jnp.float32)
  for platform, cc, want in (("gpu", "9.0", True), ("gpu", "8.0", False), ("tpu", "", False)):
    monkeypatch.setattr(jax, "devices", lambda platform=platform, cc=cc: [Dev(platform, cc)])
    assert _traversal._k_major(jnp.float32) is want, (platform, cc)
    assert not _traversal._k_major(jnp.bfloat16)
