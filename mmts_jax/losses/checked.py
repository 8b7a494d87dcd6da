"""Run-time checks of traced temperatures, margins and biases with `jax.experimental.checkify`.

The losses check concrete values before compiling, and under `jit` make the loss (and its
gradient) NaN when a traced value is out of range (see `_checks.nan_unless_valid`). Library users
who want the error itself, with the offending value, wrap the loss:

  err, loss = jax.jit(losses.checked(losses.infonce))(image, text, tau)
  err.throw()  # "temperature must be finite and > 0, got min -0.1 ..."
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import checkify

__all__ = ["check_values", "checked"]


def check_values(values, name: str = "temperature", *, signed: bool = False) -> None:
  """`checkify.check`s that every entry of `values` is finite and, unless `signed`, > 0.

  Call it inside a function that is `checkify.checkify`-ed (or use `checked`).

  Args:
    values: a scalar or array (traced or not).
    name: what the values are, for the message.
    signed: any finite value is allowed (a bias).

  Example:
    >>> import jax.numpy as jnp
    >>> from jax.experimental import checkify
    >>> err, _ = checkify.checkify(lambda t: check_values(t))(jnp.array([0.1, -0.5]))
    >>> print(err.get().split(" (")[0])
    temperature must be finite and > 0, got min -0.5 and 0 non-finite value(s)
  """
  v = jnp.asarray(values, jnp.promote_types(jnp.result_type(values), jnp.float32))
  bad = jnp.sum(~jnp.isfinite(v))
  if signed:
    checkify.check(bad == 0, f"{name} must be finite, got {{bad}} non-finite value(s)", bad=bad)
    return
  checkify.check(
    (bad == 0) & jnp.all(v > 0),
    f"{name} must be finite and > 0, got min {{low}} and {{bad}} non-finite value(s)",
    low=jnp.min(jnp.where(jnp.isnan(v), jnp.inf, v)),
    bad=bad,
  )


def checked(loss_fn: Callable, values: str = "temperature") -> Callable:
  """`loss_fn(image, text, v, **kw)` checkified: returns `(error, loss)`.

  `v` must be finite and > 0 (named `values` in the message); every keyword array (`bias`) must
  be finite. Works for `losses.infonce`, `losses.max_margin`, `losses.sigmoid`, the functions of
  `losses.get` and `losses.make_sharded_loss` (the check runs on the global values, before the
  `shard_map`). The result can be `jax.jit`-ed; call `error.throw()` to raise.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from mmts_jax import losses
    >>> f = jax.jit(checked(losses.infonce))
    >>> err, loss = f(jnp.eye(3), jnp.eye(3), jnp.array([0.1, 0.0, 0.1]))
    >>> err.get() is not None and bool(jnp.isnan(loss))
    True
  """

  @functools.wraps(loss_fn)
  def run(image, text, v, **kw):
    check_values(v, values)
    for key, value in kw.items():
      if isinstance(value, (jax.Array, float, int)) or hasattr(value, "shape"):
        check_values(value, key, signed=True)
    return loss_fn(image, text, v, **kw)

  return checkify.checkify(run, errors=checkify.user_checks)
