"""Converted CLIP towers against the PyTorch models' outputs (tests/data/clip/, made on the GPU
machine by tests/data/clip/make_reference.py with OpenCLIP 3.3.0 / transformers 5.17 in f32).

The PyTorch model was filled with `random_state_dict(keys, seed)`; here the same weights are
regenerated from the stored key list, converted by `convert_state_dict` and run through the Flax
`CLIP`. Tolerance: 1 - cos < 1e-5 per row and |z - z_ref| < 1e-5 on the unit-norm embeddings
(measured ~1e-7), and the unnormalised features within 1e-4 relative.
"""

import json
import pathlib

import jax
import numpy as np
import pytest

from mmts_jax.models.clip import convert
from mmts_jax.models.clip.config import variant_config
from mmts_jax.models.clip.model import CLIP
from mmts_jax.models.clip.random_state_dict import parity_inputs, random_state_dict

DATA = pathlib.Path(__file__).parent / "data" / "clip"
META = json.loads((DATA / "clip_reference.json").read_text())
REF = dict(np.load(DATA / "clip_reference.npz"))


_IMAGE_PREFIXES = ("visual", "vision_model.")  # OpenCLIP `visual.*`, HF `vision_model.*`


def _converted(name, side=None):
  """Regenerate, convert. With `side`, the other tower's weights are zeros (they do not reach
  this side's output) to save CPU time on the full-size models."""
  m = META["models"][name]
  keys = [(k, s) for k, s, _ in m["keys"]]
  if side is None:
    sd = random_state_dict(keys, META["seed"])
  else:
    mine = lambda k: k.startswith(_IMAGE_PREFIXES) == (side == "image")
    sd = random_state_dict([(k, s) for k, s in keys if mine(k)], META["seed"])
    sd.update({k: np.zeros(s, np.float32) for k, s in keys if not mine(k)})
  cfg = convert.infer_config(sd, m["format"], act=m["act"], hf_config=m["hf_config"])
  return m, cfg, convert.convert_state_dict(sd, cfg, m["format"])


def _check(name, m, cfg, params, sides):
  images, tokens = parity_inputs(
    META["seed"], m["batch"], m["image_size"], m["context_length"], m["vocab_size"]
  )
  model = CLIP(cfg)
  batch = {"image": images.transpose(0, 2, 3, 1), "text": tokens.astype(np.int32)}
  if len(sides) == 1:
    method = CLIP.encode_image if sides == ("image",) else CLIP.encode_text
    fn = lambda p, b: {sides[0]: model.apply(p, b[sides[0]], method=method)}
  else:  # one compiled program for both towers
    fn = model.apply
  out = jax.jit(fn)({"params": params}, batch)
  for side in sides:
    z = np.asarray(out[side], np.float64)
    raw = REF[f"{name}/{side}_features"].astype(np.float64)
    ref = raw / np.linalg.norm(raw, axis=-1, keepdims=True)
    one_minus_cos = 1.0 - (z * ref).sum(-1)
    assert one_minus_cos.max() < 1e-5, (name, side, one_minus_cos)
    np.testing.assert_allclose(z, ref, atol=1e-5, err_msg=f"{name} {side}")
    # The reference rows differ from each other far more than the tolerance: a real check.
    if len(ref) > 1:
      assert 1.0 - (ref[0] * ref[1]).sum() > 1e-4, (name, side)


@pytest.mark.parametrize("name", ["openclip_vit_small", "openclip_rn_small", "hf_vit_small"])
def test_small_random_clip_matches_pytorch(name):
  m, cfg, params = _converted(name)
  _check(name, m, cfg, params, ("image", "text"))


@pytest.mark.parametrize("side", ["image", "text"])
def test_vit_b16_openclip_matches_pytorch(side):
  m, cfg, params = _converted("openclip_vit_b16", side)
  assert cfg == variant_config("ViT-B/16")
  _check("openclip_vit_b16", m, cfg, params, (side,))


def test_rn50_openclip_matches_pytorch_image():
  # Its text tower has ViT-B/16's shapes but for the 1024-wide projection; the ViT-B/16 test
  # checks that tower at full size, so only the image side runs here (CPU time).
  m, cfg, params = _converted("openclip_rn50", "image")
  assert cfg == variant_config("RN50")
  _check("openclip_rn50", m, cfg, params, ("image",))


def test_hf_vit_b16_config_inferred_from_hf_naming():
  m = META["models"]["hf_vit_b16"]
  sd = {k: np.zeros(s, np.float32) for k, s, _ in m["keys"]}
  assert convert.detect_format(sd) == "hf"
  assert convert.infer_config(sd, "hf", hf_config=m["hf_config"]) == variant_config("ViT-B/16")
  assert convert.infer_config(sd, "hf") == variant_config("ViT-B/16")  # width / 64 heads


def test_stored_gpu_parity_numbers_within_tolerance():
  # make_reference.py --jax ran this converter and model on the GPU host's CPU as well, for the
  # sizes too slow for CI (ViT-L/14, ViT-B/32, HF ViT-B/16); docs/clip.md quotes these numbers.
  ran = {n: m["jax_parity"] for n, m in META["models"].items() if "jax_parity" in m}
  assert {"openclip_vit_l14", "openclip_vit_b32", "hf_vit_b16"} <= set(ran)
  for name, p in ran.items():
    for side in ("image", "text"):
      assert p[f"{side}_max_1_minus_cos"] < 1e-5 and p[f"{side}_max_abs"] < 1e-5, (name, p)
