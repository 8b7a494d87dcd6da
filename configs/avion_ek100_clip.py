"""AVION-style EK-100 multi-instance retrieval with InfoNCE (CLIP loss), MM-TS temperatures.

Paper (supplement Sec. 7): alpha = 0.08, shifts [0.05, 0.20], 5 oscillations, noun classes as
clusters (see `avion_ek100_mimm.py` for the data and the cluster table).

  mmts train --config configs/avion_ek100_clip.py[:ROW] --workdir DIR \\
      --config.data.path=/data/ek100_features.npz --config.mmts.cluster_table=/data/ek100_nouns.npz
  ROW: fixed | clip | ts | ics | mmts (default)
"""

from mmts_jax.config_defaults import default_config, with_row


def get_config(row: str = ""):
  c = default_config()
  c.total_steps = 15_000
  c.batch_size = 512
  c.log_every = 100
  c.data.update(name="mmts_jax.data.trainer_source:features", path="")
  c.model.update(embed_dim=256, dtype="float32")
  c.model.image = dict(name="features", hidden_dims=(1024,), dropout=0.1)
  c.model.text = dict(name="features", hidden_dims=(1024,), dropout=0.1)
  c.loss.name = "infonce"
  c.temperature.update(value=0.07, tau_min=0.05, tau_max=0.25)
  c.mmts.update(alpha=0.08, sh_min=0.05, sh_max=0.20, num_oscillations=5, k=300)
  c.optim.update(lr=3e-4, warmup_steps=500, weight_decay=0.05)
  c.checkpoint.update(every_steps=1000, keep=3)
  return with_row(c, row)
