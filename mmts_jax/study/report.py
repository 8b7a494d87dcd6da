"""`docs/study.md` from a study's raw per-trial, per-seed json lines.

  python -m mmts_jax.study.report benchmarks/results/study/wide2 --out docs/study.md \
      --notes benchmarks/results/study/wide2/notes.md \
      --ek100 benchmarks/results/study/ek100_text/results.json

Everything is recomputed from `trials.jsonl` (the selection on validation, the paired test
intervals, the temperatures), so every number in the document has its raw json; `results.json`
supplies the run's metadata (command, device, configuration).

Example:
  >>> fmt_interval({"mean": 0.012, "lo": 0.004, "hi": 0.02, "verdict": "higher"})
  '**+1.20** [+0.40, +2.00]'
  >>> fmt_interval({"mean": 0.001, "lo": -0.004, "hi": 0.006,
  ...               "verdict": "no measurable difference"})
  '+0.10 [-0.40, +0.60] ~'
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from mmts_jax.atomic_io import atomic_write_bytes
from mmts_jax.study.experiment import ROWS, on_edge, paired_table, select
from mmts_jax.study.stats import paired_interval

__all__ = ["fmt_interval", "load_trials", "main", "render"]

LABELS = {
  "fixed": "fixed (tuned)",
  "learnable": "CLIP learnable",
  "ts": "TS",
  "ics": "ICS",
  "mmts": "MM-TS",
  "ics_lm": "ICS, level-matched",
  "mmts_lm": "MM-TS, level-matched",
  "isogclr": "iSogCLR",
}
BUCKETS = ("all", "head", "middle", "tail")


def load_trials(path: str) -> dict[str, dict[str, list]]:
  """`{setting: {row: [trial, ...]}}` from `trials.jsonl` (setting "main" for the tuned run)."""
  out: dict[str, dict[str, list]] = {}
  with open(path) as f:
    for line in f:
      rec = json.loads(line)
      out.setdefault(rec.get("setting", "main"), {}).setdefault(rec["row"], []).append(rec)
  return out


def fmt_interval(r: dict) -> str:
  """`mean [lo, hi]` in points (x100); bold when the interval excludes 0, `~` when it covers 0."""
  text = f"{100 * r['mean']:+.2f} [{100 * r['lo']:+.2f}, {100 * r['hi']:+.2f}]"
  if r["verdict"] == "no measurable difference":
    return text + " ~"
  head, rest = text.split(" ", 1)
  return f"**{head}** {rest}"


def _trials_per_row(main) -> str:
  counts = sorted({len(r) for r in main.values()})
  return "/".join(str(c) for c in counts)


def _mean(trial, split, metric) -> float:
  return float(np.mean([s[metric] for s in trial[split]]))


def _paired_section(trials, selected, metrics, title) -> list[str]:
  paired = paired_table(trials, selected)
  base = trials["fixed"][selected["fixed"]]
  lines = [title, ""] if title else []
  for metric in metrics:
    lines += [
      f"**{metric}** (test; fixed's absolute value in the first row, points)",
      "",
      "| row | " + " | ".join(BUCKETS) + " |",
      "|---" * (len(BUCKETS) + 1) + "|",
    ]
    lines.append(
      "| fixed (tuned), absolute | "
      + " | ".join(f"{100 * _mean(base, 'test', f'{b}/{metric}'):.2f}" for b in BUCKETS)
      + " |"
    )
    for row in ROWS:
      if row == "fixed" or row not in paired:
        continue
      lines.append(
        f"| {LABELS[row]} | "
        + " | ".join(fmt_interval(paired[row][f"{b}/{metric}"]) for b in BUCKETS)
        + " |"
      )
    lines.append("")
  return lines


def _verdicts(trials, selected, metric) -> list[str]:
  paired = paired_table(trials, selected)
  out = []
  for row in ROWS:
    if row == "fixed" or row not in paired:
      continue
    parts = []
    for b in BUCKETS:
      r = paired[row][f"{b}/{metric}"]
      word = {
        "higher": "higher",
        "lower": "lower",
        "no measurable difference": "no measurable difference",
      }[r["verdict"]]
      parts.append(f"{b}: {word} ({100 * r['mean']:+.2f})")
    out.append(f"- {LABELS[row]} vs tuned fixed, {metric}: " + "; ".join(parts))
  return out


def _level_note(trials, selected) -> list[str]:
  """How much of each row's mAP difference follows its mean training temperature."""
  paired = paired_table(trials, selected)
  rows = [r for r in ROWS if r in paired and r != "fixed"]
  if len(rows) < 3:
    return []
  temp = [np.mean([t["mean"] for t in trials[r][selected[r]]["temperature"]]) for r in rows]
  base = np.mean([t["mean"] for t in trials["fixed"][selected["fixed"]]["temperature"]])
  out = []
  for metric in ("all/R@1", "all/mAP"):
    diff = [paired[r][metric]["mean"] for r in rows]
    corr = float(np.corrcoef(np.asarray(temp) - base, diff)[0, 1])
    out.append(f"`{metric}`: r = {corr:+.2f}")
  return [
    "Across the selected rows, Pearson correlation between a row's mean training "
    "temperature minus the fixed row's and its paired difference: "
    + ", ".join(out)
    + f" ({len(rows)} rows; |r| near 1: the metric moves with the temperature level rather "
    "than with its shape).",
    "",
  ]


