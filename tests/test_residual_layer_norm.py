"""`residual_layer_norm` (x and LN(x), whose backward adds the skip connection's cotangent g_x
to the layer norm's dx inside the Pallas backward kernel) and `lean_layer_norm="pallas_res"`,
through the Pallas interpreter on CPU: values and every gradient (g_x and g_y both nonzero)
against an independent float64 numpy reference, the kernel path against the XLA path, the
models against `lean_layer_norm="pallas"` (same parameter tree), the backward without the
separate add, the rows sharded over the 8 simulated devices, the Triton lowering for CUDA, and
the bad option value.

Tolerances: float32 inputs, the output within 1e-5 absolute and every gradient within 1e-5 of
its largest entry (float32 rounding of sums over up to 768 features); bfloat16 inputs against
the reference on the same rounded inputs and cotangents, y and dx (stored in bfloat16: 2^-8
relative rounding) within 1e-2 of their largest entry, dscale and dbias (float32 sums) within
1e-5. Kernel vs XLA path (float32): 1e-5 of the largest entry (two summation orders).
Models: as `test_pallas_layer_norm` (outputs 1e-5 absolute, gradients 5e-5 absolute + 1e-5
relative).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hlo_collectives import collectives
from jax.extend import core as jcore
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from model_grads import FAST_COMPILE, out_and_grads

from mmts_jax.models import TextTransformer, ViT, build_tower
from mmts_jax.models import pallas_layer_norm as pln
from mmts_jax.models import row_partitioning as rp
from mmts_jax.models.lean_layer_norm import check_lean, make_layer_norm
from mmts_jax.models.residual_layer_norm import residual_layer_norm
from mmts_jax.models.transformer import EncoderBlock

EPS = 1e-6


@pytest.fixture
def interpret():
  """The Pallas layer norm through the interpreter for one test, then the defaults again."""
  pln.set_pallas_layer_norm("interpret")
  yield
  pln.set_pallas_layer_norm(None)
  pln.set_layer_norm_config(None)


def _inputs(shape, dtype, seed):
  """x (around 1, spread 2, in `dtype`), scale, bias, and the cotangents w_y of y and w_x of
  the x output, representable in `dtype` (the cotangents reaching the kernel are in it)."""
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  c = shape[-1]
  x = (1.0 + 2.0 * jax.random.normal(k[0], shape)).astype(dtype)
  scale = 1.0 + 0.5 * jax.random.normal(k[1], (c,))
  bias = 0.5 * jax.random.normal(k[2], (c,))
  rounded = lambda k: jax.random.normal(k, shape).astype(dtype).astype(jnp.float32)
  return x, scale, bias, rounded(k[3]), rounded(k[4])


def reference(x, scale, bias, w_y, w_x):
  """float64 numpy: y and the gradients of `sum(w_y * y) + sum(w_x * x)` w.r.t. x, scale,
  bias, from the formulas (dx = w_x + the layer norm's backward of w_y)."""
  x, s, b, g, gx = (
    np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (x, scale, bias, w_y, w_x)
  )
  c = x.shape[-1]
  x2, g2 = x.reshape(-1, c), g.reshape(-1, c)
  sigma = np.sqrt(x2.var(axis=1, keepdims=True) + EPS)
  xhat = (x2 - x2.mean(axis=1, keepdims=True)) / sigma
  gh = g2 * s
  dx = gh - gh.mean(axis=1, keepdims=True) - xhat * (gh * xhat).mean(axis=1, keepdims=True)
  dx = gx + (dx / sigma).reshape(x.shape)
  y = (xhat * s + b).reshape(x.shape)
  return y, dx, (g2 * xhat).sum(axis=0), g2.sum(axis=0)


def _value_and_grads(x, scale, bias, w_y, w_x, dtype, kernel):
  """(x output, y), the gradients (x, scale, bias) of `sum(w_y * y) + sum(w_x * x_out)`,
  jitted; and the number of `pallas_call`s in the traced gradient."""

  def f(x, scale, bias):
    x_out, y = residual_layer_norm(x, scale, bias, EPS, dtype, kernel)
    loss = jnp.sum(w_y * y.astype(jnp.float32)) + jnp.sum(w_x * x_out.astype(jnp.float32))
    return loss, (x_out, y)

  vg = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)
  calls = str(jax.make_jaxpr(vg)(x, scale, bias)).count("pallas_call")
  (_, outs), grads = jax.jit(vg)(x, scale, bias)
  return outs, grads, calls


