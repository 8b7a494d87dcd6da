"""Temperature (InfoNCE) or margin (max-margin) policies: one per row of the paper's ablation.

| policy      | value for anchor i at step t                                   |
| ----------- | -------------------------------------------------------------- |
| `fixed`     | `tau`                                                          |
| `learnable` | CLIP's learned `tau` (the model owns the parameter)            |
| `ts`        | `tau_min + (tau_max - tau_min) (1 + cos(2 pi t / T)) / 2`      |
| `ics`       | `sh(c_i)`                         (per-sample shift only, Eq. 6) |
| `mmts`      | `alpha/2 cos(2 pi t / T) + sh(c_i)` (TS&ICS, Eq. 8)            |
| `ics_lm`    | `ics` with the table re-centred on the sample mean `value`      |
| `mmts_lm`   | `mmts` with the table re-centred on the sample mean `value`     |
| `isogclr`   | per-sample learned `tau_i` (iSogCLR, `mmts_jax.policies.isogclr`) |

`T = total_steps / num_oscillations`. The level-matched rows (`*_lm`) compare shapes, not levels:
their shifts are moved so that the sample-mean value equals the fixed baseline's `value`
(`shifts.level_match`). `sh(c_i)` is `shift_table[index_i]`, gathered on device
inside the jitted step, so the host does no per-step work.

Every policy has one interface (`Policy`): a frozen, hashable dataclass whose dataset-sized
per-sample state (`init_state`, e.g. the shift table, or learned per-sample temperatures) lives in
the train state as `policy_state`, sharded as `state_partition` says and checkpointed with the
rest; `values` gives the `(B,)` per-anchor values and `loss` the loss, the values and the new
state (the default: `loss_fn(image, text, values)` and the state unchanged).

Example:
  >>> import numpy as np
  >>> policy = ShiftTable(name="mmts", alpha=0.04, period=100.0)
  >>> state = policy.init_state(2, np.array([0.05, 0.10], np.float32))
  >>> values = policy.values(state, step=0, index=np.array([0, 1]), model_temperature=None)
  >>> [round(float(v), 4) for v in values]
  [0.07, 0.12]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmts_jax import schedules, shifts
from mmts_jax.config_defaults import ROW_ALIASES

__all__ = [
  "Policy",
  "Fixed",
  "Learnable",
  "Schedule",
  "ShiftTable",
  "POLICIES",
  "from_config",
  "check_shift_table",
  "PARTITIONS",
]

PARTITIONS = ("replicated", "rows")
LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Policy:
  """The interface of every temperature / margin policy (frozen, hashable: a static argument).

  `what` is "temperature" (InfoNCE) or "margin" (max-margin).
  """

  name: str
  what: str = "temperature"

  # Whether the model owns a learnable global temperature (CLIP) that `values` reads.
  learnable = False
  # Whether `init_state` needs the per-example shift table.
  uses_shift_table = False

  def init_state(self, num_examples: int, shift_table) -> dict[str, jax.Array]:
    """Dataset-sized per-sample state, each array with `num_examples` rows; {} if none."""
    del num_examples, shift_table
    return {}

  def state_partition(self) -> dict[str, str]:
    """Per key of the state: "replicated" or "rows" (split by row over the data axis)."""
    return {}

  def base(self, step) -> jax.Array:
    """The shared (per-step) part of the value, logged as `temperature_base` (0 if none)."""
    del step
    return jnp.float32(0.0)

  def values(self, state: Mapping[str, jax.Array], *, step, index, model_temperature) -> jax.Array:
    """`(B,)` float32 values for the anchors whose dataset positions are `index`."""
    raise NotImplementedError

  def loss(
    self,
    state: Mapping[str, jax.Array],
    image: jax.Array,
    text: jax.Array,
    *,
    step,
    index,
    loss_fn: LossFn,
    model_temperature,
  ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """`(loss, values, new_state)`; the train step differentiates `loss` and stores
    `new_state` (under `stop_gradient`)."""
    values = self.values(state, step=step, index=index, model_temperature=model_temperature)
    return loss_fn(image, text, values), values, dict(state)


def _cosine(step, period) -> jax.Array:
  """`cos(2 pi t / T)` (`schedules.cosine_oscillation` at amplitude 2): the policies' values
  may then be traced arrays (the study feeds its grids to one compiled program)."""
  return schedules.cosine_oscillation(2.0, period)(step)


def _per_anchor(value, index) -> jax.Array:
  return jnp.broadcast_to(jnp.asarray(value, jnp.float32), jnp.shape(index)[:1])


@dataclasses.dataclass(frozen=True)
class Fixed(Policy):
  """One fixed value."""

  name: str = "fixed"
  value: float = 0.07

  def base(self, step):
    return jnp.float32(self.value)

  def values(self, state, *, step, index, model_temperature):
    return _per_anchor(self.value, index)


@dataclasses.dataclass(frozen=True)
class Learnable(Policy):
  """CLIP's learnable global temperature: the model owns `log(1/tau)` (initial
  `log(1/value)`), clamped by the optimizer at `tau >= min_value`
  (`mmts_jax.train.optim.clamp_parameter`)."""

  name: str = "learnable"
  value: float = 0.07
  min_value: float = 0.01
  learnable = True

  def values(self, state, *, step, index, model_temperature):
    if model_temperature is None:
      raise ValueError("temperature policy 'learnable' needs the model's learned temperature")
    return _per_anchor(model_temperature, index)


@dataclasses.dataclass(frozen=True)
class Schedule(Policy):
  """TS: the uni-modal cosine schedule between `tau_min` and `tau_max` (Kukleva et al. 2023)."""

  name: str = "ts"
  tau_min: float = 0.07
  tau_max: float = 1.0
  period: float = 1.0

  def base(self, step):
    # `schedules.temperature_schedule`'s arithmetic, with bounds that may be traced.
    wave = (1 + _cosine(step, self.period)) / 2
    return self.tau_min + (self.tau_max - self.tau_min) * wave

  def values(self, state, *, step, index, model_temperature):
    return _per_anchor(self.base(step), index)


@dataclasses.dataclass(frozen=True)
class ShiftTable(Policy):
  """ICS (`alpha = 0`: the per-sample shift only) and MM-TS (Eq. 8):
  `alpha/2 cos(2 pi t / T) + shift_table[index]`.

  `level`: when set, the table is re-centred so that its sample mean is `level`
  (`shifts.level_match`; the level-matched rows `ics_lm` / `mmts_lm`)."""

  name: str = "mmts"
  alpha: float = 0.0
  period: float = 1.0
  level: float | None = None
  uses_shift_table = True

  def init_state(self, num_examples, shift_table):
    if shift_table is None:
      raise ValueError(
        f"temperature policy {self.name!r} needs per-example shifts: set "
        f"config.mmts.cluster_table or config.mmts.shift_table_path"
      )
    if self.level is not None:
      shift_table = check_shift_table(
        shift_table, ShiftTable(what=self.what), num_examples=num_examples
      )
      shift_table = shifts.level_match(
        shift_table, self.level, alpha=float(self.alpha), what=self.what
      )
    table = check_shift_table(shift_table, self, num_examples=num_examples)
    return {"shift_table": jnp.asarray(table)}

  def state_partition(self):
    return {"shift_table": "replicated"}  # gathered by arbitrary indices every step

  def base(self, step):
    if isinstance(self.alpha, (int, float)) and self.alpha == 0:
      return jnp.float32(0.0)
    # `schedules.cosine_oscillation(alpha, period)`, with an amplitude that may be traced.
    return self.alpha / 2 * _cosine(step, self.period)

  def values(self, state, *, step, index, model_temperature):
    return shifts.per_sample_values(
      self.base(step), state["shift_table"], jnp.asarray(index)
    ).astype(jnp.float32)


def _field(cfg, key, default=None):
  value = cfg.get(key, default) if hasattr(cfg, "get") else default
  return default if value is None else value


def _positive(name: str, value) -> float:
  value = float(value)
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"{name} must be finite and > 0, got {value}")
  return value


def _fixed(t, m, *, period, what, **unused):
  return Fixed(value=_positive(f"temperature.value ({what})", _field(t, "value", 0.07)), what=what)


def _learnable(t, m, *, period, what, **unused):
  if what != "temperature":
    raise ValueError(
      "temperature.mode 'learnable' is CLIP's learned temperature and only "
      "applies to loss 'infonce', got loss 'max_margin'"
    )
  return Learnable(value=_positive("temperature.value (temperature)", _field(t, "value", 0.07)))


def _schedule(t, m, *, period, what, **unused):
  tau_min = _positive(f"temperature.tau_min ({what})", _field(t, "tau_min", 0.07))
  tau_max = float(_field(t, "tau_max", 1.0))
  if not tau_max >= tau_min:
    raise ValueError(
      f"temperature.tau_max must be >= tau_min, got tau_min={tau_min}, tau_max={tau_max}"
    )
  return Schedule(tau_min=tau_min, tau_max=tau_max, period=period, what=what)


def _shift_table(name):
  def build(t, m, *, period, what, **unused):
    value = _positive(f"temperature.value ({what})", _field(t, "value", 0.07))
    alpha = float(_field(m, "alpha", 0.0)) if name.startswith("mmts") else 0.0
    sh_min, sh_max = float(_field(m, "sh_min", 0.0)), float(_field(m, "sh_max", 0.0))
    shifts.validate_positive(alpha, sh_min, sh_max, what=what)
    level = value if name.endswith("_lm") else None
    if level is not None and not level - alpha / 2 > 0:
      raise ValueError(
        f"temperature.mode {name!r}: the level {level} (temperature.value) minus "
        f"alpha/2 = {alpha / 2} must be > 0"
      )
    return ShiftTable(name=name, alpha=alpha, period=period, what=what, level=level)

  return build


def _isogclr(t, m, *, period, what, isogclr=None):
  from mmts_jax.policies.isogclr import ISogCLR  # imports this module

  ISogCLR.check_loss("infonce" if what == "temperature" else "max_margin")
  fields: dict[str, Any] = {k: float(v) for k, v in dict(isogclr or {}).items()}
  return ISogCLR(**fields)


# Canonical policy name -> `builder(config.temperature, config.mmts, *, period, what, isogclr)`.
POLICIES: dict[str, Callable[..., Policy]] = {
  "fixed": _fixed,
  "learnable": _learnable,
  "ts": _schedule,
  "ics": _shift_table("ics"),
  "mmts": _shift_table("mmts"),
  "ics_lm": _shift_table("ics_lm"),
  "mmts_lm": _shift_table("mmts_lm"),
  "isogclr": _isogclr,
}


def from_config(
  temperature: Mapping[str, Any],
  mmts: Mapping[str, Any],
  *,
  total_steps: int,
  loss: str = "infonce",
  isogclr: Mapping[str, Any] | None = None,
) -> Policy:
  """`config.temperature` + `config.mmts` -> a validated `Policy`.

  Everything is checked here, before any compilation: a configuration whose temperature or
  margin can reach <= 0 (`sh_min - alpha/2 <= 0`) raises ValueError naming the values.

  Example:
    >>> from_config({"mode": "mmts"}, {"alpha": 0.04, "sh_min": 0.05, "sh_max": 0.10,
    ...             "num_oscillations": 5}, total_steps=1000).period
    200.0
  """
  raw = str(_field(temperature, "mode", "fixed")).lower()
  mode = ROW_ALIASES.get(raw, raw)
  if mode not in POLICIES:
    raise ValueError(
      f"temperature.mode must be one of {sorted(POLICIES)} (or "
      f"{sorted(set(ROW_ALIASES) - set(POLICIES))}), got {raw!r}"
    )
  what = "margin" if loss == "max_margin" else "temperature"
  period = schedules.period_from_total_steps(
    total_steps, float(_field(mmts, "num_oscillations", 5))
  )
  return POLICIES[mode](temperature, mmts, period=period, what=what, isogclr=isogclr)


def check_shift_table(table, policy: Policy, *, num_examples: int | None = None) -> np.ndarray:
  """Validates a per-sample shift table against the policy and the dataset size.

  Returns the table as a float32 numpy array. Raises ValueError when it is not 1-D, not finite,
  has a length other than `num_examples` (a table of another dataset), or would make a value
  `<= 0` (`min(table) - alpha/2 <= 0`).

  Example:
    >>> check_shift_table([0.05, 0.1], ShiftTable(alpha=0.04), num_examples=2).dtype
    dtype('float32')
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
      f"examples: it was built for another dataset"
    )
  shifts.validate_positive(
    float(getattr(policy, "alpha", 0.0)), float(table.min()), float(table.max()), what=policy.what
  )
  return table
