"""VAST-style YouCook2 text-video retrieval with InfoNCE (CLIP loss), MM-TS temperatures.

Paper (supplement Sec. 7): alpha = 0.06, shifts [0.06, 0.09], K-Means k = 200 on caption
embeddings, 5 oscillations. Trains feature towers on precomputed VAST video / caption features
(`mmts_jax.data.features.save_features`); cluster the captions with `mmts cluster`.

  mmts train --config configs/vast_youcook2_clip.py[:ROW] --workdir DIR \\
      --config.data.path=/data/yc2_features.npz --config.mmts.cluster_table=/data/yc2_k200.npz
  ROW: fixed | clip | ts | ics | mmts (default)
"""

from mmts_jax.config_defaults import default_config, with_row


def get_config(row: str = ""):
  c = default_config()
  c.total_steps = 6_000  # ~40 epochs of ~10k YouCook2 training clips at batch 64
  c.batch_size = 64
  c.log_every = 50
  c.data.update(name="mmts_jax.data.trainer_source:features", path="")
  c.model.update(embed_dim=512, dtype="float32")
  c.model.image = dict(name="features", hidden_dims=(1024,), dropout=0.1)
  c.model.text = dict(name="features", hidden_dims=(1024,), dropout=0.1)
  c.loss.name = "infonce"
  c.temperature.update(value=0.07, tau_min=0.05, tau_max=0.10)
  c.mmts.update(alpha=0.06, sh_min=0.06, sh_max=0.09, num_oscillations=5, k=200)
  c.optim.update(lr=2e-4, warmup_steps=300, weight_decay=0.01)
  c.checkpoint.update(every_steps=1000, keep=3)
  return with_row(c, row)
