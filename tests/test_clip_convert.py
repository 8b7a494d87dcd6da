"""The CLIP converter's errors, file formats, `mmts convert clip` and the checkpoint it writes,
and the model as the trainer builds it. Weights: the small random state dicts whose PyTorch
outputs tests/test_clip_parity.py checks."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import save_file

from mmts_jax.cli import main as cli_main
from mmts_jax.models import build_model
from mmts_jax.models.clip import CLIP, CLIPConfig, checkpoint, convert, state_dict_io
from mmts_jax.models.clip.config import variant_config
from mmts_jax.models.clip.random_state_dict import random_state_dict

DATA = pathlib.Path(__file__).parent / "data" / "clip"
META = json.loads((DATA / "clip_reference.json").read_text())


def _sd(name):
  m = META["models"][name]
  return random_state_dict([(k, s) for k, s, _ in m["keys"]], META["seed"])


def _flat(tree):
  return {
    jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


@pytest.fixture(scope="module")
def vit_small():
  sd = _sd("openclip_vit_small")
  cfg = convert.infer_config(sd, "openclip", act="gelu")
  return sd, cfg


def test_missing_key_is_named(vit_small):
  sd, cfg = vit_small
  sd = dict(sd)
  del sd["visual.transformer.resblocks.1.mlp.c_fc.bias"]
  with pytest.raises(
    ValueError,
    match=r"1 missing key.*visual\.transformer\.resblocks\.1\.mlp"
    r"\.c_fc\.bias",
  ):
    convert.convert_state_dict(sd, cfg, "openclip")


def test_unexpected_key_is_named_and_buffers_are_ignored(vit_small):
  sd, cfg = vit_small
  extra = dict(
    sd,
    **{
      "visual.head.weight": np.zeros((2, 2), np.float32),
      "attn_mask": np.zeros((16, 16), np.float32),
      "context_length": np.array(16),
    },
  )
  with pytest.raises(ValueError, match=r"1 unexpected key.*'visual\.head\.weight'"):
    convert.convert_state_dict(extra, cfg, "openclip")
  del extra["visual.head.weight"]
  convert.convert_state_dict(extra, cfg, "openclip")  # buffers alone are fine


def test_wrong_shape_is_named(vit_small):
  sd, cfg = vit_small
  bad = dict(sd, **{"visual.ln_pre.weight": np.ones(96, np.float32)})
  with pytest.raises(
    ValueError,
    match=r"'visual\.ln_pre\.weight' has shape \(96,\).*"
    r"visual/ln_pre/scale.*\(128,\)",
  ):
    convert.convert_state_dict(bad, cfg, "openclip")
  bad = dict(
    sd, **{"visual.transformer.resblocks.0.attn.in_proj_weight": np.ones((128, 128), np.float32)}
  )
  with pytest.raises(ValueError, match=r"resblocks\.0\.attn\.in_proj_weight"):
    convert.convert_state_dict(bad, cfg, "openclip")


def test_format_errors(vit_small):
  sd, cfg = vit_small
  with pytest.raises(ValueError, match="cannot tell"):
    convert.detect_format({"encoder.weight": np.zeros(1)})
  with pytest.raises(ValueError, match="no ResNet"):
    convert.param_rules(convert.infer_config(_sd("openclip_rn_small"), "openclip"), "hf")
  with pytest.raises(ValueError, match="missing key"):  # OpenCLIP weights read as HF naming
    convert.convert_state_dict(sd, cfg, "hf")
  prefixed = {"module." + k: v for k, v in sd.items()}
  p1 = convert.convert_state_dict(prefixed, cfg, "openclip")
  p2 = convert.convert_state_dict(sd, cfg, "openclip")
  assert all((a == b).all() for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True))


def test_batchnorm_folded_into_frozen_affine():
  sd = _sd("openclip_rn_small")
  cfg = convert.infer_config(sd, "openclip")
  assert cfg.vision_kind == "resnet" and cfg.vision_layers == (1, 2, 1, 1)
  params = convert.convert_state_dict(sd, cfg, "openclip")
  g, b, mu, var = (
    sd[f"visual.layer2.0.downsample.1.{n}"].astype(np.float64)
    for n in ("weight", "bias", "running_mean", "running_var")
  )
  x = np.linspace(-2, 2, g.size)
  bn = params["visual"]["layer2_0"]["downsample_bn"]
  np.testing.assert_allclose(
    x * bn["scale"] + bn["bias"], (x - mu) / np.sqrt(var + 1e-5) * g + b, rtol=1e-6, atol=1e-6
  )


def test_npz_safetensors_and_torch_files(vit_small, tmp_path, monkeypatch):
  sd, cfg = vit_small
  np.savez(tmp_path / "w.npz", **sd)
  save_file(sd, str(tmp_path / "w.safetensors"))
  want = _flat(convert.convert_state_dict(sd, cfg, "openclip"))
  for name in ("w.npz", "w.safetensors"):
    loaded, hf_config = state_dict_io.load_state_dict(tmp_path / name)
    assert hf_config is None
    got = _flat(convert.convert_state_dict(loaded, cfg, "openclip"))
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)
  # bfloat16 / float16 checkpoints (numpy has no bfloat16) come back as float32.
  import ml_dtypes

  half = {
    "a": np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16),
    "b": np.arange(3, dtype=np.float16),
  }
  save_file(half, str(tmp_path / "half.safetensors"))
  loaded, _ = state_dict_io.load_state_dict(tmp_path / "half.safetensors")
  assert loaded["a"].dtype == loaded["b"].dtype == np.float32
  np.testing.assert_array_equal(loaded["a"], [0, 1, 2, 3])
  (tmp_path / "w.pt").write_bytes(b"not a pickle")
  monkeypatch.setitem(sys.modules, "torch", None)  # as on a machine without PyTorch
  with pytest.raises(ValueError, match="PyTorch pickle and PyTorch is not installed"):
    state_dict_io.load_state_dict(tmp_path / "w.pt")
  with pytest.raises(ValueError, match="unsupported checkpoint type '.ckpt'"):
    (tmp_path / "w.ckpt").write_bytes(b"")
    state_dict_io.load_state_dict(tmp_path / "w.ckpt")


def test_mmts_convert_clip_hf_dir_restores_into_the_model_tree(tmp_path, capsys):
  m = META["models"]["hf_vit_small"]
  sd = _sd("hf_vit_small")
  src = tmp_path / "hf"
  src.mkdir()
  save_file(sd, str(src / "model.safetensors"))
  (src / "config.json").write_text(json.dumps(m["hf_config"]))
  out = tmp_path / "ckpt"
  assert cli_main(["convert", "clip", str(src), "--out", str(out)]) == 0
  printed = json.loads(capsys.readouterr().out)
  assert printed["format"] == "hf" and abs(printed["temperature"] - 0.07) < 1e-6
  cfg, variables = checkpoint.load_converted(out)
  assert cfg.act == "quick_gelu" and cfg.vision_heads == 2 and cfg.image_size == 32
  assert set(variables) == {"params"}
  model = build_model(ml_collections.ConfigDict({"name": "clip", "config_file": str(out)}))
  batch = {"image": jnp.zeros((1, 32, 32, 3)), "text": jnp.zeros((1, 16), jnp.int32)}
  init = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)
  assert jax.tree.structure(init) == jax.tree.structure(variables)
  assert [x.shape for x in jax.tree.leaves(init)] == [x.shape for x in jax.tree.leaves(variables)]
  want = _flat(convert.convert_state_dict(sd, cfg, "hf"))
  got = _flat(variables["params"])
  assert all((got[k] == want[k]).all() for k in want)
  # A second run refuses to overwrite; --overwrite replaces.
  assert cli_main(["convert", "clip", str(src), "--out", str(out)]) == 2
  assert "exists" in capsys.readouterr().err
  assert cli_main(["convert", "clip", str(src), "--out", str(out), "--overwrite"]) == 0


def test_mmts_convert_clip_names_the_bad_key(vit_small, tmp_path, capsys):
  sd, _ = vit_small
  sd = dict(sd)
  del sd["ln_final.bias"]
  np.savez(tmp_path / "w.npz", **sd)
  assert cli_main(["convert", "clip", str(tmp_path / "w.npz"), "--out", str(tmp_path / "o")]) == 2
  assert "'ln_final.bias'" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


def test_build_model_clip_outputs_and_temperature_policy():
  cfg = ml_collections.ConfigDict(
    {
      "name": "clip",
      "variant": "ViT-B/16",
      "image_size": 32,
      "vision_width": 64,
      "vision_heads": 1,
      "vision_layers": (1,),
      "text_width": 64,
      "text_heads": 1,
      "text_layers": 1,
      "embed_dim": 16,
      "context_length": 8,
      "vocab_size": 50,
    }
  )
  batch = {
    "image": jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 3)),
    "text": jnp.array(
      [[48, 5, 49, 0, 0, 0, 0, 0], [48, 7, 8, 49, 0, 0, 0, 0], [48, 9, 9, 9, 9, 9, 9, 49]]
    ),
  }
  fixed = build_model(cfg)
  learn = build_model(cfg, learnable_temperature=True, init_temperature=0.05)
  assert isinstance(fixed, CLIP) and fixed.embed_dim == 16
  shapes = checkpoint.abstract_params(fixed.config)
  assert set(shapes) == {"visual", "text", "logit_scale"}
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32) * 0.1, shapes)
  out = jax.jit(fixed.apply)({"params": params}, batch)
  assert "temperature" not in out and out["image"].shape == out["text"].shape == (3, 16)
  np.testing.assert_allclose(np.linalg.norm(out["image"], axis=-1), 1, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out["text"], axis=-1), 1, rtol=1e-5)
  # The same tree serves both policies; the learnable one reads logit_scale (clamped at 100).
  temperature = lambda s: float(
    learn.apply({"params": dict(params, logit_scale=np.float32(s))}, method=CLIP.temperature)
  )
  assert abs(temperature(np.log(20.0)) - 0.05) < 1e-6
  assert abs(temperature(np.log(500.0)) - 0.01) < 1e-7
  init_ls = learn.init(jax.random.PRNGKey(0), method=CLIP.temperature)["params"]["logit_scale"]
  assert abs(float(init_ls) - np.log(1 / 0.05)) < 1e-6


def test_config_and_input_errors():
  with pytest.raises(ValueError, match="act must be one of"):
    CLIPConfig(act="relu")
  with pytest.raises(ValueError, match="4 stages"):
    CLIPConfig(vision_kind="resnet", vision_layers=(3, 4), patch_size=0)
  with pytest.raises(ValueError, match="variant must be one of"):
    build_model(ml_collections.ConfigDict({"name": "clip", "variant": "ViT-H/14"}))
  with pytest.raises(ValueError, match="unknown keys"):
    build_model(ml_collections.ConfigDict({"name": "clip", "variant": "RN50", "widht": 3}))
  cfg = CLIPConfig(
    embed_dim=8,
    image_size=32,
    vision_width=64,
    vision_layers=(1,),
    vision_heads=1,
    patch_size=16,
    context_length=5,
    vocab_size=10,
    text_width=64,
    text_heads=1,
    text_layers=1,
  )
  model = CLIP(cfg)
  init = lambda image, text: jax.eval_shape(
    model.init, jax.random.PRNGKey(0), {"image": image, "text": text}
  )
  with pytest.raises(ValueError, match=r"image must be \(B, 32, 32, 3\)"):
    init(jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 5), jnp.int32))
  with pytest.raises(ValueError, match=r"tokens must be \(B, 5\)"):
    init(jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 7), jnp.int32))
  with pytest.raises(ValueError, match="integer ids"):
    init(jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 5), jnp.float32))


@pytest.mark.parametrize(
  "name,variant", [("vit_b16", "ViT-B/16"), ("vit_l14", "ViT-L/14"), ("rn50", "RN50")]
)
def test_finetune_configs_build_their_tower(name, variant):
  import importlib.util

  path = pathlib.Path(__file__).parents[1] / "configs" / f"clip_{name}_finetune.py"
  spec = importlib.util.spec_from_file_location(f"clip_{name}_finetune", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for row, mode in (("clip", "learnable"), ("mmts", "mmts")):
    c = module.get_config(row)
    assert c.temperature.mode == mode and c.data.text_len == 77
    model = build_model(c.model, learnable_temperature=mode == "learnable")
    assert model.config == variant_config(variant)
    assert model.learnable_temperature == (mode == "learnable")
