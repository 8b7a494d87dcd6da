"""`benchmarks/pallas_kernels_bench.py` on the CPU: the Pallas interpreter at a tiny shape
writes the json the GPU run writes, with errors the bench computed against its float32
reference (bfloat16 outputs: within 1e-2 of the largest value; the float32 sums within 1e-5)."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import pallas_kernels_bench  # noqa: E402


def test_smoke_interpret(tmp_path):
  assert (
    pallas_kernels_bench.main(["--out", str(tmp_path), "--interpret", "--small", "--reps", "1"])
    == 0
  )
  result = json.loads((tmp_path / "pallas_kernels_bench.json").read_text())
  case = result["cases"]["tiny"]
  for op, sums in (("layer_norm", ("dscale", "dbias")), ("bias_gelu", ("dbias",))):
    for side in ("xla", "pallas"):
      err = case[op][side]["rel_err"]
      assert max(err.values()) < 1e-2, (op, side, err)
      assert all(err[k] < 1e-5 for k in sums), (op, side, err)
      assert case[op][side]["fwd_bwd_ms"] > 0
    # Same inputs, same maths: the kernels' bf16 outputs round like XLA's.
    for k, v in case[op]["pallas"]["rel_err"].items():
      assert v <= case[op]["xla"]["rel_err"][k] + 1e-5, (op, k)


def test_refuses_cpu_without_interpret(tmp_path):
  with pytest.raises(SystemExit) as e:
    pallas_kernels_bench.main(["--out", str(tmp_path)])
  assert e.value.code == 2