def _assert_close(got, want, tols):
  chex.assert_tree_all_finite(got)
  for got_i, want_i, tol in zip(got, want, tols, strict=True):
    chex.assert_trees_all_close(
      np.asarray(jnp.asarray(got_i, jnp.float32), np.float64),
      np.asarray(want_i, np.float64),
      rtol=0.0,
      atol=tol * float(np.max(np.abs(want_i))),
    )


# (3, 13, C): 39 rows, not a multiple of the 16-row forward blocks nor of the 8-row backward
# blocks (2 programs of 3 blocks: the last block of the second has no row at all).
@pytest.mark.parametrize("c", [768])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_residual_layer_norm_matches_the_float64_reference(interpret, c, dtype):
  pln.set_layer_norm_config(pln.LayerNormConfig(rows_fwd=16, rows_bwd=8, programs_bwd=2))
  x, scale, bias, w_y, w_x = _inputs((3, 13, c), dtype, seed=c)
  (x_out, y), (dx, ds, db), calls = _value_and_grads(x, scale, bias, w_y, w_x, dtype, "pallas")
  assert calls == 2, "the forward and the backward kernel, and no other"
  chex.assert_trees_all_equal(x_out, x)
  assert y.dtype == dtype and dx.dtype == dtype and ds.dtype == jnp.float32
  tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
  want = reference(x, scale, bias, w_y, w_x)
  _assert_close((y, dx, ds, db), want, (tol, tol, 1e-5, 1e-5))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_the_kernel_path_equals_the_xla_path(interpret, dtype):
  # 5 rows (fewer than one 16-row block) of 40 features.
  x, scale, bias, w_y, w_x = _inputs((5, 40), dtype, seed=7)
  kernel = _value_and_grads(x, scale, bias, w_y, w_x, dtype, "pallas")
  xla = _value_and_grads(x, scale, bias, w_y, w_x, dtype, "xla")
  assert kernel[2] == 2 and xla[2] == 0
  # bfloat16 y and dx may round to neighbouring values from the two summation orders.
  tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
  want = (*xla[0], *xla[1])
  _assert_close((*kernel[0], *kernel[1]), want, (0.0, tol, tol, 1e-5, 1e-5))


def test_off_gpus_pallas_res_is_the_xla_form():
  # CPU, default mode: no Pallas call; the same values as kernel="xla".
  x, scale, bias, w_y, w_x = _inputs((3, 13, 48), jnp.float32, seed=2)
  got = _value_and_grads(x, scale, bias, w_y, w_x, jnp.float32, "pallas")
  assert got[2] == 0
  chex.assert_trees_all_equal(got, _value_and_grads(x, scale, bias, w_y, w_x, jnp.float32, "xla"))


def _stream_adds(jaxpr, shapes):
  """The `add_any`s (the sum of a value's cotangents where the value fans out) whose result
  has one of `shapes`, outside the kernels, in `jaxpr` and its sub-jaxprs."""
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("pallas_call", "custom_partitioning"):
      continue
    if eqn.primitive.name == "add_any" and tuple(eqn.outvars[0].aval.shape) in shapes:
      n += 1
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        if isinstance(sub, (jcore.ClosedJaxpr, jcore.Jaxpr)):
          n += _stream_adds(getattr(sub, "jaxpr", sub), shapes)
  return n


IMAGE = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3), jnp.float32)


@pytest.mark.parametrize("flat", [False, True], ids=["3d", "flat"])
def test_the_backward_has_no_separate_add_of_the_skip_cotangent(interpret, flat):
  # ViT mu/8 (2 blocks, width 32, 4 tokens + the class token) with the fused q/k/v product (the
  # normalised y has one use): with "pallas" each block's stream fans out to its layer norm
  # and its residual sum twice, and XLA adds the two cotangents (2 adds per block); with
  # "pallas_res" the kernel does.
  stream = {(2, 5, 32), (10, 32)}
  adds, calls = {}, {}
  for lean in ("pallas", "pallas_res"):
    model = ViT.from_variant("mu/8", lean_layer_norm=lean, flat_residual=flat, fused_qkv=True)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), IMAGE)
    grad = jax.make_jaxpr(jax.grad(lambda p, m=model: jnp.sum(m.apply(p, IMAGE))))(params)
    adds[lean] = _stream_adds(grad.jaxpr, stream)
    calls[lean] = str(grad).count("pallas_call")
  assert adds == {"pallas": 4, "pallas_res": 0}
  assert calls == {"pallas": 12, "pallas_res": 12}  # 6 layer norms, forward + backward


