"""The transformer towers' speed options compute the same function with the same parameters:
the patch embedding as one matrix product (`patch_embed="dense"`) vs the stride-p convolution,
fused q/k/v vs three products, the "dots" and "full" remat policies vs none, one padding
token carried through the stack (`even_length`) vs none, the fused attention kernel's mask form
(causal + trailing-padding lengths) vs the dense mask, and the layer norm, the GELU and the
fused q/k/v product with hand-written backward passes (`lean_layer_norm`, `lean_gelu`,
`split_qkv_backward`) vs Flax's and XLA's automatic ones (the first two also against float64
numpy central differences).

Every comparison is in float32 on the CPU. Outputs agree to 1e-5 absolute and gradients to
5e-5 absolute + 1e-5 relative (the same products summed in another order; the class token's
gradient reaches 80 here, where one float32 ulp is 8e-6); the structured mask is also checked
against an independent float64 numpy attention."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmts_jax.models import TextTransformer, ViT, attention, build_model
from mmts_jax.models.lean_gelu import gelu
from mmts_jax.models.lean_layer_norm import layer_norm
from mmts_jax.models.transformer import remat_policy
from mmts_jax.models.vit import PatchEmbed

IMAGE = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3), jnp.float32)


def _out_and_grads(model, params, x):
  """The output and the gradients of `sum(sin(output))`, from one compiled function (with
  dropout 0 `train=True` only changes what remat keeps, not the values)."""

  def loss(p):
    out = model.apply(p, x, train=True)
    return jnp.sum(jnp.sin(out)), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return out, grads


def test_patch_embed_has_the_conv_parameters_and_computes_the_conv():
  conv = nn.Conv(8, (4, 4), strides=(4, 4), padding="VALID")
  dense = PatchEmbed(8, 4)
  p_conv = conv.init(jax.random.PRNGKey(0), IMAGE)
  p_dense = dense.init(jax.random.PRNGKey(0), IMAGE)
  chex.assert_trees_all_equal(p_conv, p_dense)  # same names, shapes and initial values
  got = jax.jit(dense.apply)(p_conv, IMAGE)
  assert got.shape == (2, 4, 4, 8)
  chex.assert_trees_all_close(got, jax.jit(conv.apply)(p_conv, IMAGE), atol=1e-5, rtol=0)
  # Patch (1, 2) of image 0 by hand: the kernel's (u, v, c) order is the flattening order.
  k = np.asarray(p_conv["params"]["kernel"], np.float64)
  patch = np.asarray(IMAGE[0, 4:8, 8:12, :], np.float64)
  np.testing.assert_allclose(
    np.asarray(got[0, 1, 2]), np.einsum("uvc,uvcf->f", patch, k), rtol=1e-5, atol=1e-5
  )


@pytest.fixture(scope="module")
def plain_vit():
  """The plain ViT's parameters, output and gradients, computed once for every option."""
  plain = ViT.from_variant("mu/8")
  params = jax.jit(plain.init)(jax.random.PRNGKey(0), IMAGE)
  return params, *_out_and_grads(plain, params, IMAGE)


@pytest.mark.parametrize(
  "options",
  [
    dict(patch_embed="dense"),
    dict(fused_qkv=True),
    dict(remat="dots"),
    dict(remat="full"),
    dict(patch_embed="dense", fused_qkv=True, remat="dots"),
    dict(even_length=True),  # 2 x 2 patches + the class token: 5 tokens, padded to 6
    dict(patch_embed="dense", fused_qkv=True, even_length=True, remat="full"),
    dict(lean_layer_norm=True),
    dict(lean_gelu=True),
    dict(fused_qkv=True, split_qkv_backward=True),
    dict(flat_residual=True),
    dict(
      patch_embed="dense", fused_qkv=True, even_length=True, lean_layer_norm=True, lean_gelu=True
    ),
    dict(patch_embed="dense", fused_qkv=True, even_length=True, flat_residual=True, remat="dots"),
  ],
)
def test_vit_speed_options_keep_parameters_outputs_and_gradients(options, plain_vit):
  params, plain_out, plain_grads = plain_vit
  fast = ViT.from_variant("mu/8", **options)
  chex.assert_trees_all_equal(params, jax.jit(fast.init)(jax.random.PRNGKey(0), IMAGE))
  out, grads = _out_and_grads(fast, params, IMAGE)
  chex.assert_trees_all_close(out, plain_out, atol=1e-5, rtol=0)
  chex.assert_trees_all_close(grads, plain_grads, atol=5e-5, rtol=1e-5)


