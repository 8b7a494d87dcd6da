"""The synthetic long-tail benchmark end to end: data -> cluster table -> ablation rows -> R@K.

1. `generator.make_dataset`: long-tailed train split, balanced test split, head/tail classes.
2. Cluster table: the training captions through the MiniLM sentence encoder, K-Means with
   `k = config.synthetic.num_clusters`, saved as a `ClusterTable`; the trainer loads it
   (`config.mmts.cluster_table`), checks its fingerprint and gathers each sample's Eq. 6 shift.
3. Every ablation row (`mmts_jax.longtail.config`: fixed, TS, ICS, TS&ICS) is trained by the real
   trainer (`mmts_jax.train.train_and_evaluate`) with the same budget, batch order and seeds.
4. Test retrieval R@1/5/10 (image->text and text->image, averaged), overall and for head / tail
   queries, every `config.eval.every_steps` steps (learning curves) and at the end.
5. `results.json`, a printed table (mean +- std over seeds) and the plots of `plots.py`.

Usage (trains every row for every seed, minutes on a CPU, so it is not a doctest; `mmts
synthetic` is the command-line front end)::

  from mmts_jax.longtail.config import get_config
  results = run(get_config(), "/tmp/mmts_synthetic")
"""

from __future__ import annotations

import copy
import json
import pathlib
import shutil
import time

import numpy as np

from mmts_jax import shifts
from mmts_jax.longtail import generator, metrics

__all__ = ["run", "cluster_captions", "evaluate", "summarize", "format_table", "RECALL_KS"]

RECALL_KS = (1, 5, 10)
GROUPS = ("all", "head", "tail")


def write_json(path, obj) -> None:
  from mmts_jax.clusters.table import atomic_write

  text = json.dumps(obj, indent=2, sort_keys=True)
  atomic_write(path, lambda f: f.write(text.encode()))


def cluster_captions(captions, k: int, seed: int, *, devices=None, log=print):
  """The preprocessing stage on the training captions: MiniLM embeddings -> K-Means -> table.

  Each distinct caption is encoded once (head classes repeat captions) and every sample gets its
  caption's embedding, so K-Means still weighs duplicates by their count. Returns a
  `ClusterTable` fingerprinted with the captions in index order.
  """
  from mmts_jax.clusters.encoder import SentenceEncoder
  from mmts_jax.clusters.kmeans import kmeans
  from mmts_jax.clusters.table import ClusterTable, dataset_fingerprint

  captions = list(captions)
  unique, inverse = np.unique(np.asarray(captions, dtype=object), return_inverse=True)
  t0 = time.perf_counter()
  encoder = SentenceEncoder.load(None, devices=devices)
  emb = np.asarray(encoder.encode([str(u) for u in unique]))[inverse]
  t1 = time.perf_counter()
  # The JAX back-end: no scikit-learn import (seconds on a small CPU), same devices as the rest.
  result = kmeans(emb, k, seed=seed, backend="jax", n_init=3, devices=devices)
  t2 = time.perf_counter()
  log(
    f"cluster table: {len(unique)} distinct captions encoded by {encoder.name} in "
    f"{t1 - t0:.1f}s, K-Means k={k} in {t2 - t1:.1f}s"
  )
  return ClusterTable.from_assignments(
    result.labels,
    k,
    source="text",
    fingerprint=dataset_fingerprint(captions),
    fingerprint_keys="captions",
    k=k,
    seed=seed,
    backend="jax",
    n_init=3,
    inertia=float(result.inertia),
    embed_seconds=round(t1 - t0, 3),
    cluster_seconds=round(t2 - t1, 3),
    **encoder.provenance(),
  )


def _embed_split(embed, variables, split: generator.Split) -> tuple[np.ndarray, np.ndarray]:
  out = embed(variables, {"image_features": split.image, "text": split.tokens})
  return np.asarray(out["image"], np.float32), np.asarray(out["text"], np.float32)


def evaluate(
  image: np.ndarray, text: np.ndarray, split: generator.Split, ds: generator.SyntheticDataset
) -> dict[str, float]:
  """R@K image->text and text->image on `split`, per query group; `<group>/R@K` averages both.

  A caption is relevant to an image when it is the same string as the image's own caption.
  """
  sim = image @ text.T
  relevant = metrics.same_string(split.captions)
  groups = ds.group_of(split.label)
  i2t = metrics.grouped_recall(sim, relevant, groups, RECALL_KS)
  t2i = metrics.grouped_recall(sim.T, relevant.T, groups, RECALL_KS)
  out = {f"i2t/{k}": v for k, v in i2t.items()}
  out.update({f"t2i/{k}": v for k, v in t2i.items()})
  out.update({k: (i2t[k] + t2i[k]) / 2 for k in i2t})
  return out