def _init(model, x):
  """Parameters through the XLA layer norm (`lean_layer_norm=True`, the same tree: the
  interpreted kernels are slow to compile)."""
  return jax.jit(model.clone(lean_layer_norm=True).init)(jax.random.PRNGKey(0), x)


def _same_as_pallas(make, x, params=None):
  """`make(lean)` built with "pallas_res" and with "pallas": the same parameter tree (names,
  shapes, dtypes), outputs and gradients."""
  fast, plain = make("pallas_res"), make("pallas")
  params = _init(plain, x) if params is None else params
  shapes = lambda m: jax.eval_shape(m.init, jax.random.PRNGKey(0), x)
  chex.assert_trees_all_equal_shapes_and_dtypes(shapes(fast), shapes(plain), params)
  out, grads = out_and_grads(fast, params, x)
  plain_out, plain_grads = out_and_grads(plain, params, x)
  chex.assert_trees_all_close(out, plain_out, atol=1e-5, rtol=0)
  chex.assert_trees_all_close(grads, plain_grads, atol=5e-5, rtol=1e-5)


def _vit(**kw):
  """ViT mu/8 with one block (width 32, 4 patches + the class token): ln_pre, the block's
  two layer norms, ln_final."""
  return ViT.from_variant("mu/8", **kw).clone(depth=1)


@pytest.fixture(scope="module")
def vit_params():
  return _init(_vit(), IMAGE)


@pytest.mark.parametrize("flat", [False, True], ids=["3d", "flat"])
def test_vit_with_pallas_res_matches_pallas(interpret, vit_params, flat):
  _same_as_pallas(lambda lean: _vit(lean_layer_norm=lean, flat_residual=flat), IMAGE, vit_params)


def test_text_tower_with_pallas_res_matches_pallas(interpret):
  ids = jnp.array([[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 0, 0, 0, 0]], jnp.int32)
  kw = dict(vocab_size=50, max_len=7, width=16, depth=1, num_heads=2, mlp_dim=32)
  _same_as_pallas(
    lambda lean: TextTransformer(**kw, lean_layer_norm=lean, flat_residual=True, even_length=True),
    ids,
  )


def _mesh(shape, names):
  return Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), names)


def _vjp(x, s, b, g_y, g_x):
  outs, vjp = jax.vjp(
    lambda x, s, b: residual_layer_norm(x, s, b, EPS, jnp.float32, "pallas"), x, s, b
  )
  return (outs[1], *vjp((g_x, g_y)))


@pytest.mark.parametrize(
  ("shape", "names", "spec"),
  [((8,), ("data",), P("data", None)), ((4, 2), ("a", "b"), P(("a", "b"), None))],
  ids=["1d", "2d-both"],
)
def test_rows_stay_sharded_over_8_devices(interpret, shape, names, spec):
  # 64 rows of 48 features, the rows and both cotangents sharded: 8 rows per device.
  pln.set_layer_norm_config(pln.LayerNormConfig(rows_fwd=4, rows_bwd=2, programs_bwd=2))
  x, s, b, g_y, g_x = _inputs((64, 48), jnp.float32, seed=3)
  mesh = _mesh(shape, names)
  rows, feat = NamedSharding(mesh, spec), NamedSharding(mesh, P())
  fn = jax.jit(_vjp, in_shardings=(rows, feat, feat, rows, rows))
  compiled = fn.lower(x, s, b, g_y, g_x).compile()
  got = compiled(x, s, b, g_y, g_x)
  _assert_close(got, reference(x, s, b, g_y, g_x), (1e-5,) * 4)
  found = collectives(compiled.as_text())
  # No (N, C) activation moves: the only collectives are the all-reduces of dscale, dbias.
  assert set(found) == {"all-reduce"} and set(found["all-reduce"]) == {"f32[48]"}, found
  assert got[1].sharding.spec[0] == spec[0], "dx keeps the rows' sharding"
  chex.assert_trees_all_close(got, jax.jit(_vjp)(x, s, b, g_y, g_x), atol=1e-5, rtol=0)


