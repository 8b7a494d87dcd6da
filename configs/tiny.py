"""Tiny MM-TS run for tests and smoke checks: trains in seconds on a CPU and logs every step.

Toy long-tail pairs (`data.name="toy_features"`: feature vectors + token ids), a feature tower and
a 1-layer text transformer, MM-TS InfoNCE.

  mmts train --config configs/tiny.py[:ROW] --workdir /tmp/tiny

ROW: fixed | clip | ts | ics | mmts (default) | ics_lm | mmts_lm (level-matched to
temperature.value) | isogclr.
"""

from mmts_jax.config_defaults import default_config, with_row


def get_config(row: str = ""):
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
  return with_row(c, row)
