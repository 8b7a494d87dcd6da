"""Where the warps of a Mosaic tile program stall: Nsight Compute's per-SASS-instruction
warp-stall samples, summed over the program's products and its epilogue.

  XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --profile-from-start off --clock-control none \\
      --section WarpStateStats --section SourceCounters -o prog \\
      python benchmarks/profile_tiles.py ncu --programs mosaic_fwd,mosaic_ds
  ncu -i prog.ncu-rep --page source --csv --print-source sass | gzip > source.csv.gz
  python benchmarks/ncu_stalls.py source.csv.gz --out stalls.json

The source page lists, per profiled kernel, each SASS instruction with its executed count and its
stall samples by reason. The regions are found from the executed counts: the products are the
contiguous run of instructions, holding the `HGMMA`s, executed most often (once per step of D);
the epilogue is the run right after it executed as often as its first instruction (once per
sub-tile and warp). Per region: samples, instructions, the share of samples per stall reason and
per opcode, and shared-memory wavefronts against the ideal (their ratio is the bank conflicts);
"rest" sums every other instruction (the setup, the copy warpgroup's loop, the exit).
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loss_bench import write_json  # noqa: E402

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def kernels(text: str) -> list[tuple[str, list[dict]]]:
  """The source page's CSV -> [(kernel name, rows as dicts)], in the report's order."""
  out, block = [], None
  for line in text.splitlines():
    if line.startswith('"Kernel Name"'):
      block = [line]
      out.append(block)
    elif block is not None and line.strip():
      block.append(line)
  parsed = []
  for block in out:
    name = next(csv.reader([block[0]]))[1]
    rows = list(csv.DictReader(io.StringIO("\n".join(block[1:]))))
    parsed.append((name, rows))
  return parsed


def _num(row: dict, key: str) -> float:
  try:
    return float(row.get(key) or 0)
  except ValueError:
    return 0.0


def opcode(source: str) -> str:
  """`@P1 FMNMX.NAN R1, R2, R3` -> `FMNMX`.

  Example:
    >>> opcode("@!P1  BRA 0x7f00"), opcode("MUFU.EX2 R1, R2")
    ('BRA', 'MUFU')
  """
  words = source.split()
  if words and words[0].startswith("@"):
    words = words[1:]
  return words[0].split(".")[0] if words else ""


def regions(rows: list[dict]) -> dict[str, tuple[int, int]]:
  """`{"products": (start, stop), "epilogue": (start, stop)}` (row indices, stop excluded)."""
  counts = [_num(r, EXECUTED) for r in rows]
  mma = [i for i, r in enumerate(rows) if opcode(r.get("Source", "")) == "HGMMA"]
  if not mma:
    raise ValueError("no HGMMA instruction: not a wgmma program")
  top = counts[mma[0]]
  start = mma[0]
  while start > 0 and counts[start - 1] == top:
    start -= 1
  stop = mma[-1]
  while stop < len(rows) and counts[stop] == top:
    stop += 1
  every = counts[stop] if stop < len(rows) else 0
  end = stop
  while end < len(rows) and counts[end] in (every, 0):
    end += 1
  return {"products": (start, stop), "epilogue": (stop, end)}


def summarise(rows: list[dict], top: int = 10) -> dict:
  stalls = [k for k in rows[0] if k.startswith("stall_") and "Not Issued" not in k]
  total = sum(_num(r, SAMPLES) for r in rows) or 1.0
  by_stall = {s: sum(_num(r, s) for r in rows) for s in stalls}
  by_op: dict[str, float] = collections.defaultdict(float)
  for r in rows:
    by_op[opcode(r.get("Source", ""))] += _num(r, SAMPLES)

  def shares(counts: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(counts.items(), key=lambda kv: -kv[1])[:top]

  return {
    "samples": sum(_num(r, SAMPLES) for r in rows),
    "instructions": len(rows),
    "stall_shares": {k[6:]: round(v / total, 3) for k, v in shares(by_stall)},
    "opcode_shares": {k: round(v / total, 3) for k, v in shares(by_op)},
    "shared_wavefronts": sum(_num(r, "L1 Wavefronts Shared") for r in rows),
    "shared_wavefronts_ideal": sum(_num(r, "L1 Wavefronts Shared Ideal") for r in rows),
  }


def analyse(text: str, name: str = "body_mosaic_gpu_kernel") -> list[dict]:
  """Per kernel called `name` in the report: its whole-kernel samples and each region's summary."""
  out = []
  for kernel, rows in kernels(text):
    if kernel != name:
      continue
    spans = regions(rows)
    entry = {"kernel": kernel, "samples": sum(_num(r, SAMPLES) for r in rows)}
    for region, (a, b) in spans.items():
      entry[region] = {"rows": [a, b], **summarise(rows[a:b])}
    (p0, _), (_, e1) = spans["products"], spans["epilogue"]
    entry["rest"] = summarise(rows[:p0] + rows[e1:])  # setup, the copy warpgroup, the exit
    out.append(entry)
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
  ap.add_argument("source", help="ncu --page source --csv output (.csv or .csv.gz)")
  ap.add_argument("--kernel", default="body_mosaic_gpu_kernel")
  ap.add_argument("--out", required=True)
  a = ap.parse_args(argv)
  opener = gzip.open if a.source.endswith(".gz") else open
  with opener(a.source, "rt") as f:
    result = {"source": a.source, "kernels": analyse(f.read(), a.kernel)}
  for k in result["kernels"]:
    print(k["kernel"], k["samples"])
    for region in ("products", "epilogue", "rest"):
      r = k[region]
      print(f"  {region}: {r['samples']:.0f} samples, {r['instructions']} instructions")
      print(f"    stalls {r['stall_shares']}")
      print(f"    opcodes {r['opcode_shares']}")
  write_json(a.out, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