def test_vit_sharded_over_8_devices_matches_one_device(interpret, vit_params):
  model, params = _vit(lean_layer_norm="pallas_res", flat_residual=True), vit_params
  image = jax.random.normal(jax.random.PRNGKey(1), (8, 16, 16, 3), jnp.float32)
  f = jax.value_and_grad(lambda p, x: jnp.sum(jnp.sin(model.apply(p, x))))
  mesh = _mesh((8,), ("data",))
  shardings = (NamedSharding(mesh, P()), NamedSharding(mesh, P("data")))
  compiled = jax.jit(f, in_shardings=shardings).lower(params, image)
  compiled = compiled.compile(compiler_options=FAST_COMPILE)
  assert "all-gather" not in collectives(compiled.as_text()), "the batch was gathered"
  loss, grads = compiled(params, image)
  want_loss, want_grads = jax.jit(f).lower(params, image).compile(FAST_COMPILE)(params, image)
  chex.assert_trees_all_close(loss, want_loss, atol=1e-5, rtol=0)
  # Gradients up to ~300 summed over 8 devices' partials in another order: 2e-4 absolute.
  chex.assert_trees_all_close(grads, want_grads, atol=2e-4, rtol=1e-5)


def test_the_residual_backward_lowers_to_triton_for_cuda():
  # No GPU here: lowering for CUDA from the CPU runs Pallas's Triton lowering of the kernel
  # with its extra operand, alone and as each device's body (its rows, then the psum).
  n, c = 256, 768
  x, v, s = jnp.ones((n, c), jnp.bfloat16), jnp.ones((n,)), jnp.ones((c,))
  alone = jax.jit(lambda x: pln.layer_norm_bwd(x, v, v, s, x, residual=x))
  text = alone.trace(x).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 1
  results = (rp.ROWS, rp.SUM, rp.SUM)
  body = rp.shard_body(pln._bwd_local, (False, pln.LayerNormConfig()), results, ("data",))
  rows = P("data", None)
  mapped = jax.shard_map(
    body,
    mesh=_mesh((8,), ("data",)),
    in_specs=(rows, P("data"), P("data"), P(), rows, rows),
    out_specs=(rows, P(), P()),
    check_vma=False,
  )
  text = jax.jit(mapped).trace(x, v, v, s, x, x).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 1 and text.count("all_reduce") == 2


def test_bad_values_raise_value_errors_naming_them():
  assert check_lean("pallas_res") == "pallas_res"
  with pytest.raises(ValueError, match="'pallas_resid'"):
    check_lean("pallas_resid")
  with pytest.raises(ValueError, match="'pallas-res'"):
    make_layer_norm("pallas-res", jnp.float32, jnp.float32, "ln")
  with pytest.raises(ValueError, match="'res'"):
    build_tower({"name": "vit", "variant": "mu/8", "lean_layer_norm": "res"}, "image", None)
  with pytest.raises(ValueError, match="'Pallas_res'"):
    block = EncoderBlock(num_heads=2, mlp_dim=8, lean_layer_norm="Pallas_res")
    jax.eval_shape(block.init, jax.random.PRNGKey(0), jnp.ones((1, 2, 4)))
  with pytest.raises(ValueError, match="'cuda'"):
    residual_layer_norm(jnp.ones((2, 8)), jnp.ones(8), jnp.zeros(8), EPS, jnp.float32, "cuda")
  with pytest.raises(ValueError, match=r"residual must be \(2, 8\), got \(2, 4\)"):
    v = jnp.ones(2)
    pln.layer_norm_bwd(jnp.ones((2, 8)), v, v, jnp.ones(8), jnp.ones((2, 8)), jnp.ones((2, 4)))


def test_build_tower_passes_pallas_res_to_both_towers():
  vit, _ = build_tower(
    {"name": "vit", "variant": "mu/8", "lean_layer_norm": "pallas_res"}, "image", jnp.float32
  )
  text_cfg = dict(name="transformer", width=16, depth=1, num_heads=2, mlp_dim=32)
  text, _ = build_tower({**text_cfg, "lean_layer_norm": "pallas_res"}, "text", jnp.float32)
  assert vit.lean_layer_norm == "pallas_res" and text.lean_layer_norm == "pallas_res"
