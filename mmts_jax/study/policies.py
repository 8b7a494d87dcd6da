r"""The study's temperature policies, written against the trainer's `Policy` interface.

Thin adapters of `mmts_jax.temperature`'s modes (and `mmts_jax.policies.isogclr.ISogCLR`) until
the trainer's policies land; each is a frozen (hashable) dataclass with

* `init_state(num_examples, shift_table) -> dict` (dataset-sized per-sample state, `{}` if none),
* `state_partition() -> {key: "replicated" | "rows"}`,
* `values(state, *, step, index, model_temperature) -> (B,)` temperatures (or margins),
* `loss(state, image, text, *, step, index, loss_fn, model_temperature) -> (loss, values,
  new_state)`.

Float fields not named in `static_fields` may be traced: the runner compiles one program per
policy type and feeds the hyper-parameters of each trial as arguments.

| policy        | value of anchor `i` at step `t`                                        |
| ------------- | ---------------------------------------------------------------------- |
| `Fixed`       | `tau`                                                                  |
| `Learnable`   | CLIP's learned `tau` (the model's parameter, initialised at `tau`)     |
| `TS`          | `tau_min + (tau_max - tau_min) (1 + cos(2 pi t / T)) / 2`              |
| `ICS`         | `sh_i` (Eq. 6 of the anchor's cluster size, in `[sh_min, sh_max]`)      |
| `MMTS`        | `alpha/2 cos(2 pi t / T) + sh_i` (Eq. 8)                               |

`ICS` and `MMTS` with `level` set re-centre the shifts (`shifts.level_match`) so that their
sample mean is `level`, e.g. the tuned fixed temperature: the *level-matched* rows. With
max-margin every value is a margin; `Learnable` applies to InfoNCE only.

Example:
  >>> import jax.numpy as jnp
  >>> p = MMTS(alpha=0.04, sh_min=0.05, sh_max=0.10, period=100.0)
  >>> state = p.init_state(2, jnp.array([0.05, 0.10]))
  >>> [round(float(v), 4) for v in p.values(state, step=0, index=jnp.array([0, 1]))]
  [0.07, 0.12]
  >>> lm = MMTS(alpha=0.04, sh_min=0.05, sh_max=0.10, period=100.0, level=0.07)
  >>> [round(float(v), 4) for v in lm.values(lm.init_state(2, jnp.array([0.05, 0.10])), step=0,
  ...                                         index=jnp.array([0, 1]))]
  [0.065, 0.115]
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mmts_jax import schedules, shifts

__all__ = ["ICS", "MMTS", "TS", "Fixed", "Learnable"]


class _Stateless:
  """Policies whose loss is the configured loss at `values(...)`."""

  def init_state(self, num_examples: int, shift_table=None) -> dict[str, jax.Array]:
    return {}

  def state_partition(self) -> dict[str, str]:
    return {}

  def values(self, state, *, step, index, model_temperature=None) -> jax.Array:
    raise NotImplementedError  # each policy below defines its values

  def loss(self, state, image, text, *, step, index, loss_fn, model_temperature=None):
    values = self.values(state, step=step, index=index, model_temperature=model_temperature)
    return loss_fn(image, text, values), values, state


@dataclasses.dataclass(frozen=True)
class Fixed(_Stateless):
  tau: float = 0.07
  name: str = "fixed"

  def values(self, state, *, step, index, model_temperature=None):
    return jnp.full(index.shape[:1], self.tau, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Learnable(_Stateless):
  """CLIP's learnable temperature; `tau` is the model's initial value (the model owns it)."""
  tau: float = 0.07
  name: str = "learnable"
  static_fields = ("tau",)  # the model's initialiser

  def values(self, state, *, step, index, model_temperature=None):
    if model_temperature is None:
      raise ValueError("Learnable: the model has no learnable temperature "
                       "(DualEncoder(learnable_temperature=True))")
    return jnp.broadcast_to(jnp.asarray(model_temperature, jnp.float32), index.shape[:1])


def _cosine(step, period: float):
  """`cos(2 pi t / T)`: `schedules.cosine_oscillation` at amplitude 2 (the period stays static)."""
  return schedules.cosine_oscillation(2.0, period)(step)


@dataclasses.dataclass(frozen=True)
class TS(_Stateless):
  tau_min: float = 0.04
  tau_max: float = 0.10
  period: float = 60.0
  name: str = "ts"
  static_fields = ("period",)

  def __post_init__(self):
    if not 0 < self.tau_min <= self.tau_max:
      raise ValueError(f"TS: need 0 < tau_min <= tau_max, got {self.tau_min}, {self.tau_max}")

  def values(self, state, *, step, index, model_temperature=None):
    # `schedules.temperature_schedule`, written with traced bounds (one program per grid).
    wave = (1 + _cosine(step, self.period)) / 2
    value = self.tau_min + (self.tau_max - self.tau_min) * wave
    return jnp.broadcast_to(jnp.asarray(value, jnp.float32), index.shape[:1])


@dataclasses.dataclass(frozen=True)
class ICS:
  """Cluster shift only; the per-sample shift table is the (constant) state."""
  sh_min: float = 0.05
  sh_max: float = 0.10
  level: float | None = None
  name: str = "ics"

  @property
  def alpha(self) -> float:
    return 0.0

  def init_state(self, num_examples: int, shift_table=None) -> dict[str, jax.Array]:
    """`{"shift": (N,) float32}`: the table, level-matched when `level` is set."""
    if shift_table is None:
      raise ValueError(f"{type(self).__name__}: needs a per-sample shift table")
    table = np.asarray(shift_table, np.float64)
    if table.shape != (int(num_examples),):
      raise ValueError(f"{type(self).__name__}: the shift table has shape {table.shape}, the "
                       f"dataset {num_examples} examples")
    if self.level is not None:
      table = shifts.level_match(table, self.level, alpha=self.alpha)
    shifts.validate_positive(self.alpha, float(table.min()), float(table.max()))
    return {"shift": jnp.asarray(table, jnp.float32)}

  def state_partition(self) -> dict[str, str]:
    return {"shift": "rows"}

  def base(self, step):
    return jnp.float32(0.0)

  def values(self, state, *, step, index, model_temperature=None):
    return shifts.per_sample_values(self.base(step), state["shift"], index).astype(jnp.float32)

  def loss(self, state, image, text, *, step, index, loss_fn, model_temperature=None):
    values = self.values(state, step=step, index=index)
    return loss_fn(image, text, values), values, state


@dataclasses.dataclass(frozen=True)
class MMTS(ICS):
  """TS&ICS (Eq. 8): the cosine base of amplitude `alpha` plus the cluster shift."""
  alpha: float = 0.04
  period: float = 60.0
  name: str = "mmts"
  static_fields = ("period",)

  def base(self, step):
    # Eq. 7, `schedules.cosine_oscillation(alpha, period)`, with a traced amplitude.
    return self.alpha / 2 * _cosine(step, self.period)
