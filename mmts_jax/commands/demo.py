"""`mmts demo`: the MM-TS value of a few clusters along a schedule, and the losses of a batch.

The same per-sample value is InfoNCE's temperature and max-margin's margin (MM-TS schedules
whichever the loss has); the printout names it for each loss.

A one-minute tour of the core API (schedules, shifts, losses); no data, no training.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from mmts_jax import losses, schedules, shifts
from mmts_jax.commands import errors
from mmts_jax.commands.help_format import HelpFormatter


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="mmts demo", description=__doc__, formatter_class=HelpFormatter)
  p.add_argument("--alpha", type=float, default=0.04, help="oscillation amplitude (Eq. 7)")
  p.add_argument("--sh-min", type=float, default=0.05, help="shift of the smallest cluster (Eq. 6)")
  p.add_argument("--sh-max", type=float, default=0.10, help="shift of the largest cluster (Eq. 6)")
  p.add_argument("--total-steps", type=int, default=10_000, help="length of the schedule")
  p.add_argument("--oscillations", type=float, default=5, help="cosine periods over the schedule")
  p.add_argument("--batch", type=int, default=256, help="synthetic batch size")
  p.add_argument("--dim", type=int, default=64, help="embedding width of the synthetic batch")
  return p


def main(argv: list[str] | None = None) -> int:
  return errors.run("mmts demo", _main, argv)


def _main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  shifts.validate_positive(args.alpha, args.sh_min, args.sh_max)
  period = schedules.period_from_total_steps(args.total_steps, args.oscillations)
  base = schedules.cosine_oscillation(args.alpha, period)
  # A long-tail of cluster sizes (Zipf), as K-Means on captions produces.
  sizes = np.array([5000, 1200, 300, 60, 8])
  sh = shifts.cluster_shift(sizes, args.sh_min, args.sh_max)
  steps = np.linspace(0, period, 5).astype(int)
  print(
    f"MM-TS value per cluster (the temperature of InfoNCE, the margin of max-margin), "
    f"alpha={args.alpha}, shift in [{args.sh_min}, {args.sh_max}], period={period:g} steps"
  )
  print("cluster size | " + " | ".join(f"t={s:>6d}" for s in steps))
  for k, s in zip(sizes, sh, strict=True):
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
  print("InfoNCE uses each value as its temperature, max-margin as its margin")
  print("step   | mean     | InfoNCE fixed tau 0.07 | InfoNCE MM-TS tau | max-margin MM-TS margin")
  fixed = float(losses.infonce(image, text, 0.07))
  for t in steps:
    tau = base(t) + shift_of_sample
    ce, mm = loss_fns(image, text, tau)
    print(
      f"{t:>6d} | {float(tau.mean()):8.4f} | {fixed:22.4f} | {float(ce):17.4f} | {float(mm):23.4f}"
    )
  return 0