def _row_config(base, row: str, seed: int):
  from mmts_jax.train import with_row

  cfg = with_row(copy.deepcopy(base), row)
  cfg.seed = int(seed)
  return cfg


def _mean_std(values) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarize(runs: list[dict]) -> dict[str, dict[str, list[float]]]:
  """Per row, `{metric: [mean, std]}` over the seeds of `runs` (each: row, seed, final)."""
  out: dict[str, dict] = {}
  for row in dict.fromkeys(r["row"] for r in runs):
    finals = [r["final"] for r in runs if r["row"] == row]
    out[row] = {k: list(_mean_std([f[k] for f in finals])) for k in finals[0]}
  return out


def format_table(summary: dict, labels: dict[str, str] | None = None) -> str:
  """The ablation table: one line per row, R@1/5/10 overall / head / tail (mean +- std, %)."""
  labels = labels or {}
  cols = [f"{g}/R@{k}" for g in GROUPS for k in RECALL_KS]
  head = f"{'row':<20}" + "".join(f"{c:>13}" for c in cols)
  lines = [head, "-" * len(head)]
  for row, stats in summary.items():
    cells = "".join(f"{100 * stats[c][0]:>7.1f}+-{100 * stats[c][1]:<4.1f}" for c in cols)
    lines.append(f"{labels.get(row, row):<20}{cells}")
  return "\n".join(lines)


