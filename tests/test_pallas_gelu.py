"""The fused bias + tanh GELU (`pallas_gelu.bias_gelu`): its Pallas kernels through the Pallas
interpreter on CPU and its XLA path, against an independent float64 numpy reference (values,
dh and db), with blocks that divide N and F and with ragged edges; the per-program partial sums
of the bias gradient; the kernels' lowering to Triton for CUDA; and `lean_gelu="pallas"` in the
ViT and the text transformer against the plain towers (same parameters, outputs, gradients).

Tolerances: float32 1e-5 (relative and absolute); bfloat16 h 1e-2 against the reference on the
same rounded inputs (one bf16 rounding of y and dh is 2^-8 relative). db sums float32 dh over
rows, so it is held to 1e-5 of its largest entry for both dtypes. Towers (float32): outputs
1e-5 absolute, gradients 5e-5 absolute + 1e-5 relative, as in test_speed_options.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmts_jax.models import TextTransformer, ViT, build_model
from mmts_jax.models import pallas_gelu as pg
from mmts_jax.models.transformer import MlpBlock

C, A = np.sqrt(2.0 / np.pi), 0.044715


def _numpy(h, b, g):
  """float64 y, dh, db of `gelu_tanh(h + b)` with cotangent g, written from the formulas."""
  x = np.asarray(h, np.float64) + np.asarray(b, np.float64)
  t = np.tanh(C * (x + A * x**3))
  y = 0.5 * x * (1.0 + t)
  dh = np.asarray(g, np.float64) * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * C * (1 + 3 * A * x * x))
  return y, dh, dh.reshape(-1, x.shape[-1]).sum(axis=0)


@pytest.fixture
def interpret():
  """The kernels through the Pallas interpreter for one test, then the defaults again."""
  pg.set_pallas_gelu("interpret")
  yield
  pg.set_pallas_gelu(None)
  pg.set_gelu_config(None)


def _inputs(shape, dtype, seed):
  kh, kb, kg = jax.random.split(jax.random.PRNGKey(seed), 3)
  h = (3.0 * jax.random.normal(kh, shape)).astype(dtype)  # GELU's curved part and both tails
  b = jax.random.normal(kb, shape[-1:])
  return h, b, jax.random.normal(kg, shape).astype(dtype)


def _run(h, b, g):
  """y, dh, db through `jax.vjp`, jitted, and the number of Pallas calls traced."""

  def f(h, b, g):
    y, vjp = jax.vjp(pg.bias_gelu, h, b)
    return (y, *vjp(g))

  calls = str(jax.make_jaxpr(f)(h, b, g)).count("pallas_call")
  return jax.jit(f)(h, b, g), calls


def _assert_matches(got, h, b, g, tol):
  y, dh, db = got
  want = _numpy(h.astype(jnp.float32), b, g.astype(jnp.float32))
  assert (y.dtype, dh.dtype, db.dtype) == (h.dtype, h.dtype, jnp.float32)
  chex.assert_tree_all_finite(got)
  for a, w in zip((y, dh), want[:2], strict=True):
    chex.assert_trees_all_close(np.asarray(a, np.float64), w, atol=tol, rtol=tol)
  # db from float32 dh (not the rounded output): 1e-5 of its scale for every dtype.
  chex.assert_trees_all_close(
    np.asarray(db, np.float64), want[2], atol=1e-5 * float(np.max(np.abs(want[2]))), rtol=1e-5
  )


# (config, N, F): whole blocks (2 x 2 programs of 2 sub-blocks); ragged rows and columns
# (the last program's last sub-block entirely past N, the last column block 8 of 64 wide);
# a tiny input smaller than one block; the default config on a ViT-like F = 3072.
CASES = [
  (pg.GeluConfig(16, 64, 2), 64, 128),
  (pg.GeluConfig(16, 64, 3), 100, 200),
  (pg.GeluConfig(), 7, 5),
  (pg.GeluConfig(), 40, 3072),
]
IDS = ["whole", "ragged", "tiny", "f3072"]


@pytest.mark.parametrize(("dtype", "tol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize(("cfg", "n", "f"), CASES, ids=IDS)
def test_kernels_match_the_float64_reference(interpret, cfg, n, f, dtype, tol):
  pg.set_gelu_config(cfg)
  h, b, g = _inputs((n, f), dtype, seed=n + f)
  got, calls = _run(h, b, g)
  assert calls == 2, "the forward and the backward pass are the Pallas kernels"
  _assert_matches(got, h, b, g, tol)


@pytest.mark.parametrize(("dtype", "tol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_xla_path_matches_the_float64_reference(dtype, tol, request):
  # float32's 1e-5 is XLA's default code generation's; bfloat16's 1e-2 holds at any level.
  if dtype == jnp.float32 and not request.getfixturevalue("default_codegen"):
    return  # ran in a child process with XLA's default flags
  # The default on the CPU: XLA, no Pallas call; leading axes flattened to rows.
  h, b, g = _inputs((3, 33, 24), dtype, seed=5)
  got, calls = _run(h, b, g)
  assert calls == 0
  assert got[0].shape == got[1].shape == (3, 33, 24) and got[2].shape == (24,)
  _assert_matches(got, h, b, g, tol)


def test_switched_off_takes_xla_and_float64_never_takes_the_kernels(interpret, default_codegen):
  if not default_codegen:  # ran in a child process with XLA's default flags
    return
  h, b, g = _inputs((20, 16), jnp.float32, seed=6)
  pg.set_pallas_gelu(False)
  got, calls = _run(h, b, g)
  assert calls == 0
  _assert_matches(got, h, b, g, 1e-5)
  pg.set_pallas_gelu("interpret")
  assert not pg.use_pallas_gelu(jnp.float16) and pg.use_pallas_gelu(jnp.bfloat16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_bias_gradient_partials_are_per_program_row_sums(interpret, dtype):
  # 100 rows in programs of 16 x 3 = 48 rows: partials (3, F), row ranges [0, 48), [48, 96),
  # [96, 100); each is the float64 sum of dh over its rows, and db their sum.
  pg.set_gelu_config(pg.GeluConfig(16, 64, 3))
  h, b, g = _inputs((100, 72), dtype, seed=7)
  dh, parts = pg._call(pg._bwd_kernel, h, 2, [("nf", h.dtype), ("parts", jnp.float32)])(g, h, b)
  assert parts.shape == (3, 72) and parts.dtype == jnp.float32
  _, want_dh, _ = _numpy(h.astype(jnp.float32), b, g.astype(jnp.float32))
  for p, (lo, hi) in enumerate([(0, 48), (48, 96), (96, 100)]):
    want = want_dh[lo:hi].sum(axis=0)
    chex.assert_trees_all_close(
      np.asarray(parts[p], np.float64), want, atol=1e-5 * float(np.max(np.abs(want))), rtol=1e-5
    )
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  chex.assert_trees_all_close(np.asarray(dh, np.float64), want_dh, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(("n", "f"), [(512, 1024), (300, 200)], ids=["whole", "ragged"])
def test_kernels_lower_to_triton_for_cuda(dtype, n, f):
  # No GPU here: lowering for CUDA from the CPU runs Pallas's Triton lowering of every primitive
  # in the kernels (tanh, the masked loads and stores, the loop), so one it cannot lower fails.
  h, b = jnp.ones((n, f), dtype), jnp.zeros((f,))
  fwd = lambda h: pg._pallas_forward(h, b)
  bwd = lambda h: pg._pallas_backward(h, h, b)
  for fn in (fwd, bwd):
    text = jax.jit(fn).trace(h).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
    # The GPU kernels' sigmoid: one ex2.approx and one rcp.approx (fast_math, the default).
    assert text.count("ex2.approx.ftz.f32") == text.count("rcp.approx.ftz.f32") == 1


def test_exact_math_switch_lowers_without_the_approximate_instructions():
  h, b = jnp.ones((512, 1024), jnp.bfloat16), jnp.zeros((1024,))
  pg.set_gelu_config(pg.GeluConfig(fast_math=False))
  try:
    text = (
      jax.jit(lambda h: pg._pallas_backward(h, h, b))
      .trace(h)
      .lower(lowering_platforms=("cuda",))
      .as_text()
    )
  finally:
    pg.set_gelu_config(None)
  assert "approx" not in text and text.count("__gpu$xla.gpu.triton") == 1


@pytest.mark.parametrize("x", [-60.0, -12.0, -3.0, -1e-3, 0.0, 1e-3, 0.7, 3.0, 12.0, 60.0])
def test_sigmoid_form_equals_the_tanh_gelu_in_float64(x):
  # The kernels' identity gelu(x) = x sigmoid(2u) and its slope, with the exact exp2 (the form
  # the interpreter runs; the GPU replaces exp2 and 1/x by ex2.approx and rcp.approx), against
  # the tanh form in float64, including the saturated tails where 2^z overflows to inf.
  x32 = jnp.float32(x)
  s = float(pg._sigmoid_2u(x32, False))
  u = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
  t = math.tanh(u)
  gelu = 0.5 * x * (1 + t)
  slope = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * math.sqrt(2 / math.pi) * (
    1 + 3 * 0.044715 * x * x
  )
  got_slope = s + 2 * math.sqrt(2 / math.pi) * x * s * (1 - s) * (1 + 3 * 0.044715 * x * x)
  assert math.isfinite(s)
  assert abs(x * s - gelu) <= 1e-6 * max(1.0, abs(gelu))
  assert abs(got_slope - slope) <= 1e-6 * max(1.0, abs(slope))


def test_bad_inputs_are_value_errors_naming_them():
  with pytest.raises(ValueError, match=r"b must be a floating \(F,\) = \(4,\) vector.*\(5,\)"):
    pg.bias_gelu(jnp.ones((2, 4)), jnp.ones((5,)))
  with pytest.raises(ValueError, match="h must be a floating array.*int32"):
    pg.bias_gelu(jnp.ones((2, 4), jnp.int32), jnp.ones((4,)))
  with pytest.raises(ValueError, match="got 'always'"):
    pg.set_pallas_gelu("always")
  with pytest.raises(ValueError, match="bn must be a power of two >= 16, got 96"):
    pg.set_gelu_config(pg.GeluConfig(bn=96))
  with pytest.raises(ValueError, match="lean_gelu must be False, True or 'pallas', got 'triton'"):
    MlpBlock(8, lean_gelu="triton").init(jax.random.PRNGKey(0), jnp.ones((2, 4)))
  cfg = ml_collections.ConfigDict(
    {
      "embed_dim": 8,
      "image": {"name": "vit", "variant": "mu/8", "lean_gelu": "fused"},
      "text": {"name": "features", "hidden_dims": (16,)},
    }
  )
  with pytest.raises(ValueError, match="got 'fused'"):
    build_model(cfg)
  cfg.image.lean_gelu = "pallas"
  assert build_model(cfg).image_tower.lean_gelu == "pallas"


IMAGE = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3), jnp.float32)


def _random_params(model, x):
  """Parameters of `model`'s tree with random values (the biases too, which init sets to 0)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(3)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)


