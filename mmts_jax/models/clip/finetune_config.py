"""Trainer configs that fine-tune a converted CLIP checkpoint with MM-TS
(`configs/clip_{vit_b16,vit_l14,rn50}_finetune.py` call `finetune_config`).

  mmts convert clip ViT-B-16.safetensors --out ckpt/clip_b16
  mmts convert clip-tokenizer --out ckpt/clip_bpe
  mmts train --config configs/clip_vit_b16_finetune.py:mmts --workdir DIR \\
      --config.model.config_file=ckpt/clip_b16 --config.init.checkpoint=ckpt/clip_b16 \\
      --config.data.path=/data/records --config.data.tokenizer=ckpt/clip_bpe \\
      --config.mmts.cluster_table=/data/clusters.npz

Rows as everywhere (`fixed`, `clip`, `ts`, `ics`, `mmts`). `clip` (learnable) starts from the
checkpoint's `logit_scale`; the others replace it. `fixed` uses 0.01, the temperature OpenAI's
checkpoints end at (their `logit_scale` sits at the clamp, 100); MM-TS keeps the paper's CC3M
values (alpha 0.04, shifts [0.05, 0.10]), see docs/clip.md. Fine-tuning hyper-parameters are a
conservative start (AdamW lr 1e-5, weight decay 0.1, 500 warm-up steps), not tuned values.

Example:
  >>> c = finetune_config("ViT-B/16", "clip")
  >>> c.model.name, c.model.variant, c.temperature.mode, c.data.image_size
  ('clip', 'ViT-B/16', 'learnable', 224)
"""

from __future__ import annotations

import ml_collections

from mmts_jax.models.clip.config import variant_config

__all__ = ["finetune_config"]


def finetune_config(variant: str, row: str = "") -> ml_collections.ConfigDict:
  """The fine-tuning config of one tower (`VARIANTS`) and ablation row."""
  from mmts_jax.config_defaults import default_config, with_row

  shapes = variant_config(variant)
  c = default_config()
  c.total_steps = 10_000
  c.batch_size = 512
  c.log_every = 50
  c.data = ml_collections.ConfigDict(
    dict(
      name="mmts_jax.data.trainer_source:records",
      path="",
      tokenizer="",
      text_len=shapes.context_length,
      image_size=shapes.image_size,
    )
  )
  c.model = ml_collections.ConfigDict(
    dict(
      name="clip",
      variant=variant,
      config_file="",
      dtype="bfloat16",
      remat=shapes.vision_width >= 1024,
    )
  )
  if "init" not in c:  # the trainer's checkpoint-initialisation option
    c.init = ml_collections.ConfigDict(dict(checkpoint=""))
  c.loss.name = "infonce"
  c.temperature.update(value=0.01, tau_min=0.01, tau_max=0.1)
  c.mmts.update(alpha=0.04, sh_min=0.05, sh_max=0.10, num_oscillations=5, k=200)
  c.optim.update(lr=1e-5, warmup_steps=500, weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-6)
  c.checkpoint.update(every_steps=1000, keep=3)
  return with_row(c, row)
