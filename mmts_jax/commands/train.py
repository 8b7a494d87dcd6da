"""`mmts train`: train a dual encoder with MM-TS from a config file.

  mmts train --config configs/tiny.py --workdir /tmp/tiny [--config.optim.lr=1e-3 ...]
             [--stop-at-step N] [--no-progress]

With `--config.eval.zero_shot="[NAME=]PATH,..."` the run also evaluates retrieval on those test
sets every `eval.every_steps` steps and at the end (`mmts_jax.finetune.zero_shot`).

The config file defines `get_config()` returning an `ml_collections.ConfigDict`
(`configs/x.py:arg` passes `arg` to `get_config`). `--config.KEY=VALUE` overrides a key; the value
is parsed to the key's type (bool, int, float, str, tuple), and an unknown key or a value of the
wrong type is an error that names it. Rerunning the same command resumes from the latest
checkpoint in WORKDIR.

Exit status: 0 trained (or stopped at --stop-at-step with a checkpoint); 2 bad arguments or
configuration; 3 the loss became NaN/inf (the last good checkpoint is kept); 143 stopped by
SIGTERM after saving a checkpoint (rerun to resume).
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import pathlib
import sys
from typing import Any

EXIT_BAD_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 143


def load_config(spec: str):
  """`path/to/config.py[:arg]` -> the `ConfigDict` its `get_config([arg])` returns."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"_mmts_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} defines no get_config()")
  return module.get_config(arg) if arg else module.get_config()


def _parse_value(key: str, text: str, current: Any):
  """Parses `text` to the type of the key's current value; raises ValueError naming the key."""
  def bad(kind):
    return ValueError(f"--config.{key}: expected {kind}, got {text!r}")

  if isinstance(current, bool):
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise bad("a bool (true/false)")
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise bad("an int") from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise bad("a float") from None
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if current is None:
      return text
    raise bad(f"a Python literal of type {type(current).__name__}") from None
  if isinstance(current, (tuple, list)):
    if not isinstance(value, (tuple, list)):
      raise bad("a tuple, e.g. (128, 64)")
    return type(current)(value)
  return value


def apply_override(config, key: str, text: str) -> None:
  """`config.a.b = parse(text)` for `key == "a.b"`; unknown keys raise a ValueError listing the
  keys at that level."""
  import ml_collections
  node, parts = config, key.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      where = ".".join(parts[:i]) or "config"
      known = sorted(node.keys()) if hasattr(node, "keys") else []
      raise ValueError(f"--config.{key}: unknown key {part!r} in {where} (known: {known})")
    if i < len(parts) - 1:
      node = node[part]
  current = node[parts[-1]]
  if isinstance(current, (ml_collections.ConfigDict, dict)):
    raise ValueError(f"--config.{key} is a section; override one of its keys "
                     f"({sorted(current.keys())})")
  value = _parse_value(key, text, current)
  if isinstance(node, ml_collections.ConfigDict):
    with node.unlocked():
      node[parts[-1]] = value
  else:
    node[parts[-1]] = value


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """Separates `--config.KEY=VALUE` / `--config.KEY VALUE` from the other arguments."""
  rest, overrides, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      key, eq, value = arg[len("--config."):].partition("=")
      if not eq:
        if i + 1 >= len(argv):
          raise ValueError(f"{arg} needs a value")
        value, i = argv[i + 1], i + 1
      overrides.append((key, value))
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="mmts train", description="Train a dual encoder with MM-TS from a config file.",
      epilog="Override any config key with --config.KEY=VALUE (e.g. --config.optim.lr=1e-3). "
             "Rerun with the same --workdir to resume from the latest checkpoint.")
  p.add_argument("--config", required=True, help="config file, path/to/config.py[:arg]")
  p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard")
  p.add_argument("--stop-at-step", type=int, default=None,
                 help="stop with a checkpoint at this step, as a preemption would")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    rest, overrides = split_overrides(argv)
  except ValueError as e:
    print(f"mmts train: error: {e}", file=sys.stderr)
    return EXIT_BAD_CONFIG
  args = build_parser().parse_args(rest)
  try:
    config = load_config(args.config)
    for key, value in overrides:
      apply_override(config, key, value)
    if args.no_progress:
      config.progress_bar = False
  except (ValueError, TypeError, FileNotFoundError) as e:
    print(f"mmts train: error: {e}", file=sys.stderr)
    return EXIT_BAD_CONFIG

  from mmts_jax import train  # after argument errors: importing JAX costs seconds
  try:
    eval_fn = None
    if config.get("eval", {}).get("zero_shot", ""):
      from mmts_jax.finetune.zero_shot import eval_fn_from_config
      eval_fn = eval_fn_from_config(config)
    result = train.train_and_evaluate(config, args.workdir, stop_at_step=args.stop_at_step,
                                      eval_fn=eval_fn)
  except train.NonFiniteLossError as e:
    print(f"mmts train: error: {e}", file=sys.stderr)
    return EXIT_NONFINITE
  except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
    print(f"mmts train: error: {e}", file=sys.stderr)
    return EXIT_BAD_CONFIG
  m = result.last_metrics
  summary = (f"step {result.step}/{config.total_steps} ({result.status})"
             + (f"  loss {m['loss']:.4f}  tau mean {m['temperature_mean']:.4f}"
                f"  {m['examples_per_sec']:.0f} examples/s" if m else ""))
  print(summary)
  print(f"metrics: {result.workdir / 'metrics.jsonl'}")
  print(f"checkpoints: {result.workdir / 'checkpoints'}")
  if result.status == "preempted":
    print("stopped by SIGTERM after saving a checkpoint; rerun the same command to resume",
          file=sys.stderr)
    return EXIT_PREEMPTED
  return 0


if __name__ == "__main__":
  sys.exit(main())
