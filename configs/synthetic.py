"""The built-in synthetic long-tail benchmark (`mmts synthetic`): CLIP vs MM-TS on the 2-core CPU.

Data: `mmts_jax.synthetic.generator` (40 Zipf classes, imbalance 100, image features + real
captions). Model: a feature MLP over the image features and a 1-layer text transformer over the
caption tokens, 64-d embeddings. Ablation rows (same budget, same seeds):

| row    | temperature of anchor i at step t                      |
| ------ | ------------------------------------------------------ |
| `clip` | 0.07 (fixed, CLIP)                                     |
| `ts`   | 0.04 + 0.06 (1 + cos(2 pi t / T)) / 2 (uni-modal TS)   |
| `ics`  | sh(c_i) in [0.05, 0.10]            (cluster shift)     |
| `mmts` | 0.02 cos(2 pi t / T) + sh(c_i)     (TS&ICS, Eq. 8)     |

`T = total_steps / 5`. alpha = 0.04 and sh in [0.05, 0.10] are the paper's CLIP/CC3M values; the
lowest value reached, sh_min - alpha/2 = 0.03, is > 0 (checked by `shifts.validate_positive`). The
TS row spans the same [0.04, 0.10] range MM-TS sweeps around its mid cluster, and the fixed row
sits at CLIP's 0.07, so the rows differ in how the temperature moves, not in its level.

  mmts synthetic                                   # the whole benchmark, ~6 minutes on 2 cores
  mmts train --config configs/synthetic.py:mmts    # one row through the generic trainer needs
                                                   # config.data.path: `mmts synthetic` writes it
"""
from __future__ import annotations

import ml_collections

from mmts_jax.synthetic import generator
from mmts_jax.train import default_config

# Row name -> overrides of `config.temperature`. Shared MM-TS values live in `config.mmts`.
ROWS = {
    "clip": dict(mode="fixed", value=0.07),
    "ts": dict(mode="ts", tau_min=0.04, tau_max=0.10),
    "ics": dict(mode="ics"),
    "mmts": dict(mode="mmts"),
}
ROW_LABELS = {"clip": "CLIP (fixed 0.07)", "ts": "TS", "ics": "ICS", "mmts": "TS&ICS (MM-TS)",
              "learnable": "CLIP (learnable)"}
EXTRA_ROWS = {"learnable": dict(mode="learnable", value=0.07)}


def row_temperature(row: str) -> dict:
  """The `config.temperature` overrides of one ablation row."""
  table = {**ROWS, **EXTRA_ROWS}
  if row not in table:
    raise ValueError(f"unknown ablation row {row!r}; choose from {sorted(table)}")
  return dict(table[row])


def get_config(row: str = "mmts") -> ml_collections.ConfigDict:
  c = default_config()
  c.seed = 0
  c.total_steps = 300
  c.batch_size = 256
  c.log_every = 10
  c.progress_bar = False
  c.tensorboard = False
  vocab_size = len(generator.build_vocab())
  gen = generator.GeneratorConfig()
  c.data = ml_collections.ConfigDict(dict(name="npz", path="", shuffle=True))
  c.model = ml_collections.ConfigDict(dict(
      embed_dim=64, dtype="float32",
      image=dict(name="features", hidden_dims=(128,), dropout=0.0, input_key="image_features"),
      text=dict(name="transformer", vocab_size=vocab_size, max_len=gen.max_len, width=64,
                depth=1, num_heads=2, mlp_dim=128, pool="mean", causal=False, pad_id=0)))
  c.loss = ml_collections.ConfigDict(dict(name="infonce", impl="dense"))
  c.temperature = ml_collections.ConfigDict(dict(mode="fixed", value=0.07, tau_min=0.07,
                                                 tau_max=1.0))
  c.temperature.update(row_temperature(row))
  c.mmts.update(alpha=0.04, sh_min=0.05, sh_max=0.10, num_oscillations=5)
  c.optim.update(lr=2e-3, warmup_steps=20, weight_decay=0.1)
  c.checkpoint.update(every_steps=100_000, keep=1, async_save=False)
  c.eval.every_steps = 50
  # The benchmark itself (read by `mmts_jax.synthetic.benchmark`, ignored by the trainer).
  c.synthetic = ml_collections.ConfigDict(dict(
      rows=tuple(ROWS), seeds=1, num_clusters=30, cluster_seed=0,
      generator=dict(num_classes=gen.num_classes, head_size=gen.head_size,
                     imbalance=gen.imbalance, latent_dim=gen.latent_dim,
                     image_dim=gen.image_dim, head_spread=gen.head_spread,
                     test_per_class=gen.test_per_class, seed=gen.seed)))
  return c
