"""`mmts train`: train a dual encoder with MM-TS from a config file.

  mmts train --config configs/tiny.py[:ROW] --workdir /tmp/tiny [--config.optim.lr=1e-3 ...]
             [--stop-at-step N] [--no-progress] [--allow-config-change]

With `--config.eval.zero_shot="[NAME=]PATH,..."` the run also evaluates retrieval on those test
sets every `eval.every_steps` steps and at the end (`mmts_jax.eval.zero_shot`).

The config file defines `get_config(arg="")` returning an `ml_collections.ConfigDict`
(`configs/x.py:arg` passes `arg`, e.g. an ablation row). `--config.KEY=VALUE` overrides a key
(`ml_collections.config_flags`: the value is parsed to the key's type), and an unknown key or a
value of the wrong type is an error that names it. Rerunning the same command resumes from the
latest checkpoint in WORKDIR ("resumed from step N"); a rerun whose configuration changes the run
(anything but logging, checkpoint and evaluation cadence, display and device layout) is refused,
naming the differing keys, unless `--allow-config-change` (recorded in
WORKDIR/config_history.jsonl).

Exit status: 0 trained (or stopped at --stop-at-step with a checkpoint); 2 bad arguments or
configuration, or a checkpoint that could not be written (a full disk: the previous, usable one
is named); 3 the loss became NaN/inf with `--config.train.skip_nonfinite=false` (the last good
checkpoint is kept; by default such a step is skipped and counted); 143 stopped by SIGTERM after
saving a checkpoint (rerun to resume).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import warnings
from collections.abc import Sequence

from mmts_jax.commands.help_format import HelpFormatter
from mmts_jax.errors import UserInputError

EXIT_BAD_CONFIG = 2
EXIT_NONFINITE = 3  # `train.NonFiniteLossError.exit_status`, honoured by `commands.errors.run`
EXIT_PREEMPTED = 143


def _flag_values(argv: list[str]):
  """A private absl `FlagValues` with `--config` defined and `argv` parsed into it."""
  from absl import flags
  from ml_collections import config_flags

  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config",
    None,
    "config file, path/to/config.py[:arg]",
    flag_values=values,
    lock_config=True,
    sys_argv=argv,
  )
  with warnings.catch_warnings():
    # ml_collections loads the config file with `SourceFileLoader.load_module()`, deprecated
    # since Python 3.10: one DeprecationWarning per parse, about its code, not the user's.
    warnings.filterwarnings("ignore", r"the load_module\(\) method", DeprecationWarning)
    values(argv)
  return values


def _known(node, key: str) -> None:
  """Raises ValueError naming the first unknown part of dotted `key` and the keys there."""
  import ml_collections

  parts = key.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      where = ".".join(parts[:i]) or "config"
      known = sorted(node.keys()) if hasattr(node, "keys") else []
      raise ValueError(f"--config.{key}: unknown key {part!r} in {where} (known: {known})")
    node = node[part]
  if isinstance(node, (ml_collections.ConfigDict, dict)):
    raise ValueError(
      f"--config.{key} is a section; override one of its keys ({sorted(node.keys())})"
    )


def parse_config(spec: str, overrides: Sequence[tuple[str, str]] = ()):
  """`path/to/config.py[:arg]` and `(KEY, VALUE)` overrides -> the run's `ConfigDict`.

  Parsed by `ml_collections.config_flags` (`DEFINE_config_file` on a private `FlagValues`): the
  file's `get_config(arg)` builds the config, and each `--config.KEY=VALUE` is parsed to the
  key's type. Unknown keys, sections and unparsable values raise ValueError naming the key.

  Example:
    >>> c = parse_config("configs/tiny.py:ts", [("optim.lr", "1e-2"), ("tensorboard", "false")])
    >>> c.temperature.mode, c.optim.lr, c.tensorboard
    ('ts', 0.01, False)
  """
  path = spec.partition(":")[0]
  if not pathlib.Path(path).is_file():
    raise FileNotFoundError(f"config file {path!r} does not exist")
  try:  # the file's own syntax errors, with their line, before absl wraps them
    compile(pathlib.Path(path).read_bytes(), path, "exec")
  except SyntaxError as e:
    raise UserInputError(
      path,
      f"invalid Python syntax ({e.msg})",
      line=e.lineno,
      expected="a Python config file defining get_config()",
    ) from None
  base_argv = ["mmts train", f"--config={spec}"]
  try:
    base = _flag_values(base_argv).config
  except Exception as e:  # absl wraps the config file's own errors
    raise ValueError(f"--config={spec}: {e}") from None
  if base is None or not hasattr(base, "keys"):
    raise ValueError(f"config file {path!r}: get_config() must return a ConfigDict")
  if not overrides:
    return base
  for key, _ in overrides:
    _known(base, key)
  argv = base_argv + [f"--config.{k}={v}" for k, v in overrides]
  try:
    return _flag_values(argv).config
  except Exception as e:  # absl.flags.Error and the parsers' own errors, with the flag named
    raise ValueError(str(e)) from None


def load_config(spec: str):
  """`path/to/config.py[:arg]` -> the `ConfigDict` its `get_config([arg])` returns."""
  return parse_config(spec)


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """Separates `--config.KEY=VALUE` / `--config.KEY VALUE` from the other arguments."""
  rest, overrides, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      key, eq, value = arg[len("--config.") :].partition("=")
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
    prog="mmts train",
    description="Train a dual encoder with MM-TS from a config file.",
    epilog="Override any config key with --config.KEY=VALUE (e.g. --config.optim.lr=1e-3).\n"
    "Rerun with the same --workdir to resume from the latest checkpoint.",
    formatter_class=HelpFormatter,
  )
  p.add_argument(
    "--config",
    required=True,
    help="config file, path/to/config.py[:ROW], ROW an ablation row (fixed, clip, ts, ics, mmts)",
  )
  p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard")
  p.add_argument(
    "--stop-at-step",
    type=int,
    default=None,
    help="stop with a checkpoint at this step, as a preemption would (default: config.total_steps)",
  )
  p.add_argument(
    "--no-progress",
    action="store_true",
    help="no progress bar (there is none when stderr is not a terminal)",
  )
  p.add_argument(
    "--allow-config-change",
    action="store_true",
    help="resume even if the configuration changes the run (recorded in "
    "WORKDIR/config_history.jsonl)",
  )
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
    config = parse_config(args.config, overrides)
    if args.no_progress:
      config.progress_bar = False
  except (ValueError, TypeError, FileNotFoundError) as e:
    print(f"mmts train: error: {e}", file=sys.stderr)
    return EXIT_BAD_CONFIG

  from mmts_jax import train  # after argument errors: importing JAX costs seconds

  try:
    eval_fn = None
    if config.get("eval", {}).get("zero_shot", ""):
      from mmts_jax.eval.zero_shot import eval_fn_from_config

      eval_fn = eval_fn_from_config(config)
    result = train.train_and_evaluate(
      config,
      args.workdir,
      stop_at_step=args.stop_at_step,
      eval_fn=eval_fn,
      allow_config_change=args.allow_config_change,
    )
  except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
    print(f"mmts train: error: {e}", file=sys.stderr)
    return EXIT_BAD_CONFIG
  m = result.last_metrics
  summary = f"step {result.step}/{config.total_steps} ({result.status})"
  if m:
    # A max-margin run's values are margins (logged as margin_*), every other loss's temperatures.
    value = (
      f"margin mean {m['margin_mean']:.4f}"
      if "margin_mean" in m
      else f"tau mean {m['temperature_mean']:.4f}"
    )
    summary += f"  loss {m['loss']:.4f}  {value}  {m['examples_per_sec']:.0f} examples/s"
  print(summary)
  print(f"metrics: {result.workdir / 'metrics.jsonl'}")
  print(f"checkpoints: {result.workdir / 'checkpoints'}")
  if result.status == "preempted":
    print(
      "stopped by SIGTERM after saving a checkpoint; rerun the same command to resume",
      file=sys.stderr,
    )
    return EXIT_PREEMPTED
  return 0


if __name__ == "__main__":
  sys.exit(main())
