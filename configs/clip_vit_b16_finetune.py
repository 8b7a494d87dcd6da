"""Fine-tune a converted CLIP ViT-B/16 checkpoint with MM-TS (docs/clip.md).

  mmts convert clip CHECKPOINT --out ckpt/clip_vit_b16
  mmts convert clip-tokenizer --out ckpt/clip_bpe
  mmts train --config configs/clip_vit_b16_finetune.py[:ROW] --workdir DIR \\
      --config.model.config_file=ckpt/clip_vit_b16 --config.init.checkpoint=ckpt/clip_vit_b16 \\
      --config.data.path=/data/records --config.data.tokenizer=ckpt/clip_bpe \\
      --config.mmts.cluster_table=/data/clusters.npz
  ROW: fixed | clip (learnable, from the checkpoint's logit_scale) | ts | ics | mmts (default)
"""

from mmts_jax.models.clip.finetune_config import finetune_config


def get_config(row: str = ""):
  return finetune_config("ViT-B/16", row)