def _trial_text(row: str, rec: dict) -> str:
  """A trial's grid coordinates (or, for records without them, its hyper-parameters)."""
  coords = rec.get("coords")
  if not coords:
    coords = {
      k: v
      for k, v in rec["policy"].items()
      if isinstance(v, (int, float))
      and k not in ("eps", "period", "gamma", "beta", "eta", "tau_min", "tau_max")
    }
  return ", ".join(f"{k}={v:g}" for k, v in coords.items())


def _row_vs_row(trials, selected, pairs) -> list[str]:
  """Paired intervals between two non-baseline rows (e.g. MM-TS vs ICS: the oscillation)."""
  lines = []
  for a, b in pairs:
    if a not in trials or b not in trials:
      continue
    ta, tb = trials[a][selected[a]]["test"], trials[b][selected[b]]["test"]
    parts = []
    for metric in ("all/R@1", "tail/R@1", "all/mAP", "tail/mAP"):
      r = paired_interval([x[metric] for x in ta], [x[metric] for x in tb])
      parts.append(f"`{metric}` {fmt_interval(r)}")
    lines.append(f"- {LABELS[a]} minus {LABELS[b]} (test, paired): " + ", ".join(parts))
  return (["## The oscillation on top of the shifts", ""] + lines + [""]) if lines else []


EK100_LABELS = {
  "mimm_fixed": "max-margin, fixed margin 0.2 (AVION MI-MM)",
  "mimm_mmts": "max-margin, MM-TS (alpha 0.20, shifts [0.17, 0.30])",
  "mimm_mmts_lm": "max-margin, MM-TS level-matched to 0.2",
  "infonce_fixed": "InfoNCE, fixed 0.07",
  "infonce_mmts": "InfoNCE, MM-TS (alpha 0.04, shifts [0.05, 0.10])",
  "infonce_mmts_lm": "InfoNCE, MM-TS level-matched to 0.07",
}


