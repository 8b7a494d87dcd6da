"""Where a profiled train step's kernel time goes: each profiled kernel joined to the optimised
HLO instruction that launched it, its source op, tower, layer part, bytes moved and bandwidth.

`train_step_bench.py --profile V --hlo V` writes the device kernels of 3 steps (the top 40 by
time, and every kernel's time per category) and the optimised HLO of the same executable. A
profiled kernel `input_add_reduce_fusion_28` is the HLO instruction `%input_add_reduce_fusion.28`;
XLA emits one kernel for all the instructions that share its `deduplicated_name` (the 12 layers'
copies of one fusion), so `calls_per_step` is the size of that group. For each kernel:

  bytes per call = sum of the fusion's operand shapes + its result shapes (an upper bound on
                   the HBM traffic of one launch: an operand read only in part, e.g. by a
                   slice, counts whole),
  bandwidth      = bytes per call * calls per step / ms per step,

compared with the H200's HBM bandwidth (`--hbm-tb-s`, 4.8 TB/s). Each kernel gets one cause
(`CAUSES`, from its `op_name` metadata and the operations inside the fusion); the kernels outside
the top 40 are reported per profile category as the tail (their names are not in the json).

  python benchmarks/profile_attribution.py benchmarks/results/train_step_h200_run6 \\
      --variant fast+qkv+even --out benchmarks/results/train_step_h200_run6/attribution.json

Example (the parsing, on two HLO lines):
  >>> hlo = parse_hlo('''
  ...   %p = bf16[4,8]{1,0} parameter(0)
  ...   %f.1 = (f32[4]{0}, bf16[4,8]{1,0}) fusion(%p), calls=%c, metadata={op_name="jit(f)/ln1/mul"}
  ... ''')
  >>> hlo["f.1"]["bytes_out"], hlo["f.1"]["op_name"]
  (80, 'jit(f)/ln1/mul')
  >>> operand_bytes(hlo, "f.1")
  64
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mmts_jax import atomic_io  # noqa: E402

DTYPE_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "bf16": 2,
  "f16": 2,
  "s16": 2,
  "u16": 2,
  "f32": 4,
  "s32": 4,
  "u32": 4,
  "f64": 8,
  "s64": 8,
  "u64": 8,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
}
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string (a tuple counts all its arrays).

  Example:
    >>> shape_bytes("(bf16[2,3]{1,0}, f32[4]{0})")
    28
  """
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * DTYPE_BYTES[dtype]
  return total


