"""CLIP ViT-B/16 on CC3M from scratch, MM-TS InfoNCE, with the GPU speed preset.

`configs/clip_rn50_cc3m.py` with another image tower: the paper's values (supplement Sec. 7:
alpha = 0.04, shifts [0.05, 0.10], K-Means k = 200 on caption embeddings, 5 oscillations),
the text transformer, data, optimizer and schedule are read from that file. The model is the one
issue 17's train-step benchmark times against OpenCLIP's ViT-B-16 (ViT-B/16 at 224 px + CLIP's
12-layer text transformer, 512-d embeddings); batch and schedule are `clip_rn50_cc3m.py`'s
(batch 1024, ~30 epochs of ~2.8M pairs, AdamW 1e-3), an assumption, not a tuned recipe. The
towers and optimizer take `mmts_jax.speed_presets.with_speed(c, "gpu")`, the fastest measured
step on one H200 (docs/training.md; the XLA forms on CPU/TPU). Its optimizer state is laid out
flat (`optim.flatten`), so with `--config.mesh.param_sharding=fsdp` also pass
`--config.optim.flatten=False`.

  mmts train --config configs/clip_vit_b16_cc3m.py[:ROW] --workdir gs://.../clip_b16_cc3m \\
      --config.data.path=/data/cc3m --config.data.tokenizer=/data/clip_bpe \\
      --config.mmts.cluster_table=/data/cc3m/clusters_k200.npz
  ROW: fixed | clip (learnable temperature, the CLIP baseline) | ts | ics | mmts (default)
"""

import importlib.util
import os

from mmts_jax.config_defaults import with_row
from mmts_jax.speed_presets import with_speed


def _rn50_config():
  """`configs/clip_rn50_cc3m.py`'s config (loaded beside this file: configs are read by path)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_rn50_cc3m.py")
  spec = importlib.util.spec_from_file_location("_clip_rn50_cc3m", path)
  assert spec is not None and spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(row: str = ""):
  c = _rn50_config()
  c.model.update(embed_dim=512)
  c.model.image = dict(name="vit", variant="B/16")
  return with_row(with_speed(c, "gpu"), row)
