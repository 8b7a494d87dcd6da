r"""The study: every policy on a tuning grid, many paired seeds, selection on validation.

1. `evaluate`: the long-tail report (`eval.longtail_report`) of one model on one split:
   instance R@1/5/10 (a caption is correct for an image when it is the same string as the
   image's own caption: head classes repeat captions), and mAP / nDCG with relevancy
   `[same class]`, overall and by bucket of the query's class size (terciles of `K_c`: on the
   class-balanced splits each bucket holds about a third of the queries).
2. `default_grid`: nine trials per row (the issue's "same number of trials"), see the table in
   `docs/study.md`. The level-matched rows (`ics_lm`, `mmts_lm`) re-centre their shifts on the
   *selected* fixed temperature, so they run after the fixed row is tuned.
3. `run`: all trials of a row and all seeds train as one program (`runner.train_trials`); every
   trial's validation `all/R@1` (`select_r1`) picks the row's trial, which alone gets the full
   report on validation and test; its per-seed test numbers are compared with the selected
   fixed row's, paired by seed (`stats.paired_interval`). `on_edge` names the grid axes on which
   a selected trial sits at the end of its range.

Every trial's per-seed numbers go to `on_trial` as soon as they exist (the driver writes them as
json lines), so a run cut short keeps what it finished.

Example:
  >>> grid = default_grid(period=60.0)
  >>> sorted(grid), len(grid["mmts"])
  (['fixed', 'ics', 'isogclr', 'learnable', 'mmts', 'ts'], 9)
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mmts_jax import shifts
from mmts_jax.eval.longtail import label_relevancy, longtail_report, recall_per_query
from mmts_jax.longtail.metrics import same_string
from mmts_jax.policies.isogclr import ISogCLR
from mmts_jax.study import policies as P
from mmts_jax.study.runner import TrainConfig, train_trials
from mmts_jax.study.stats import paired_interval
from mmts_jax.study.task import Task

__all__ = [
  "ROWS",
  "default_grid",
  "evaluate",
  "level_matched_grid",
  "on_edge",
  "run",
  "run_row",
  "select",
  "select_r1",
]

ROWS = ("fixed", "learnable", "ts", "ics", "mmts", "ics_lm", "mmts_lm", "isogclr")
KS = (1, 5, 10)
SHIFT_RANGE = (0.05, 0.10)  # the shift table's Eq. 6 range; trials rescale it (see `_table`)


def evaluate(
  image: np.ndarray, text: np.ndarray, labels: np.ndarray, captions, cluster_sizes: np.ndarray
) -> dict[str, float]:
  """`{"<bucket>/<metric>": value}` for one model on one split (see the module docstring)."""
  sim = (np.asarray(image, np.float32) @ np.asarray(text, np.float32).T).astype(np.float32)
  report = longtail_report(
    sim,
    label_relevancy(labels, labels),
    image_clusters=labels,
    text_clusters=labels,
    cluster_sizes=cluster_sizes,
    positives=same_string(captions),
    ks=KS,
    scheme="terciles",
    num_threads=2,
  )
  return {
    f"{b}/{k}": float(v)
    for b, row in report.items()
    for k, v in row.items()
    if not k.startswith("num_")
  }


def select_r1(image: np.ndarray, text: np.ndarray, captions) -> float:
  """`all/R@1` of `evaluate` alone (no sorting: the rank of the best positive), for selection.

  Example:
    >>> x = np.eye(3, dtype=np.float32)
    >>> select_r1(x, x, ["a", "b", "c"])
    1.0
  """
  sim = (np.asarray(image, np.float32) @ np.asarray(text, np.float32).T).astype(np.float32)
  pos = same_string(captions)
  i2t = float(np.mean(recall_per_query(sim, pos) < 1))
  t2i = float(np.mean(recall_per_query(sim.T, pos.T) < 1))
  return (i2t + t2i) / 2


# Every row gets the same number of trials (9). The second run selected the top of its fixed grid
# (0.40) and the widest / largest-centre shift trials, so this grid reaches ~2.5x further:
# fixed 0.05 .. 1.0 (the low end thinned, 0.05 and 0.07 kept for the milder-tail knob), centres
# 0.10 .. 0.70 (2x the 0.35 selected), relative widths / amplitudes up to ~1.5-2x. Two-parameter
# rows are 3 x 3 grids of a centre (level) and a relative width / amplitude.
TAUS = (0.05, 0.07, 0.10, 0.14, 0.20, 0.30, 0.45, 0.65, 1.00)
CENTRES = (0.10, 0.35, 0.70)
RHOS = (0.01, 0.03, 0.06, 0.10, 0.15, 0.25, 0.40, 0.60, 1.00)


def default_grid(period: float) -> dict[str, list]:
  """`{row: [(policy, coords), ...]}`, nine trials per row; `coords` are the grid's axes (what
  `on_edge` checks). TS's and MM-TS's periods are `total_steps / 5` (`period`)."""
  grid = {
    "fixed": [(P.Fixed(t), {"tau": t}) for t in TAUS],
    "learnable": [(P.Learnable(t), {"tau": t}) for t in TAUS],
    # TS: centre c, tau in [c (1 - r), c (1 + r)].
    "ts": [
      (P.TS(round(c * (1 - r), 4), round(c * (1 + r), 4), period), {"centre": c, "r": r})
      for c in CENTRES
      for r in (0.3, 0.6, 0.9)
    ],
    # ICS: shifts in [c (1 - w/2), c (1 + w/2)].
    "ics": [
      (P.ICS(round(c * (1 - w / 2), 4), round(c * (1 + w / 2), 4)), {"centre": c, "width": w})
      for c in CENTRES
      for w in (0.6, 1.2, 1.8)
    ],
    # MM-TS: shifts in [0.6 c, 1.4 c] (the paper's CC3M 0.05-0.10 has w/c = 0.67), alpha a c;
    # tau >= 0.6 c - a c / 2 stays positive for a < 1.2.
    "mmts": [
      (
        P.MMTS(round(0.6 * c, 4), round(1.4 * c, 4), alpha=round(a * c, 4), period=period),
        {"centre": c, "alpha/c": a},
      )
      for c in CENTRES
      for a in (0.4, 0.8, 1.15)
    ],
    # The temperatures start at CLIP's 0.07 and move at the paper's rate (eta 0.03, momentum
    # 0.9), gamma 0.8 as the paper; the KL radius rho sets their level.
    "isogclr": [(ISogCLR(rho=r, tau_init=0.07), {"rho": r}) for r in RHOS],
  }
  return grid


def level_matched_grid(level: float, period: float) -> dict[str, list]:
  """Nine shapes each for ICS and MM-TS, re-centred on the sample-mean value `level`: the Eq. 6
  range is `[0.05, 0.05 + w level]` before re-centring, alpha `a level`."""
  ics = [
    (P.ICS(0.05, round(0.05 + w * level, 4), level=level), {"width": w})
    for w in (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 1.8, 2.2)
  ]
  mmts = [
    (
      P.MMTS(
        0.05, round(0.05 + w * level, 4), level=level, alpha=round(a * level, 4), period=period
      ),
      {"alpha/level": a, "width": w},
    )
    for a in (0.2, 0.45, 0.7)
    for w in (0.5, 1.0, 1.4)
  ]
  return {"ics_lm": ics, "mmts_lm": mmts}


def on_edge(trials: list[dict], index: int) -> list[str]:
  """The grid axes on which trial `index` takes the smallest or largest value tried (among
  trials that ran), e.g. `["tau (largest)"]`; [] when it is inside on every axis."""
  ran = [t for t in trials if "skipped" not in t]
  coords = trials[index].get("coords", {})
  out = []
  for axis, value in coords.items():
    values = sorted({t["coords"][axis] for t in ran})
    if len(values) < 3:
      continue
    if value == values[0]:
      out.append(f"{axis} (smallest)")
    elif value == values[-1]:
      out.append(f"{axis} (largest)")
  return out


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


def _summary(out, i, task, policy) -> dict:
  """Temperatures, losses (and iSogCLR's learned values) of trial `i` of `out`."""
  rec: dict[str, Any] = {"temperature": [], "final_loss": []}
  for s in range(out["loss"].shape[1]):
    temp = out["temperature"][i, s]
    rec["temperature"].append(
      {
        "mean": float(temp[:, 0].mean()),
        "min": float(temp[:, 1].min()),
        "max": float(temp[:, 2].max()),
      }
    )
    rec["final_loss"].append(float(out["loss"][i, s, -1]))
  if isinstance(policy, ISogCLR):  # the learned per-sample temperatures at the end, per bucket
    st = out["final_state"]
    tau = 0.5 * (st["tau_image"][i] + st["tau_text"][i])
    rec["learned_tau_by_class_size"] = _tau_by_bucket(task, tau)
  return rec


def _full_reports(task, out, i, seeds) -> dict:
  """`{"val": [...], "test": [...]}`: `evaluate` of trial `i`, every seed, both splits."""

  def one(job):
    s, split = job
    _, labels, captions = task.split(split)
    return evaluate(
      out[f"{split}_image"][i, s], out[f"{split}_text"][i, s], labels, captions, task.cluster_sizes
    )

  jobs = [(s, split) for s in range(len(seeds)) for split in ("val", "test")]
  rec = {"val": [], "test": []}
  # numpy's sorts release the GIL: the seeds' reports run side by side.
  with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
    for (_, split), result in zip(jobs, pool.map(one, jobs), strict=True):
      rec[split].append(result)
  return rec


def run_row(
  task: Task,
  row: str,
  trials: list,
  *,
  seeds,
  cfg: TrainConfig,
  select_metric: str = "all/R@1",
  pad_to: int | None = None,
) -> tuple[list, int]:
  """Trains a row's trials side by side, selects on validation `select_metric` and returns
  `(records, selected index)`: every trial has its per-seed validation `select_metric`; the
  selected one also every metric of `evaluate` on validation and test."""
  recs, ok = [], []
  for policy, coords in trials:
    rec = {"row": row, "policy": describe(policy), "coords": coords, "seeds": list(seeds)}
    try:
      table = _table(task, policy)
      policy.init_state(len(task.train_label), table)  # raises for a value that reaches <= 0
      ok.append((policy, table, rec))
    except ValueError as e:
      rec["skipped"] = str(e)
    recs.append(rec)
  if not ok:
    raise ValueError(f"row {row}: every trial was skipped: {recs[0].get('skipped')}")
  t0 = time.perf_counter()
  out = train_trials(
    [p for p, _, _ in ok],
    task,
    seeds=seeds,
    cfg=cfg,
    shift_tables=[t for _, t, _ in ok],
    pad_to=pad_to,
  )
  seconds = time.perf_counter() - t0
  _, _, captions = task.split("val")
  for i, (policy, _, rec) in enumerate(ok):
    rec["val"] = [
      {select_metric: select_r1(out["val_image"][i, s], out["val_text"][i, s], captions)}
      for s in range(len(seeds))
    ]
    rec.update(_summary(out, i, task, policy), train_seconds=seconds / len(ok))
  if select_metric != "all/R@1":
    raise ValueError(
      f"select_metric must be 'all/R@1' (the one computed for every trial), got {select_metric!r}"
    )
  best = select([r for _, _, r in ok], select_metric)
  t1 = time.perf_counter()
  ok[best][2].update(_full_reports(task, out, best, seeds))
  ok[best][2]["eval_seconds"] = time.perf_counter() - t1
  return recs, recs.index(ok[best][2])


def _tau_by_bucket(task: Task, tau: np.ndarray) -> dict[str, float]:
  from mmts_jax.eval.longtail import BUCKETS, cluster_buckets

  b = cluster_buckets(task.cluster_sizes, "terciles")[task.train_label]
  return {name: float(tau[:, b == i].mean()) for i, name in enumerate(BUCKETS) if (b == i).any()}


def run(
  task: Task,
  *,
  seeds: Sequence[int],
  cfg: TrainConfig = TrainConfig(),
  rows: Sequence[str] = ROWS,
  grid: dict[str, list] | None = None,
  select_metric: str = "all/R@1",
  on_trial: Callable[[dict], None] | None = None,
  log=print,
  pad_to: int | None = None,
  level: float | None = None,
) -> dict:
  """Trains and evaluates every trial of `rows`, selects on validation, compares on test.

  `grid`: `{row: [(policy, coords), ...]}` (default `default_grid` and, at the selected fixed
  temperature or `level`, `level_matched_grid`). Returns `{"trials": {row: [trial records]},
  "selected": {row: index}, "level": ..., "paired": {row: {metric: paired_interval vs fixed}},
  "edges": {row: [axes on which the selected trial sits at the grid's edge]}}`.
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

  def do_row(row):
    t0 = time.perf_counter()
    trials[row], selected[row] = run_row(
      task, row, grid[row], seeds=seeds, cfg=cfg, select_metric=select_metric, pad_to=pad_to
    )
    for i, rec in enumerate(trials[row]):
      rec["selected"] = i == selected[row]
      if on_trial:
        on_trial(rec)
    rec = trials[row][selected[row]]
    log(
      f"  {row:<9} {len(trials[row])} trials in {time.perf_counter() - t0:.1f}s; selected "
      f"{rec['coords']}: val {select_metric} "
      f"{100 * np.mean([s[select_metric] for s in rec['val']]):.2f}, test "
      f"{100 * np.mean([s[select_metric] for s in rec['test']]):.2f}; edge: "
      f"{on_edge(trials[row], selected[row]) or 'none'}"
    )

  do_row("fixed")
  if level is None:
    level = grid["fixed"][selected["fixed"]][0].tau
  assert level is not None, "the fixed row's selected tau"
  grid.update({k: v for k, v in level_matched_grid(level, period).items() if k not in grid})
  for row in rows:
    if row != "fixed":
      do_row(row)
  return {
    "trials": trials,
    "selected": selected,
    "level": level,
    "paired": paired_table(trials, selected),
    "edges": {r: on_edge(trials[r], i) for r, i in selected.items()},
  }


def paired_table(trials: dict[str, list], selected: dict[str, int]) -> dict:
  """Per row and test metric, the paired interval of the selected trial minus selected fixed."""
  base = trials["fixed"][selected["fixed"]]["test"]
  out = {}
  for row, recs in trials.items():
    rec = recs[selected[row]]
    if "skipped" in rec:
      continue
    out[row] = {
      m: paired_interval([s[m] for s in rec["test"]], [s[m] for s in base]) for m in base[0]
    }
  return out


def _short(policy) -> str:
  return ", ".join(
    f"{k}={v:g}" for k, v in vars(policy).items() if isinstance(v, float) and k not in ("eps",)
  )
