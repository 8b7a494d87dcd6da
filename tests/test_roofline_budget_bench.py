"""benchmarks/roofline_budget.py on sessions 20 and 21's committed H200 profiles: every kernel is
counted in exactly one part, the parts add up to the call, and the budgets follow from them
(the programs' rate now and needed are the same FLOP over different times)."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

import roofline_budget as rb  # noqa: E402

# Per run: its folder, its two profiles (B = 32,768 and 131,072) and its sweep with the peers.
RUNS = {
  "session20": ("loss_profile12_32k.json", "loss_profile13_131k.json", "loss_h200_session20.json"),
  "session21": ("loss_profile16_32k.json", "loss_profile17_131k.json", "loss_h200_session21.json"),
}


def _load(path):
  return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module", params=sorted(RUNS))
def run(request):
  folder = RESULTS / f"loss_h200_{request.param}"
  *profiles, sweep = (folder / name for name in RUNS[request.param])
  return profiles, rb.analyse([_load(p) for p in profiles], _load(sweep))


@pytest.fixture(scope="module")
def rows(run):
  return run[1]


def test_every_profiled_case_gets_a_row_with_both_targets(rows):
  got = {(r["B"], r["dtype"]) for r in rows}
  assert got == {(32768, "bf16"), (32768, "f32"), (131072, "bf16"), (131072, "f32")}
  for r in rows:
    assert set(r["budgets"]) == {"run_70pct", "issue"}
    assert r["budgets"]["issue"]["target_ms"] == rb.ISSUE_TARGETS_MS[(r["B"], r["dtype"])]


def test_the_parts_cover_the_profiled_kernels_and_the_call(run):
  profiles, rows = run
  by_case = {}
  for prof in map(_load, profiles):
    b = int(prof["argv"][prof["argv"].index("--size") + 1])
    for key, case in prof.items():
      if isinstance(case, dict) and "kernels" in case:
        by_case[(b, key.split(":")[1])] = case
  for r in rows:
    case = by_case[(r["B"], r["dtype"])]
    p = r["parts_ms"]
    # The kernels listed per call split into three parts with nothing lost (rounding: 1 us).
    listed = sum(k["ms_per_call"] for k in case["kernels"])
    assert abs(p["programs"] + p["products"] + p["glue"] - listed) < 3e-3
    assert p["programs"] > 0 and p["products"] > 0 and p["host"] > 0
    assert abs(sum(p.values()) - r["call_ms"]) < 1e-3
    # The profiled call and the sweep's timed one (another process) agree to within 5%.
    assert abs(r["call_ms"] / r["sweep_ms"] - 1) < 0.05


def test_the_budgets_follow_from_the_parts(rows):
  for r in rows:
    p = r["parts_ms"]
    for b in r["budgets"].values():
      left = b["target_ms"] - p["products"] - p["glue"] - p["idle"] - p["host"]
      assert b["programs_ms_left"] == pytest.approx(left, abs=2e-3)
      # Same FLOP: rate needed x time left = rate now x time now.
      assert b["programs_rate_needed"] * b["programs_ms_left"] == pytest.approx(
        b["programs_rate_now"] * p["programs"], rel=2e-3
      )
      assert b["programs_ms_left_if_no_overhead"] > b["programs_ms_left"]


def test_kernel_names_fall_into_parts():
  assert rb.kernel_part("sm90_xmma_gemm_f32f32_tf32f32_f32_nn_n_tilesize128x256x32") == "products"
  assert rb.kernel_part("memcpy128") == "glue"
  assert rb.kernel_part("body_mosaic_gpu_kernel") == "programs"


def test_a_sweep_without_its_matmul_rates_is_refused():
  with pytest.raises(ValueError, match="gemm_torch"):
    rb.rates({"results": [{"impl": "blockwise", "B": 8, "ms": 1.0}]})
