r"""EK-100 MIR at the feature level with a real text side: MiniLM narrations, trained heads.

  python -m mmts_jax.study.ek100 --annotations ../shared/data/ek100 --out DIR [--seeds 5]

* Text: the packaged Flax all-MiniLM-L6-v2 (`mmts_jax.clusters.encoder.SentenceEncoder`) embeds
  the real
  narrations, the 15,989 distinct training captions and the 3,842 validation captions (384-d
  unit vectors, cached in `DIR/minilm.npz`); a trained MLP head maps them to the joint space.
* Video: **class-derived, not real video** (no clips or frozen AVION features ship): the
  features of `mmts_jax.projects.ek100_features.ek100_features` (a verb + noun class latent plus
  noise, seen
  through a fixed random map), for the training captions' segments and the 9,668 validation
  videos; a trained MLP head on top.
* Rows, without tuning (EK-100 has no split besides the MIR validation one, which reports):
  max-margin (AVION's MI-MM loss) with AVION's fixed margin 0.2, MM-TS with the paper's
  EK-100 margins (alpha 0.20, shifts [0.17, 0.30]), and MM-TS level-matched to 0.2; InfoNCE
  with a fixed 0.07, MM-TS with the CC3M values (alpha 0.04, shifts [0.05, 0.10]) and MM-TS
  level-matched to 0.07. Clusters: the main noun class with its official training frequency
  (`ek100_noun_freq.csv`), the paper's EK-100 table.
* Report: MIR mAP / nDCG (the official definitions, `mmts_jax.eval.ek100_mir`) on the whole
  validation split, overall and by noun-frequency bucket of the query's main noun (head /
  middle / tail: the noun classes holding the first, second and last third of the 67,217
  training narrations, `eval.longtail.cluster_buckets(..., "share")`); per seed, and the paired
  difference of each MM-TS row to the fixed row of its loss with a 95% interval.

Example:
  >>> rows = dict(ROWS)
  >>> rows["mimm_mmts"]
  ('max_margin', 'mmts', {'alpha': 0.2, 'sh_min': 0.17, 'sh_max': 0.3})
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

from mmts_jax.atomic_io import atomic_write_bytes

__all__ = ["ROWS", "BUCKETS", "load_text_embeddings", "build_task", "evaluate", "main"]

# (name, (loss, policy, hyper-parameters)); level-matched rows take their loss's fixed value.
ROWS = (
  ("mimm_fixed", ("max_margin", "fixed", {"value": 0.2})),
  ("mimm_mmts", ("max_margin", "mmts", {"alpha": 0.20, "sh_min": 0.17, "sh_max": 0.30})),
  (
    "mimm_mmts_lm",
    ("max_margin", "mmts_lm", {"alpha": 0.20, "sh_min": 0.17, "sh_max": 0.30, "level": 0.2}),
  ),
  ("infonce_fixed", ("infonce", "fixed", {"value": 0.07})),
  ("infonce_mmts", ("infonce", "mmts", {"alpha": 0.04, "sh_min": 0.05, "sh_max": 0.10})),
  (
    "infonce_mmts_lm",
    ("infonce", "mmts_lm", {"alpha": 0.04, "sh_min": 0.05, "sh_max": 0.10, "level": 0.07}),
  ),
)
BUCKETS = ("all", "head", "middle", "tail")


def load_text_embeddings(annotations: str, cache: str) -> dict[str, np.ndarray]:
  """`{"train": (15989, 384), "val": (3842, 384)}` MiniLM embeddings of the real narrations, in
  CSV order; computed once (about 3 minutes on 2 loaded CPU cores) and cached in `cache`."""
  if os.path.exists(cache):
    with np.load(cache) as f:
      return {"train": f["train"], "val": f["val"]}
  from mmts_jax.clusters.encoder.encoder import SentenceEncoder
  from mmts_jax.eval.relevancy import read_ek100_mir
  from mmts_jax.projects.ek100_features.ek100_features import read_ek100_train

  enc = SentenceEncoder.load(None)
  out: dict[str, Any] = {
    "train": enc.encode(list(read_ek100_train(annotations).captions)),
    "val": enc.encode(list(read_ek100_mir(annotations).captions)),
  }
  import io

  buf = io.BytesIO()
  np.savez(buf, **out)
  atomic_write_bytes(cache, buf.getvalue())
  return out


def build_task(annotations: str, text: dict[str, np.ndarray]):
  """`(task, val)`: a study `Task` (train: class-derived video + MiniLM text; val = test: the
  MIR split) and `val = {"relevancy", "video_bucket", "caption_bucket"}`."""
  import pathlib

  from mmts_jax.eval.longtail import cluster_buckets
  from mmts_jax.eval.relevancy import class_relevancy, read_ek100_mir
  from mmts_jax.projects.ek100_features import ek100_features as F
  from mmts_jax.study.task import Task

  directory = pathlib.Path(annotations)
  train, val = F.read_ek100_train(directory), read_ek100_mir(directory)
  if text["train"].shape[0] != len(train) or text["val"].shape[0] != len(val.captions):
    raise ValueError(
      f"text embeddings {text['train'].shape[0]} / {text['val'].shape[0]} do not "
      f"match the {len(train)} training and {len(val.captions)} validation "
      "captions: a stale cache"
    )
  spec = F.FeatureSpec()
  all_verbs = np.concatenate([train.verbs, val.video_verbs])
  all_nouns = np.fromiter((c for s in train.nouns + val.video_nouns for c in s), np.int64)
  maps = F.ClassFeatureMaps(
    spec,
    F._num_classes(directory, F.VERB_CLASSES_CSV, all_verbs),
    F._num_classes(directory, F.NOUN_CLASSES_CSV, all_nouns),
  )
  video_train = maps.features(
    "video", train.verbs, train.nouns, rng=F._split_rng(spec, "train", "video")
  )
  video_val = maps.features(
    "video", val.video_verbs, val.video_nouns, rng=F._split_rng(spec, "val", "video")
  )
  freq = F.read_frequencies(directory / F.NOUN_FREQ_CSV)
  num_nouns = max(max(int(k) for k in freq) + 1, int(all_nouns.max()) + 1)
  sizes = np.zeros(num_nouns, np.float64)
  for k, c in freq.items():
    sizes[int(k)] = c
  main = train.main_nouns
  if np.any(sizes[main] <= 0):
    raise ValueError("a training caption's main noun has no official frequency")
  split = {"image": video_val.astype(np.float32), "text": text["val"].astype(np.float32)}
  task = Task(
    dataset=None,
    train={"image": video_train.astype(np.float32), "text": text["train"].astype(np.float32)},
    val=split,
    test=split,
    train_label=main,
    cluster_sizes=sizes,
  )
  bucket = cluster_buckets(np.maximum(sizes, 0), "share")
  video_main = np.array([n[0] for n in val.video_nouns])
  caption_main = np.array([n[0] for n in val.caption_nouns])
  rel = class_relevancy(val.video_verbs, val.video_nouns, val.caption_verbs, val.caption_nouns)
  return task, {
    "relevancy": rel.astype(np.float32),
    "video_bucket": bucket[video_main],
    "caption_bucket": bucket[caption_main],
  }


def evaluate(video: np.ndarray, text: np.ndarray, val: dict) -> dict[str, float]:
  """`{"<bucket>/mAP", "<bucket>/nDCG"}`: MIR over all queries, or those of a bucket (each
  query still ranked against every item)."""
  from mmts_jax.eval.ek100_mir import mir_per_query

  sim = (np.asarray(video, np.float32) @ np.asarray(text, np.float32).T).astype(np.float32)
  per = mir_per_query(sim, val["relevancy"])
  out = {}
  for i, name in enumerate(BUCKETS):
    vm = None if i == 0 else val["video_bucket"] == i - 1
    cm = None if i == 0 else val["caption_bucket"] == i - 1
    for metric, score in per.scores(vm, cm).items():
      out[f"{name}/{metric}"] = float(score.average)
  return out


def _policy(kind: str, hp: dict, period: float):
  from mmts_jax.study import policies as P

  if kind == "fixed":
    return P.Fixed(hp["value"])
  return P.MMTS(hp["sh_min"], hp["sh_max"], level=hp.get("level"), alpha=hp["alpha"], period=period)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m mmts_jax.study.ek100",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--annotations", default="../shared/data/ek100")
  p.add_argument("--out", required=True)
  p.add_argument("--cache", default="", help="MiniLM embeddings (default OUT/minilm.npz)")
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--rows", nargs="+", default=[r for r, _ in ROWS])
  args = p.parse_args(argv)
  if args.seeds < 2:
    p.error(f"--seeds must be >= 2 (paired intervals), got {args.seeds}")
  unknown = sorted(set(args.rows) - dict(ROWS).keys())
  if unknown:
    p.error(f"unknown rows {unknown}; known: {[r for r, _ in ROWS]}")

  import concurrent.futures

  import jax

  from mmts_jax import shifts
  from mmts_jax.study.runner import TrainConfig, train_trials
  from mmts_jax.study.stats import paired_interval

  os.makedirs(args.out, exist_ok=True)
  t0 = time.perf_counter()
  text = load_text_embeddings(args.annotations, args.cache or os.path.join(args.out, "minilm.npz"))
  task, val = build_task(args.annotations, text)
  print(
    f"ek100: {len(task.train_label)} train pairs, {val['relevancy'].shape} validation, "
    f"{args.seeds} seeds, {args.steps} steps of {args.batch_size} "
    f"({time.perf_counter() - t0:.0f}s to load)",
    flush=True,
  )
  seeds = tuple(range(args.seeds))
  period = args.steps / 5
  results = {}
  for row in args.rows:
    loss, kind, hp = dict(ROWS)[row]
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-3, loss=loss)
    policy = _policy(kind, hp, period)
    table = (
      shifts.cluster_shift(task.sample_sizes(), hp["sh_min"], hp["sh_max"])
      if kind != "fixed"
      else None
    )
    t1 = time.perf_counter()
    out = train_trials([policy], task, seeds=seeds, cfg=cfg, shift_tables=[table])
    t2 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      per_seed = list(
        pool.map(
          lambda s, out=out: evaluate(out["test_image"][0, s], out["test_text"][0, s], val),
          range(len(seeds)),
        )
      )
    temp = out["temperature"][0]
    results[row] = {
      "loss": loss,
      "policy": kind,
      "hyper": hp,
      "seeds": list(seeds),
      "test": per_seed,
      "value_mean": float(temp[:, :, 0].mean()),
      "value_min": float(temp[:, :, 1].min()),
      "value_max": float(temp[:, :, 2].max()),
      "train_seconds": t2 - t1,
      "eval_seconds": time.perf_counter() - t2,
    }
    print(
      f"  {row:<16} mAP {100 * np.mean([s['all/mAP'] for s in per_seed]):.2f} nDCG "
      f"{100 * np.mean([s['all/nDCG'] for s in per_seed]):.2f} (train {t2 - t1:.0f}s, "
      f"eval {time.perf_counter() - t2:.0f}s)",
      flush=True,
    )
  paired = {}
  for row, rec in results.items():
    base = results.get(f"{rec['loss'].replace('max_margin', 'mimm')}_fixed")
    if base is None or rec["policy"] == "fixed":
      continue
    paired[row] = {
      m: paired_interval([s[m] for s in rec["test"]], [s[m] for s in base["test"]])
      for m in rec["test"][0]
    }
  summary = {
    "rows": results,
    "paired_to_fixed": paired,
    "meta": {
      "command": "python -m mmts_jax.study.ek100 "
      + " ".join(sys.argv[1:] if argv is None else argv),
      "device": str(jax.devices()[0]),
      "jax": jax.__version__,
      "num_train": len(task.train_label),
      "val_shape": list(val["relevancy"].shape),
      "bucket_queries": {
        "videos": np.bincount(val["video_bucket"], minlength=3).tolist(),
        "captions": np.bincount(val["caption_bucket"], minlength=3).tolist(),
      },
      "seconds": time.perf_counter() - t0,
    },
  }
  atomic_write_bytes(
    os.path.join(args.out, "results.json"), json.dumps(summary, indent=1, sort_keys=True).encode()
  )
  print(f"done in {time.perf_counter() - t0:.0f}s", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