def _text(**kw):
  return TextTransformer(vocab_size=50, max_len=7, width=16, depth=2, num_heads=2, mlp_dim=32, **kw)


TEXT_IDS = jnp.array([[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 0, 0, 0, 0], [0] * 7], jnp.int32)


@functools.cache
def _plain_text(causal: bool, pool: str):
  """The plain text tower's parameters, output and gradients, once per (causal, pool)."""
  plain = _text(causal=causal, pool=pool)
  params = jax.jit(plain.init)(jax.random.PRNGKey(0), TEXT_IDS)
  return params, *_out_and_grads(plain, params, TEXT_IDS)


@pytest.mark.parametrize("causal,pool", [(True, "eot"), (False, "mean")])
@pytest.mark.parametrize(
  "options",
  [
    dict(fused_qkv=True, remat="dots", attention="xla"),
    dict(even_length=True),  # 7 tokens padded to 8 (the dense mask and the lengths)
    dict(even_length=True, fused_qkv=True, remat="dots", attention="xla"),
    dict(
      even_length=True,
      fused_qkv=True,
      split_qkv_backward=True,
      lean_layer_norm=True,
      lean_gelu=True,
    ),
    dict(even_length=True, flat_residual=True, lean_layer_norm=True),
    dict(even_length=True, causal_only_lengths=True, fused_qkv=True),
  ],
)
def test_text_speed_options_keep_outputs_and_gradients(causal, pool, options):
  params, plain_out, plain_grads = _plain_text(causal, pool)
  out, grads = _out_and_grads(_text(causal=causal, pool=pool, **options), params, TEXT_IDS)
  chex.assert_trees_all_close(out, plain_out, atol=1e-5, rtol=0)
  chex.assert_trees_all_close(grads, plain_grads, atol=5e-5)


