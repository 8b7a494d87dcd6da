"""Flax towers and the dual encoder: exact parameter counts of the paper's backbones, masking,
unit-norm float32 outputs, float32 parameters under bfloat16 compute, config errors.

Every forward pass is jitted (eager Flax compiles each primitive separately: slow on a CPU)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmts_jax.models import DualEncoder, FeatureTower, ResNet, TextTransformer, ViT, build_model


def _init_apply(module, *args):
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), *args)
  return variables, jax.jit(module.apply)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_vit_b16_parameter_count_matches_the_architecture():
  # Independent count: patch conv, class token, 197 positions, 12 pre-LN blocks, ln_pre/final.
  w, mlp, depth, tokens = 768, 3072, 12, 197
  block = 2 * 2 * w + 3 * (w * w + w) + (w * w + w) + (w * mlp + mlp) + (mlp * w + w)
  expected = (16 * 16 * 3 * w + w) + w + tokens * w + depth * block + 2 * 2 * w
  vit = ViT.from_variant("B/16")
  shapes = jax.eval_shape(vit.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  assert _count(shapes["params"]) == expected == 85_800_192


def test_resnet50_parameter_count_matches_torchvision_backbone():
  # torchvision resnet50 has 25,557,032 parameters, of which the 1000-way fc is 2048*1000+1000.
  net = ResNet.from_depth(50)
  shapes = jax.eval_shape(lambda x: net.init(jax.random.PRNGKey(0), x), jnp.zeros((1, 224, 224, 3)))
  assert _count(shapes["params"]) == 25_557_032 - 2_049_000
  out = jax.eval_shape(
    lambda v, x: net.apply(v, x, train=True, mutable=["batch_stats"]),
    shapes,
    jnp.zeros((2, 64, 64, 3)),
  )
  chex.assert_shape(out[0], (2, 2048))
  assert set(out[1]) == {"batch_stats"}


def test_text_transformer_masks_padding_and_pools_the_last_real_token():
  tower = TextTransformer(
    vocab_size=50, max_len=10, width=16, depth=1, num_heads=2, mlp_dim=32, pool="eot", causal=True
  )
  short = jnp.array([[3, 4, 5, 0, 0], [7, 0, 0, 0, 0]], jnp.int32)
  long = jnp.array([[3, 4, 5, 0, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0, 0, 0]], jnp.int32)
  params, apply = _init_apply(tower, long)
  a, b = apply(params, short), apply(params, long)
  chex.assert_shape(a, (2, 16))
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(a[0], a[1], atol=1e-3)


def test_dual_encoder_from_config_vit_and_text_unit_norm():
  cfg = ml_collections.ConfigDict(
    {
      "embed_dim": 8,
      "dtype": "float32",
      "image": {"name": "vit", "variant": "mu/8"},
      "text": {
        "name": "transformer",
        "vocab_size": 20,
        "max_len": 6,
        "width": 16,
        "depth": 1,
        "num_heads": 2,
        "mlp_dim": 32,
        "pool": "mean",
        "causal": False,
      },
    }
  )
  model = build_model(cfg)
  batch = {
    "image": jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3)),
    "text": jnp.array([[1, 2, 3, 0, 0, 0], [4, 5, 0, 0, 0, 0]], jnp.int32),
  }
  variables, apply = _init_apply(model, batch)
  out = apply(variables, batch)
  chex.assert_shape([out["image"], out["text"]], (2, 8))
  chex.assert_tree_all_finite(out)
  np.testing.assert_allclose(np.linalg.norm(out["image"], axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out["text"], axis=1), 1.0, rtol=1e-5)
  with pytest.raises(KeyError, match="'text'"):
    apply(variables, {"image": batch["image"]})
  cfg.image.name = "convnext"
  with pytest.raises(ValueError, match="convnext"):
    build_model(cfg)
  with pytest.raises(ValueError, match="X/16"):
    ViT.from_variant("X/16")


def test_bf16_compute_keeps_f32_params_and_clip_temperature_has_no_forward_clamp():
  tower = lambda: FeatureTower((16,), dtype=jnp.bfloat16)
  model = DualEncoder(
    tower(),
    tower(),
    embed_dim=8,
    image_key="image_features",
    text_key="text_features",
    learnable_temperature=True,
    init_temperature=0.05,
    dtype=jnp.bfloat16,
  )
  batch = {
    "image_features": jnp.ones((3, 5)) * jnp.arange(5.0),
    "text_features": jnp.ones((3, 7)) * jnp.arange(7.0),
  }
  variables, apply = _init_apply(model, batch)
  assert {x.dtype for x in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
  out = apply(variables, batch)
  assert out["image"].dtype == out["text"].dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(out["image"], axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(out["temperature"], 0.05, rtol=1e-6)
  # The bound tau >= min_temperature is kept by the optimizer (mmts_jax.train.optim, tested in
  # test_train_step), not by a forward minimum: past the bound the gradient is not zero.
  params = dict(variables["params"], log_inv_temperature=jnp.float32(10.0))
  np.testing.assert_allclose(
    apply({"params": params}, batch)["temperature"], np.exp(-10.0), rtol=1e-6
  )
  grad = jax.grad(lambda p: apply({"params": p}, batch)["temperature"])(params)
  assert float(grad["log_inv_temperature"]) < 0


def test_remat_gives_the_same_parameters_and_gradients_tree():
  x = jnp.zeros((2, 16, 16, 3))
  plain, remat = ViT.from_variant("mu/8"), ViT.from_variant("mu/8", remat=True)
  p = jax.eval_shape(plain.init, jax.random.PRNGKey(0), x)
  assert jax.tree.structure(p) == jax.tree.structure(
    jax.eval_shape(remat.init, jax.random.PRNGKey(0), x)
  )
  g = jax.eval_shape(jax.grad(lambda v: remat.apply(v, x, train=True).sum()), p)
  chex.assert_trees_all_equal_shapes(g, p)