def render_ek100(path: str) -> list[str]:
  """The EK-100 real-text section from `python -m mmts_jax.study.ek100`'s results.json."""
  with open(path) as f:
    res = json.load(f)
  rows, paired, meta = res["rows"], res["paired_to_fixed"], res["meta"]
  seeds = len(next(iter(rows.values()))["seeds"])
  q = meta["bucket_queries"]
  lines = [
    "## EK-100 MIR with a real text side",
    "",
    "Text: the packaged Flax all-MiniLM-L6-v2 embeddings of the real narrations (15,989 "
    "training captions, 3,842 validation captions) and a trained MLP head. **Video: "
    "class-derived features** "
    "(`mmts_jax.projects.ek100_features.ek100_features`: verb + noun class "
    "latent plus noise through a fixed random map), not real video, with a trained MLP "
    "head. No tuning (EK-100 has only the MIR validation split, which reports): AVION's and "
    "the paper's values. MIR mAP / nDCG (official definitions) on the whole validation "
    f"split ({meta['val_shape'][0]} videos x {meta['val_shape'][1]} captions), overall and "
    "by the official noun frequency (`ek100_noun_freq.csv`) of the query's main noun: "
    "head / middle / tail = the noun classes holding the first / second / last third of "
    f"the training narrations (query videos per bucket {q['videos']}, captions "
    f"{q['captions']}). {seeds} paired seeds (initialisation and batch order), "
    f"{meta['command'].split('--steps ')[-1].split()[0] if '--steps' in meta['command'] else '600'}"
    f" steps of 256; CPU (`{meta['command']}`, {meta['seconds']:.0f} s, raw json "
    f"`{path}`).",
    "",
    "| row | value mean (min, max) | mAP all | head | middle | tail | nDCG all |",
    "|---|---|---|---|---|---|---|",
  ]
  for name, rec in rows.items():
    m = lambda k, rec=rec: 100 * np.mean([s[k] for s in rec["test"]])
    lines.append(
      f"| {EK100_LABELS.get(name, name)} | {rec['value_mean']:.3f} "
      f"({rec['value_min']:.3f}, {rec['value_max']:.3f}) | {m('all/mAP'):.2f} | "
      f"{m('head/mAP'):.2f} | {m('middle/mAP'):.2f} | {m('tail/mAP'):.2f} | "
      f"{m('all/nDCG'):.2f} |"
    )
  lines += [
    "",
    "Paired difference to the fixed row of the same loss (points, mean [95% CI]):",
    "",
    "| row | mAP all | head | middle | tail | nDCG all | nDCG tail |",
    "|---|---|---|---|---|---|---|",
  ]
  for name, p in paired.items():
    lines.append(
      f"| {EK100_LABELS.get(name, name)} | "
      + " | ".join(
        fmt_interval(p[k])
        for k in ("all/mAP", "head/mAP", "middle/mAP", "tail/mAP", "all/nDCG", "tail/nDCG")
      )
      + " |"
    )
  return lines + [""]


