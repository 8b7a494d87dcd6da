"""Blockwise InfoNCE / max-margin against the official reference and the dense losses.

Tolerances: float32 relative 1e-4 (gradients relative to their largest entry), float64 1e-9.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmts_jax import losses
from mmts_jax.losses import blockwise, dense

HIGHEST = jax.lax.Precision.HIGHEST


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)


def _unit(key, shape):
  x = jax.random.normal(key, shape)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _inputs(b, d, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  return _unit(k1, (b, d)), _unit(k2, (b, d)), 0.03 + 0.1 * jax.random.uniform(k3, (b,))


# The suite runs on 2 CPU cores and XLA's LLVM backend dominates its time: compile once per
# signature, at LLVM -O0 (XLA's own HLO passes still run; only the machine code is less tuned).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compiled(f):
  """`jax.jit(f)`, compiled per input signature with `FAST_COMPILE`."""
  jf = jax.jit(f)
  cache = {}

  def call(*args):
    key = tuple((np.shape(a), str(jnp.result_type(a))) for a in jax.tree.leaves(args))
    if key not in cache:
      cache[key] = jf.lower(*args).compile(compiler_options=FAST_COMPILE)
    return cache[key](*args)

  return call


@functools.cache
def _vg_cached(fn, argnums, kw):
  kw = dict(kw)
  return compiled(jax.value_and_grad(lambda x, y, t: fn(x, y, t, **kw), argnums=argnums))


def _vg(fn, argnums=(0, 1, 2), **kw):
  """Compiled value_and_grad of `fn(x, y, t, **kw)`, one compile per signature."""
  return _vg_cached(fn, argnums, tuple(sorted(kw.items())))


@pytest.fixture(scope="module")
def cases(shared_dir):
  data = np.load(shared_dir / "reference" / "mmts_official_cases.npz")
  ids = sorted({k.split("/")[0] for k in data.files})
  return [{k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(i + "/")} for i in ids]


def _check_case(case, dtype, tol, block):
  image = jnp.asarray(case["image"], dtype)
  text = jnp.asarray(case["text"], dtype)
  b = image.shape[0]
  for name, fn, value in (
    ("mmts_infonce", losses.infonce, case["tau"]),
    ("infonce_fixed", losses.infonce, np.full(b, 0.07)),
    ("mmts_max_margin", losses.max_margin, case["tau"]),
    ("max_margin_fixed", losses.max_margin, np.full(b, 0.2)),
  ):
    f = _vg(fn, (0, 1), impl="blockwise", block_size=block)
    v, (gx, gy) = f(image, text, jnp.asarray(value, dtype))
    assert v.dtype == dtype
    assert _rel(v, case[name]) <= tol, (name, float(v), float(case[name]))
    assert _rel(gx, case[name + "_grad_image"]) <= tol, name
    assert _rel(gy, case[name + "_grad_text"]) <= tol, name


def test_official_cases_float32_with_ragged_tiles(cases):
  # (5, 3) divides none of the batch sizes (8 ... 128): every case has a masked last tile.
  assert len(cases) == 5 and all(c["image"].shape[0] % 5 and c["image"].shape[0] % 3 for c in cases)
  for case in cases:
    _check_case(case, jnp.float32, 1e-4, (5, 3))


def test_official_cases_float64(cases):
  with jax.enable_x64(True):
    for case in (cases[0], cases[2]):
      _check_case(case, jnp.float64, 1e-9, 7)


@pytest.mark.parametrize("b,block", [(1, 4), (2, 1), (16, (8, 4)), (29, (8, 5))])
def test_blockwise_equals_dense_values_and_all_gradients(b, block):
  x, y, t = _inputs(b, 12, seed=b)
  y = 2.0 * y  # max-margin normalises; infonce must work on any scale too
  for bw, ref in (
    (losses.infonce_blockwise, dense.infonce_dense),
    (losses.max_margin_blockwise, dense.max_margin_dense),
  ):
    if b < 2 and ref is dense.max_margin_dense:
      continue
    v, g = _vg(bw, block_size=block, precision=HIGHEST)(x, y, t)
    v0, g0 = _vg(ref, precision=HIGHEST)(x, y, t)
    assert _rel(v, v0) <= 1e-5, (bw.__name__, float(v), float(v0))
    for got, want in zip(g, g0, strict=True):  # image, text and temperature gradients
      # + 1e-6 absolute: at B = 1 every gradient is exactly 0 in the dense loss.
      err = np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)))
      assert err <= 1e-4 * np.max(np.abs(want)) + 1e-6, bw.__name__


def test_gradient_with_respect_to_embeddings_only_skips_the_temperature_term():
  # Not differentiating tau takes the symbolic-zero path of the custom VJP; same gradients.
  x, y, t = _inputs(11, 8, seed=3)
  v, g = _vg(losses.infonce_blockwise, (0, 1), block_size=3, precision=HIGHEST)(x, y, t)
  v0, g0 = _vg(dense.infonce_dense, (0, 1), precision=HIGHEST)(x, y, t)
  assert _rel(v, v0) <= 1e-5
  chex.assert_trees_all_close(g, g0, rtol=1e-4, atol=1e-6)


def test_small_temperature_is_stable():
  # logits up to 1/0.005 = 200: an online logsumexp without the running max would overflow.
  x, y, _ = _inputs(10, 16, seed=5)
  # Near-duplicates: every similarity is close to 1, so logits near 200 differ by O(1).
  x = _unit(jax.random.PRNGKey(0), (1, 16)) + 0.05 * x
  x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
  y = x + 0.02 * y
  y = y / jnp.linalg.norm(y, axis=1, keepdims=True)
  v, g = _vg(losses.infonce_blockwise, block_size=4)(x, y, jnp.full((10,), 0.005))
  v0, _ = _vg(dense.infonce_dense)(x, y, jnp.full((10,), 0.005))
  assert float(v0) > 0.1  # far from the trivial 0 of well-separated pairs
  assert np.isfinite(float(v)) and _rel(v, v0) <= 1e-4
  chex.assert_tree_all_finite(g)


def test_bf16_embeddings_within_1e2_of_float32():
  x, y, t = _inputs(40, 32, seed=6)
  v, (gx, gy) = _vg(losses.infonce_blockwise, (0, 1), block_size=16)(
    x.astype(jnp.bfloat16), y.astype(jnp.bfloat16), t
  )
  v0, (gx0, _) = _vg(dense.infonce_dense, (0, 1))(x, y, t)
  assert v.dtype == jnp.float32 and gx.dtype == gy.dtype == jnp.bfloat16
  assert _rel(v, v0) <= 1e-2
  assert _rel(gx, gx0) <= 3e-2


def test_public_dispatch():
  x, y, t = _inputs(9, 8, seed=7)
  ref = dense.infonce_dense(x, y, t)
  # auto -> dense; auto with a block -> blockwise; blockwise with the default tile.
  for kw in ({}, {"block_size": (4, 2)}, {"impl": "blockwise"}):
    got = compiled(lambda x, y, t, kw=kw: losses.infonce(x, y, t, **kw))(x, y, t)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)
  ref = dense.max_margin_dense(x, y, t)
  got = compiled(lambda x, y, t: losses.max_margin(x, y, t, impl="blockwise", block_size=4))
  np.testing.assert_allclose(float(got(x, y, t)), float(ref), rtol=1e-5)


def test_vmap_over_batches():
  keys = jax.random.split(jax.random.PRNGKey(8), 2)
  xs = jax.vmap(lambda k: _unit(k, (7, 8)))(keys)
  taus = jnp.linspace(0.05, 0.2, 14).reshape(2, 7)
  f = jax.vmap(lambda x, y, t: losses.infonce(x, y, t, impl="blockwise", block_size=3))
  chex.assert_trees_all_close(
    compiled(f)(xs, xs[::-1], taus),
    jnp.stack([dense.infonce_dense(xs[i], xs[1 - i], taus[i]) for i in range(2)]),
    rtol=1e-5,
  )


@pytest.mark.parametrize("fn", [losses.infonce, losses.max_margin])
def test_bad_arguments_are_rejected_before_compiling(fn):
  x, y, t = _inputs(4, 8)
  with pytest.raises(ValueError, match="impl must be one of"):
    fn(x, y, t, impl="flash")
  with pytest.raises(ValueError, match="sharded must be one of"):
    fn(x, y, t, sharded="tree")
  with pytest.raises(ValueError, match=r"block_size must be >= 1, got 0"):
    fn(x, y, t, impl="blockwise", block_size=0)
  with pytest.raises(TypeError, match=r"block_size must be an int.*2\.5"):
    fn(x, y, t, impl="blockwise", block_size=2.5)
  with pytest.raises(ValueError, match=r"\(rows, cols\), got \(1, 2, 3\)"):
    fn(x, y, t, impl="blockwise", block_size=(1, 2, 3))
  with pytest.raises(ValueError, match="temperature|margin"):
    fn(x, y, -t, impl="blockwise")


def _temp_bytes(fn, b, d=16):
  x = jax.ShapeDtypeStruct((b, d), jnp.float32)
  t = jax.ShapeDtypeStruct((b,), jnp.float32)
  lowered = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(x, x, t)
  return lowered.compile(compiler_options=FAST_COMPILE).memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name", ["infonce", "max_margin", "sigmoid"])
def test_compiled_temporary_memory_grows_linearly_with_the_batch(name):
  fn = losses.get(name, impl="blockwise", block_size=(64, 64))
  kw = {"bias": -10.0} if name == "sigmoid" else {}
  temp = [_temp_bytes(lambda x, y, t: fn(x, y, t, **kw), b) for b in (1024, 8192)]
  # 8x the batch: linear growth is 8x, quadratic 64x; allow 2x slack over linear (XLA's buffer
  # assignment is not exactly proportional), and the temporaries must stay a small fraction of
  # one (B, B) float32 array.
  assert temp[1] <= 16 * temp[0], temp
  assert temp[1] < 8192 * 8192 * 4 / 16, temp


def test_the_memory_measure_sees_the_dense_quadratic_growth():
  d1, d2 = (
    _temp_bytes(lambda x, y, t: losses.infonce(x, y, t, impl="dense"), b) for b in (1024, 8192)
  )
  assert d2 >= 48 * d1 and d2 >= 8192 * 8192 * 4


def test_fused_gpu_tiles_compute_the_same_maths():
  # The Pallas kernels that run on GPUs, through the Pallas interpreter on CPU: one padded tile
  # row and column each (B = 130, tiles of 128), f32 and bf16, all gradients.
  x, y, t = _inputs(130, 64, seed=9)
  v0, g0 = _vg(dense.infonce_dense, precision=HIGHEST)(x, y, t)
  # By default only where measured faster (GPUs, bf16): on CPU the XLA tiles.
  assert not blockwise.use_fused_tiles(blockwise.Blocks(128, 128), 64, jnp.bfloat16)
  blockwise.set_fused_tiles("interpret")
  try:
    assert blockwise.use_fused_tiles(blockwise.Blocks(128, 128), 64, jnp.float32)
    v, g = _vg(losses.infonce_blockwise, block_size=128, precision=HIGHEST)(x, y, t)
    vb, gb = _vg(losses.infonce_blockwise, (0, 1), block_size=128)(
      x.astype(jnp.bfloat16), y.astype(jnp.bfloat16), t
    )
  finally:
    blockwise.set_fused_tiles(None)
  assert _rel(v, v0) <= 1e-5
  for got, want in zip(g, g0, strict=True):
    assert _rel(got, want) <= 1e-4
  assert _rel(vb, v0) <= 1e-2 and _rel(gb[0], g0[0]) <= 3e-2
  with pytest.raises(ValueError, match="mode must be"):
    blockwise.set_fused_tiles("yes")


def _scan_lengths(jaxpr) -> set:
  """The lengths of every `scan` in a traced function, nested ones included."""
  found = set()

  def walk(j):
    for eq in j.eqns:
      if eq.primitive.name == "scan":
        found.add(eq.params["length"])
      for v in eq.params.values():
        for sub in v if isinstance(v, (list, tuple)) else [v]:
          inner = getattr(sub, "jaxpr", None)
          if inner is not None:
            walk(getattr(inner, "jaxpr", inner))

  walk(jaxpr.jaxpr)
  return found


def test_default_tile_is_clipped_to_the_batch_in_whole_sub_tiles():
  assert blockwise.resolve_blocks(None, 5000, 5000) == (5120, 5120)
  assert blockwise.resolve_blocks(None, 100, 100) == (100, 100)
  # Taller tiles only from LARGE_BATCH rows per device up (the memory they cost below it).
  assert blockwise.resolve_blocks(None, 131071, 131071) == (8192, 8192)
  assert blockwise.resolve_blocks(None, 131072, 131072) == (16384, 8192)
  assert blockwise.resolve_blocks((8192, 300), 1000, 1000) == (1024, 300)
  # Traced (not run) at B = 131,072: InfoNCE sweeps 8 row blocks of 16,384, the sigmoid, which
  # keeps the square tile, 16 of 8,192.
  x = jax.ShapeDtypeStruct((131072, 8), jnp.float32)
  t = jax.ShapeDtypeStruct((131072,), jnp.float32)
  nce = jax.make_jaxpr(lambda x, t: losses.infonce(x, x, t, impl="blockwise"))(x, t)
  sig = jax.make_jaxpr(lambda x, t: losses.sigmoid(x, x, t, bias=-10.0, impl="blockwise"))(x, t)
  assert _scan_lengths(nce) == {8, 16}  # rows outer, columns (8,192) inner
  assert _scan_lengths(sig) == {16}
  # B = 200 in one 256 x 256 tile with 56 masked rows and columns.
  x, y, t = _inputs(200, 8, seed=10)
  got = compiled(lambda x, y, t: losses.infonce(x, y, t, impl="blockwise"))(x, y, t)
  np.testing.assert_allclose(float(got), float(dense.infonce_dense(x, y, t)), rtol=1e-5)
