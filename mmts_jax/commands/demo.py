"""`mmts demo`: the MM-TS temperature of a few clusters along a schedule, and the losses of a batch.

A one-minute tour of the core API (schedules, shifts, losses); no data, no training.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from mmts_jax import losses, schedules, shifts


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="mmts demo", description=__doc__)
  p.add_argument("--alpha", type=float, default=0.04, help="oscillation amplitude (Eq. 7)")
  p.add_argument("--sh-min", type=float, default=0.05)
  p.add_argument("--sh-max", type=float, default=0.10)
  p.add_argument("--total-steps", type=int, default=10_000)
  p.add_argument("--oscillations", type=float, default=5)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--dim", type=int, default=64)
  return p


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  shifts.validate_positive(args.alpha, args.sh_min, args.sh_max)
  period = schedules.period_from_total_steps(args.total_steps, args.oscillations)
  base = schedules.cosine_oscillation(args.alpha, period)
  # A long-tail of cluster sizes (Zipf), as K-Means on captions produces.
  sizes = np.array([5000, 1200, 300, 60, 8])
  sh = shifts.cluster_shift(sizes, args.sh_min, args.sh_max)
  steps = np.linspace(0, period, 5).astype(int)
  print(f"MM-TS temperature, alpha={args.alpha}, shift in [{args.sh_min}, {args.sh_max}], "
        f"period={period:g} steps")
  print("cluster size | " + " | ".join(f"t={s:>6d}" for s in steps))
  for k, s in zip(sizes, sh):
    print(f"{k:>12d} | " + " | ".join(f"{float(base(t)) + s:8.4f}" for t in steps))

  rng = np.random.default_rng(0)
  cluster = rng.choice(len(sizes), size=args.batch, p=sizes / sizes.sum())
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  image = jax.random.normal(k1, (args.batch, args.dim))
  text = image + 1.5 * jax.random.normal(k2, (args.batch, args.dim))
  image = image / jnp.linalg.norm(image, axis=1, keepdims=True)
  text = text / jnp.linalg.norm(text, axis=1, keepdims=True)
  shift_of_sample = jnp.asarray(sh[cluster], jnp.float32)
  loss_fns = jax.jit(lambda x, y, tau: (losses.infonce(x, y, tau), losses.max_margin(x, y, tau)))
  print(f"\nlosses on a synthetic batch (B={args.batch}, D={args.dim}):")
  print("step   | tau mean | InfoNCE fixed 0.07 | InfoNCE MM-TS | max-margin MM-TS")
  fixed = float(losses.infonce(image, text, 0.07))
  for t in steps:
    tau = base(t) + shift_of_sample
    ce, mm = loss_fns(image, text, tau)
    print(f"{t:>6d} | {float(tau.mean()):8.4f} | {fixed:18.4f} | {float(ce):13.4f} | "
          f"{float(mm):16.4f}")
  return 0
