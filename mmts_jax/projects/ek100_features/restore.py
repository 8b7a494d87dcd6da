"""A trained model back from a training workdir: its config, the model and the variables.

`mmts_jax.train.train_and_evaluate` writes `WORKDIR/config.json` and orbax checkpoints under
`WORKDIR/checkpoints/<step>/`. For evaluation only the parameters (and BatchNorm statistics)
are needed, so they are restored as saved, without rebuilding the optimizer state.

Usage (`tests/test_zero_shot.py` runs it on a trained workdir):

  trained = load_trained_model("runs/ek100")
  embed = mmts_jax.train.make_embed_fn(trained.model)
  emb = embed(trained.variables, {"image_features": x})["image"]
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

from mmts_jax import atomic_io
from mmts_jax.errors import UserInputError

__all__ = ["TrainedModel", "load_config", "load_trained_model"]


class TrainedModel(NamedTuple):
  config: Any  # ml_collections.ConfigDict of the run
  model: Any  # the DualEncoder
  variables: dict  # {"params": ...[, "batch_stats": ...]}
  step: int


def load_config(workdir: str | os.PathLike):
  """`WORKDIR/config.json` as a ConfigDict (lists back to tuples, as configs write them)."""
  import ml_collections

  path = atomic_io.as_path(workdir) / "config.json"  # local or gs://
  if not path.is_file():
    raise FileNotFoundError(f"{str(path)!r} does not exist: not a training workdir")
  try:
    raw = json.loads(path.read_text(encoding="utf-8"))
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise UserInputError(
      path, f"is not valid JSON ({e})", expected="the config.json a training run writes"
    ) from e
  if not isinstance(raw, dict):
    raise UserInputError(
      path,
      f"holds a JSON {type(raw).__name__}",
      expected="a JSON object (the config.json a training run writes)",
    )

  def tuples(x: Any) -> Any:
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    return tuple(tuples(v) for v in x) if isinstance(x, list) else x

  return ml_collections.ConfigDict(tuples(raw))


def load_trained_model(workdir: str | os.PathLike, step: int | None = None) -> TrainedModel:
  """The model of a run and its variables at `step` (default: the latest checkpoint).

  Raises:
    FileNotFoundError: no config.json, or no checkpoint (at `step`).
  """
  import orbax.checkpoint as ocp

  from mmts_jax import temperature as temperature_lib
  from mmts_jax.checkpointing import Checkpointer
  from mmts_jax.models import build_model

  config = load_config(workdir)
  directory = atomic_io.as_path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoint directory {str(directory)!r}")
  ckpt = Checkpointer(directory, every_steps=1, keep=1 << 30, async_save=False)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
    if step is None:
      step = max(steps)
    elif int(step) not in steps:
      raise FileNotFoundError(
        f"no checkpoint at step {step} in {ckpt.directory} (have {sorted(steps)})"
      )
    restored = ckpt.manager.restore(
      int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )["state"]
  finally:
    ckpt.close()
  policy = temperature_lib.from_config(
    config.temperature,
    config.mmts,
    total_steps=int(config.total_steps),
    loss=config.loss.name,
    isogclr=config.get("isogclr"),
  )
  # The same model as training's (`train.setup`): loss "sigmoid" adds the learned logit bias.
  model = build_model(
    config.model,
    learnable_temperature=policy.learnable,
    init_temperature=getattr(policy, "value", 0.07),
    learnable_bias=config.loss.name == "sigmoid",
    init_bias=float(config.loss.get("bias_init", -10.0)),
  )
  variables = {"params": restored["params"]}
  if restored.get("batch_stats"):
    variables["batch_stats"] = restored["batch_stats"]
  return TrainedModel(config, model, variables, int(step))
