"""`benchmarks/ncu_stalls.py`: regions and shares from a small source page written here."""

import gzip
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import ncu_stalls  # noqa: E402

HEADER = (
  '"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed",'
  '"L1 Wavefronts Shared","L1 Wavefronts Shared Ideal","stall_wait","stall_barrier",'
  '"stall_wait (Not Issued)"'
)


def _page(rows, name="body_mosaic_gpu_kernel"):
  lines = [f'"Kernel Name","{name}",', HEADER]
  for i, (src, samples, executed, wait, barrier) in enumerate(rows):
    lines.append(f'"0x{i:04x}","{src}","{samples}","{executed}","0","0","{wait}","{barrier}","0"')
  return "\n".join(lines)


# A setup instruction, a products loop (executed 8 times per sub-tile), an epilogue (once per
# sub-tile, one predicated-off instruction executed 0 times inside it), then the copy loop.
ROWS = [
  ("LDC R1, c[0x0][0x28]", 1, 2, 0, 1),
  ("UIADD3 UR4, UR4, 0x1, URZ", 2, 16, 2, 0),
  ("HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24", 3, 16, 1, 0),
  ("WARPGROUP.DEPBAR.LE gsb0, 0x0", 10, 16, 0, 10),
  ("MUFU.EX2 R3, R3", 6, 2, 6, 0),
  ("@P0 BRA 0x0100", 0, 0, 0, 0),
  ("FMNMX.NAN R4, R3, R5, !PT", 2, 2, 2, 0),
  ("UTMALDG.4D [UR8], [UR10]", 5, 1, 0, 5),
]


def test_regions_follow_the_executed_counts():
  ((name, rows),) = ncu_stalls.kernels(_page(ROWS))
  assert name == "body_mosaic_gpu_kernel"
  assert ncu_stalls.regions(rows) == {"products": (1, 4), "epilogue": (4, 7)}


def test_shares_per_region_and_the_rest(tmp_path):
  src = tmp_path / "source.csv.gz"
  with gzip.open(src, "wt") as f:
    f.write(_page(ROWS) + "\n" + _page(ROWS[:2], name="other_kernel"))
  out = tmp_path / "stalls.json"
  assert ncu_stalls.main([str(src), "--out", str(out)]) == 0
  (k,) = json.loads(out.read_text())["kernels"]  # the other kernel is left out
  assert k["samples"] == 29
  assert k["products"]["samples"] == 15 and k["products"]["instructions"] == 3
  assert k["products"]["stall_shares"] == {
    "barrier": pytest.approx(10 / 15, abs=1e-3),
    "wait": pytest.approx(3 / 15, abs=1e-3),
  }
  assert k["epilogue"]["opcode_shares"]["MUFU"] == pytest.approx(0.75)
  assert k["rest"]["samples"] == 6 and k["rest"]["opcode_shares"]["UTMALDG"] == pytest.approx(
    5 / 6, abs=1e-3
  )


def test_a_program_without_wgmma_is_refused():
  ((_, rows),) = ncu_stalls.kernels(_page(ROWS[4:]))
  with pytest.raises(ValueError, match="no HGMMA"):
    ncu_stalls.regions(rows)
