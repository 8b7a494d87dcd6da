"""Tiny MM-TS run for tests and smoke checks: trains in seconds on a CPU and logs every step.

Synthetic long-tail pairs (feature vectors + token ids), a feature tower and a 1-layer text
transformer, MM-TS InfoNCE.

  mmts train --config configs/tiny.py --workdir /tmp/tiny
"""
from mmts_jax.train import default_config


def get_config():
  c = default_config()
  c.total_steps = 20
  c.batch_size = 32
  c.log_every = 1
  c.progress_bar = False
  c.data.update(num_examples=512, num_clusters=16, image_dim=16, text_len=8, vocab_size=64)
  c.model.update(embed_dim=16)
  c.model.image.hidden_dims = (32,)
  c.model.text.update(vocab_size=64, max_len=8, width=16, depth=1, num_heads=2, mlp_dim=32)
  c.optim.update(lr=3e-3, warmup_steps=2)
  c.checkpoint.update(every_steps=5, keep=2)
  return c
