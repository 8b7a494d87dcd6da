"""The fused short-sequence attention (`pallas_attention`): its Pallas kernels through the Pallas
interpreter on CPU against an independent float64 numpy reference (output, dq, dk, dv), with
and without `causal` and `lengths` (a row of length 1, a row of length 0 counting as 1), ragged
L (13, 37, 71: blocks that do not divide L, several query and key blocks, causal block skips);
against `attend(kernel="xla")`; in the ViT and the text transformer (`attention="pallas"`)
against `attention="xla"`; batch-sharded over the 8 simulated devices; the lowering to Triton
for CUDA at the B/16 shapes; and the ValueErrors.

Tolerances: float32 inputs 2e-5 (absolute and relative: IEEE float32 products, the exact
exp2). bfloat16 inputs against the reference on the same rounded inputs: output 1.5e-2 and
gradients 3e-2 of the largest magnitude of each (P and dS are rounded to bfloat16 for their
products, 2^-8 relative each, and the results once more). Towers (float32) as in
test_pallas_gelu: outputs 1e-5 absolute, gradients 5e-5 absolute + 1e-5 relative.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmts_jax.models import TextTransformer, ViT, build_model
from mmts_jax.models import pallas_attention as pa
from mmts_jax.models.attention import attend


@pytest.fixture
def interpret():
  """The kernels through the Pallas interpreter for one test, then the defaults again."""
  pa.set_pallas_attention("interpret")
  yield
  pa.set_pallas_attention(None)
  pa.set_attention_config(None)


SMALL = pa.AttentionConfig(block_q=16, bwd_block_q=16, bwd_block_k=16)


def _numpy(q, k, v, g, causal, lengths):
  """float64 o, dq, dk, dv of masked softmax attention, written out per (b, h); padded query
  rows (i >= lengths[b]) give 0 and take no part in the gradients."""
  q, k, v, g = (np.asarray(a, np.float64).transpose(0, 2, 1, 3) for a in (q, k, v, g))
  bsz, _, length, d = q.shape
  n = np.full(bsz, length) if lengths is None else np.clip(np.asarray(lengths), 1, length)
  i, j = np.arange(length)[:, None], np.arange(length)[None, :]
  vis = (j < n[:, None, None]) & ((j <= i) if causal else True)  # (B, L, L)
  real = (np.arange(length)[None, :] < n[:, None])[:, None, :, None]  # (B, 1, L, 1)
  c = 1.0 / np.sqrt(d)
  s = np.where(vis[:, None], c * q @ k.transpose(0, 1, 3, 2), -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  o = (p @ v) * real
  go = g * real
  dp = go @ v.transpose(0, 1, 3, 2)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  dq, dk, dv = c * ds @ k, c * ds.transpose(0, 1, 3, 2) @ q, p.transpose(0, 1, 3, 2) @ go
  return tuple(a.transpose(0, 2, 1, 3) for a in (o, dq, dk, dv))


def _inputs(shape, dtype, seed=0):
  q, k, v, g = jax.random.normal(jax.random.PRNGKey(seed), (4, *shape))
  return q.astype(dtype), k.astype(dtype), (2.0 * v).astype(dtype), g.astype(dtype)


def _run(q, k, v, g, causal, lengths):
  def f(q, k, v, g):
    o, vjp = jax.vjp(lambda q, k, v: pa.pallas_attention(q, k, v, causal=causal, lengths=lengths),
                     q, k, v)  # fmt: skip
    return (o, *vjp(g))

  return jax.jit(f)(q, k, v, g)


def _assert_close(got, want, dtype):
  chex.assert_tree_all_finite(got)
  for a, w, name in zip(got, want, ("o", "dq", "dk", "dv"), strict=True):
    assert a.dtype == dtype, name
    a = np.asarray(a, np.float64)
    if dtype == jnp.float32:
      np.testing.assert_allclose(a, w, atol=2e-5, rtol=2e-5, err_msg=name)
    else:
      scale = float(np.max(np.abs(w)))
      tol = (1.5e-2 if name == "o" else 3e-2) * scale
      np.testing.assert_allclose(a, w, atol=tol, rtol=0, err_msg=name)


# (B, L, H, D), causal, lengths, small blocks: one block; ragged L over several blocks with a
# row of length 1 and one of length 0 (counts as 1); text-like causal + lengths.
CASES = [
  ((2, 13, 2, 16), False, None, False),
  ((3, 13, 1, 16), True, [13, 1, 7], False),
  ((3, 37, 2, 16), False, [37, 0, 20], True),
  ((2, 71, 1, 32), True, [71, 30], True),
]
IDS = ["plain-13", "causal-lengths-13", "lengths-37-blocks", "causal-lengths-71-blocks"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(("shape", "causal", "lengths", "small"), CASES, ids=IDS)
def test_kernels_match_float64_reference(interpret, dtype, shape, causal, lengths, small):
  if small:
    pa.set_attention_config(SMALL)
  q, k, v, g = _inputs(shape, dtype)
  n = None if lengths is None else jnp.array(lengths, jnp.int32)
  got = _run(q, k, v, g, causal, n)
  f32 = [a.astype(jnp.float32) for a in (q, k, v, g)]
  _assert_close(got, _numpy(*f32, causal, lengths), dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal-lengths"])
def test_kernel_path_matches_attend_xla_on_real_rows(interpret, causal):
  pa.set_attention_config(SMALL)
  q, k, v, g = _inputs((3, 21, 2, 16), jnp.float32, seed=1)
  n = jnp.array([21, 4, 1], jnp.int32) if causal else None

  def loss(kernel, q, k, v):
    return jnp.sum(g * attend(q, k, v, causal=causal, lengths=n, kernel=kernel))

  pallas = functools.partial(loss, "pallas")
  assert str(jax.make_jaxpr(pallas)(q, k, v)).count("pallas_call") == 1
  got = jax.jit(jax.value_and_grad(pallas, argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.value_and_grad(functools.partial(loss, "xla"), argnums=(0, 1, 2)))(q, k, v)
  chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)


def test_attend_pallas_falls_back_where_the_kernels_do_not_apply(interpret):
  q = jnp.ones((1, 3, 2, 12))  # D = 12: not a power of two
  assert "pallas_call" not in str(jax.make_jaxpr(lambda q: attend(q, q, q, kernel="pallas"))(q))
  q = jnp.ones((1, 3, 2, 16))
  mask = jnp.ones((1, 1, 3, 3), bool)  # a dense mask alone
  jaxpr = str(jax.make_jaxpr(lambda q: attend(q, q, q, mask, kernel="pallas"))(q))
  assert "pallas_call" not in jaxpr
  pa.set_pallas_attention(None)  # on the CPU: kernels off, XLA's result
  chex.assert_trees_all_close(attend(q, q, q, kernel="pallas"), q, atol=1e-6)


def _random_params(model, x):
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(3)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)


def _run_tower(model, params, x):
  f = jax.value_and_grad(lambda p: (jnp.sum(jnp.sin(out := model.apply(p, x))), out), has_aux=True)
  calls = str(jax.make_jaxpr(f)(params)).count("pallas_call")
  (_, out), grads = jax.jit(f)(params)
  return out, grads, calls


def _same_tower(plain, fast, x):
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


IMAGE = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3), jnp.float32)


@pytest.mark.parametrize("even_length", [False, True], ids=["odd", "even_length"])
def test_vit_with_pallas_attention_keeps_outputs_and_gradients(interpret, even_length):
  # mu/8 on 16 x 16: 5 tokens (4 patches + class), 2 heads of 16; even_length pads to 6.
  plain = ViT.from_variant("mu/8", attention="xla", even_length=even_length)
  _same_tower(plain, plain.clone(attention="pallas"), IMAGE)


def test_text_transformer_with_pallas_attention_keeps_outputs_and_gradients(interpret):
  ids = jnp.array([[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 0, 0, 0, 0], [0] * 7], jnp.int32)
  plain = TextTransformer(
    vocab_size=50, max_len=7, width=32, depth=1, num_heads=2, mlp_dim=48, attention="xla"
  )
  _same_tower(plain, plain.clone(attention="pallas"), ids)


def test_build_model_accepts_attention_pallas():
  cfg = {
    "embed_dim": 8,
    "image": {"name": "vit", "variant": "mu/8", "attention": "pallas"},
    "text": {"name": "features", "hidden_dims": (16,)},
  }
  model = build_model(ml_collections.ConfigDict(cfg))
  assert model.image_tower.attention == "pallas"


def test_batch_sharded_over_8_devices_matches_one_device(interpret):
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  q, k, v, g = _inputs((8, 13, 2, 16), jnp.float32, seed=2)
  lengths = jnp.array([13, 1, 7, 13, 2, 9, 13, 5], jnp.int32)

  def f(q, k, v, g, n):
    o, vjp = jax.vjp(lambda q, k, v: pa.pallas_attention(q, k, v, causal=True, lengths=n), q, k, v)
    return (o, *vjp(g))

  rows = NamedSharding(mesh, P("data"))
  sharded = jax.jit(f, in_shardings=(rows,) * 5)
  got = sharded(q, k, v, g, lengths)
  hlo = sharded.lower(q, k, v, g, lengths).compile().as_text()
  assert "all-gather" not in hlo  # each device keeps its batch rows
  assert all(a.sharding.spec[0] == "data" for a in got)
  chex.assert_trees_all_close(got, jax.jit(f)(q, k, v, g, lengths), atol=1e-6, rtol=1e-6)
  _assert_close(got, _numpy(q, k, v, g, True, np.asarray(lengths)), jnp.float32)


@pytest.mark.parametrize(
  ("shape", "causal"), [((256, 198, 12, 64), False), ((256, 78, 8, 64), True)], ids=["vit", "text"]
)
def test_kernels_lower_to_triton_for_cuda(shape, causal):
  # No GPU here: lowering for CUDA from the CPU runs Pallas's Triton lowering of every
  # primitive of the kernels (the masked loads, the dots, the loop over query blocks).
  q = jnp.ones(shape, jnp.bfloat16)
  n = jnp.full((shape[0],), 70, jnp.int32)
  lse = jnp.zeros((shape[0], shape[2], shape[1]), jnp.float32)
  cfg = pa.attention_config()
  fwd = lambda q: pa._fwd_local(causal, False, cfg, q, q, q, n)
  bwd = lambda q: pa._bwd_local(causal, False, cfg, q, q, q, q, q, lse, n)
  for fn, kernels in ((fwd, 1), (bwd, 2)):
    text = jax.jit(fn).trace(q).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == kernels
    assert text.count("ex2.approx.ftz.f32") == kernels  # fast_math: one 2^x per kernel


def test_bad_inputs_are_value_errors_naming_them():
  q = jnp.ones((1, 4, 2, 16))
  with pytest.raises(ValueError, match=r"D must be a power of two in \[16, 256\], got 24"):
    pa.pallas_attention(*(jnp.ones((1, 4, 2, 24)),) * 3)
  with pytest.raises(ValueError, match=r"L must be in \[1, 256\], got 300"):
    pa.pallas_attention(*(jnp.ones((1, 300, 2, 16)),) * 3)
  with pytest.raises(ValueError, match="must all be float32 or bfloat16, got float16"):
    pa.pallas_attention(*(q.astype(jnp.float16),) * 3)
  with pytest.raises(ValueError, match=r"share one \(B, L, H, D\) shape"):
    pa.pallas_attention(q, q, q[:, :3])
  with pytest.raises(ValueError, match=r"lengths must be int \(1,\), got float32"):
    pa.pallas_attention(q, q, q, lengths=jnp.ones((1,)))
  with pytest.raises(ValueError, match="mode must be None, False or 'interpret', got 'gpu'"):
    pa.set_pallas_attention("gpu")
  with pytest.raises(ValueError, match="block_q must be a power of two >= 16, got 48"):
    pa.set_attention_config(pa.AttentionConfig(block_q=48))
  with pytest.raises(ValueError, match="bwd_num_warps must be a power of two, got 3"):
    pa.set_attention_config(pa.AttentionConfig(bwd_num_warps=3))
  with pytest.raises(ValueError, match="kernel must be 'auto', 'xla' or 'pallas', got 'flash'"):
    attend(q, q, q, kernel="flash")
