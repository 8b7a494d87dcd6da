r"""The study: every policy on a tuning grid, many paired seeds, selection on validation.

1. `evaluate`: the long-tail report (`eval.longtail_report`) of one model on one split:
   instance R@1/5/10 (a caption is correct for an image when it is the same string as the
   image's own caption: head classes repeat captions), and mAP / nDCG with relevancy
   `[same class]`, overall and by bucket of the query's class size (terciles of `K_c`: on the
   class-balanced splits each bucket holds about a third of the queries).
2. `default_grid`: five trials per row (the issue's "same number of trials"), see the table in
   `docs/study.md`. The level-matched rows (`ics_lm`, `mmts_lm`) re-centre their shifts on the
   *selected* fixed temperature, so they run after the fixed row is tuned.
3. `run`: every trial trains all seeds as one program (`runner.train_seeds`) and is evaluated on
   validation and test; per row, the trial with the best mean validation `select_metric` is
   selected; its per-seed test numbers are compared with the selected fixed row's, paired by
   seed (`stats.paired_interval`).

Every trial's per-seed numbers go to `on_trial` as soon as they exist (the driver writes them as
json lines), so a run cut short keeps what it finished.

Example:
  >>> grid = default_grid(period=60.0)
  >>> sorted(grid), len(grid["mmts"])
  (['fixed', 'ics', 'isogclr', 'learnable', 'mmts', 'ts'], 5)
"""
from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from mmts_jax import shifts
from mmts_jax.eval.longtail import label_relevancy, longtail_report
from mmts_jax.policies.isogclr import ISogCLR
from mmts_jax.study import policies as P
from mmts_jax.study.runner import TrainConfig, train_seeds
from mmts_jax.study.stats import paired_interval
from mmts_jax.study.task import Task
from mmts_jax.synthetic.metrics import same_string

__all__ = ["ROWS", "default_grid", "evaluate", "level_matched_grid", "run", "select"]

ROWS = ("fixed", "learnable", "ts", "ics", "mmts", "ics_lm", "mmts_lm", "isogclr")
KS = (1, 5, 10)
SHIFT_RANGE = (0.05, 0.10)  # the shift table's Eq. 6 range; trials rescale it (see `_table`)


def evaluate(image: np.ndarray, text: np.ndarray, labels: np.ndarray, captions,
             cluster_sizes: np.ndarray) -> dict[str, float]:
  """`{"<bucket>/<metric>": value}` for one model on one split (see the module docstring)."""
  sim = (np.asarray(image, np.float32) @ np.asarray(text, np.float32).T).astype(np.float32)
  report = longtail_report(sim, label_relevancy(labels, labels), image_clusters=labels,
                           text_clusters=labels, cluster_sizes=cluster_sizes,
                           positives=same_string(captions), ks=KS, scheme="terciles",
                           num_threads=2)
  return {f"{b}/{k}": float(v) for b, row in report.items() for k, v in row.items()
          if not k.startswith("num_")}


def default_grid(period: float) -> dict[str, list]:
  """Five trials per row; MM-TS's and TS's periods are `total_steps / 5` (`period`)."""
  taus = (0.03, 0.05, 0.07, 0.10, 0.14)
  return {
      "fixed": [P.Fixed(t) for t in taus],
      "learnable": [P.Learnable(t) for t in taus],
      "ts": [P.TS(lo, hi, period) for lo, hi in
             ((0.02, 0.07), (0.03, 0.10), (0.04, 0.10), (0.05, 0.14), (0.07, 0.20))],
      "ics": [P.ICS(lo, hi) for lo, hi in
              ((0.03, 0.07), (0.04, 0.10), (0.05, 0.10), (0.05, 0.15), (0.07, 0.20))],
      "mmts": [P.MMTS(lo, hi, alpha=a, period=period) for a, lo, hi in
               ((0.02, 0.04, 0.10), (0.04, 0.05, 0.10), (0.04, 0.04, 0.12), (0.06, 0.05, 0.15),
                (0.04, 0.07, 0.14))],
      # The KL radius sets how peaked the weights may get; the temperatures start at CLIP's 0.07
      # and move at the paper's rate (eta 0.03, momentum 0.9), gamma 0.8 as the paper.
      "isogclr": [ISogCLR(rho=r, tau_init=0.07) for r in (0.5, 1.0, 2.0, 4.0, 6.0)],
  }


def level_matched_grid(level: float, period: float) -> dict[str, list]:
  """Five shapes each for ICS and MM-TS, re-centred on the sample-mean value `level`."""
  return {
      "ics_lm": [P.ICS(0.05, 0.05 + w, level=level) for w in (0.02, 0.03, 0.05, 0.07, 0.10)],
      "mmts_lm": [P.MMTS(0.05, 0.05 + w, level=level, alpha=a, period=period) for a, w in
                  ((0.02, 0.05), (0.04, 0.05), (0.04, 0.03), (0.06, 0.05), (0.04, 0.08))],
  }


def _table(task: Task, policy) -> np.ndarray | None:
  """Eq. 6 per-sample shifts in the policy's `[sh_min, sh_max]` (ICS / MM-TS only)."""
  if not isinstance(policy, P.ICS):
    return None
  return shifts.cluster_shift(task.sample_sizes(), policy.sh_min, policy.sh_max)


