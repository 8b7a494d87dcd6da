"""`HelpFormatter`: `--help` keeps the description's layout and states every option's default.

An option whose help text already names its default (the word "default") is left as written;
any other gets ` (default: VALUE)` appended: `off` for a flag, `none` for an option that is
unset unless given; a required option gets ` (required)`. `tests/test_cli_help.py` checks that
every option of every command has a description and a default.

Example:
  >>> import argparse
  >>> p = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter)
  >>> _ = p.add_argument("--k", type=int, default=200, help="clusters")
  >>> _ = p.add_argument("--json", action="store_true", help="print JSON")
  >>> "clusters (default: 200)" in p.format_help(), "print JSON (default: off)" in p.format_help()
  (True, True)
"""

from __future__ import annotations

import argparse

__all__ = ["HelpFormatter"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Raw description and epilog; ` (default: ...)` after each option's help."""

  def _get_help_string(self, action: argparse.Action) -> str:
    text = action.help or ""
    if (
      not action.option_strings or action.default is argparse.SUPPRESS or "default" in text.lower()
    ):
      return text
    if action.required:
      return f"{text} (required)"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
      value = "on" if action.default else "off"
    elif action.default is None:
      value = "none"
    elif isinstance(action.default, (list, tuple)):
      value = " ".join(str(v) for v in action.default)
    else:
      value = "%(default)s"
    return f"{text} (default: {value})"
