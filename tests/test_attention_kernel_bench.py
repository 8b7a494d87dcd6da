"""`benchmarks/attention_kernel_bench.py` on the CPU: the Pallas interpreter at a tiny shape
(causal, with lengths) writes the json the GPU run writes, with errors the bench computed
against its float32 reference (bfloat16 inputs: the kernels and XLA's bfloat16 attention
within 3e-2 of the largest magnitude of each output)."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import attention_kernel_bench  # noqa: E402

from mmts_jax.models import pallas_attention as pa  # noqa: E402


def test_smoke_interpret(tmp_path):
  try:
    code = attention_kernel_bench.main(
      ["--out", str(tmp_path), "--interpret", "--small", "--reps", "1", "--calls", "1"]
    )
  finally:
    pa.set_pallas_attention(None)
  assert code == 0
  result = json.loads((tmp_path / "attention_kernel_bench.json").read_text())
  assert set(result["cases"]) == {"tiny_text"}
  for case in result["cases"].values():
    for side in ("pallas", "xla"):
      err = case[side]["rel_err"]
      assert set(err) == {"o", "dq", "dk", "dv"} and max(err.values()) < 3e-2, (side, err)
      assert case[side]["fwd_ms"] > 0 and case[side]["fwd_bwd_ms"] > 0


def test_refuses_cpu_without_interpret(tmp_path):
  with pytest.raises(SystemExit) as e:
    attention_kernel_bench.main(["--out", str(tmp_path)])
  assert e.value.code == 2