def render(
  trials_path: str,
  results_path: str | None = None,
  json_dir: str = "",
  ek100_path: str | None = None,
) -> str:
  """The markdown of `docs/study.md`."""
  settings = load_trials(trials_path)
  main = settings["main"]
  meta = {}
  if results_path and os.path.exists(results_path):
    with open(results_path) as f:
      meta = json.load(f)["meta"]
  metric = meta.get("select_metric", "all/R@1")
  selected = {row: select(recs, metric) for row, recs in main.items()}
  fixed_tau = main["fixed"][selected["fixed"]]["policy"]["tau"]
  seeds = len(main["fixed"][0]["seeds"])
  lines = [
    "# Does MM-TS help, and where? A paired study on the synthetic long-tail task",
    "",
    "Generated by `python -m mmts_jax.study.report` from the raw json in "
    f"`{json_dir}` (`trials.jsonl`: every trial, every seed, validation and test; "
    "`results.json`: the run's metadata; `knobs.json`: the task-knob variants). "
    f"Run: `{meta.get('command', '?')}` on {meta.get('device', '?')} "
    f"(jax {meta.get('jax', '?')}).",
    "",
    "## Setup",
    "",
    f"- Task: the synthetic long-tail benchmark's generator (`mmts_jax.longtail.generator`, "
    f"defaults: 40 Zipf classes, imbalance 100, {meta.get('num_train', '?')} training pairs) "
    "with a class-balanced validation split (20 per class, selection) and the balanced test "
    "split (20 per class, report). Clusters are the generator's classes (an oracle "
    "clustering, so `K_c` is the class's training size; no sentence encoder or K-Means).",
    "- Model: the feature-tower dual encoder (`DualEncoder(FeatureTower((128,)), "
    "FeatureTower((128,)))`, 64-d), image features in, bag-of-words captions in; "
    f"symmetric InfoNCE; AdamW 2e-3, 20 warm-up steps, cosine decay, weight decay 0.1; "
    f"{meta.get('train', {}).get('steps', '?')} steps of "
    f"{meta.get('train', {}).get('batch_size', '?')}. TS and MM-TS periods: steps / 5.",
    f"- Seeds: {seeds} per trial, **paired**: seed `s` fixes the initialisation and the batch "
    "order in every row; the data is the same. All trials and seeds of a row train as one "
    "program (`jax.vmap` over trials x seeds of a `lax.scan` over steps, "
    "`mmts_jax.study.runner`).",
    f"- Tuning: {_trials_per_row(main)} trials per row (table below), trained side by side "
    f"(`jax.vmap` over trials x seeds); per row the trial with the best mean "
    f"validation `{metric}` is selected and reported on test. The level-matched rows "
    f"re-centre the Eq. 6 shifts so that the sample-mean temperature equals the selected "
    f"fixed temperature ({fixed_tau}) (`shifts.level_match`).",
    "- Metrics (`mmts_jax.eval.longtail`): instance R@K (a caption is correct when it is the "
    "same string as the image's own caption), and EK-100-style mAP / nDCG with relevancy "
    "`[same class]`, each the mean of image->text and text->image; overall and by bucket of "
    "the query's class size (terciles of `K_c` over the 40 classes: ~13 classes, a third of "
    "the balanced queries, per bucket).",
    "- Intervals: mean and 95% CI (Student's t) of the per-seed paired difference to the "
    "tuned fixed row, in points; **bold**: the CI excludes 0; `~`: no measurable difference "
    "(the CI covers 0).",
    "",
    "## Trials, selection and effective temperatures",
    "",
    "| row | trials (selected in bold) | val " + metric + " of selected | temperature over "
    "training: mean (min, max) |",
    "|---|---|---|---|",
  ]
  for row in ROWS:
    if row not in main:
      continue
    recs = main[row]
    cells = []
    for i, rec in enumerate(recs):
      text = _trial_text(row, rec)
      if "skipped" in rec:
        text += " (skipped: would reach <= 0)"
      elif rec.get("val"):
        text += f" ({100 * _mean(rec, 'val', metric):.1f})"
      cells.append(f"**{text}**" if i == selected[row] else text)
    rec = recs[selected[row]]
    temp = rec["temperature"]
    lines.append(
      f"| {LABELS[row]} | " + "; ".join(cells) + f" | {100 * _mean(rec, 'val', metric):.2f} | "
      f"{np.mean([t['mean'] for t in temp]):.3f} ({min(t['min'] for t in temp):.3f}, "
      f"{max(t['max'] for t in temp):.3f}) |"
    )
  lines += [
    "",
    "Each trial's validation `" + metric + "` (mean over seeds) in brackets. TS: "
    "`tau in [c (1 - r), c (1 + r)]`; ICS: shifts in `[c (1 - w/2), c (1 + w/2)]`; "
    "MM-TS: shifts in `[0.6 c, 1.4 c]`, `alpha = (alpha/c) c`; level-matched rows: the "
    "Eq. 6 range `[0.05, 0.05 + w level]` re-centred on `level` = the selected fixed "
    "temperature, `alpha = (alpha/level) level`. iSogCLR keeps the paper's gamma 0.8, "
    "eta 0.03, beta 0.9 and bounds [0.005, 1], starts at 0.07 and tunes the KL radius rho.",
    "",
  ]
  edges = {r: on_edge(main[r], selected[r]) for r in ROWS if r in main}
  edge_text = [f"{LABELS[r]} ({', '.join(e)})" for r, e in edges.items() if e]
  if edge_text:
    lines += [
      "**Grid edges: the selected trial sits at the end of a grid axis for** "
      + "; ".join(edge_text)
      + ". The optimum of those rows may lie beyond the grid.",
      "",
    ]
  iso = next((r for r in main.get("isogclr", []) if "learned_tau_by_class_size" in r), None)
  if iso is not None:
    sel = main["isogclr"][selected["isogclr"]]
    by = sel.get("learned_tau_by_class_size", {})
    lines += [
      "iSogCLR's learned per-sample temperatures at the end (mean over seeds and the "
      "image/text sides), by class-size bucket: "
      + ", ".join(f"{k} {v:.3f}" for k, v in by.items())
      + ".",
      "",
    ]
  lines += _paired_section(
    main,
    selected,
    ("R@1", "mAP", "nDCG"),
    "## Paired differences to the tuned fixed temperature (test)",
  )
  lines += ["## Verdicts (test, from the intervals above)", ""]
  for m in ("R@1", "mAP"):
    lines += _verdicts(main, selected, m) + [""]
  lines += _level_note(main, selected)
  knob_settings = [s for s in settings if s != "main"]
  lines += _row_vs_row(main, selected, [("mmts_lm", "ics_lm"), ("mmts", "ics")])
  if knob_settings:
    lines += [
      "## Task knobs",
      "",
      "Every row re-tuned on the same grids on a variant of the task (selection on the "
      f"variant's validation split), the same {seeds} paired seeds.",
    ]
    for s in knob_settings:
      recs = settings[s]
      sel = {row: select(r, metric) for row, r in recs.items()}
      edge_text = [
        f"{LABELS[r]} ({', '.join(on_edge(recs[r], sel[r]))})"
        for r in ROWS
        if r in recs and on_edge(recs[r], sel[r])
      ]
      fixed = recs["fixed"][sel["fixed"]]
      lines += [
        "",
        f"### `{s}`",
        "",
        f"Selected fixed temperature {_trial_text('fixed', fixed)}; grid edges: "
        + ("; ".join(edge_text) or "none")
        + ".",
      ]
      lines += [""] + _paired_section(recs, sel, ("R@1", "mAP"), "")
  if ek100_path:
    lines += render_ek100(ek100_path)
  skipped = [s for s in ("head_duplicates=0.5", "imbalance=10") if s not in settings]
  if skipped:
    lines += [
      "Not run (skipped by the run's `--knob-budget`, which kept it inside its "
      "device-time budget): " + ", ".join(f"`{s}`" for s in skipped) + ".",
      "",
    ]
  return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m mmts_jax.study.report")
  p.add_argument("dir", help="the study's output folder (trials.jsonl, results.json)")
  p.add_argument("--out", required=True)
  p.add_argument(
    "--note",
    action="append",
    default=[],
    help="a line added under the title (e.g. the commit that ran the study)",
  )
  p.add_argument("--notes", help="a markdown file added under the title (the written answer)")
  p.add_argument("--ek100", help="results.json of `python -m mmts_jax.study.ek100`")
  args = p.parse_args(argv)
  if args.notes:
    with open(args.notes) as f:
      args.note += f.read().rstrip("\n").split("\n")
  text = render(
    os.path.join(args.dir, "trials.jsonl"),
    os.path.join(args.dir, "results.json"),
    json_dir=args.dir,
    ek100_path=args.ek100,
  )
  if args.note:
    title, rest = text.split("\n", 1)
    text = title + "\n\n" + "\n".join(args.note) + "\n" + rest
  atomic_write_bytes(args.out, text.encode())
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