def _split_shape(rest: str) -> tuple[str, str]:
  """`rest` = 'SHAPE opcode(...)...' -> (SHAPE, the remainder); SHAPE may be a nested tuple."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[: i + 1], rest[i + 1 :].lstrip()
  head, _, tail = rest.partition(" ")
  return head, tail


def _closing_paren(args: str) -> int:
  """Index of the `)` that closes an operand list `args` (its `(` already consumed)."""
  depth = 1
  for i, ch in enumerate(args):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      return i
  return len(args)


def parse_hlo(text: str) -> dict[str, dict]:
  """Every instruction of an HLO module's text: name -> shape, opcode, operand names, result
  bytes, `op_name`, `deduplicated_name`, called computation and (for a computation's own
  instructions) the computation it lies in."""
  out, comp = {}, None
  for line in text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      comp = line.split()[0].lstrip("%") if line.startswith(("%", "ENTRY")) else comp
      if line.startswith("ENTRY"):
        comp = line.split()[1].lstrip("%")
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, rest = m.groups()
    shape, rest = _split_shape(rest)
    opcode, _, args = rest.partition("(")
    end = _closing_paren(args)
    operands = re.findall(r"%([\w.\-]+)", args[:end])
    attrs = args[end:]

    def get(key: str, attrs: str = attrs) -> str | None:
      m = re.search(key + r'="([^"]*)"', attrs)
      return m[1] if m else None

    calls = re.search(r"calls=%([\w.\-]+)", attrs)
    out[name] = {
      "shape": shape,
      "opcode": opcode.strip(),
      "operands": operands,
      "bytes_out": shape_bytes(shape),
      "op_name": get("op_name") or "",
      "deduplicated_name": get("deduplicated_name"),
      "calls": calls[1] if calls else None,
      "target": get("custom_call_target"),
      "computation": comp,
    }
  return out


def operand_bytes(hlo: dict, name: str) -> int:
  return sum(hlo[o]["bytes_out"] for o in hlo[name]["operands"] if o in hlo)


def body_opcodes(hlo: dict, computation: str | None) -> collections.Counter:
  """Opcodes inside a fused computation (what the fusion computes)."""
  return collections.Counter(
    i["opcode"] for i in hlo.values() if computation and i["computation"] == computation
  )


def source_op(hlo: dict, name: str) -> str:
  """The fusion's `op_name`, or (XLA leaves it off some fusions) the commonest `op_name` of the
  instructions inside its fused computation."""
  h = hlo[name]
  if h["op_name"]:
    return h["op_name"]
  inner = collections.Counter(
    i["op_name"]
    for i in hlo.values()
    if h["calls"] and i["computation"] == h["calls"] and i["op_name"]
  )
  return inner.most_common(1)[0][0] if inner else ""


def instruction_of(hlo: dict, kernel: str) -> str | None:
  """`input_add_reduce_fusion_28` -> `input_add_reduce_fusion.28` (if that instruction exists)."""
  for cand in (kernel, re.sub(r"_(\d+)$", r".\1", kernel)):
    if cand in hlo:
      return cand
  return None


def where(op_name: str) -> dict:
  """Tower, layer and part of a source path such as
  `.../encode_text/text_tower/encoder/block_11/mlp/fc1/reduce_sum` (`bwd`: under `transpose(`,
  JAX's name for the backward pass)."""
  tower = "image" if "image_tower" in op_name else "text" if "text_tower" in op_name else "-"
  block = re.search(r"/block_(\d+)/", op_name)
  tail = op_name.split("/encoder/")[-1] if "/encoder/" in op_name else op_name.split("/")[-1]
  part = re.sub(r"^block_\d+/", "", tail)
  return {
    "tower": tower,
    "block": int(block[1]) if block else None,
    "part": part,
    "pass": "bwd" if "transpose(" in op_name else "fwd",
  }


# (cause, test on (kernel name, op_name, fusion-body opcodes)), first match wins.
CAUSES = (
  ("gemm (cuBLAS)", lambda k, op, ops: bool(re.search(r"nvjet|gemm|cublas|cutlass|xmma", k))),
  ("attention: cuDNN flash fwd/bwd", lambda k, op, ops: "sdpa" in k or "fmha" in k),
  ("attention: cuDNN bwd helpers (dO.O, dq f32->bf16)", lambda k, op, ops: "cudnn" in k),
  (
    "layer norm fwd/bwd in f32 (residual stream in an (L,C,B) layout, transposes)",
    lambda k, op, ops: bool(re.search(r"/ln(1|2|_pre|_final)/", op)),
  ),
  (
    "GELU fwd (tanh saved) and GELU bwd + fc1 bias grad",
    lambda k, op, ops: "/mlp/" in op and ("tanh" in ops or "fc1" in op or op.endswith("mlp/mul")),
  ),
  (
    "q/k/v split + bias, dq/dk/dv concat + bias grad (fused qkv)",
    lambda k, op, ops: "/attn/" in op and "/out/" not in op,
  ),
  (
    "bias grads of out/fc2 + residual adds",
    lambda k, op, ops: bool(re.search(r"/(out|fc2)/|/add(_any)?$", op)),
  ),
  (
    "optimizer (AdamW, clipping, casts)",
    lambda k, op, ops: bool(re.search(r"optax|adam|clip|global_norm|tree_", op, re.I)),
  ),
)


def cause_of(kernel: str, op_name: str, ops: collections.Counter) -> str:
  for cause, test in CAUSES:
    if test(kernel, op_name, ops):
      return cause
  return "other"


# The kernel categories of `train_step_bench.py`'s profile summary (it imports these).
CATEGORIES = (
  ("attention", re.compile(r"fmha|flash|cudnn|sdpa|attention", re.I)),
  ("gemm", re.compile(r"gemm|xmma|nvjet|cutlass|cublas|wgmma|triton_gemm|matmul|_dot", re.I)),
  ("conv", re.compile(r"conv|implicit", re.I)),
  ("reduce/norm", re.compile(r"reduce|norm", re.I)),
  ("copy/transpose", re.compile(r"copy|transpose|memcpy|memset", re.I)),
)


def category(kernel: str) -> str:
  """The category of a GPU kernel's name (the first of `CATEGORIES` whose pattern it matches).

  Example:
    >>> category("nvjet_sm90_tst_128x128"), category("input_add_reduce_fusion_28")
    ('gemm', 'reduce/norm')
  """
  for cat, pattern in CATEGORIES:
    if pattern.search(kernel):
      return cat
  return "other fusion"


def device_kernel_times(trace_dir: str) -> dict[str, tuple[collections.Counter, ...]] | None:
  """Per line of the device planes of the newest `jax.profiler` trace under `trace_dir`: the
  total nanoseconds and the count of each event name, `{"plane | line": (total, count)}`; None
  if no trace was written."""
  import glob

  from jax.profiler import ProfileData

  files = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
  if not files:
    return None
  lines = {}
  for plane in ProfileData.from_file(files[-1]).planes:
    if not plane.name.startswith("/device:"):
      continue
    for line in plane.lines:
      total, count = collections.Counter(), collections.Counter()
      for ev in line.events:
        total[ev.name] += ev.duration_ns
        count[ev.name] += 1
      lines[f"{plane.name} | {line.name}"] = (total, count)
  return lines


def attribute(profile_line: dict, hlo: dict, hbm_tb_s: float) -> dict:
  """Rows for the profiled kernels, totals per cause and the tail per category."""
  rows, by_cause = [], collections.Counter()
  top_by_cat = collections.Counter()
  for k in profile_line["top"]:
    name, ms, calls = k["name"], k["ms_per_step"], k["calls_per_step"]
    top_by_cat[category(name)] += ms
    instr = instruction_of(hlo, name)
    row = {
      "kernel": name,
      "ms_per_step": round(ms, 4),
      "calls_per_step": calls,
      "category": category(name),
    }
    if instr:
      h = hlo[instr]
      dedup = h["deduplicated_name"] or instr
      group = [
        n
        for n, i in hlo.items()
        if (i["deduplicated_name"] or n) == dedup and i["computation"] == h["computation"]
      ]
      ops = body_opcodes(hlo, h["calls"])
      per_call = operand_bytes(hlo, instr) + h["bytes_out"]
      gb_s = per_call * calls / (ms * 1e-3) / 1e9
      op = source_op(hlo, instr)
      places = collections.Counter(
        f"{where(source_op(hlo, n))['tower']}/{where(source_op(hlo, n))['pass']}" for n in group
      )
      row.update(
        instruction=instr,
        instructions_in_group=len(group),
        op_name=re.sub(r"block_\d+", "block_N", op),
        **{k2: v for k2, v in where(op).items() if k2 != "block"},
        towers_passes=dict(places),
        result_shape=re.sub(r"\{[0-9,]*\}", "", h["shape"]),
        operand_shapes=[
          re.sub(r"\{[0-9,]*\}", "", hlo[o]["shape"]) for o in h["operands"] if o in hlo
        ],
        fused_ops={
          o: c
          for o, c in ops.most_common()
          if o not in ("parameter", "constant", "bitcast", "broadcast", "tuple")
        },
        mb_per_call=round(per_call / 1e6, 1),
        gb_s=round(gb_s, 0),
        pct_of_hbm=round(100 * gb_s / (hbm_tb_s * 1e3), 1),
      )
      row["cause"] = cause_of(name, op, ops)
    else:
      row["cause"] = cause_of(name, "", collections.Counter())
    by_cause[row["cause"]] += ms
    rows.append(row)
  cats = profile_line["by_category_ms_per_step"]
  tail = {c: round(cats[c] - top_by_cat.get(c, 0.0), 3) for c in cats}
  return {
    "total_kernel_ms_per_step": round(profile_line["total_ms_per_step"], 3),
    "kernels_per_step": profile_line["events_per_step"],
    "by_category_ms_per_step": {c: round(v, 3) for c, v in cats.items()},
    "top_kernels_ms_per_step": round(sum(k["ms_per_step"] for k in profile_line["top"]), 3),
    "by_cause_top_kernels_ms_per_step": {c: round(v, 3) for c, v in by_cause.most_common()},
    "tail_outside_top_by_category_ms_per_step": tail,
    "kernels": rows,
  }


def hlo_totals(hlo: dict) -> dict:
  """Every kernel-launching fusion of the entry computation, counted by cause: how many, and
  their bytes (operands + results): the share of the tail each cause can hold."""
  entry = next(i["computation"] for i in hlo.values() if i["opcode"] == "fusion")
  out = collections.defaultdict(lambda: {"fusions": 0, "gb": 0.0})
  for name, h in hlo.items():
    if h["computation"] != entry or h["opcode"] != "fusion":
      continue
    c = cause_of(name, source_op(hlo, name), body_opcodes(hlo, h["calls"]))
    out[c]["fusions"] += 1
    out[c]["gb"] += (operand_bytes(hlo, name) + h["bytes_out"]) / 1e9
  return {c: {"fusions": v["fusions"], "gb": round(v["gb"], 2)} for c, v in out.items()}


def table(result: dict) -> str:
  lines = [f"{'ms/step':>8} {'calls':>5} {'MB/call':>8} {'%HBM':>5}  cause | kernel | op"]
  for r in result["kernels"]:
    if r["category"] == "gemm":
      continue
    lines.append(
      f"{r['ms_per_step']:8.3f} {r['calls_per_step']:5.0f} {r.get('mb_per_call', 0):8.1f} "
      f"{r.get('pct_of_hbm', 0):5.1f}  {r['cause'][:40]} | {r['kernel'][:34]} | "
      f"{r.get('op_name', '')[-60:]}"
    )
  lines.append("")
  lines.append("by cause (top kernels):")
  for c, v in result["by_cause_top_kernels_ms_per_step"].items():
    lines.append(f"  {v:7.3f} ms  {c}")
  lines.append("tail outside the top kernels, by category:")
  for c, v in result["tail_outside_top_by_category_ms_per_step"].items():
    lines.append(f"  {v:7.3f} ms  {c}")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
  p.add_argument("run_dir", help="a run's directory: train_step_bench_MODEL.json + hlo_*.txt.gz")
  p.add_argument("--variant", default="fast+qkv+even")
  p.add_argument("--model", default="vit_b16")
  p.add_argument("--hbm-tb-s", type=float, default=4.8, help="the card's HBM bandwidth, TB/s")
  p.add_argument("--out", help="json written here (atomically)")
  args = p.parse_args(argv)
  run = pathlib.Path(args.run_dir)
  bench = json.loads((run / f"train_step_bench_{args.model}.json").read_text())
  prof = bench.get("profile", {}).get(args.variant)
  if not prof or not prof.get("lines"):
    raise ValueError(f"{run}: no profile of variant {args.variant!r}")
  hlo_path = run / f"hlo_{args.variant.replace('+', '_')}.txt.gz"
  with gzip.open(hlo_path, "rt") as f:
    hlo = parse_hlo(f.read())
  line_name, line = max(prof["lines"].items(), key=lambda kv: kv[1]["total_ms_per_step"])
  result = {
    "source": {
      "bench_json": str(run / f"train_step_bench_{args.model}.json"),
      "hlo": str(hlo_path),
      "variant": args.variant,
      "line": line_name,
      "steps_profiled": prof["steps"],
    },
    "step_ms_median": bench.get(f"{args.variant}_fixed_b{bench['batches'][0]}", {}).get(
      "step_ms_median"
    ),
    "hbm_tb_s": args.hbm_tb_s,
    **attribute(line, hlo, args.hbm_tb_s),
    "hlo_fusions_by_cause": hlo_totals(hlo),
  }
  print(table(result))
  if args.out:
    atomic_io.atomic_write_json(pathlib.Path(args.out), result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
