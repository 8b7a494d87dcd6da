"""Makes the PyTorch reference outputs that tests/test_clip_parity.py compares against.

Runs where torch, transformers and open_clip_torch are installed (the GPU machine; see
docs/clip.md). For each model it builds the PyTorch CLIP (OpenCLIP's `CLIP` or transformers'
`CLIPModel`), fills its state dict with `random_state_dict(keys, seed)` (loaded strictly), runs
it in float32 (TF32 off) on `parity_inputs(...)`, and stores the image / text features and their
normalised embeddings in `clip_reference.npz` plus the key list, shapes and configs in
`clip_reference.json`: CI regenerates the same weights from the key list and needs no PyTorch.
Token ids of OpenCLIP's tokenizer for fixed strings are stored too. With `--jax` it also runs
this repository's converter and Flax model (CPU backend) on the same weights and records the
parity numbers.

  python3 tests/data/clip/make_reference.py --out DIR [--jax] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import time
import traceback

import numpy as np

HERE = pathlib.Path(__file__).resolve()
SEED = 0
TOKENIZER_TEXTS = [
  "a photo of a cat",
  "A Photo Of A DOG!!",
  "",
  "  multiple   spaces\tand\nnewlines  ",
  "it's what we'll do, isn't it? they've I'd you're",
  "numbers 12345 and 3.14159 and 1,000,000",
  "caf\u00e9 na\u00efve \u00fcber r\u00e9sum\u00e9",
  "html &amp; entities &lt;b&gt; &quot;quoted&quot;",
  "emoji \U0001f600 \U0001f44d and symbols \u00a9 \u2122 \u00b0C",
  "\u4e2d\u6587 \u65e5\u672c\u8a9e \ud55c\uad6d\uc5b4",
  "hyphen-ated words/slashes_under_scores #hashtag @mention",
  "<start_of_text>literal special<end_of_text>",
  " ".join(["long caption"] * 60),
  "x" * 300,
]

SMALL_TEXT = dict(context_length=16, vocab_size=1000, width=128, heads=2, layers=2)
FULL_TEXT = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)
OPENCLIP = {
  "openclip_vit_small": dict(
    embed_dim=64,
    quick_gelu=False,
    batch=4,
    text=SMALL_TEXT,
    vision=dict(image_size=32, patch_size=8, width=128, layers=2),
  ),
  "openclip_rn_small": dict(
    embed_dim=64,
    quick_gelu=True,
    batch=4,
    text=SMALL_TEXT,
    vision=dict(image_size=64, layers=[1, 2, 1, 1], width=16, patch_size=None),
  ),
  "openclip_vit_b16": dict(
    embed_dim=512,
    quick_gelu=True,
    batch=2,
    text=FULL_TEXT,
    vision=dict(image_size=224, patch_size=16, width=768, layers=12),
  ),
  "openclip_rn50": dict(
    embed_dim=1024,
    quick_gelu=True,
    batch=2,
    text=FULL_TEXT,
    vision=dict(image_size=224, layers=[3, 4, 6, 3], width=64, patch_size=None),
  ),
  "openclip_vit_b32": dict(
    embed_dim=512,
    quick_gelu=False,
    batch=2,
    text=FULL_TEXT,
    vision=dict(image_size=224, patch_size=32, width=768, layers=12),
  ),
  "openclip_vit_l14": dict(
    embed_dim=768,
    quick_gelu=True,
    batch=2,
    text=dict(FULL_TEXT, width=768, heads=12),
    vision=dict(image_size=224, patch_size=14, width=1024, layers=24),
  ),
}
HF = {
  "hf_vit_small": dict(
    projection_dim=64,
    batch=4,
    act="quick_gelu",
    text=dict(
      vocab_size=1000,
      hidden_size=128,
      intermediate_size=512,
      num_hidden_layers=2,
      num_attention_heads=2,
      max_position_embeddings=16,
    ),
    vision=dict(
      hidden_size=128,
      intermediate_size=512,
      num_hidden_layers=2,
      num_attention_heads=2,
      image_size=32,
      patch_size=8,
    ),
  ),
  "hf_vit_b16": dict(
    projection_dim=512,
    batch=2,
    act="quick_gelu",
    text=dict(
      vocab_size=49408,
      hidden_size=512,
      intermediate_size=2048,
      num_hidden_layers=12,
      num_attention_heads=8,
      max_position_embeddings=77,
    ),
    vision=dict(
      hidden_size=768,
      intermediate_size=3072,
      num_hidden_layers=12,
      num_attention_heads=12,
      image_size=224,
      patch_size=16,
    ),
  ),
}


def _load_generator():
  path = HERE.parents[3] / "mmts_jax" / "models" / "clip" / "random_state_dict.py"
  spec = importlib.util.spec_from_file_location("clip_random_state_dict", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _fill(model, gen):
  import torch

  keys = [
    (k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()
  ]
  sd = gen.random_state_dict([(k, s) for k, s, _ in keys], SEED)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  return keys, sd


def _stats(emb):
  emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  g = emb @ emb.T
  off = g[~np.eye(len(g), dtype=bool)]
  return float(off.mean()) if off.size else None


def run_openclip(name, spec, gen, device):
  import open_clip
  import torch

  vision = dict(spec["vision"])
  text = dict(spec["text"])
  model = open_clip.model.CLIP(spec["embed_dim"], vision, text, quick_gelu=spec["quick_gelu"])
  keys, sd = _fill(model, gen)
  model = model.to(device).eval().float()
  images, tokens = gen.parity_inputs(
    SEED, spec["batch"], vision["image_size"], text["context_length"], text["vocab_size"]
  )
  with torch.no_grad():
    fi = model.encode_image(torch.from_numpy(images).to(device)).cpu().numpy()
    ft = model.encode_text(torch.from_numpy(tokens).to(device)).cpu().numpy()
  meta = dict(
    format="openclip",
    act="quick_gelu" if spec["quick_gelu"] else "gelu",
    batch=spec["batch"],
    image_size=vision["image_size"],
    context_length=text["context_length"],
    vocab_size=text["vocab_size"],
    torch_config=spec,
    keys=keys,
    hf_config=None,
    mean_offdiag_cos_image=_stats(fi),
    mean_offdiag_cos_text=_stats(ft),
  )
  return meta, sd, {"image_features": fi, "text_features": ft}


def run_hf(name, spec, gen, device):
  import torch
  import transformers

  vocab = spec["text"]["vocab_size"]
  text = dict(
    spec["text"],
    hidden_act=spec["act"],
    eos_token_id=vocab - 1,
    bos_token_id=vocab - 2,
    pad_token_id=0,
  )
  vision = dict(spec["vision"], hidden_act=spec["act"])
  config = transformers.CLIPConfig(
    text_config=text, vision_config=vision, projection_dim=spec["projection_dim"]
  )
  model = transformers.CLIPModel(config)
  keys, sd = _fill(model, gen)
  model = model.to(device).eval().float()
  images, tokens = gen.parity_inputs(
    SEED, spec["batch"], vision["image_size"], text["max_position_embeddings"], vocab
  )
  with torch.no_grad():
    out = model(
      input_ids=torch.from_numpy(tokens).to(device),
      pixel_values=torch.from_numpy(images).to(device),
      return_dict=True,
    )
    # image_embeds / text_embeds are the normalised projections; undo nothing, store both.
    vo = model.vision_model(pixel_values=torch.from_numpy(images).to(device))
    fi = model.visual_projection(vo.pooler_output).cpu().numpy()
    to = model.text_model(input_ids=torch.from_numpy(tokens).to(device))
    ft = model.text_projection(to.pooler_output).cpu().numpy()
  ni, nt = out.image_embeds.cpu().numpy(), out.text_embeds.cpu().numpy()
  check = max(
    float(np.abs(ni - fi / np.linalg.norm(fi, axis=-1, keepdims=True)).max()),
    float(np.abs(nt - ft / np.linalg.norm(ft, axis=-1, keepdims=True)).max()),
  )
  meta = dict(
    format="hf",
    act=spec["act"],
    batch=spec["batch"],
    image_size=vision["image_size"],
    context_length=text["max_position_embeddings"],
    vocab_size=vocab,
    torch_config=spec,
    keys=keys,
    hf_config=config.to_dict(),
    hf_embeds_vs_features_max_abs=check,
    mean_offdiag_cos_image=_stats(fi),
    mean_offdiag_cos_text=_stats(ft),
  )
  return meta, sd, {"image_features": fi, "text_features": ft}


def jax_parity(meta, sd, ref):
  """This repository's converter + Flax model on the same weights -> parity numbers."""
  import jax

  jax.config.update("jax_default_matmul_precision", "highest")
  from mmts_jax.models.clip import convert
  from mmts_jax.models.clip.model import CLIP

  gen = _load_generator()
  fmt = meta["format"]
  cfg = convert.infer_config(sd, fmt, act=meta["act"], hf_config=meta["hf_config"])
  params = convert.convert_state_dict(sd, cfg, fmt)
  images, tokens = gen.parity_inputs(
    SEED, meta["batch"], meta["image_size"], meta["context_length"], meta["vocab_size"]
  )
  model = CLIP(cfg)
  variables = {"params": params}
  zi = np.asarray(model.apply(variables, images.transpose(0, 2, 3, 1), method=CLIP.encode_image))
  zt = np.asarray(model.apply(variables, tokens.astype(np.int32), method=CLIP.encode_text))
  out = {"config": cfg.to_dict()}
  for side, z in (("image", zi), ("text", zt)):
    r = ref[f"{side}_features"].astype(np.float64)
    r = r / np.linalg.norm(r, axis=-1, keepdims=True)
    cos = (z.astype(np.float64) * r).sum(-1)
    out[f"{side}_max_1_minus_cos"] = float((1 - cos).max())
    out[f"{side}_max_abs"] = float(np.abs(z - r).max())
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--out", required=True)
  p.add_argument("--jax", action="store_true")
  p.add_argument("--only", default="")
  args = p.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  import torch

  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  device = "cuda" if torch.cuda.is_available() else "cpu"
  gen = _load_generator()
  versions = {"torch": torch.__version__, "device": device}
  for mod in ("transformers", "open_clip", "numpy", "jax", "flax"):
    try:
      versions[mod] = __import__(mod).__version__
    except Exception as e:  # record, do not stop: the other parts still run
      versions[mod] = f"unavailable: {e!r}"
  result = {"seed": SEED, "versions": versions, "models": {}, "errors": {}}
  arrays = {}
  try:
    from open_clip.tokenizer import SimpleTokenizer

    ids = SimpleTokenizer()(TOKENIZER_TEXTS).numpy()
    arrays["tokenizer/open_clip_ids"] = ids.astype(np.int32)
    result["tokenizer_texts"] = TOKENIZER_TEXTS
  except Exception:
    result["errors"]["tokenizer"] = traceback.format_exc()
    print(result["errors"]["tokenizer"], flush=True)
  only = set(filter(None, args.only.split(",")))
  jobs = [(n, s, run_openclip) for n, s in OPENCLIP.items()] + [
    (n, s, run_hf) for n, s in HF.items()
  ]
  for name, spec, fn in jobs:
    if only and name not in only:
      continue
    t0 = time.time()
    try:
      meta, sd, ref = fn(name, spec, gen, device)
      for k, v in ref.items():
        arrays[f"{name}/{k}"] = v.astype(np.float32)
      result["models"][name] = meta
      print(f"{name}: torch done in {time.time() - t0:.1f}s", flush=True)
      if args.jax:
        t1 = time.time()
        meta["jax_parity"] = jax_parity(meta, sd, ref)
        meta["jax_parity"]["seconds"] = time.time() - t1
        numbers = {k: v for k, v in meta["jax_parity"].items() if k != "config"}
        print(f"{name}: {json.dumps(numbers)}", flush=True)
    except Exception:
      result["errors"][name] = traceback.format_exc()
      print(f"{name} FAILED\n{result['errors'][name]}", flush=True)
    np.savez(out / "clip_reference.npz", **arrays)
    (out / "clip_reference.json").write_text(json.dumps(result, indent=1))
  return 1 if result["errors"] else 0


if __name__ == "__main__":
  sys.exit(main())
