"""`mmts finetune`: feature-level EK-100 fine-tuning with MIR evaluation, and zero-shot retrieval.

  mmts finetune prepare --annotations ../shared/data/ek100 --out data/ek100
  mmts finetune train --data data/ek100 --annotations ../shared/data/ek100 --workdir runs/ek100 \\
      [--config configs/ek100_features_mimm.py[:ROW]] [--config.KEY=VALUE ...] [--val-videos N]
  mmts finetune eval --data data/ek100 --annotations ../shared/data/ek100 --workdir runs/ek100
  mmts finetune zero-shot --workdir runs/cc3m --test-set data/flickr30k_test --test-set coco.npz \\
      [--tokenizer DIR] [--captions-per-image 5]

`prepare` writes class-derived train / validation features (synthetic stand-ins for frozen
AVION features, from the real annotations) and the noun-class cluster table (official
frequencies). `train` trains projection heads with `mmts_jax.train`, logs MIR mAP / nDCG every
`config.eval.every_steps` steps, and writes `val_embeddings.npz` and `mir_metrics.json` into the
workdir (rerunning resumes). `eval` scores a checkpoint. `zero-shot` prints the paper's Table 1
columns (IR@1/5/10, TR@1/5/10, RSUM) of a run's checkpoint on Flickr30K / COCO-style test sets:
datasets converted by `mmts prepare` (one record per caption) or `.npz` files of model inputs
(see `mmts_jax.eval.zero_shot`).

Exit status: 0 done; 2 bad arguments, configuration or input files; 3 the loss became NaN/inf.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from mmts_jax.commands import errors
from mmts_jax.commands.help_format import HelpFormatter

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "ek100_features_mimm.py"
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="mmts finetune", description=__doc__, formatter_class=HelpFormatter
  )
  sub = p.add_subparsers(dest="action", required=True)

  def add(name, help_):
    return sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)

  pr = add("prepare", "EK-100 features + noun-class cluster table")
  pr.add_argument("--annotations", required=True, help="the EK-100 annotation folder")
  pr.add_argument("--out", required=True, help="output folder")
  pr.add_argument("--video-dim", type=int, default=64, help="width of the video features")
  pr.add_argument("--text-dim", type=int, default=48, help="width of the text features")
  pr.add_argument(
    "--latent-dim",
    type=int,
    default=32,
    help="width of the class latent both modalities are drawn from",
  )
  pr.add_argument("--noise", type=float, default=1.0, help="noise std per feature")
  pr.add_argument(
    "--seed", type=int, default=0, help="seed of the class embeddings, maps and noise"
  )
  for name, help_ in (
    ("train", "train projection heads, MIR during and after"),
    ("eval", "MIR metrics of a checkpoint"),
  ):
    a = add(name, help_)
    a.add_argument("--data", required=True, help="folder written by `mmts finetune prepare`")
    a.add_argument("--annotations", required=True, help="the EK-100 annotation folder")
    a.add_argument(
      "--workdir", required=True, help="the run's folder: checkpoints, metrics, embeddings"
    )
    a.add_argument(
      "--val-videos",
      type=int,
      default=None,
      help="validate on the first N videos only (default: all 9,668)",
    )
    a.add_argument("--out", help="also write the metrics json here")
  t = sub.choices["train"]
  t.add_argument(
    "--config",
    default=str(_DEFAULT_CONFIG),
    help="path/to/config.py[:ROW] (default: configs/ek100_features_mimm.py)",
  )
  t.add_argument(
    "--stop-at-step",
    type=int,
    default=None,
    help="stop after this step with a checkpoint; rerun to resume (default: config.total_steps)",
  )
  t.add_argument("--no-progress", action="store_true", help="no progress bar")
  sub.choices["eval"].add_argument(
    "--step", type=int, default=None, help="checkpoint step (default: the latest)"
  )
  z = add("zero-shot", "Table 1 retrieval metrics of a checkpoint")
  z.add_argument("--workdir", required=True, help="the run whose checkpoint is evaluated")
  z.add_argument(
    "--test-set",
    action="append",
    required=True,
    metavar="[NAME=]PATH",
    help="a .npz of model inputs, or a dataset converted by `mmts prepare` (one "
    "record per caption); repeatable; NAME defaults to the file name",
  )
  z.add_argument(
    "--tokenizer",
    help="tokenizer directory for converted datasets (default: the run's config.data.tokenizer)",
  )
  z.add_argument("--image-size", type=int, help="default: the run's config.data.image_size")
  z.add_argument("--text-len", type=int, help="default: the run's config.data.text_len")
  z.add_argument(
    "--captions-per-image",
    type=int,
    default=None,
    help="caption j describes image j // K when the npz has no text_to_image",
  )
  z.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  z.add_argument("--out", help="metrics json")
  return p


def _write_json(path: str, record: dict) -> None:
  from mmts_jax.clusters.table import atomic_write

  with errors.writing(path, "the metrics"):
    atomic_write(
      path, lambda f: f.write((json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    )
  print(f"wrote {path}")


def _prepare(args) -> int:
  from mmts_jax.clusters.table import ClusterTable
  from mmts_jax.projects.ek100_features.driver import prepare
  from mmts_jax.projects.ek100_features.ek100_features import FeatureSpec

  spec = FeatureSpec(
    video_dim=args.video_dim,
    text_dim=args.text_dim,
    latent_dim=args.latent_dim,
    noise=args.noise,
    seed=args.seed,
  )
  errors.check_output_dir(args.out, "--out")
  from mmts_jax.projects.ek100_features.driver import data_files_of

  with errors.all_or_nothing(data_files_of(args.out)), errors.writing(args.out, "the features"):
    files = prepare(args.annotations, args.out, spec)
  table = ClusterTable.load(files.table)
  s = table.summary()
  print(
    f"train: {table.num_samples} pairs, video {spec.video_dim}-d, text {spec.text_dim}-d "
    f"-> {files.train}"
  )
  import numpy as np

  with np.load(files.val) as z:
    print(
      f"val:   {len(z['video_features'])} videos x {len(z['text_features'])} captions "
      f"-> {files.val}"
    )
  print(
    f"cluster table: {s['num_clusters']} noun classes, K_c {s['size_min']}..{s['size_max']} "
    f"(official frequencies), fingerprint {str(table.fingerprint)[:23]}... -> {files.table}"
  )
  return 0


def _load_config(args, overrides):
  from mmts_jax.commands.train import parse_config

  config = parse_config(args.config, overrides)
  if args.no_progress:
    config.progress_bar = False
  return config


def _train(args, overrides) -> int:
  from mmts_jax import train
  from mmts_jax.projects.ek100_features.driver import finetune
  from mmts_jax.projects.ek100_features.mir_eval import format_mir

  config = _load_config(args, overrides)
  try:
    out = finetune(
      config,
      args.workdir,
      args.data,
      args.annotations,
      max_val_videos=args.val_videos,
      stop_at_step=args.stop_at_step,
    )
  except train.NonFiniteLossError as e:
    print(f"mmts finetune train: error: {e}", file=sys.stderr)
    return EXIT_NONFINITE
  m = out.train.last_metrics
  print(
    f"step {out.train.step}/{config.total_steps} ({out.train.status})"
    + (f"  loss {m['loss']:.4f}" if m else "")
  )
  with open(out.metrics) as f:
    shape = json.load(f)
  print(f"EK-100 MIR ({shape['videos']} videos x {shape['captions']} captions):")
  print(format_mir(out.scores))
  print(f"embeddings: {out.embeddings}")
  print(f"metrics: {out.metrics}")
  if args.out:
    _write_json(args.out, {"step": out.train.step, "metrics": out.scores})
  return 0


def _eval(args) -> int:
  from mmts_jax.projects.ek100_features.driver import evaluate
  from mmts_jax.projects.ek100_features.mir_eval import format_mir

  step, scores = evaluate(
    args.workdir, args.data, args.annotations, step=args.step, max_val_videos=args.val_videos
  )
  print(f"EK-100 MIR of {args.workdir} at step {step}:")
  print(format_mir(scores))
  if args.out:
    _write_json(args.out, {"step": step, "metrics": scores})
  return 0


def _zero_shot(args) -> int:
  from mmts_jax.eval.zero_shot import evaluate_checkpoint, format_table1, load_test_sets
  from mmts_jax.models import build_model
  from mmts_jax.projects.ek100_features.restore import load_config

  config = load_config(args.workdir)
  model = build_model(config.model)  # the input keys of its towers
  data = config.get("data", {})
  test_sets = load_test_sets(
    args.test_set,
    image_key=model.image_key,
    text_key=model.text_key,
    tokenizer=args.tokenizer or data.get("tokenizer") or None,
    image_size=args.image_size or int(data.get("image_size", 224)),
    text_len=args.text_len or int(data.get("text_len", 77)),
    captions_per_image=args.captions_per_image,
  )
  results = evaluate_checkpoint(args.workdir, test_sets, step=args.step)
  print(format_table1(results))
  if args.out:
    _write_json(args.out, results)
  return 0


def _main(argv: list[str]) -> int:
  from mmts_jax.commands.train import split_overrides

  rest, overrides = split_overrides(argv)
  args = _parser().parse_args(rest)
  if overrides and args.action != "train":
    raise errors.UserInputError(
      None, f"--config.* overrides apply to `train` only, not `{args.action}`"
    )
  if getattr(args, "out", None) and args.action != "prepare":
    errors.check_output_path(args.out, "--out")
  if getattr(args, "workdir", None) and args.action == "train":
    errors.check_output_dir(args.workdir, "--workdir")
  if args.action == "prepare":
    return _prepare(args)
  if args.action == "train":
    return _train(args, overrides)
  if args.action == "eval":
    return _eval(args)
  return _zero_shot(args)


def main(argv: list[str] | None = None) -> int:
  return errors.run("mmts finetune", _main, argv)


if __name__ == "__main__":
  sys.exit(main())
