"""Text side of the preprocessing stage: a Flax BERT-family sentence encoder.

Imports flax, `tokenizers` and `safetensors` (the `text` extra); never imported by
`mmts_jax.losses` or the training step.

Example:
  >>> from mmts_jax.clusters.encoder import SentenceEncoder
  >>> emb = SentenceEncoder.load(None).encode(["open door"])  # the packaged all-MiniLM-L6-v2
  >>> emb.shape, round(float((emb ** 2).sum()), 4)  # one unit vector per sentence
  ((1, 384), 1.0)
"""

from __future__ import annotations

from mmts_jax.clusters.encoder.bert import BertEncoder
from mmts_jax.clusters.encoder.config import BertConfig
from mmts_jax.clusters.encoder.encoder import SentenceEncoder, default_model_dir

__all__ = ["SentenceEncoder", "BertEncoder", "BertConfig", "default_model_dir"]
