"""`speed_presets.with_speed`: the preset fills the transformer towers' and optimizer's options
in (a tower's own settings win, other towers untouched, an unknown name refused), equals the
benchmark's fastest measured variant (so the docs' numbers are the preset's), and a config
trained with it computes what the plain config computes."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import chex
import jax
import numpy as np
import pytest

from mmts_jax import train
from mmts_jax.config_defaults import default_config
from mmts_jax.speed_presets import PRESETS, with_speed

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _vit_config():
  c = default_config()
  c.model.image = dict(name="vit", variant="B/16", pool="gap")
  c.model.text = dict(name="transformer", width=64, fused_qkv=False)
  return c


def test_preset_fills_in_and_the_towers_own_options_win():
  c = with_speed(_vit_config(), "gpu")
  assert dict(c.model.image) == {
    **PRESETS["gpu"]["image"],
    "name": "vit",
    "variant": "B/16",
    "pool": "gap",
  }
  text = dict(c.model.text)
  assert text["fused_qkv"] is False  # set by the config, kept
  assert text["attention"] == "pallas" and text["lean_layer_norm"] == "pallas_res"
  assert c.optim.flatten is True


def test_other_towers_are_left_alone():
  c = default_config()
  c.model.image = dict(name="resnet", depth=50, width=64)
  before_image, before_text = dict(c.model.image), dict(c.model.text)
  with_speed(c, "gpu")
  assert dict(c.model.image) == before_image
  assert dict(c.model.text) == {**PRESETS["gpu"]["text"], **before_text}


def test_unknown_preset_is_refused_by_name():
  with pytest.raises(ValueError, match="'tpu_fastest'"):
    with_speed(default_config(), "tpu_fastest")


def _load(name: str, path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(name, path)
  assert spec is not None and spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def test_preset_is_the_benchmarks_fastest_variant():
  """benchmarks/BENCHMARKS.md's session-8 numbers (runs 22-24) are this variant's."""
  bench = _load("_tsb_presets", ROOT / "benchmarks" / "train_step_bench.py")
  towers, image, _, text, optim = bench._parts(
    "fast+qkv+even+lean+flat+plnres+pgelu+fopt+pqkv+pattnt"
  )
  assert {**towers, **image} == PRESETS["gpu"]["image"]
  assert {**towers, **text} == PRESETS["gpu"]["text"]
  assert optim == PRESETS["gpu"]["optim"]


def _tiny(preset: bool):
  c = _load("_tiny_cfg", ROOT / "configs" / "tiny.py").get_config()
  c.total_steps, c.batch_size = 20, 32
  c.mesh.update(num_devices=1, param_sharding="replicated")
  c.optim.update(lr=1e-2, warmup_steps=1)
  return with_speed(c, "gpu") if preset else c


def _train(c, steps: int = 3):
  run = train.setup(c)
  state, losses = run.state, []
  for b, _ in zip(run.batches(0), range(steps), strict=False):
    state, m = run.step_fn(state, run.to_device(b))
    losses.append(float(m["loss"]))
  return jax.device_get(state.params), losses


def test_a_config_with_the_preset_trains_as_the_plain_one():
  """On the CPU every option of the preset takes its XLA form: same parameters, same maths."""
  plain = _tiny(False)
  fast = _tiny(True)
  assert fast.model.text["split_qkv_backward"] == "pallas" and fast.optim.flatten
  params, losses = _train(fast)
  ref_params, ref_losses = _train(plain)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert len(set(losses)) == 3  # the state moved
  # The key bias's exact gradient is zero (it adds q . b_k to every logit of a row, which the
  # softmax ignores): both runs move it by Adam-normalised rounding noise only, so it is checked
  # to stay near zero instead of equal.
  flat, ref_flat = (
    {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(t)}
    for t in (params, ref_params)
  )
  key_bias = [k for k in flat if "key" in k and "bias" in k]
  assert key_bias, sorted(flat)
  for k in key_bias:
    assert np.abs(flat.pop(k)).max() < 1e-4 and np.abs(ref_flat.pop(k)).max() < 1e-4, k
  chex.assert_trees_all_close(flat, ref_flat, rtol=1e-4, atol=1e-6)