def describe(policy) -> dict:
  """The policy's hyper-parameters as a json-able dict."""
  return {k: v for k, v in vars(policy).items()}


def select(trials: list[dict], metric: str) -> int:
  """Index of the trial with the highest mean validation `metric` over seeds (first on ties)."""
  means = [np.mean([s[metric] for s in t["val"]]) if t.get("val") else -np.inf for t in trials]
  return int(np.argmax(np.asarray(means)))


def _train_trial(task, policy, seeds, cfg, row) -> dict:
  t0 = time.perf_counter()
  try:
    table = _table(task, policy)
    out = train_seeds(policy, task, seeds=seeds, cfg=cfg, shift_table=table)
  except ValueError as e:  # e.g. a level-matched shape whose lowest value would be <= 0
    return {"row": row, "policy": describe(policy), "skipped": str(e)}
  seconds = time.perf_counter() - t0
  rec = {"row": row, "policy": describe(policy), "seeds": list(seeds), "val": [], "test": [],
         "temperature": [], "final_loss": [], "train_seconds": seconds}

  def one(job):
    i, split = job
    _, labels, captions = task.split(split)
    return evaluate(out[f"{split}_image"][i], out[f"{split}_text"][i], labels, captions,
                    task.cluster_sizes)

  jobs = [(i, split) for i in range(len(seeds)) for split in ("val", "test")]
  # numpy's sorts release the GIL: the seeds' reports run side by side.
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    for (_, split), result in zip(jobs, pool.map(one, jobs), strict=True):
      rec[split].append(result)
  for i in range(len(seeds)):
    temp = out["temperature"][i]
    rec["temperature"].append({"mean": float(temp[:, 0].mean()), "min": float(temp[:, 1].min()),
                               "max": float(temp[:, 2].max())})
    rec["final_loss"].append(float(out["loss"][i, -1]))
  if isinstance(policy, ISogCLR):  # the learned per-sample temperatures at the end, per bucket
    tau = 0.5 * (out["final_state"]["tau_image"] + out["final_state"]["tau_text"])
    rec["learned_tau_by_class_size"] = _tau_by_bucket(task, tau)
  rec["eval_seconds"] = time.perf_counter() - t0 - seconds
  return rec


def _tau_by_bucket(task: Task, tau: np.ndarray) -> dict[str, float]:
  from mmts_jax.eval.longtail import BUCKETS, cluster_buckets
  b = cluster_buckets(task.cluster_sizes, "terciles")[task.train_label]
  return {name: float(tau[:, b == i].mean()) for i, name in enumerate(BUCKETS) if (b == i).any()}


def run(task: Task, *, seeds: Sequence[int], cfg: TrainConfig = TrainConfig(),
        rows: Sequence[str] = ROWS, grid: dict[str, list] | None = None,
        select_metric: str = "all/R@1", on_trial: Callable[[dict], None] | None = None,
        log=print) -> dict:
  """Trains and evaluates every trial of `rows`, selects on validation, compares on test.

  Returns `{"trials": {row: [trial records]}, "selected": {row: index}, "paired": {row:
  {metric: paired_interval vs fixed}}}`. Needs the "fixed" row (the baseline).
  """
  bad = [r for r in rows if r not in ROWS]
  if bad or "fixed" not in rows:
    raise ValueError(f"rows must be among {ROWS} and include 'fixed', got {list(rows)}")
  if len(seeds) < 2:
    raise ValueError(f"the paired intervals need >= 2 seeds, got {len(seeds)}")
  period = cfg.steps / 5
  grid = dict(grid or default_grid(period))
  trials: dict[str, list] = {}
  selected: dict[str, int] = {}

  def run_row(row):
    trials[row] = []
    for policy in grid[row]:
      rec = _train_trial(task, policy, seeds, cfg, row)
      trials[row].append(rec)
      if on_trial:
        on_trial(rec)
      if "skipped" in rec:
        log(f"  {row:<9} {describe(policy)}: skipped ({rec['skipped'][:80]})")
      else:
        log(f"  {row:<9} {_short(policy)}: val {select_metric} "
            f"{100 * np.mean([s[select_metric] for s in rec['val']]):.2f}  "
            f"({rec['train_seconds']:.1f}s train, {rec['eval_seconds']:.1f}s eval)")
    selected[row] = select(trials[row], select_metric)

  run_row("fixed")
  level = grid["fixed"][selected["fixed"]].tau
  grid.update({k: v for k, v in level_matched_grid(level, period).items() if k not in grid})
  for row in rows:
    if row != "fixed":
      run_row(row)
  return {"trials": trials, "selected": selected, "level": level,
          "paired": paired_table(trials, selected)}


def paired_table(trials: dict[str, list], selected: dict[str, int]) -> dict:
  """Per row and test metric, the paired interval of the selected trial minus selected fixed."""
  base = trials["fixed"][selected["fixed"]]["test"]
  out = {}
  for row, recs in trials.items():
    rec = recs[selected[row]]
    if "skipped" in rec:
      continue
    out[row] = {m: paired_interval([s[m] for s in rec["test"]], [s[m] for s in base])
                for m in base[0]}
  return out


def _short(policy) -> str:
  return ", ".join(f"{k}={v:g}" for k, v in vars(policy).items()
                   if isinstance(v, float) and k not in ("eps",))
