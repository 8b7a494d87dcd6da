"""Per-sample temperature (InfoNCE) or margin (max-margin) for each row of the paper's ablation.

| mode        | value for anchor i at step t                                   |
| ----------- | -------------------------------------------------------------- |
| `fixed`     | `tau`                                                          |
| `learnable` | CLIP's learned `tau` (the model owns the parameter)            |
| `ts`        | `tau_min + (tau_max - tau_min) (1 + cos(2 pi t / T)) / 2`      |
| `ics`       | `sh(c_i)`                         (per-sample shift only, Eq. 6) |
| `mmts`      | `alpha/2 cos(2 pi t / T) + sh(c_i)` (TS&ICS, Eq. 8)            |

`T = total_steps / num_oscillations`. `sh(c_i)` is `shift_table[index_i]`, gathered on device
inside the jitted step, so the host does no per-step work. The spec is a frozen (hashable)
dataclass, so a train state can carry it as a static field.

Example:
  >>> import numpy as np
  >>> spec = TemperatureSpec(mode="mmts", alpha=0.04, period=100.0)
  >>> table = np.array([0.05, 0.10], np.float32)
  >>> [round(float(v), 4) for v in spec(0, np.array([0, 1]), table)]
  [0.07, 0.12]
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from mmts_jax import schedules, shifts

__all__ = ["MODES", "TemperatureSpec", "from_config", "check_shift_table"]

MODES = ("fixed", "learnable", "ts", "ics", "mmts")
_ALIASES = {"ts&ics": "mmts", "ts_ics": "mmts", "mm-ts": "mmts", "clip": "learnable"}


@dataclasses.dataclass(frozen=True)
class TemperatureSpec:
  """How the per-anchor value is computed (see the module docstring for each mode)."""
  mode: str
  value: float = 0.07
  tau_min: float = 0.07
  tau_max: float = 0.07
  alpha: float = 0.0
  period: float = 1.0
  what: str = "temperature"

  @property
  def uses_shift_table(self) -> bool:
    return self.mode in ("ics", "mmts")

  @property
  def learnable(self) -> bool:
    return self.mode == "learnable"

  def base(self, step):
    """The shared (per-step) part: the value for `fixed`/`ts`, Eq. 7 for `mmts`, 0 for `ics`."""
    if self.mode == "fixed":
      return jnp.float32(self.value)
    if self.mode == "ts":
      return schedules.temperature_schedule(self.tau_min, self.tau_max, self.period)(step)
    if self.mode == "mmts":
      return schedules.cosine_oscillation(self.alpha, self.period)(step)
    return jnp.float32(0.0)

  def __call__(self, step, index, shift_table=None, learned=None):
    """`(B,)` float32 values for the anchors whose dataset positions are `index`."""
    index = jnp.asarray(index)
    if self.learnable:
      if learned is None:
        raise ValueError("temperature mode 'learnable' needs the model's learned temperature")
      value = jnp.asarray(learned, jnp.float32)
    elif self.uses_shift_table:
      if shift_table is None:
        raise ValueError(f"temperature mode {self.mode!r} needs a shift table")
      value = shifts.per_sample_values(self.base(step), jnp.asarray(shift_table), index)
    else:
      value = self.base(step)
    return jnp.broadcast_to(jnp.asarray(value, jnp.float32), index.shape[:1])


def _field(cfg, key, default=None):
  value = cfg.get(key, default) if hasattr(cfg, "get") else default
  return default if value is None else value


def _positive(name: str, value) -> float:
  value = float(value)
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"{name} must be finite and > 0, got {value}")
  return value


def from_config(temperature: Mapping[str, Any], mmts: Mapping[str, Any], *, total_steps: int,
                loss: str = "infonce") -> TemperatureSpec:
  """`config.temperature` + `config.mmts` -> a validated `TemperatureSpec`.

  Everything is checked here, before any compilation: a configuration whose temperature or
  margin can reach <= 0 (`sh_min - alpha/2 <= 0`) raises ValueError naming the values.

  Example:
    >>> from_config({"mode": "mmts"}, {"alpha": 0.04, "sh_min": 0.05, "sh_max": 0.10,
    ...             "num_oscillations": 5}, total_steps=1000).period
    200.0
  """
  mode = str(_field(temperature, "mode", "fixed")).lower()
  mode = _ALIASES.get(mode, mode)
  if mode not in MODES:
    raise ValueError(f"temperature.mode must be one of {MODES} (or {sorted(_ALIASES)}), "
                     f"got {temperature.get('mode')!r}")
  what = "margin" if loss == "max_margin" else "temperature"
  if mode == "learnable" and loss != "infonce":
    raise ValueError(f"temperature.mode 'learnable' is CLIP's learned temperature and only "
                     f"applies to loss 'infonce', got loss {loss!r}")
  period = schedules.period_from_total_steps(
      total_steps, float(_field(mmts, "num_oscillations", 5)))
  value = _positive(f"temperature.value ({what})", _field(temperature, "value", 0.07))
  kw = dict(mode=mode, value=value, period=period, what=what)
  if mode == "ts":
    tau_min = _positive(f"temperature.tau_min ({what})", _field(temperature, "tau_min", 0.07))
    tau_max = float(_field(temperature, "tau_max", 1.0))
    if not tau_max >= tau_min:
      raise ValueError(f"temperature.tau_max must be >= tau_min, got tau_min={tau_min}, "
                       f"tau_max={tau_max}")
    kw.update(tau_min=tau_min, tau_max=tau_max)
  if mode in ("ics", "mmts"):
    alpha = float(_field(mmts, "alpha", 0.0)) if mode == "mmts" else 0.0
    sh_min, sh_max = float(_field(mmts, "sh_min", 0.0)), float(_field(mmts, "sh_max", 0.0))
    shifts.validate_positive(alpha, sh_min, sh_max, what=what)
    kw.update(alpha=alpha)
  return TemperatureSpec(**kw)


def check_shift_table(table, spec: TemperatureSpec, *, num_examples: int | None = None):
  """Validates a per-sample shift table against the spec and the dataset size.

  Returns the table as a float32 numpy array. Raises ValueError when it is not 1-D, not finite,
  has a length other than `num_examples` (a table of another dataset), or would make a value
  `<= 0` (`min(table) - alpha/2 <= 0`).
  """
  table = np.asarray(table)
  if table.ndim != 1 or table.size == 0:
    raise ValueError(f"the shift table must be a non-empty (N,) array, got shape {table.shape}")
  if not np.issubdtype(table.dtype, np.number):
    raise TypeError(f"the shift table must be numeric, got dtype {table.dtype}")
  table = table.astype(np.float32)
  if not np.all(np.isfinite(table)):
    raise ValueError(f"the shift table has {int(np.sum(~np.isfinite(table)))} non-finite values")
  if num_examples is not None and table.shape[0] != num_examples:
    raise ValueError(
        f"the shift table has {table.shape[0]} entries but the dataset has {num_examples} "
        f"examples: it was built for another dataset")
  shifts.validate_positive(spec.alpha, float(table.min()), float(table.max()), what=spec.what)
  return table
