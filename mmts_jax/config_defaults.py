"""Every key the trainer reads, with its default, and the paper's ablation rows: data only.

This module imports ml_collections and nothing else of the project's stack (no JAX, flax, optax
or orbax), so `import configs.tiny` is cheap and a config file can be read anywhere.

The one alias table, `ROW_ALIASES`, maps every accepted ablation-row or temperature-mode name to
the canonical policy name (`mmts_jax.temperature.POLICIES`).

Example:
  >>> c = with_row(default_config(), "clip")
  >>> c.temperature.mode, canonical_mode("TS&ICS")
  ('learnable', 'mmts')
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

__all__ = [
  "default_config",
  "with_row",
  "canonical_mode",
  "ROW_ALIASES",
  "MODES",
  "RUN_NEUTRAL_KEYS",
]

# Canonical temperature / margin policies, one per row of the paper's ablation.
MODES = ("fixed", "learnable", "ts", "ics", "mmts", "ics_lm", "mmts_lm", "isogclr")
# Every accepted name -> its canonical mode. Rows are named as in the paper's tables.
ROW_ALIASES = {
  "fixed": "fixed",
  "clip": "learnable",
  "learnable": "learnable",
  "ts": "ts",
  "ics": "ics",
  "mmts": "mmts",
  "ts_ics": "mmts",
  "ts&ics": "mmts",
  "mm-ts": "mmts",
  "ics_lm": "ics_lm",
  "mmts_lm": "mmts_lm",
  "mm-ts_lm": "mmts_lm",
  "isogclr": "isogclr",
}

# Keys whose value does not change what a run computes (how often it logs, saves or evaluates,
# how it is displayed, how many threads read the data, how the state is laid out on devices):
# a resumed run may change them without `--allow-config-change`. A key ending in "." is a prefix.
RUN_NEUTRAL_KEYS = (
  "progress_bar",
  "tensorboard",
  "log_every",
  "distributed",
  "checkpoint.",
  "eval.",
  "mesh.",
  "data.num_threads",
  "data.worker_count",
)


def default_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, with defaults: the toy long-tail feature data
  (`data.name="toy_features"`), MM-TS InfoNCE with the CLIP/CC3M alpha and shift range.
  `configs/*.py` start from this."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 256  # global, over all devices and hosts
  c.log_every = 50
  c.progress_bar = True
  c.tensorboard = True
  c.distributed = "auto"  # jax.distributed.initialize(): True / False / "auto"
  # name: a source of `mmts_jax.data.sources.SOURCES` or "package.module:function".
  c.data = ml_collections.ConfigDict(
    dict(
      name="toy_features",
      path="",
      num_examples=4096,
      num_clusters=50,
      zipf=1.1,
      image_dim=64,
      text="tokens",
      text_len=16,
      vocab_size=256,
      noise=0.5,
      shuffle=True,
    )
  )
  c.model = ml_collections.ConfigDict(
    dict(
      embed_dim=64,
      dtype="float32",
      image=dict(name="features", hidden_dims=(128,), dropout=0.0),
      text=dict(
        name="transformer",
        vocab_size=256,
        max_len=16,
        width=64,
        depth=2,
        num_heads=2,
        mlp_dim=128,
        pool="mean",
        causal=False,
        pad_id=0,
      ),
    )
  )
  # block_size: None (the default tile), an int or (rows, cols); `object` lets
  # `--config.loss.block_size=64` override the None default.
  # bias_init: loss "sigmoid" only, the initial learned logit bias b (SigLIP's -10).
  c.loss = ml_collections.ConfigDict(
    dict(name="infonce", impl="auto", block_size=config_dict.placeholder(object), bias_init=-10.0)
  )
  # For loss "max_margin" every value below is a margin instead of a temperature.
  c.temperature = ml_collections.ConfigDict(
    dict(mode="mmts", value=0.07, tau_min=0.07, tau_max=1.0)
  )
  c.mmts = ml_collections.ConfigDict(
    dict(
      alpha=0.04,
      sh_min=0.05,
      sh_max=0.10,
      num_oscillations=5,
      k=200,
      cluster_table="",
      shift_table_path="",
      shift_table_kind="sizes",
    )
  )
  # mode "isogclr": the per-sample learned temperatures' hyper-parameters
  # (`mmts_jax.policies.isogclr.ISogCLR`; the paper's CC3M values, rho the KL radius).
  c.isogclr = ml_collections.ConfigDict(
    dict(gamma=0.8, rho=6.0, tau_init=0.01, tau_min=0.005, tau_max=1.0, eta=0.03, beta=0.9)
  )
  c.optim = ml_collections.ConfigDict(
    dict(
      lr=5e-4,
      warmup_steps=100,
      end_lr_factor=0.0,
      weight_decay=0.1,
      b1=0.9,
      b2=0.98,
      eps=1e-6,
      grad_clip_norm=1.0,
      # flatten: clipping and Adam's moments on one flat vector (a few kernels per step
      # instead of several per parameter; same values, a different optimizer-state layout).
      flatten=False,
    )
  )
  c.mesh = ml_collections.ConfigDict(dict(num_devices=0, param_sharding="replicated"))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True))
  # skip_nonfinite: a step with a NaN/inf loss or gradient never updates the state; True skips
  # its batch (counted, one warning line), False stops the run (NonFiniteLossError, exit 3).
  # micro_batch_size: 0 = one tower pass over the global batch; else the towers run on
  # micro-batches of this size and `accumulation` combines them: "grad_cache" (the big-batch
  # update, every negative kept) or "plain" (per-micro-batch losses). mmts_jax/train/grad_cache.py
  c.train = ml_collections.ConfigDict(
    dict(skip_nonfinite=True, micro_batch_size=0, accumulation="grad_cache")
  )
  # checkpoint: an orbax checkpoint directory holding `{"params": ...}` (e.g. converted CLIP
  # weights); its parameters replace the initial ones before step 0. Ignored when resuming.
  c.init = ml_collections.ConfigDict(dict(checkpoint=""))
  # every_steps: how often `eval_fn` runs (0: only at total_steps). zero_shot: "[NAME=]PATH,..."
  # retrieval test sets that `mmts train` evaluates (mmts_jax.eval.zero_shot). at_start:
  # also evaluate before the first step (step 0: e.g. the converted checkpoint, zero-shot).
  # longtail: also the head / middle / tail report of the test sets whose .npz has per-image
  # class ids ("cluster" or "label"), buckets by bucket_scheme ("share" | "terciles");
  # mmts_jax.eval.longtail.
  c.eval = ml_collections.ConfigDict(
    dict(every_steps=0, zero_shot="", at_start=False, longtail=False, bucket_scheme="share")
  )
  return c


def canonical_mode(name: str) -> str:
  """Any accepted row or mode name (case-insensitive) -> its canonical mode.

  Raises:
    ValueError: an unknown name, listing the accepted ones.
  """
  key = str(name).lower()
  if key not in ROW_ALIASES:
    raise ValueError(
      f"temperature mode / ablation row must be one of {sorted(ROW_ALIASES)}, got {name!r}"
    )
  return ROW_ALIASES[key]


def with_row(config: ml_collections.ConfigDict, row: str = "") -> ml_collections.ConfigDict:
  """Selects one row of the paper's ablation: "fixed" (fixed temperature / margin), "clip"
  (CLIP's learnable temperature), "ts" (uni-modal schedule), "ics" (per-sample shifts only),
  "mmts" (TS&ICS, the default when `row` is empty), the level-matched "ics_lm" / "mmts_lm"
  (shifts re-centred on `temperature.value`) and "isogclr" (per-sample learned temperatures,
  `config.isogclr`). Used as `configs/x.py:ROW`.

  Example:
    >>> with_row(default_config(), "ics").temperature.mode
    'ics'
  """
  config.temperature.mode = canonical_mode(row or "mmts")
  return config