def _numpy_layer_norm(x, scale, bias, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * scale + bias


def _numpy_gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _central_differences(f, args, cot, h=1e-6):
  """d <cot, f(args)> / d args[i] in float64 by central differences, for every argument."""
  grads = []
  for i, a in enumerate(args):
    g = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
      up, down = [b.copy() for b in args], [b.copy() for b in args]
      up[i][idx] += h
      down[i][idx] -= h
      g[idx] = (np.sum(cot * f(*up)) - np.sum(cot * f(*down))) / (2 * h)
    grads.append(g)
  return grads


def test_lean_layer_norm_and_gelu_gradients_match_float64_central_differences():
  rng = np.random.default_rng(3)
  x, cot = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
  scale, bias = rng.normal(size=5), rng.normal(size=5)
  f32 = lambda *a: [jnp.asarray(v, jnp.float32) for v in a]
  loss = lambda x, s, b: jnp.sum(
    jnp.asarray(cot, jnp.float32) * layer_norm(x, s, b, 1e-6, jnp.float32)
  )
  got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*f32(x, scale, bias))
  want = _central_differences(_numpy_layer_norm, [x, scale, bias], cot)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
    np.asarray(layer_norm(*f32(x, scale, bias), 1e-6, jnp.float32)),
    _numpy_layer_norm(x, scale, bias),
    rtol=1e-5,
    atol=1e-5,
  )
  (want_gelu,) = _central_differences(_numpy_gelu, [x], cot)
  got_gelu = jax.grad(lambda v: jnp.sum(jnp.asarray(cot, jnp.float32) * gelu(v)))(*f32(x))
  np.testing.assert_allclose(np.asarray(got_gelu), want_gelu, rtol=1e-4, atol=1e-4)
  # bfloat16 activations, float32 parameters: each gradient in its input's dtype.
  xb = jnp.asarray(x, jnp.bfloat16)
  dx, ds, db = jax.grad(
    lambda x, s, b: jnp.sum(layer_norm(x, s, b, 1e-6, jnp.bfloat16).astype(jnp.float32)),
    argnums=(0, 1, 2),
  )(xb, *f32(scale, bias))
  assert (dx.dtype, ds.dtype, db.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
  assert jax.grad(lambda v: jnp.sum(gelu(v).astype(jnp.float32)))(xb).dtype == jnp.bfloat16


def _numpy_masked_attention(q, k, v, keep):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(keep, logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("length", [7, 8])
@pytest.mark.parametrize("causal,drop_lengths", [(True, False), (False, False), (True, True)])
def test_structured_mask_equals_the_dense_mask_on_real_rows(length, causal, drop_lengths):
  # The fused kernel's form (lengths + causal, odd lengths padded to even; with
  # `drop_lengths` the causal mask alone, as `causal_only_lengths` gives it), run through XLA
  # here, against the dense mask the text tower builds and a float64 reference.
  q, k, v = jax.random.normal(jax.random.PRNGKey(4), (3, 3, length, 2, 8), jnp.float32)
  lengths = jnp.array([length, 4, 0])
  valid = jnp.arange(length)[None] < lengths[:, None]
  mask = nn.make_attention_mask(valid, valid)
  if causal:
    mask = nn.combine_masks(mask, nn.make_causal_mask(valid))
  mask = jnp.logical_or(mask, jnp.eye(length, dtype=bool)[None, None])
  dense = lambda q, k, v: attention.attend(q, k, v, mask)
  structured = lambda q, k, v: attention.even_length_attention(
    q, k, v, "xla", causal=causal, lengths=None if drop_lengths else lengths
  )
  got, want = jax.jit(structured)(q, k, v), jax.jit(dense)(q, k, v)
  assert bool(jnp.all(jnp.isfinite(got)))  # padded rows too: they feed later layers
  ref = _numpy_masked_attention(q, k, v, np.asarray(mask))
  # Row b's real queries (a row of padding alone: its first position, which pooling reads).
  for b, n in enumerate([length, 4, 1]):
    chex.assert_trees_all_close(got[b, :n], want[b, :n], atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(got[b, :n]), ref[b, :n], rtol=1e-5, atol=1e-5)
  real = (jnp.arange(length)[None, :] < jnp.array([[length], [4], [1]]))[..., None, None]
  loss = lambda f: lambda *a: jnp.sum(jnp.where(real, jnp.cos(f(*a)), 0.0))
  chex.assert_trees_all_close(
    jax.jit(jax.grad(loss(structured), argnums=(0, 1, 2)))(q, k, v),
    jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2)))(q, k, v),
    atol=1e-5,
    rtol=0,
  )


def test_kernel_choice_takes_the_structured_mask_on_a_gpu():
  assert attention.implementation(jnp.bfloat16, 64, has_mask=False, backend="gpu") == "cudnn"
  assert attention.implementation(jnp.bfloat16, 64, has_mask=True, backend="gpu") == "xla"
  with pytest.raises(ValueError, match="kernel must be 'auto', 'xla' or 'pallas', got 'cudnn'"):
    attention.attend(*jnp.ones((3, 1, 2, 1, 8)), kernel="cudnn")


def test_bad_speed_options_are_value_errors_naming_them():
  with pytest.raises(ValueError, match="got 'some'"):
    remat_policy("some")
  with pytest.raises(ValueError, match="patch_embed must be one of .* got 'pixels'"):
    ViT.from_variant("mu/8", patch_embed="pixels").init(jax.random.PRNGKey(0), IMAGE)
  cfg = ml_collections.ConfigDict(
    {
      "embed_dim": 8,
      "image": {"name": "vit", "variant": "mu/8", "remat": "everything"},
      "text": {"name": "features", "hidden_dims": (16,)},
    }
  )
  with pytest.raises(ValueError, match="got 'everything'"):
    build_model(cfg)
  cfg.image.remat, cfg.image.attention = "dots", "flash"
  with pytest.raises(ValueError, match="attention must be 'auto', 'xla' or 'pallas', got 'flash'"):
    build_model(cfg)
  cfg.image.attention = "xla"
  cfg.image.lean_layer_norm, cfg.image.lean_gelu = True, True
  model = build_model(cfg)
  assert (model.image_tower.remat, model.image_tower.attention) == ("dots", "xla")
  assert model.image_tower.lean_layer_norm and model.image_tower.lean_gelu
