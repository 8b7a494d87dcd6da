"""The train-step table of `BENCHMARKS.md` from the raw results of the H200 runs: for each run
directory, every timed run of ours (`train_step_bench_MODEL.json`) and OpenCLIP's rows
(`openclip*.json`) with step time (median, min-max over rounds), examples/s, memory (ours: XLA's
buffer assignment of the step, `xla_step_gib`; OpenCLIP: `torch.cuda.max_memory_allocated`) and
the fraction of the run's measured bf16 matmul rate (`matmul_after.json`) that the model's
matrix-product FLOP per example (`flops_per_example`) reach; a run that did not measure the rate
takes the previous run directory's (named in `matmul_rate_from`).

  python benchmarks/step_table.py benchmarks/results/train_step_h200_run5 \\
      benchmarks/results/train_step_h200_run6 benchmarks/results/train_step_h200_l14 \\
      --out benchmarks/results/train_step_table.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mmts_jax import atomic_io  # noqa: E402

# (image width, depth, MLP, patch; text width, depth, MLP): CLIP's published shapes.
SHAPES = {
  "vit_b16": (768, 12, 3072, 16, 512, 12, 2048),
  "vit_l14": (1024, 24, 4096, 14, 768, 12, 3072),
}
OPENCLIP = {"ViT-B-16": "vit_b16", "ViT-L-14": "vit_l14"}


def flops_per_example(model: str, image_size: int = 224, text_len: int = 77) -> float:
  """Forward + backward FLOP of one example: per token and pre-LN block `4 w^2 + 2 w m`
  weight MACs and `2 L w` attention MACs, the patch embedding, 2 FLOP per MAC, backward = 2x
  forward (layer norms, softmax and the loss left out, under 1%).

  Example:
    >>> round(flops_per_example("vit_b16") / 1e9, 1)
    123.3
  """
  w, d, m, p, tw, td, tm = SHAPES[model]
  patches = (image_size // p) ** 2

  def tower(width, depth, mlp, length):
    return depth * length * (4 * width**2 + 2 * width * mlp + 2 * length * width)

  macs = tower(w, d, m, patches + 1) + patches * 3 * p * p * w + tower(tw, td, tm, text_len)
  return 3 * 2 * macs


def rows(run_dir: pathlib.Path, fallback: tuple[str, float] | None = None) -> list[dict]:
  """`fallback` (run name, FLOP/s): the matmul rate used where `run_dir` did not measure one
  (the row's `matmul_rate_from` names the run it came from)."""
  rate_file = run_dir / "matmul_after.json"
  if rate_file.exists():
    rate, rate_from = json.loads(rate_file.read_text())["bf16_tflops"] * 1e12, run_dir.name
  else:
    rate_from, rate = fallback if fallback else (None, None)
  out = []
  for path in sorted(run_dir.glob("train_step_bench_*.json")):
    res = json.loads(path.read_text())
    model = res["model"]
    for key, row in res.items():
      if not (isinstance(row, dict) and "step_ms_median" in row):
        continue
      out.append(
        dict(
          run=run_dir.name,
          side=f"mmts_jax {key}",
          model=model,
          batch=row["batch"],
          step_ms=row["step_ms_median"],
          step_ms_range=[row["step_ms_min"], row["step_ms_max"]],
          examples_per_s=row["examples_per_sec"],
          memory_gib=row["xla_step_gib"],
        )
      )
  for path in sorted(run_dir.glob("openclip*.json")):
    text = path.read_text().strip()
    if not text:
      continue
    res = json.loads(text.splitlines()[-1])
    arch = res["peer"].split()[1]
    times = res.get("step_ms_all")
    out.append(
      dict(
        run=run_dir.name,
        side=res["peer"],
        model=OPENCLIP[arch],
        batch=res["batch"],
        step_ms=res["step_ms_median"],
        step_ms_range=[min(times), max(times)] if times else None,
        examples_per_s=res["examples_per_sec"],
        memory_gib=res["peak_gib"],
      )
    )
  for row in out:
    flops = flops_per_example(row["model"])
    row["flops_per_example"] = flops
    row["matmul_rate_tflops"] = rate / 1e12 if rate else None
    row["matmul_rate_from"] = rate_from
    row["fraction_of_matmul_rate"] = row["examples_per_s"] * flops / rate if rate else None
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
  ap.add_argument("runs", nargs="+", help="run directories under benchmarks/results")
  ap.add_argument("--out", required=True, help="json written (atomically)")
  args = ap.parse_args(argv)
  table, fallback = [], None
  for d in args.runs:  # a run without its own matmul rate takes the previous run's
    got = rows(pathlib.Path(d), fallback)
    table += got
    if got and got[0]["matmul_rate_from"] == pathlib.Path(d).name:
      fallback = (pathlib.Path(d).name, got[0]["matmul_rate_tflops"] * 1e12)
  atomic_io.atomic_write_json(pathlib.Path(args.out), {"rows": table})
  print("| run | side | batch | step ms (range) | examples/s | GiB | fraction of bf16 rate |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for r in table:
    rng = r["step_ms_range"]
    span = f" ({rng[0]:.1f}-{rng[1]:.1f})" if rng else ""
    frac = r["fraction_of_matmul_rate"]
    print(
      f"| {r['run']} | {r['side']} | {r['batch']} | {r['step_ms']:.2f}{span} | "
      f"{r['examples_per_s']:,.1f} | {r['memory_gib']:.2f} | "
      f"{'' if frac is None else f'{frac:.2f}'} |"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
