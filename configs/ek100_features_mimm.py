"""Feature-level EK-100 MIR fine-tuning (AVION MI-MM setting without video decoding).

Projection heads (a small MLP per modality) on precomputed video and text features, trained with
the max-margin loss and MM-TS margins (paper, supplement Sec. 7: alpha = 0.20, shifts
[0.17, 0.30], 5 oscillations; the cluster table from EK-100 noun classes with the official
frequencies). Sized for the synthetic class-derived features of `mmts finetune prepare`
(64-d video, 48-d text); for real frozen AVION features raise `model.*.hidden_dims`,
`model.embed_dim` and `total_steps` (see `configs/avion_ek100_mimm.py` for the full-size run).

  mmts finetune prepare --annotations ../shared/data/ek100 --out data/ek100
  mmts finetune train --data data/ek100 --workdir runs/ek100 \\
      [--config configs/ek100_features_mimm.py[:ROW]] [--config.total_steps=2000 ...]
  ROW: fixed (AVION's margin 0.2) | ts | ics | mmts (default)

`mmts finetune train` fills in `data.path` and `mmts.cluster_table` from `--data`; plain
`mmts train` works too when both are given as overrides (it logs no MIR metrics then).
"""

from mmts_jax.config_defaults import default_config, with_row


def get_config(row: str = ""):
  c = default_config()
  c.total_steps = 1500
  c.batch_size = 256
  c.log_every = 100
  # In-memory batches (fast for small features); "mmts_jax.data.trainer_source:features" reads
  # the same file through grain.
  c.data.update(name="features_in_memory", path="")
  c.model.update(embed_dim=64, dtype="float32")
  c.model.image = dict(name="features", hidden_dims=(128,), dropout=0.0)
  c.model.text = dict(name="features", hidden_dims=(128,), dropout=0.0)
  c.loss.name = "max_margin"
  # Margins for max-margin: AVION's fixed 0.2; TS spans the MM-TS range.
  c.temperature.update(value=0.2, tau_min=0.07, tau_max=0.40)
  c.mmts.update(alpha=0.20, sh_min=0.17, sh_max=0.30, num_oscillations=5, cluster_table="")
  c.optim.update(lr=1e-3, warmup_steps=100, weight_decay=0.01)
  c.checkpoint.update(every_steps=500, keep=2)
  c.eval.every_steps = 500
  return with_row(c, row)
