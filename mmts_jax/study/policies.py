r"""The study's grid points: thin wrappers that delegate to the trainer's policies.

There is one implementation of each policy, in `mmts_jax.temperature` (`Fixed`, `Learnable`,
`Schedule`, `ShiftTable`) and `mmts_jax.policies.isogclr.ISogCLR`; `mmts train` runs the same
objects. A wrapper only names a trial's hyper-parameters the way the study's grids do (a shift
*range* `[sh_min, sh_max]` from which `experiment` builds the Eq. 6 table, a `level` for the
level-matched rows) and builds the trainer's policy (`.policy`); `init_state`,
`state_partition`, `values` and `loss` are the trainer policy's.

Float fields not named in `static_fields` may be traced: the runner compiles one program per
policy type and feeds the hyper-parameters of every trial as (vmapped) arguments.

| wrapper       | trainer policy                                 | value of anchor `i` at step `t` |
| ------------- | ---------------------------------------------- | ------------------------------- |
| `Fixed`       | `Fixed(value=tau)`                             | `tau`                           |
| `Learnable`   | `Learnable(value=tau)`                         | CLIP's learned `tau`            |
| `TS`          | `Schedule(tau_min, tau_max, period)`           | uni-modal cosine schedule       |
| `ICS`         | `ShiftTable(alpha=0, level=level)`             | `sh_i`                          |
| `MMTS`        | `ShiftTable(alpha, period, level=level)`       | `alpha/2 cos(2 pi t/T) + sh_i`  |
| `ISogCLR`     | itself (`mmts_jax.policies.isogclr`)           | learned per-sample `tau_i`      |

Example:
  >>> import jax.numpy as jnp
  >>> p = MMTS(alpha=0.04, sh_min=0.05, sh_max=0.10, period=100.0)
  >>> state = p.init_state(2, jnp.array([0.05, 0.10]))
  >>> [round(float(v), 4) for v in p.values(state, step=0, index=jnp.array([0, 1]))]
  [0.07, 0.12]
"""

from __future__ import annotations

import dataclasses

import jax

from mmts_jax import shifts, temperature
from mmts_jax.policies.isogclr import ISogCLR

__all__ = ["Fixed", "Learnable", "TS", "ICS", "MMTS", "ISogCLR", "trainer_policy"]


class _Delegate:
  """`init_state`, `state_partition`, `values`, `loss`: those of `self.policy`."""

  static_fields: tuple[str, ...] = ()

  @property
  def policy(self) -> temperature.Policy:
    raise NotImplementedError

  def init_state(self, num_examples: int, shift_table=None) -> dict[str, jax.Array]:
    return self.policy.init_state(num_examples, shift_table)

  def state_partition(self) -> dict[str, str]:
    return self.policy.state_partition()

  def values(self, state, *, step, index, model_temperature=None) -> jax.Array:
    return self.policy.values(state, step=step, index=index, model_temperature=model_temperature)

  def loss(self, state, image, text, *, step, index, loss_fn, model_temperature=None):
    return self.policy.loss(
      state,
      image,
      text,
      step=step,
      index=index,
      loss_fn=loss_fn,
      model_temperature=model_temperature,
    )


@dataclasses.dataclass(frozen=True)
class Fixed(_Delegate):
  tau: float = 0.07
  name: str = "fixed"

  @property
  def policy(self):
    return temperature.Fixed(value=self.tau)


@dataclasses.dataclass(frozen=True)
class Learnable(_Delegate):
  """CLIP's learnable temperature; `tau` is the model parameter's initial value."""

  tau: float = 0.07
  name: str = "learnable"

  @property
  def policy(self):
    return temperature.Learnable(value=self.tau)


@dataclasses.dataclass(frozen=True)
class TS(_Delegate):
  tau_min: float = 0.04
  tau_max: float = 0.10
  period: float = 60.0
  name: str = "ts"
  static_fields = ("period",)

  def __post_init__(self):
    if not 0 < self.tau_min <= self.tau_max:
      raise ValueError(f"TS: need 0 < tau_min <= tau_max, got {self.tau_min}, {self.tau_max}")

  @property
  def policy(self):
    return temperature.Schedule(tau_min=self.tau_min, tau_max=self.tau_max, period=self.period)


@dataclasses.dataclass(frozen=True)
class ICS(_Delegate):
  """Cluster shift only; the Eq. 6 table spans `[sh_min, sh_max]` (re-centred on `level`)."""

  sh_min: float = 0.05
  sh_max: float = 0.10
  level: float | None = None
  name: str = "ics"

  @property
  def alpha(self) -> float:
    return 0.0

  def __post_init__(self):
    # A level-matched table is checked after re-centring (`ShiftTable.init_state`).
    if self.level is None:
      shifts.validate_positive(float(self.alpha), self.sh_min, self.sh_max)

  @property
  def policy(self):
    return temperature.ShiftTable(name="ics", alpha=0.0, level=self.level)


@dataclasses.dataclass(frozen=True)
class MMTS(ICS):
  """TS&ICS (Eq. 8): the cosine base of amplitude `alpha` plus the cluster shift."""

  alpha: float = 0.04
  period: float = 60.0
  name: str = "mmts"
  static_fields = ("period",)

  @property
  def policy(self):
    return temperature.ShiftTable(
      name="mmts", alpha=self.alpha, period=self.period, level=self.level
    )


def trainer_policy(policy) -> temperature.Policy:
  """The trainer's policy object of a study trial (ISogCLR is its own)."""
  return policy if isinstance(policy, temperature.Policy) else policy.policy