def run(config, workdir, *, log=print, plot: bool = True, overwrite: bool = False) -> dict:
  """Runs the whole benchmark of `config` (`mmts_jax.longtail.config`) in `workdir`.

  Writes `workdir/{cluster_table.npz, results.json, plots/*.png}` and one trainer workdir per row
  and seed, `workdir/runs/<row>/seed_<s>/` (metrics.jsonl, final checkpoint). Returns the
  results dict. Refuses a workdir that already holds runs unless `overwrite`.
  """
  from mmts_jax import train
  from mmts_jax.clusters.table import dataset_fingerprint
  from mmts_jax.longtail import config as config_lib
  from mmts_jax.longtail import source
  from mmts_jax.metrics_log import read_metrics

  syn = config.synthetic
  seeds = int(syn.seeds)
  if seeds < 1:
    raise ValueError(f"synthetic.seeds must be >= 1, got {seeds}")
  rows = tuple(syn.rows)
  if not rows:
    raise ValueError("synthetic.rows is empty: name at least one ablation row")
  for row in rows:
    train.with_row(copy.deepcopy(config), row)  # an unknown row fails before any work
  shifts.validate_positive(
    float(config.mmts.alpha), float(config.mmts.sh_min), float(config.mmts.sh_max)
  )
  gen_cfg = source.generator_config(config.data)
  cluster_source = syn.get("cluster_source", "captions")
  if cluster_source not in ("captions", "classes"):
    raise ValueError(
      f"synthetic.cluster_source must be 'captions' or 'classes', got {cluster_source!r}"
    )
  k = int(syn.num_clusters)
  if not 2 <= k <= gen_cfg.head_size:
    raise ValueError(f"synthetic.num_clusters must be in [2, {gen_cfg.head_size}], got {k}")
  devices = _devices(int(syn.get("num_devices", 0) or 0))
  workdir = pathlib.Path(workdir).absolute()
  runs_dir = workdir / "runs"
  if runs_dir.exists():
    if not overwrite:
      raise ValueError(f"{runs_dir} already holds runs: choose another workdir or overwrite")
    shutil.rmtree(runs_dir)
  workdir.mkdir(parents=True, exist_ok=True)

  t_start = time.perf_counter()
  ds = generator.make_dataset(gen_cfg)
  log(
    f"data: {len(ds.train)} train pairs in {gen_cfg.num_classes} classes (sizes "
    f"{ds.class_sizes.max()}..{ds.class_sizes.min()}, imbalance {ds.imbalance:.0f}; "
    f"{int(ds.head_classes.sum())} head, {int(ds.tail_classes.sum())} tail classes), "
    f"{len(ds.test)} balanced test pairs"
  )

  if cluster_source == "captions":
    table = cluster_captions(ds.train.captions, k, int(syn.cluster_seed), devices=devices, log=log)
  else:  # the generator's classes: what K-Means would find if it recovered them exactly
    from mmts_jax.clusters.table import ClusterTable

    table = ClusterTable.from_labels(
      ds.train.label,
      fingerprint=ds.fingerprint(),
      fingerprint_keys="captions",
      source="labels",
      column="synthetic class",
    )
    log(f"cluster table: the {gen_cfg.num_classes} generator classes (no encoder, no K-Means)")
  table_path = workdir / "cluster_table.npz"
  table.save(table_path)
  shift_table = table.shift_table(float(config.mmts.sh_min), float(config.mmts.sh_max))

  # The trainer loads the table itself and checks it against the source's fingerprint.
  base = copy.deepcopy(config)
  base.mmts.cluster_table = str(table_path)
  base.mesh.num_devices = len(devices)
  runs = []
  for seed in range(seeds):
    for row in rows:
      cfg = _row_config(base, row, seed)
      run_dir = runs_dir / row / f"seed_{seed}"
      curve: list[dict] = []

      def eval_fn(step, embed, variables, curve=curve):
        result = evaluate(*_embed_split(embed, variables, ds.test), ds.test, ds)
        curve.append({"step": int(step), **result})
        return {f"test/{k}": v for k, v in result.items() if not k.startswith(("i2t", "t2i"))}

      t0 = time.perf_counter()
      result = train.train_and_evaluate(cfg, run_dir, eval_fn=eval_fn)
      final = curve[-1]
      runs.append(
        {
          "row": row,
          "seed": seed,
          "final": {k: v for k, v in final.items() if k != "step"},
          "curve": curve,
          "train_log": read_metrics(run_dir),
          "seconds": time.perf_counter() - t0,
          "status": result.status,
        }
      )
      log(
        f"  {row:<6} seed {seed}: R@1 all {100 * final['all/R@1']:.1f} head "
        f"{100 * final['head/R@1']:.1f} tail {100 * final['tail/R@1']:.1f}  "
        f"({time.perf_counter() - t0:.0f}s)"
      )

  summary = summarize(runs)
  results = {
    "summary": summary,
    "runs": runs,
    "rows": list(rows),
    "seeds": seeds,
    "labels": {r: config_lib.ROW_LABELS.get(r, r) for r in rows},
    "config": config.to_dict(),
    "data": {
      "num_train": len(ds.train),
      "num_test": len(ds.test),
      "class_sizes": ds.class_sizes.tolist(),
      "imbalance": ds.imbalance,
      "head_classes": np.flatnonzero(ds.head_classes).tolist(),
      "tail_classes": np.flatnonzero(ds.tail_classes).tolist(),
      "fingerprint": dataset_fingerprint(ds.train.captions),
    },
    "clusters": {
      "sizes": table.sizes.tolist(),
      "provenance": dict(table.provenance),
      "shift_min": float(shift_table.min()),
      "shift_max": float(shift_table.max()),
      "class_cluster_nmi": _nmi(ds.train.label, table.cluster_ids),
    },
    "seconds": time.perf_counter() - t_start,
  }
  write_json(workdir / "results.json", results)
  if plot:
    from mmts_jax.longtail import plots

    results["plots"] = plots.write_all(results, workdir / "plots", config)
    write_json(workdir / "results.json", results)
  log("\n" + format_table(summary, results["labels"]))
  log(
    f"\nR@K in %, mean +- std over {seeds} seed(s), {time.perf_counter() - t_start:.0f}s; "
    f"results in {workdir / 'results.json'}"
  )
  return results


def _devices(num_devices: int) -> list:
  """The first `num_devices` local devices (0: all) for the encoder and the trainer's mesh."""
  import jax

  devices = jax.local_devices()
  if not 0 <= num_devices <= len(devices):
    raise ValueError(f"synthetic.num_devices must be in [0, {len(devices)}], got {num_devices}")
  return devices[:num_devices] if num_devices else devices


def _nmi(a: np.ndarray, b: np.ndarray) -> float:
  """Normalised mutual information (arithmetic mean of entropies) of two labelings."""
  joint = np.histogram2d(a, b, bins=(np.max(a) + 1, np.max(b) + 1))[0] / len(a)
  pa, pb = joint.sum(1), joint.sum(0)
  nz = joint > 0
  mi = float(np.sum(joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])))
  ent = lambda p: -float(np.sum(p[p > 0] * np.log(p[p > 0])))
  return mi / max((ent(pa) + ent(pb)) / 2, 1e-12)