def _run_tower(model, params, x):
  """Output and parameter gradients of `sum(sin(model(x)))`, one compile; Pallas calls traced."""
  f = jax.value_and_grad(lambda p: (jnp.sum(jnp.sin(out := model.apply(p, x))), out), has_aux=True)
  calls = str(jax.make_jaxpr(f)(params)).count("pallas_call")
  (_, out), grads = jax.jit(f)(params)
  return out, grads, calls


def test_mlp_block_with_pallas_gelu_has_the_dense_parameters_and_values(interpret):
  # Same names, shapes, dtypes and initial values as nn.Dense's fc1 / fc2 (the towers below
  # compare their whole trees' shapes; the values come from these initialisers).
  x = jax.random.normal(jax.random.PRNGKey(2), (3, 5, 8))
  plain, fast = MlpBlock(24), MlpBlock(24, lean_gelu="pallas")
  params = plain.init(jax.random.PRNGKey(0), x)
  chex.assert_trees_all_equal(params, fast.init(jax.random.PRNGKey(0), x))
  chex.assert_trees_all_close(fast.apply(params, x), plain.apply(params, x), atol=1e-5, rtol=0)


def _same_tower(plain, fast, x):
  """`fast` has `plain`'s parameter tree (names, shapes, dtypes), runs the Pallas kernels, and
  gives `plain`'s outputs and gradients on the same (random) parameters."""
  key = jax.random.PRNGKey(0)
  chex.assert_trees_all_equal_shapes_and_dtypes(
    jax.eval_shape(plain.init, key, x), jax.eval_shape(fast.init, key, x)
  )
  params = _random_params(plain, x)
  out, grads, calls = _run_tower(fast, params, x)
  want_out, want_grads, plain_calls = _run_tower(plain, params, x)
  assert calls > 0 and plain_calls == 0
  chex.assert_trees_all_close(out, want_out, atol=1e-5, rtol=0)
  chex.assert_trees_all_close(grads, want_grads, atol=5e-5, rtol=1e-5)


def test_vit_with_pallas_gelu_keeps_outputs_and_gradients(interpret):
  # mu/8 on 16 x 16: 5 tokens x 2 images = 10 rows of mlp_dim 64: one ragged row block.
  plain = ViT.from_variant("mu/8")
  _same_tower(plain, plain.clone(lean_gelu="pallas"), IMAGE)


def test_text_transformer_with_pallas_gelu_keeps_outputs_and_gradients(interpret):
  ids = jnp.array([[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 0, 0, 0, 0], [0] * 7], jnp.int32)
  plain = TextTransformer(vocab_size=50, max_len=7, width=16, depth=1, num_heads=2, mlp_dim=48)
  # With the 2-D residual stream (flat_residual: same parameters): h arrives as (B L, F).
  _same_tower(plain, plain.clone(lean_gelu="pallas", flat_residual=True), ids)
