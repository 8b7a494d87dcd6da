"""`mmts` command line: one subcommand per stage, each in `mmts_jax/commands/<name>.py`.

Subcommand modules are imported lazily so that `mmts train` never pays for transformers or
scikit-learn, and `mmts cluster` never initialises an accelerator it does not use.

Errors: a problem with the user's files, flags or disk ends with exit status 2 and one line
naming the file, the line or key, and what was expected (`mmts_jax.commands.errors`, the one
place that turns exceptions into messages); `--debug` or `MMTS_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
  "synthetic": (
    "mmts_jax.commands.synthetic",
    "the built-in synthetic long-tail benchmark (cluster, train CLIP vs MM-TS, eval)",
  ),
  "demo": ("mmts_jax.commands.demo", "print MM-TS temperatures along a schedule and batch losses"),
  "cluster": (
    "mmts_jax.commands.cluster",
    "build a cluster table (captions, labels or embeddings)",
  ),
  "train": ("mmts_jax.commands.train", "train a dual encoder with MM-TS from a config"),
  "eval": ("mmts_jax.commands.eval", "retrieval R@K / EK-100 MIR metrics from embeddings"),
  "prepare": ("mmts_jax.commands.prepare", "convert image-text data to ArrayRecord"),
  "finetune": (
    "mmts_jax.commands.finetune",
    "EK-100 feature fine-tuning with MIR eval; zero-shot retrieval of a checkpoint",
  ),
  "convert": ("mmts_jax.commands.convert", "a PyTorch CLIP checkpoint -> an orbax Flax checkpoint"),
}


def _usage() -> str:
  lines = ["usage: mmts COMMAND [ARGS...]", "", "commands:"]
  lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
  lines += [
    "",
    "`mmts COMMAND --help` describes a command. `--debug` (or MMTS_DEBUG=1) shows "
    "the traceback of an error.",
  ]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  from mmts_jax.commands import errors

  argv, debug = errors.strip_debug(list(sys.argv[1:] if argv is None else argv))
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(_usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"mmts: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    return 2
  module_name = COMMANDS[name][0]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name == module_name:
      print(f"mmts: command {name!r} is not available in this build", file=sys.stderr)
      return 2
    raise
  # `errors.run` takes `--debug` off again and turns it on for the whole command; most commands
  # also run through it themselves, and this catches whatever escapes any other one.
  return errors.run(f"mmts {name}", module.main, rest + (["--debug"] if debug else []))


if __name__ == "__main__":
  sys.exit(main())
