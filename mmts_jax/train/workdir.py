"""A run's configuration record in its workdir, and the check that a resume trains the same run.

`WORKDIR/config.json` holds the configuration the checkpoints were trained with. Rerunning a
workdir that has a checkpoint with a configuration that differs in a key that changes the run
(anything but `config_defaults.RUN_NEUTRAL_KEYS`: logging, checkpoint and evaluation cadence,
display, data-loader threads, device layout) is refused with the differing keys, unless the
change is allowed explicitly; an allowed change is appended to `WORKDIR/config_history.jsonl`
(one JSON object per change: the step, the time and each key's old and new value) and
`config.json` is rewritten. Files are written with `mmts_jax.atomic_io`.

Example:
  >>> diff_configs({"a": 1, "b": {"c": 2}, "log_every": 5},
  ...              {"a": 1, "b": {"c": 3}, "log_every": 1, "new": ""}, defaults={"new": ""})
  {'b.c': (2, 3)}
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from typing import Any

from etils import epath

from mmts_jax.atomic_io import atomic_write_bytes
from mmts_jax.config_defaults import RUN_NEUTRAL_KEYS, default_config

__all__ = [
  "ConfigChangedError",
  "diff_configs",
  "check_config_change",
  "record_config",
  "CONFIG_FILE",
  "HISTORY_FILE",
]

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"


class ConfigChangedError(ValueError):
  """A resume with a configuration that changes the run, without `allow_config_change`."""


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v  # as JSON stores it
  return out


def _neutral(key: str) -> bool:
  return any(key.startswith(n) if n.endswith(".") else key == n for n in RUN_NEUTRAL_KEYS)


def diff_configs(
  old: Mapping[str, Any], new: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> dict[str, tuple]:
  """`{key: (old, new)}` for every dotted key that differs and changes the run. A key the old
  config lacks (written by an earlier version) whose new value is its default in `defaults`
  is no difference."""
  a, b = _flatten(old), _flatten(new)
  d = _flatten(defaults or {})
  return {
    k: (a.get(k), b.get(k))
    for k in sorted(set(a) | set(b))
    if a.get(k) != b.get(k) and not _neutral(k) and not (k not in a and k in d and b.get(k) == d[k])
  }


def _to_json(config) -> dict:
  raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(raw, default=str))


def _write_json(path: epath.Path, obj) -> None:
  atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def check_config_change(
  workdir, config, *, resuming_from: int | None, allow_config_change: bool = False
) -> dict[str, tuple]:
  """The run-changing differences between `config` and the workdir's `config.json`.

  Args:
    resuming_from: the step of the checkpoint the run resumes from, or None for a fresh run
      (then there is nothing to compare: {}).
    allow_config_change: accept a run-changing difference (`record_config` records it).

  Raises:
    ConfigChangedError: a run-changing difference without `allow_config_change`, naming the
      keys with their old and new values.
  """
  workdir = epath.Path(workdir)
  path = workdir / CONFIG_FILE
  if resuming_from is None or not path.exists():
    return {}
  changes = diff_configs(json.loads(path.read_text()), _to_json(config), _to_json(default_config()))
  if changes and not allow_config_change:
    lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
    raise ConfigChangedError(
      f"{workdir} holds a run at step {resuming_from} trained with another configuration:\n"
      f"{lines}\nresuming would not continue that run; use a new workdir, or pass "
      f"--allow-config-change (recorded in {HISTORY_FILE})"
    )
  return changes


def record_config(
  workdir, config, *, changes: Mapping[str, tuple] | None = None, step: int = 0
) -> None:
  """Writes `config.json` and appends accepted `changes` (from `check_config_change`) at `step`
  to `config_history.jsonl`. Process 0 only: call it there."""
  workdir = epath.Path(workdir)
  if changes:
    history = workdir / HISTORY_FILE
    old = history.read_text() if history.exists() else ""
    entry = {
      "step": int(step),
      "time": datetime.datetime.now(datetime.UTC).isoformat(),
      "changes": {k: {"old": a, "new": b} for k, (a, b) in changes.items()},
    }
    atomic_write_bytes(
      history, (old + json.dumps(entry, sort_keys=True, default=str) + "\n").encode()
    )
  _write_json(workdir / CONFIG_FILE, _to_json(config))
