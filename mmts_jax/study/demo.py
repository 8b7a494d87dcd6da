r"""`make run`: a CPU-sized slice of the study, with paired intervals (about 2 minutes).

  python -m mmts_jax.study.demo [--seeds 8] [--steps 300]

Four rows of the study on the synthetic long-tail task (2,998 training pairs), each at the
hyper-parameters the GPU study selected on validation (`benchmarks/results/study/wide2`, the
run `docs/study.md` reports; not re-tuned here): the fixed temperature, CLIP's learnable
temperature, MM-TS as tuned and MM-TS level-matched to the fixed temperature. All seeds of a
row train as one program; the seeds are paired (seed `s`: the same initialisation and batch
order in every row). It prints the test R@1 and mAP of each row and, for each row, the mean and
95% interval of its paired difference to the fixed row, overall and on the tail bucket; "~"
marks an interval that covers 0 (no measurable difference). The full study is `python -m
mmts_jax.study` (see `docs/study.md`).

Example:
  >>> [name for name, _ in demo_rows(period=60.0)]
  ['fixed', 'learnable', 'mmts', 'mmts_lm']
"""

from __future__ import annotations

import argparse
import time

import numpy as np

__all__ = ["demo_rows", "main"]

# Selected on validation by the GPU study that docs/study.md reports
# (benchmarks/results/study/wide2/results.json, `selected_policies`; a test keeps them equal).
FIXED_TAU = 0.45


def demo_rows(period: float) -> list:
  """`[(row, policy)]` at the GPU study's selected hyper-parameters."""
  from mmts_jax.study import policies as P

  return [
    ("fixed", P.Fixed(FIXED_TAU)),
    ("learnable", P.Learnable(0.14)),
    ("mmts", P.MMTS(0.42, 0.98, alpha=0.56, period=period)),
    ("mmts_lm", P.MMTS(0.05, 0.68, level=FIXED_TAU, alpha=0.2025, period=period)),
  ]


def _fmt(r: dict) -> str:
  text = f"{100 * r['mean']:+5.2f} [{100 * r['lo']:+5.2f}, {100 * r['hi']:+5.2f}]"
  return text + (" ~" if r["verdict"] == "no measurable difference" else "  ")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m mmts_jax.study.demo",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--seeds", type=int, default=8)
  p.add_argument("--steps", type=int, default=300)
  args = p.parse_args(argv)
  if args.seeds < 2:
    p.error(f"--seeds must be >= 2 (paired intervals), got {args.seeds}")
  if args.steps < 1:
    p.error(f"--steps must be >= 1, got {args.steps}")

  from mmts_jax import shifts
  from mmts_jax.longtail.generator import GeneratorConfig
  from mmts_jax.study.experiment import evaluate
  from mmts_jax.study.policies import ICS
  from mmts_jax.study.runner import TrainConfig, train_trials
  from mmts_jax.study.stats import paired_interval
  from mmts_jax.study.task import make_task

  t0 = time.perf_counter()
  task = make_task(GeneratorConfig(val_per_class=20))  # the study's task (val unused here)
  cfg = TrainConfig(steps=args.steps)
  seeds = tuple(range(args.seeds))
  _, labels, captions = task.split("test")
  print(
    f"MM-TS study demo: synthetic long-tail task ({len(task.train_label)} training pairs, 40 "
    f"classes, imbalance 100), {args.seeds} paired seeds, {args.steps} steps of "
    f"{cfg.batch_size}; hyper-parameters from the GPU study, not re-tuned.",
    flush=True,
  )
  scores, temps = {}, {}
  for row, policy in demo_rows(period=args.steps / 5):
    table = (
      shifts.cluster_shift(task.sample_sizes(), policy.sh_min, policy.sh_max)
      if isinstance(policy, ICS)
      else None
    )
    out = train_trials([policy], task, seeds=seeds, cfg=cfg, shift_tables=[table])
    scores[row] = [
      evaluate(
        out["test_image"][0, s], out["test_text"][0, s], labels, captions, task.cluster_sizes
      )
      for s in range(len(seeds))
    ]
    temps[row] = float(out["temperature"][0, :, :, 0].mean())
    print(f"  trained {row} ({time.perf_counter() - t0:.0f}s)", flush=True)
  base = scores["fixed"]
  head = (
    f"{'row':<10} {'tau mean':>8} {'R@1':>6} {'mAP':>6}   {'dR@1 vs fixed [95% CI]':<25}"
    f"{'d tail R@1 [95% CI]':<25}{'d mAP [95% CI]':<25}"
  )
  print("\n" + head + "\n" + "-" * len(head))
  for row, per_seed in scores.items():
    mean = lambda m, per_seed=per_seed: 100 * np.mean([s[m] for s in per_seed])
    cells = ""
    if row != "fixed":
      for m in ("all/R@1", "tail/R@1", "all/mAP"):
        cells += f"{_fmt(paired_interval([s[m] for s in per_seed], [s[m] for s in base])):<25}"
    print(f"{row:<10} {temps[row]:8.3f} {mean('all/R@1'):6.2f} {mean('all/mAP'):6.2f}   {cells}")
  print(
    f"\n{args.seeds} paired seeds; test split (20 per class); d = row minus fixed in points, "
    f"mean [95% t-interval]; ~ = the interval covers 0 (no measurable difference). "
    f"{time.perf_counter() - t0:.0f}s in all. Full study: python -m mmts_jax.study "
    f"(docs/study.md)."
  )
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
