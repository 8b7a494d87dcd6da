"""The synthetic long-tail benchmark end to end: data -> cluster table -> ablation rows -> R@K.

1. `generator.make_dataset`: long-tailed train split, balanced test split, head/tail classes.
2. Cluster table: the training captions through the MiniLM sentence encoder, K-Means with
   `k = config.synthetic.num_clusters`; each sample's shift is Eq. 6 of its cluster size.
3. Every ablation row (`configs/synthetic.py`: CLIP, TS, ICS, TS&ICS) is trained by the real
   trainer (`mmts_jax.train.train_and_evaluate`) with the same budget, batch order and seeds.
4. Test retrieval R@1/5/10 (image->text and text->image, averaged), overall and for head / tail
   queries, every `config.eval.every_steps` steps (learning curves) and at the end.
5. `results.json`, a printed table (mean +- std over seeds) and the plots of `plots.py`.

Example:
  >>> from configs import synthetic  # doctest: +SKIP
  >>> results = run(synthetic.get_config(), "/tmp/mmts_synthetic")  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import json
import os
import pathlib
import tempfile
import time
from typing import Any, Callable

import numpy as np

from mmts_jax import shifts
from mmts_jax.synthetic import generator, metrics

__all__ = ["run", "make_generator_config", "cluster_captions", "evaluate", "summarize",
           "format_table", "RECALL_KS"]

RECALL_KS = (1, 5, 10)
GROUPS = ("all", "head", "tail")


def make_generator_config(cfg) -> generator.GeneratorConfig:
  """`config.synthetic.generator` -> a validated `GeneratorConfig`."""
  fields = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  return generator.GeneratorConfig(**fields)


def _atomic_write(path: pathlib.Path, write: Callable[[Any], None], mode: str = "w") -> None:
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    with os.fdopen(fd, mode) as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def write_json(path, obj) -> None:
  _atomic_write(pathlib.Path(path), lambda f: json.dump(obj, f, indent=2, sort_keys=True))


def write_npz(path, **arrays) -> None:
  _atomic_write(pathlib.Path(path), lambda f: np.savez(f, **arrays), mode="wb")


def cluster_captions(captions, k: int, seed: int, log=print) -> dict:
  """MiniLM caption embeddings -> K-Means; returns `cluster` (N,), `sizes` (k,), provenance.

  Each distinct caption is encoded once (head classes repeat captions), then every sample gets
  its caption's embedding, so K-Means still weighs duplicates by their count.
  """
  from mmts_jax.text.encoder import SentenceEncoder
  from sklearn.cluster import KMeans  # TODO: mmts_jax.clustering once it lands
  captions = list(captions)
  unique, inverse = np.unique(np.asarray(captions, dtype=object), return_inverse=True)
  t0 = time.perf_counter()
  encoder = SentenceEncoder.load(None)
  emb = np.asarray(encoder.encode([str(u) for u in unique]))[inverse]
  t1 = time.perf_counter()
  cluster = KMeans(k, n_init=3, random_state=seed).fit(emb).labels_.astype(np.int32)
  t2 = time.perf_counter()
  log(f"cluster table: {len(unique)} distinct captions encoded in {t1 - t0:.1f}s, K-Means "
      f"k={k} in {t2 - t1:.1f}s")
  return {"cluster": cluster, "sizes": np.bincount(cluster, minlength=k),
          "provenance": {"source": "captions", "model": encoder.name, "k": k, "seed": seed,
                         "num_examples": len(captions)}}


def _embed_split(embed, variables, split: generator.Split) -> tuple[np.ndarray, np.ndarray]:
  out = embed(variables, {"image_features": split.image, "text": split.tokens})
  return np.asarray(out["image"], np.float32), np.asarray(out["text"], np.float32)


def evaluate(image: np.ndarray, text: np.ndarray, split: generator.Split,
             ds: generator.SyntheticDataset) -> dict[str, float]:
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
  from configs import synthetic as synthetic_config  # the row table lives with the config
  cfg = copy.deepcopy(base)
  cfg.seed = int(seed)
  cfg.temperature.update(synthetic_config.row_temperature(row))
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


def run(config, workdir, *, log=print, plot: bool = True) -> dict:
  """Runs the whole benchmark of `config` (see `configs/synthetic.py`) in `workdir`.

  Writes `workdir/{data/train.npz, cluster_table.npz, results.json, plots/*.png}` and one trainer
  workdir per row and seed under `workdir/runs/<row>/seed_<s>/`. Returns the results dict.
  """
  from mmts_jax import train
  from mmts_jax.metrics_log import read_metrics
  from configs import synthetic as synthetic_config

  syn = config.synthetic
  seeds = int(syn.seeds)
  if seeds < 1:
    raise ValueError(f"synthetic.seeds must be >= 1, got {seeds}")
  rows = tuple(syn.rows)
  for row in rows:
    synthetic_config.row_temperature(row)   # unknown rows fail before any work
  shifts.validate_positive(float(config.mmts.alpha), float(config.mmts.sh_min),
                           float(config.mmts.sh_max))
  k = int(syn.num_clusters)
  gen_cfg = make_generator_config(syn.generator)
  if not 2 <= k <= gen_cfg.head_size:
    raise ValueError(f"synthetic.num_clusters must be in [2, {gen_cfg.head_size}], got {k}")

  workdir = pathlib.Path(workdir).absolute()
  (workdir / "data").mkdir(parents=True, exist_ok=True)
  t_start = time.perf_counter()
  ds = generator.make_dataset(gen_cfg)
  log(f"data: {len(ds.train)} train pairs in {gen_cfg.num_classes} classes (sizes "
      f"{ds.class_sizes.max()}..{ds.class_sizes.min()}, imbalance {ds.imbalance:.0f}; "
      f"{int(ds.head_classes.sum())} head, {int(ds.tail_classes.sum())} tail classes), "
      f"{len(ds.test)} balanced test pairs")
  data_path = workdir / "data" / "train.npz"
  write_npz(data_path, image_features=ds.train.image, text=ds.train.tokens, index=ds.train.index)

  table = cluster_captions(ds.train.captions, k, int(syn.cluster_seed), log=log)
  sample_sizes = table["sizes"][table["cluster"]]
  shift_table = shifts.cluster_shift(sample_sizes, float(config.mmts.sh_min),
                                     float(config.mmts.sh_max)).astype(np.float32)
  write_npz(workdir / "cluster_table.npz", cluster=table["cluster"], sizes=table["sizes"],
            shift=shift_table, provenance=json.dumps(table["provenance"]),
            fingerprint=ds.fingerprint())

  base = copy.deepcopy(config)
  base.data.name, base.data.path = "npz", str(data_path)
  runs = []
  for seed in range(seeds):
    for row in rows:
      cfg = _row_config(base, row, seed)
      run_dir = workdir / "runs" / row / f"seed_{seed}"
      curve: list[dict] = []

      def eval_fn(step, embed, variables, curve=curve):
        result = evaluate(*_embed_split(embed, variables, ds.test), ds.test, ds)
        curve.append({"step": int(step), **result})
        return {f"test/{k}": v for k, v in result.items() if not k.startswith(("i2t", "t2i"))}

      t0 = time.perf_counter()
      result = train.train_and_evaluate(cfg, run_dir, shift_table=shift_table, eval_fn=eval_fn)
      final = curve[-1]
      runs.append({"row": row, "seed": seed, "final": {k: v for k, v in final.items()
                                                        if k != "step"},
                   "curve": curve, "train_log": read_metrics(run_dir),
                   "seconds": time.perf_counter() - t0, "status": result.status})
      log(f"  {row:<6} seed {seed}: R@1 all {100 * final['all/R@1']:.1f} head "
          f"{100 * final['head/R@1']:.1f} tail {100 * final['tail/R@1']:.1f}  "
          f"({time.perf_counter() - t0:.0f}s)")

  summary = summarize(runs)
  results = {
      "summary": summary, "runs": runs, "rows": list(rows), "seeds": seeds,
      "labels": {r: synthetic_config.ROW_LABELS.get(r, r) for r in rows},
      "config": config.to_dict(),
      "data": {"num_train": len(ds.train), "num_test": len(ds.test),
               "class_sizes": ds.class_sizes.tolist(), "imbalance": ds.imbalance,
               "head_classes": np.flatnonzero(ds.head_classes).tolist(),
               "tail_classes": np.flatnonzero(ds.tail_classes).tolist(),
               "fingerprint": ds.fingerprint()},
      "clusters": {"sizes": table["sizes"].tolist(), "provenance": table["provenance"],
                   "shift_min": float(shift_table.min()), "shift_max": float(shift_table.max()),
                   "class_cluster_nmi": _nmi(ds.train.label, table["cluster"])},
      "seconds": time.perf_counter() - t_start,
  }
  write_json(workdir / "results.json", results)
  if plot:
    from mmts_jax.synthetic import plots
    results["plots"] = plots.write_all(results, workdir / "plots", config)
    write_json(workdir / "results.json", results)
  log("\n" + format_table(summary, results["labels"]))
  log(f"\nR@K in %, mean +- std over {seeds} seed(s); results in {workdir / 'results.json'}")
  return results


def _nmi(a: np.ndarray, b: np.ndarray) -> float:
  """Normalised mutual information (arithmetic mean of entropies) of two labelings."""
  joint = np.histogram2d(a, b, bins=(np.max(a) + 1, np.max(b) + 1))[0] / len(a)
  pa, pb = joint.sum(1), joint.sum(0)
  nz = joint > 0
  mi = float(np.sum(joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])))
  ent = lambda p: -float(np.sum(p[p > 0] * np.log(p[p > 0])))
  return mi / max((ent(pa) + ent(pb)) / 2, 1e-12)
