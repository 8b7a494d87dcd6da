"""A model's output and gradients in one compiled function, for the tests that compare two
forms of the same tower (speed options, Pallas kernels) on the same parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The interpreted Pallas kernels make large programs; XLA's optimisation passes are not what
# these tests check.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def out_and_grads(model, params, x, rngs=None, compiler_options=FAST_COMPILE):
  """`model.apply(params, x, train=True)` and the gradients of `sum(sin(output))`."""

  def f(p):
    out = model.apply(p, x, train=True, rngs=rngs)
    return jnp.sum(jnp.sin(out)), out

  vg = jax.jit(jax.value_and_grad(f, has_aux=True))
  (_, out), grads = vg.lower(params).compile(compiler_options=compiler_options)(params)
  return out, grads
