"""Configuration of the synthetic long-tail benchmark (`mmts synthetic`) and its ablation rows.

It lives in the package so that `mmts synthetic` works from any directory; `configs/synthetic.py`
re-exports it for `mmts train --config configs/synthetic.py:ROW`.

Data: `mmts_jax.longtail` (40 Zipf classes, imbalance 100, image features + real captions),
through the trainer's input protocol (`mmts_jax.longtail.source:make_source`). Model: a feature
MLP over the image features and a 1-layer text transformer over the caption tokens, 64-d
embeddings. Rows (same budget, same seeds; `mmts_jax.train.with_row`):

| row     | temperature of anchor i at step t                      |
| ------- | ------------------------------------------------------ |
| `fixed` | 0.07                                                   |
| `clip`  | CLIP's learnable temperature, initialised at 0.07      |
| `ts`    | 0.04 + 0.06 (1 + cos(2 pi t / T)) / 2 (uni-modal TS)   |
| `ics`   | sh(c_i) in [0.05, 0.10]            (cluster shift)     |
| `mmts`  | 0.02 cos(2 pi t / T) + sh(c_i)     (TS&ICS, Eq. 8)     |

`T = total_steps / 5`. alpha = 0.04 and sh in [0.05, 0.10] are the paper's CLIP/CC3M values; the
lowest value reached, sh_min - alpha/2 = 0.03, is > 0 (`shifts.validate_positive`). TS spans
[0.04, 0.10], the range MM-TS sweeps around its middle cluster, and the fixed row sits at CLIP's
0.07: the rows differ in how the temperature moves, not in its level.

  mmts synthetic                                      # all rows, K-Means table, table + plots
  mmts train --config configs/synthetic.py:ROW --workdir DIR   # one row; ROW: fixed | clip |
      # ts | ics | mmts (default). Without a cluster table (config.mmts.cluster_table) the
      # shifts come from the class sizes.
"""

from __future__ import annotations

import ml_collections

from mmts_jax.config_defaults import default_config, with_row
from mmts_jax.longtail import generator

# Rows `mmts synthetic` trains by default, and their names in tables and plots.
BENCHMARK_ROWS = ("fixed", "ts", "ics", "mmts")
ROW_LABELS = {
  "fixed": "fixed tau=0.07",
  "clip": "CLIP (learnable tau)",
  "ts": "TS",
  "ics": "ICS",
  "mmts": "TS&ICS (MM-TS)",
}


def get_config(row: str = "") -> ml_collections.ConfigDict:
  c = default_config()
  c.seed = 0
  c.total_steps = 300
  c.batch_size = 256
  c.log_every = 10
  c.progress_bar = False
  c.tensorboard = False
  gen = generator.GeneratorConfig()
  c.data = ml_collections.ConfigDict(
    dict(
      name="mmts_jax.longtail.source:make_source",
      shuffle=True,
      num_classes=gen.num_classes,
      head_size=gen.head_size,
      imbalance=gen.imbalance,
      latent_dim=gen.latent_dim,
      image_dim=gen.image_dim,
      head_spread=gen.head_spread,
      test_per_class=gen.test_per_class,
      seed=gen.seed,
    )
  )
  c.model = ml_collections.ConfigDict(
    dict(
      embed_dim=64,
      dtype="float32",
      image=dict(name="features", hidden_dims=(128,), dropout=0.0, input_key="image_features"),
      text=dict(
        name="transformer",
        vocab_size=len(generator.build_vocab()),
        max_len=gen.max_len,
        width=64,
        depth=1,
        num_heads=2,
        mlp_dim=128,
        pool="mean",
        causal=False,
        pad_id=0,
      ),
    )
  )
  c.loss.update(name="infonce", impl="dense")
  c.temperature.update(value=0.07, tau_min=0.04, tau_max=0.10)
  c.mmts.update(alpha=0.04, sh_min=0.05, sh_max=0.10, num_oscillations=5)
  c.optim.update(lr=2e-3, warmup_steps=20, weight_decay=0.1)
  c.checkpoint.update(every_steps=500, keep=1, async_save=False)
  c.eval.every_steps = 50
  # Read by `mmts_jax.longtail.benchmark` only (the trainer ignores it). cluster_source:
  # "captions" (MiniLM + K-Means with num_clusters, the paper's recipe) or "classes" (the
  # generator's classes, an oracle clustering).
  c.synthetic = ml_collections.ConfigDict(
    dict(
      rows=BENCHMARK_ROWS,
      seeds=1,
      num_clusters=30,
      cluster_seed=0,
      num_devices=0,
      cluster_source="captions",
    )
  )
  return with_row(c, row)
