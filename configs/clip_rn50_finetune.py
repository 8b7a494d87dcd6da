"""Fine-tune a converted CLIP RN50 checkpoint with MM-TS (docs/clip.md).

  mmts convert clip CHECKPOINT --out ckpt/clip_rn50
  mmts convert clip-tokenizer --out ckpt/clip_bpe
  mmts train --config configs/clip_rn50_finetune.py[:ROW] --workdir DIR \\
      --config.model.config_file=ckpt/clip_rn50 --config.init.checkpoint=ckpt/clip_rn50 \\
      --config.data.path=/data/records --config.data.tokenizer=ckpt/clip_bpe \\
      --config.mmts.cluster_table=/data/clusters.npz
  ROW: fixed | clip (learnable, from the checkpoint's logit_scale) | ts | ics | mmts (default)
"""

from mmts_jax.models.clip.finetune_config import finetune_config


def get_config(row: str = ""):
  return finetune_config("RN50", row)
