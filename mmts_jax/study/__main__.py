"""`python -m mmts_jax.study --out DIR`: the whole study, raw json per trial and seed.

  python -m mmts_jax.study --out DIR [--seeds 16] [--steps 300] [--knobs] \
      [--doc docs/study.md [--notes NOTES.md] [--ek100 EK100_DIR/results.json]]
  python -m mmts_jax.study.report DIR --out docs/study.md [--notes NOTES.md] [--ek100 ...]

Writes `DIR/trials.jsonl` (one line per trial: every seed's validation and test numbers and
temperatures, as soon as the trial is done), `DIR/results.json` (selection, paired intervals,
configuration, timings, grid-edge flags) and, with `--knobs`, `DIR/knobs.json`: every row
re-tuned on the same grids (selection on each variant's validation split) on variants of the
task (more near-duplicates in head classes, a milder imbalance, both), the same seeds. All
variants' training sets are padded to one size so that they share the compiled programs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from mmts_jax.atomic_io import atomic_write_bytes

KNOB_SETTINGS = {
  "head_duplicates=0.5": dict(head_duplicates=0.5),
  "imbalance=10": dict(imbalance=10.0),
  "head_duplicates=0.5,imbalance=10": dict(head_duplicates=0.5, imbalance=10.0),
}


def _write_json(path, obj) -> None:
  atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m mmts_jax.study",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--out", required=True)
  p.add_argument("--seeds", type=int, default=16)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--val-per-class", type=int, default=20)
  p.add_argument("--rows", nargs="+", default=None)
  p.add_argument("--select-metric", default="all/R@1")
  p.add_argument("--knobs", action="store_true", help="also run the task-knob variants")
  p.add_argument(
    "--knob-budget",
    type=float,
    default=float("inf"),
    help="skip the knob variants once this many seconds have passed",
  )
  p.add_argument("--small", action="store_true", help="a tiny task (tests, CPU smoke runs)")
  p.add_argument("--doc", default="", help="also write the report (e.g. docs/study.md)")
  p.add_argument("--notes", default="", help="with --doc: the written answer, under the title")
  p.add_argument("--ek100", default="", help="with --doc: the EK-100 results.json to include")
  args = p.parse_args(argv)

  import jax

  from mmts_jax.longtail.generator import GeneratorConfig
  from mmts_jax.study import experiment
  from mmts_jax.study.runner import TrainConfig
  from mmts_jax.study.task import make_task

  if args.seeds < 2:
    p.error(f"--seeds must be >= 2 (paired intervals), got {args.seeds}")
  os.makedirs(args.out, exist_ok=True)
  gen_kw = dict(val_per_class=args.val_per_class)
  if args.small:
    gen_kw.update(
      num_classes=6,
      head_size=60,
      imbalance=10,
      test_per_class=4,
      val_per_class=min(args.val_per_class, 4),
    )
  gen = GeneratorConfig(**gen_kw)
  cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size)
  seeds = tuple(range(args.seeds))
  rows = tuple(args.rows) if args.rows else experiment.ROWS
  t0 = time.perf_counter()
  task = make_task(gen)
  variants = (
    {name: make_task(dataclasses.replace(gen, **kw)) for name, kw in KNOB_SETTINGS.items()}
    if args.knobs
    else {}
  )
  pad_to = max(len(t.train_label) for t in [task, *variants.values()])
  jsonl = os.path.join(args.out, "trials.jsonl")
  open(jsonl, "w").close()

  def on_trial(rec):
    with open(jsonl, "a") as f:
      f.write(json.dumps(rec, sort_keys=True) + "\n")

  print(
    f"study: {len(task.train_label)} train pairs, {len(seeds)} seeds, {cfg.steps} steps of "
    f"{cfg.batch_size}, devices {jax.devices()}",
    flush=True,
  )
  res = experiment.run(
    task,
    seeds=seeds,
    cfg=cfg,
    rows=rows,
    select_metric=args.select_metric,
    on_trial=on_trial,
    log=lambda s: print(s, flush=True),
    pad_to=pad_to,
  )
  meta = {
    "generator": dataclasses.asdict(gen),
    "train": dataclasses.asdict(cfg),
    "seeds": list(seeds),
    "select_metric": args.select_metric,
    "device": str(jax.devices()[0]),
    "jax": jax.__version__,
    "num_train": len(task.train_label),
    "class_sizes": task.cluster_sizes.tolist(),
    "command": "python -m mmts_jax.study " + " ".join(sys.argv[1:] if argv is None else argv),
  }
  summary = {
    "meta": meta,
    "selected": res["selected"],
    "level": res["level"],
    "paired": res["paired"],
    "edges": res["edges"],
    "selected_policies": {r: res["trials"][r][i]["policy"] for r, i in res["selected"].items()},
    "temperature": {r: res["trials"][r][i].get("temperature") for r, i in res["selected"].items()},
    "learned_tau_by_class_size": {
      r: res["trials"][r][i].get("learned_tau_by_class_size")
      for r, i in res["selected"].items()
      if "learned_tau_by_class_size" in res["trials"][r][i]
    },
    "seconds": time.perf_counter() - t0,
  }
  _write_json(os.path.join(args.out, "results.json"), summary)
  print(f"main study done in {summary['seconds']:.0f}s", flush=True)

  if args.knobs:
    knobs = {}
    for name, vtask in variants.items():
      if time.perf_counter() - t0 > args.knob_budget:
        print(f"knob setting {name} skipped: past --knob-budget {args.knob_budget:g}s")
        continue
      vres = experiment.run(
        vtask,
        seeds=seeds,
        cfg=cfg,
        rows=rows,
        select_metric=args.select_metric,
        pad_to=pad_to,
        on_trial=lambda rec, name=name: on_trial({**rec, "setting": name}),
        log=lambda s, name=name: print(f"[{name}] {s}", flush=True),
      )
      knobs[name] = {
        "generator": KNOB_SETTINGS[name],
        "paired": vres["paired"],
        "selected": vres["selected"],
        "level": vres["level"],
        "edges": vres["edges"],
        "num_train": len(vtask.train_label),
      }
      _write_json(os.path.join(args.out, "knobs.json"), knobs)
    print(f"all done in {time.perf_counter() - t0:.0f}s", flush=True)
  if args.doc:
    from mmts_jax.study import report

    report.main(
      [args.out, "--out", args.doc]
      + (["--notes", args.notes] if args.notes else [])
      + (["--ek100", args.ek100] if args.ek100 else [])
    )
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
