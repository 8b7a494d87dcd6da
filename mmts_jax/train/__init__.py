"""The MM-TS trainer: state, step, setup and loop.

  state.py    `TrainState`: the arrays of a run plus `apply_fn` / `tx` (as Flax's TrainState)
  optim.py    AdamW + warmup-cosine, gradient clipping, the clamp of CLIP's temperature
  step.py     the pure `train_step(state, batch, *, policy, loss_fn, lr_fn, skip_nonfinite)`
  setup.py    `setup(config)`: mesh, source, policy, loss, model, state, compiled step
  pretrained.py  initial parameters from an orbax checkpoint (`config.init.checkpoint`)
  workdir.py  `config.json`, and the refusal of a resume with a run-changing configuration
  loop.py     `train_and_evaluate(config, workdir)`: the loop, metrics, checkpoints

The input protocol and sources are `mmts_jax.data.sources`; the configuration's keys and the
ablation rows are `mmts_jax.config_defaults` (re-exported here as before).

Example:
  >>> from mmts_jax import train
  >>> train.with_row(train.default_config(), "ts").temperature.mode
  'ts'
"""

from mmts_jax.config_defaults import ROW_ALIASES as ABLATION_ROWS
from mmts_jax.config_defaults import default_config, with_row
from mmts_jax.data.sources import SOURCES, ArraySource, check_batch, make_source, npz, toy_features
from mmts_jax.train.loop import MetricsLogger, NonFiniteLossError, TrainResult, train_and_evaluate
from mmts_jax.train.optim import clamp_parameter, make_optimizer
from mmts_jax.train.setup import Setup, resolve_shift_table, setup, table_fingerprint
from mmts_jax.train.state import TrainState
from mmts_jax.train.step import compile_train_step, eval_step, make_embed_fn, train_step
from mmts_jax.train.workdir import ConfigChangedError

__all__ = [
  "default_config",
  "with_row",
  "ABLATION_ROWS",
  "TrainState",
  "train_step",
  "eval_step",
  "make_embed_fn",
  "compile_train_step",
  "make_optimizer",
  "clamp_parameter",
  "make_source",
  "ArraySource",
  "SOURCES",
  "toy_features",
  "npz",
  "check_batch",
  "resolve_shift_table",
  "table_fingerprint",
  "Setup",
  "setup",
  "train_and_evaluate",
  "TrainResult",
  "NonFiniteLossError",
  "MetricsLogger",
  "ConfigChangedError",
]
