"""The MM-TS core against the official PyTorch code (../shared/reference/mmts_official_cases.npz).

Float32: relative error <= 1e-4 (gradients: relative to the largest gradient entry). Float64
(`jax_enable_x64`): <= 1e-9.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmts_jax import losses, schedules, shifts

LOSSES = {
  "mmts_infonce": (losses.infonce, "tau"),
  "mmts_max_margin": (losses.max_margin, "tau"),
  "infonce_fixed": (losses.infonce, 0.07),
  "max_margin_fixed": (losses.max_margin, 0.2),
}


def _cases(shared_dir):
  data = np.load(shared_dir / "reference" / "mmts_official_cases.npz")
  ids = sorted({k.split("/")[0] for k in data.files})
  return [{k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(i + "/")} for i in ids]


@pytest.fixture(scope="module")
def cases(shared_dir):
  return _cases(shared_dir)


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)


def _check_case(case, dtype, tol):
  tau_base = schedules.cosine_oscillation(float(case["alpha"]), float(case["period"]))(
    int(case["step"])
  )
  sh = shifts.cluster_shift(
    jnp.asarray(case["cluster_size"]),
    float(case["sh_min"]),
    float(case["sh_max"]),
    min_size=case["min_size"],
    max_size=case["max_size"],
  )
  tau = tau_base + sh
  # tau_base can be exactly 0 (a quarter period): compare it relative to its amplitude alpha/2.
  assert abs(float(tau_base) - float(case["tau_base"])) <= tol * float(case["alpha"]) / 2
  assert _rel(sh, case["shift"]) <= tol
  assert _rel(tau, case["tau"]) <= tol
  image = jnp.asarray(case["image"], dtype)
  text = jnp.asarray(case["text"], dtype)
  for name, (fn, t) in LOSSES.items():
    t = tau if isinstance(t, str) else jnp.asarray(t, dtype)
    value, (g_img, g_txt) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(image, text, t)
    assert value.dtype == dtype
    assert _rel(value, case[name]) <= tol, (name, float(value), float(case[name]))
    assert _rel(g_img, case[name + "_grad_image"]) <= tol, name
    assert _rel(g_txt, case[name + "_grad_text"]) <= tol, name


def test_official_cases_float32(cases):
  assert len(cases) == 5
  for case in cases:
    _check_case(case, jnp.float32, 1e-4)


def test_official_cases_float64(cases):
  with jax.enable_x64(True):
    for case in cases:
      _check_case(case, jnp.float64, 1e-9)


def test_cases_cover_both_signs_of_the_base_temperature(cases):
  # Guards the fixture itself: the schedule is exercised on both sides of zero.
  bases = [float(c["tau_base"]) for c in cases]
  assert min(bases) < 0 < max(bases)
