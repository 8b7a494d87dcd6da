"""The Pallas layer norm and bias + GELU under a multi-device `jit` with the rows sharded
(`row_partitioning`), through the Pallas interpreter on the 8-device simulated CPU mesh.

Each case jits y and the vjp (dx, dscale, dbias / dh, db) with the rows (and the cotangent)
sharded over a 1-D mesh of 8, over both axes of a (4, 2) mesh, or over one of its axes; the
values are compared with an independent float64 numpy reference, and the compiled HLO is read:
no all-gather, all-to-all or collective-permute (the (N, C) activations stay where they are),
and the only all-reduces are of (C,) / (F,) vectors (the per-feature sums); with the features
sharded too, the only all-gathers are of the features (each device keeps its rows). A control
shows the same check fails for the bare Pallas call (without the rule XLA gathers the rows).
Rows that do not split evenly fall back to replicated rows, still correct. The GSPMD partitioner
(Shardy's predecessor, still selectable) gets the same partition. A ViT and a text
transformer with both kernels, the batch sharded over 8 devices, give the single-device loss
and gradients; the per-device kernels with their all-reduce lower to Triton for CUDA.

Tolerances (float32): outputs and dx / dh within 1e-5 of their largest entry; the per-feature
sums within 1e-5 of theirs (float32 sums of up to 64 rows, psum of 8 partials); towers as
test_speed_options (loss and outputs 1e-5 absolute, gradients 5e-5 absolute + 1e-5 relative).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hlo_collectives import collectives
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmts_jax.models import TextTransformer, ViT
from mmts_jax.models import pallas_gelu as pg
from mmts_jax.models import pallas_layer_norm as pln
from mmts_jax.models import row_partitioning as rp
from mmts_jax.models.lean_layer_norm import layer_norm

EPS = 1e-6
C_GELU, A_GELU = np.sqrt(2.0 / np.pi), 0.044715


@pytest.fixture
def interpret():
  """Both kernels through the Pallas interpreter for one test, then the defaults again."""
  pln.set_pallas_layer_norm("interpret")
  pg.set_pallas_gelu("interpret")
  yield
  pln.set_pallas_layer_norm(None)
  pg.set_pallas_gelu(None)
  pln.set_layer_norm_config(None)
  pg.set_gelu_config(None)


def _mesh(shape, names):
  return Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), names)


# (mesh shape, axis names, the spec of the (N, C) operands): rows over a 1-D mesh, over both
# axes of a 2-D mesh, over one of them (the other replicates), and rows over "a" with the
# features over "b" (which the rule must replicate first).
MESHES = [
  ((8,), ("data",), P("data", None)),
  ((4, 2), ("a", "b"), P(("a", "b"), None)),
  ((4, 2), ("a", "b"), P("a", None)),
  ((4, 2), ("a", "b"), P("a", "b")),
]
MESH_IDS = ["1d", "2d-both", "2d-one", "2d-features-sharded"]


def _layer_norm_numpy(x, s, b, g):
  """float64 y, dx, dscale, dbias of the layer norm with cotangent g, from the formulas."""
  x, s, b, g = (np.asarray(a, np.float64) for a in (x, s, b, g))
  xhat = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + EPS)
  gh = g * s
  dx = gh - gh.mean(1, keepdims=True) - xhat * (gh * xhat).mean(1, keepdims=True)
  dx /= np.sqrt(x.var(1, keepdims=True) + EPS)
  return xhat * s + b, dx, (g * xhat).sum(0), g.sum(0)


def _gelu_numpy(h, b, g):
  """float64 y, dh, db of `gelu_tanh(h + b)` with cotangent g, from the formulas."""
  x = np.asarray(h, np.float64) + np.asarray(b, np.float64)
  t = np.tanh(C_GELU * (x + A_GELU * x**3))
  slope = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * C_GELU * (1 + 3 * A_GELU * x * x)
  dh = np.asarray(g, np.float64) * slope
  return 0.5 * x * (1 + t), dh, dh.sum(0)


def _layer_norm_vjp(x, s, b, g):
  y, vjp = jax.vjp(lambda x, s, b: layer_norm(x, s, b, EPS, jnp.float32, "pallas"), x, s, b)
  return (y, *vjp(g))


def _gelu_vjp(h, b, g):
  y, vjp = jax.vjp(pg.bias_gelu, h, b)
  return (y, *vjp(g))


def _inputs(n, c, seed):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = 1.0 + 2.0 * jax.random.normal(k[0], (n, c))
  s = 1.0 + 0.5 * jax.random.normal(k[1], (c,))
  b = 0.5 * jax.random.normal(k[2], (c,))
  return x, s, b, jax.random.normal(k[3], (n, c))


LN_KINDS = ("rows", "features", "features", "rows")  # x, scale, bias, the cotangent


def _sharded(fn, mesh, spec, kinds):
  """`fn` jitted with its "rows" arguments sharded as `spec` and the "features" replicated."""
  shard = {"rows": NamedSharding(mesh, spec), "features": NamedSharding(mesh, P())}
  return jax.jit(fn, in_shardings=tuple(shard[k] for k in kinds))


def _run(fn, *args, options=None):
  """`fn(*args)` through one ahead-of-time compile; also the compiled HLO's collectives and
  the number of partitioned calls (`row_partitioned`) in the lowered program."""
  lowered = fn.lower(*args)
  calls = lowered.as_text().count("CustomSPMDPartitioning")
  compiled = lowered.compile(compiler_options=options)
  return compiled(*args), collectives(compiled.as_text()), calls


def _assert_only_feature_sums(found, c):
  """No collective but all-reduces of (c,) float32 vectors, and at least one of them."""
  assert set(found) == {"all-reduce"}, f"collectives other than the sums' all-reduce: {found}"
  assert found["all-reduce"] and set(found["all-reduce"]) == {f"f32[{c}]"}, found


def _assert_close(got, want, tol=1e-5):
  chex.assert_tree_all_finite(got)
  for a, w in zip(got, want, strict=True):
    chex.assert_trees_all_close(
      np.asarray(a, np.float64), w, rtol=0.0, atol=tol * float(np.max(np.abs(w)))
    )


@pytest.mark.parametrize(("shape", "names", "spec"), MESHES, ids=MESH_IDS)
def test_layer_norm_keeps_rows_sharded(interpret, shape, names, spec):
  # 64 rows of 48 features in 4-row forward blocks and 2 backward programs per shard.
  pln.set_layer_norm_config(pln.LayerNormConfig(rows_fwd=4, rows_bwd=2, programs_bwd=2))
  x, s, b, g = _inputs(64, 48, seed=1)
  fn = _sharded(_layer_norm_vjp, _mesh(shape, names), spec, LN_KINDS)
  got, found, _ = _run(fn, x, s, b, g)
  _assert_close(got, _layer_norm_numpy(x, s, b, g))
  if spec[1] is None:  # with the features sharded, XLA places the results as it likes
    assert got[0].sharding.spec[0] == spec[0] and got[1].sharding.spec[0] == spec[0]
    assert got[2].sharding.is_fully_replicated and got[3].sharding.is_fully_replicated
    _assert_only_feature_sums(found, 48)
  else:  # only the features are gathered: each device keeps its 16 rows
    assert set(found["all-gather"]) == {"f32[16,48]"}, found


@pytest.mark.parametrize(("shape", "names", "spec"), MESHES, ids=MESH_IDS)
def test_bias_gelu_keeps_rows_sharded(interpret, shape, names, spec):
  # 64 rows of 40 features: per shard one row block, the last column block ragged.
  pg.set_gelu_config(pg.GeluConfig(16, 16, 2))
  h, b, _, g = _inputs(64, 40, seed=2)
  h = 3.0 * h
  fn = _sharded(_gelu_vjp, _mesh(shape, names), spec, ("rows", "features", "rows"))
  got, found, _ = _run(fn, h, b, g)
  _assert_close(got, _gelu_numpy(h, b, g))
  if spec[1] is None:
    assert got[0].sharding.spec[0] == spec[0] and got[2].sharding.is_fully_replicated
    _assert_only_feature_sums(found, 40)
  else:
    assert set(found["all-gather"]) == {"f32[16,40]"}, found


def test_the_bare_pallas_call_gathers_the_rows(interpret):
  # The control for the HLO check above: the same kernel without the rule has its rows
  # gathered (in the interpreter, padded to whole blocks first).
  x, s, b, _ = _inputs(64, 48, seed=3)
  bare = lambda x, s, b: pln._fwd_local(
    EPS, jnp.dtype(jnp.float32), True, pln.LayerNormConfig(), x, s, b
  )
  fn = _sharded(bare, _mesh((8,), ("data",)), P("data", None), ("rows", "features", "features"))
  found = collectives(fn.lower(x, s, b).compile().as_text())
  assert "all-gather" in found, found


def test_uneven_rows_fall_back_to_replicated_rows_and_stay_correct(interpret):
  # 39 of 40 sharded rows: 8 shards of 39 would be padded, and the padding would enter the
  # sums, so the rule replicates these rows (an all-gather) and the results stay exact.
  x, s, b, g = _inputs(40, 24, seed=4)

  def both(x, s, b, g):
    ln = _layer_norm_vjp(x[:39], s, b, g[:39])
    gelu = _gelu_vjp(x[:39], b, g[:39])
    return ln, gelu

  fn = _sharded(both, _mesh((8,), ("data",)), P("data", None), LN_KINDS)
  (ln, gelu), found, _ = _run(fn, x, s, b, g)
  assert "all-gather" in found
  _assert_close(ln, _layer_norm_numpy(x[:39], s, b, g[:39]))
  _assert_close(gelu, _gelu_numpy(x[:39], b, g[:39]))


# The towers' programs are large in the interpreter: XLA's backend optimisations off (the SPMD
# partitioning, which the collectives come from, runs all the same).
FAST_COMPILE = {"xla_backend_optimization_level": 0}
IMAGE = jax.random.normal(jax.random.PRNGKey(1), (8, 16, 16, 3), jnp.float32)
IDS = jnp.tile(jnp.array([[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 0, 0, 0, 0, 0]]), (4, 1))


def _loss_and_grads(model, params, x, mesh):
  """Loss `sum(sin(model(x)))` and its parameter gradients, jitted; with `mesh`, the batch
  sharded over its 8 devices and the parameters replicated."""
  f = jax.value_and_grad(lambda p, x: jnp.sum(jnp.sin(model.apply(p, x))))
  if mesh is None:
    return _run(jax.jit(f), params, x, options=FAST_COMPILE)[0]
  shardings = (NamedSharding(mesh, P()), NamedSharding(mesh, P("data")))
  out, found, calls = _run(jax.jit(f, in_shardings=shardings), params, x, options=FAST_COMPILE)
  assert "all-gather" not in found, f"the batch was gathered: {found}"
  return out, calls


@pytest.mark.parametrize("tower", ["vit", "text"])
def test_towers_with_both_kernels_sharded_over_8_devices_match_one_device(interpret, tower):
  if tower == "vit":
    model, x = ViT.from_variant("mu/8", lean_layer_norm="pallas", lean_gelu="pallas"), IMAGE
  else:
    kw = dict(vocab_size=50, max_len=8, width=16, depth=1, num_heads=2, mlp_dim=32)
    model, x = TextTransformer(**kw, lean_layer_norm="pallas", lean_gelu="pallas"), IDS
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  (loss, grads), calls = _loss_and_grads(model, params, x, _mesh((8,), ("data",)))
  # Each layer norm and GELU a forward and a backward call: ViT mu/8 2 blocks x (2 norms + 1
  # GELU) + ln_pre + ln_final; the text tower 1 block + its final norm.
  assert calls == {"vit": 2 * (2 * 3 + 2), "text": 2 * (3 + 1)}[tower]
  want_loss, want_grads = _loss_and_grads(model, params, x, None)
  chex.assert_trees_all_close(loss, want_loss, atol=1e-5, rtol=0)
  chex.assert_trees_all_close(grads, want_grads, atol=5e-5, rtol=1e-5)


def _cuda_case(kernel):
  """(per-device function, static arguments, result kinds, arguments, their specs)."""
  n, c, f32 = 256, 768, jnp.dtype(jnp.float32)
  x, v, s = jnp.ones((n, c)), jnp.ones((n,)), jnp.ones((c,))
  rows, feat = P("data", None), P()
  ln = pln.LayerNormConfig()
  gelu = pg.gelu_config()
  return {
    "ln_fwd": (
      pln._fwd_local,
      (EPS, f32, False, ln),
      (rp.ROWS, rp.ROW, rp.ROW),
      (x, s, s),
      (rows, feat, feat),
    ),
    "ln_bwd": (
      pln._bwd_local,
      (False, ln),
      (rp.ROWS, rp.SUM, rp.SUM),
      (x, v, v, s, x),
      (rows, P("data"), P("data"), feat, rows),
    ),
    "gelu_fwd": (pg._fwd_local, (False, gelu), (rp.ROWS,), (x, s), (rows, feat)),
    "gelu_bwd": (pg._bwd_local, (False, gelu), (rp.ROWS, rp.SUM), (x, x, s), (rows, rows, feat)),
  }[kernel]


@pytest.mark.parametrize("kernel", ["ln_fwd", "ln_bwd", "gelu_fwd", "gelu_bwd"])
def test_per_device_bodies_lower_to_triton_for_cuda(kernel):
  # No GPU here: what each device runs in the partitioned program (`shard_body`: the kernel on
  # its 32 of 256 rows, then the psum of the per-feature sums), lowered for CUDA from the CPU
  # inside a shard_map over 8 devices, runs Pallas's Triton lowering at the per-device shapes.
  fn, static, results, args, specs = _cuda_case(kernel)
  body = rp.shard_body(fn, static, results, ("data",))
  out_specs = tuple(P() if k == rp.SUM else P("data") for k in results)
  mapped = jax.shard_map(
    body, mesh=_mesh((8,), ("data",)), in_specs=specs, out_specs=out_specs, check_vma=False
  )
  text = jax.jit(mapped).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 1
  assert text.count("all_reduce") == results.count(rp.SUM)


def test_row_partitioned_names_bad_kinds():
  body = lambda x: (x,)
  with pytest.raises(
    ValueError, match=r"first operand must be ROWS or batch\(rank\), got \('row',\)"
  ):
    rp.row_partitioned(body, (rp.ROW,), (rp.ROWS,))
  with pytest.raises(
    ValueError, match=r"operands must be ROWS, ROW, FEATURES or batch\(rank\), got .*'sum'"
  ):
    rp.row_partitioned(body, (rp.ROWS, rp.SUM), (rp.ROWS,))
  with pytest.raises(
    ValueError, match=r"results must be ROWS, ROW, SUM or batch\(rank\), got .*'features'"
  ):
    rp.row_partitioned(body, (rp.ROWS,), (rp.FEATURES,))
  with pytest.raises(ValueError, match=r"first operand .* got \('batch1',\)"):  # rank 1 is ROW
    rp.row_partitioned(body, ("batch1",), (rp.ROWS,))
  with pytest.raises(ValueError, match="rank must be >= 2"):
    rp.batch(1)


def test_batch_kinds_keep_the_leading_axis_sharded_and_the_rest_replicated():
  """`batch(rank)` arrays (attention's (B, L, H, D) and (B, H, L)) beside a per-row operand,
  on the 8-device simulated mesh: values as one device, outputs sharded over the batch, and
  no all-gather in the compiled program (the batch stays split)."""

  def fn(scale, x, lse, n):
    return x * scale + n[:, None, None, None], jnp.swapaxes(lse, 1, 2).sum(-1) + n[:, None]

  f = rp.row_partitioned(
    fn, (rp.batch(4), rp.batch(3), rp.ROW), (rp.batch(4), rp.batch(2)), num_static=1
  )
  mesh = _mesh((8,), ("data",))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 5, 3, 4)).astype(np.float32)
  lse = rng.normal(size=(16, 3, 5)).astype(np.float32)
  n = np.arange(16, dtype=np.float32)
  batch_sharded = lambda r: NamedSharding(mesh, P("data", *([None] * (r - 1))))
  run = jax.jit(
    lambda x, lse, n: f(2.0, x, lse, n),
    in_shardings=(batch_sharded(4), batch_sharded(3), batch_sharded(1)),
  )
  y, z = run(x, lse, n)
  want_y, want_z = fn(2.0, x, lse, n)
  chex.assert_trees_all_close((np.asarray(y), np.asarray(z)), (want_y, want_z), rtol=1e-6)
  assert y.sharding.spec[0] == "data" and z.sharding.spec[0] == "data"
  assert collectives(run.lower(x, lse, n).compile().as_text() or "") == {}


def test_the_gspmd_partitioner_takes_the_same_rule(interpret):
  # Shardy is the default; the older GSPMD partitioner reads `infer_sharding_from_operands`
  # instead of the sharding rule, and must end in the same partition (rows kept, sums reduced).
  x, s, b, g = _inputs(64, 48, seed=5)
  shardy = jax.config.jax_use_shardy_partitioner
  jax.config.update("jax_use_shardy_partitioner", False)
  try:
    mesh = _mesh((8,), ("data",))
    ln, ln_found, _ = _run(_sharded(_layer_norm_vjp, mesh, P("data", None), LN_KINDS), x, s, b, g)
    kinds = ("rows", "features", "rows")
    gelu, gelu_found, _ = _run(_sharded(_gelu_vjp, mesh, P("data", None), kinds), x, b, g)
  finally:
    jax.config.update("jax_use_shardy_partitioner", shardy)
  _assert_close(ln, _layer_norm_numpy(x, s, b, g))
  _assert_close(gelu, _gelu_numpy(x, b, g))
  _assert_only_feature_sums(ln_found, 48)
  _assert_only_feature_sums(gelu_found, 48)
