"""`mmts eval`: retrieval R@K or EK-100 MIR mAP / nDCG from saved embeddings; json + a table.

  mmts eval retrieval --embeddings emb.npz [--captions-per-image 5] [--out metrics.json]
  mmts eval ek100 --embeddings emb.npz --annotations ../shared/data/ek100 [--out metrics.json]
  mmts eval ek100 --similarity sim.npy --relevancy rel.npy

Embeddings come as one `.npz` (keys below, renamable) or as separate `.npy` files. Retrieval
needs the image of each caption: a `text_to_image` array (in the npz or `--text-to-image`), or
`--captions-per-image K` for the COCO / Flickr30K layout (caption i describes image i // K).
EK-100 needs video and caption embeddings in the order of `EPIC_100_retrieval_test.csv` and
`EPIC_100_retrieval_test_sentence.csv` (or a ready similarity matrix), and the relevancy: built
from the annotation CSVs, or given as a `.npy`.
"""
from __future__ import annotations

import argparse
import io
import json
import sys

import numpy as np
from etils import epath

from mmts_jax.atomic_io import atomic_write_text, read_bytes


class InputError(ValueError):
  """A problem with the user's files or flags: reported in one line, exit status 2."""


def _open_npy(path: str):
  """`np.load` of a local file or an object (`gs://...`, downloaded whole)."""
  return np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)


def _load(path: str, key: str | None = None) -> np.ndarray:
  if not epath.Path(path).exists():
    raise InputError(f"no such file: {path}")
  if path.endswith(".npz"):
    with _open_npy(path) as data:
      if key not in data:
        raise InputError(f"{path} has no array {key!r}; it has {sorted(data.files)}")
      return data[key]
  if key is not None and not path.endswith(".npy"):
    raise InputError(f"{path}: expected a .npz or .npy file")
  return _open_npy(path)


def _pick(args, npz_key_attr: str, file_attr: str, what: str, required: bool = True):
  """An array from `--<file_attr>` if given, else from the `--embeddings` npz."""
  path = getattr(args, file_attr, None)
  if path:
    return _load(path)
  if args.embeddings:
    if args.embeddings.endswith(".npz"):
      key = getattr(args, npz_key_attr)
      if not epath.Path(args.embeddings).exists():
        raise InputError(f"no such file: {args.embeddings}")
      with _open_npy(args.embeddings) as data:
        if key in data:
          return data[key]
        if not required:
          return None
        raise InputError(f"{args.embeddings} has no {what} array {key!r}; it has "
                         f"{sorted(data.files)} (rename with --{npz_key_attr.replace('_', '-')})")
    raise InputError(f"--embeddings must be a .npz file, got {args.embeddings}")
  if required:
    raise InputError(f"missing {what}: give --embeddings FILE.npz or "
                     f"--{file_attr.replace('_', '-')} FILE.npy")
  return None


def _write_json(path: str, record: dict) -> None:
  """`record` as indented JSON at `path` (local or `gs://`), written atomically."""
  atomic_write_text(path, json.dumps(record, indent=2) + "\n")


# ---- retrieval -----------------------------------------------------------------------------------

def _retrieval(args) -> tuple[dict, str]:
  from mmts_jax.eval import retrieval_metrics
  image = _pick(args, "image_key", "image_emb", "image embedding")
  text = _pick(args, "text_key", "text_emb", "caption embedding")
  mapping = _pick(args, "map_key", "text_to_image", "caption->image", required=False)
  if args.captions_per_image:
    if mapping is not None:
      raise InputError("give either a text_to_image array or --captions-per-image, not both")
    if len(text) != args.captions_per_image * len(image):
      raise InputError(
          f"--captions-per-image {args.captions_per_image} needs {args.captions_per_image} x "
          f"{len(image)} = {args.captions_per_image * len(image)} captions, got {len(text)}")
    mapping = np.arange(len(text)) // args.captions_per_image
  if mapping is None:
    raise InputError(f"missing caption->image map: an array {args.map_key!r} in the npz, "
                     "--text-to-image FILE.npy, or --captions-per-image K")
  subsets = {}
  for spec in args.subset or []:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
      raise InputError(f"--subset wants NAME=MASK.npy, got {spec!r}")
    mask = _load(path)
    if mask.dtype != bool:
      if not np.isin(mask, (0, 1)).all():
        raise InputError(f"--subset {name}: {path} must hold a bool (or 0/1) mask")
      mask = mask.astype(bool)
    subsets[name] = mask
  block = tuple(args.block_size) if args.block_size else None
  metrics = retrieval_metrics(image, text, mapping, ks=tuple(args.ks), block_size=block,
                              normalize=not args.no_normalize, subsets=subsets)
  lines = [f"retrieval: {len(image)} images, {len(text)} captions"
           + ("" if args.no_normalize else " (cosine)")]
  header = "".join(f"{f'R@{k}':>8}" for k in args.ks) + f"{'medR':>8}{'queries':>9}"
  lines.append(f"{'':<16}{header}")
  for prefix in [""] + [f"{name}/" for name in subsets]:
    for side, label in (("t2i", "text->image"), ("i2t", "image->text")):
      p = f"{prefix}{side}/"
      row = "".join(f"{100 * metrics[f'{p}R@{k}']:8.2f}" for k in args.ks)
      row += f"{metrics[f'{p}medR']:8.1f}{metrics[f'{p}num_queries']:9d}"
      lines.append(f"{(prefix + label):<16}{row}")
    lines.append(f"{prefix + 'rsum':<16}{metrics[f'{prefix}rsum']:8.2f}")
  return {"task": "retrieval", "metrics": metrics,
          "inputs": {"images": int(len(image)), "captions": int(len(text)),
                     "normalize": not args.no_normalize, "ks": list(args.ks)}}, "\n".join(lines)


# ---- EK-100 MIR ----------------------------------------------------------------------------------

def _ek100(args) -> tuple[dict, str]:
  from mmts_jax.eval import ek100_relevancy, mir_metrics, read_ek100_mir
  if args.similarity:
    sim = _load(args.similarity)
  else:
    video = _pick(args, "video_key", "video_emb", "video embedding")
    text = _pick(args, "text_key", "text_emb", "caption embedding")
    if video.ndim != 2 or text.ndim != 2 or video.shape[1] != text.shape[1]:
      raise InputError(f"video and caption embeddings must be (n, dim) with one dim, got "
                       f"{video.shape} and {text.shape}")
    video, text = video.astype(np.float32), text.astype(np.float32)
    if not args.no_normalize:
      video = video / np.maximum(np.linalg.norm(video, axis=1, keepdims=True), 1e-8)
      text = text / np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-8)
    sim = video @ text.T
  if args.relevancy:
    rel = _load(args.relevancy)
  elif args.annotations:
    ann = read_ek100_mir(args.annotations)
    if sim.shape != ann.shape:
      raise InputError(
          f"the similarity is {sim.shape} but {args.annotations} has {ann.shape[0]} videos x "
          f"{ann.shape[1]} captions; embeddings must follow the CSV order")
    rel = ek100_relevancy(ann)
  else:
    raise InputError("missing relevancy: give --annotations DIR (the EK-100 CSVs) or "
                     "--relevancy FILE.npy")
  metrics = mir_metrics(sim, rel, num_threads=args.threads)
  lines = [f"EK-100 MIR: {sim.shape[0]} videos x {sim.shape[1]} captions",
           f"{'':<6}{'v->t':>8}{'t->v':>8}{'avg':>8}"]
  for name, score in metrics.items():
    lines.append(f"{name:<6}" + "".join(f"{100 * v:8.2f}" for v in score))
  flat = {f"{name}/{field}": float(v) for name, score in metrics.items()
          for field, v in score._asdict().items()}
  return {"task": "ek100_mir", "metrics": flat,
          "inputs": {"videos": int(sim.shape[0]), "captions": int(sim.shape[1])}}, \
      "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="mmts eval", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="task", required=True)
  r = sub.add_parser("retrieval", help="text<->image R@K and median rank")
  r.add_argument("--embeddings", help=".npz with the arrays below")
  r.add_argument("--image-key", default="image_emb")
  r.add_argument("--text-key", default="text_emb")
  r.add_argument("--map-key", default="text_to_image")
  r.add_argument("--image-emb", help="(N, D) .npy instead of the npz")
  r.add_argument("--text-emb", help="(M, D) .npy instead of the npz")
  r.add_argument("--text-to-image", help="(M,) int .npy: the image of each caption")
  r.add_argument("--captions-per-image", type=int,
                 help="caption i describes image i // K (COCO / Flickr30K order)")
  r.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
  r.add_argument("--block-size", type=int, nargs=2, metavar=("QUERIES", "KEYS"),
                 help="similarity tile on the device (default 1024 8192)")
  r.add_argument("--subset", action="append", metavar="NAME=MASK.npy",
                 help="(N,) bool mask over images; metrics are repeated for it (repeatable)")
  r.add_argument("--no-normalize", action="store_true", help="dot product, not cosine")
  r.add_argument("--out", help="metrics json (written atomically)")
  e = sub.add_parser("ek100", help="EK-100 multi-instance retrieval mAP / nDCG")
  e.add_argument("--embeddings", help=".npz with video and caption embeddings")
  e.add_argument("--video-key", default="video_emb")
  e.add_argument("--text-key", default="text_emb")
  e.add_argument("--video-emb", help="(9668, D) .npy instead of the npz")
  e.add_argument("--text-emb", help="(3842, D) .npy instead of the npz")
  e.add_argument("--similarity", help="(videos, captions) .npy instead of embeddings")
  e.add_argument("--annotations", help="folder with the EPIC_100_retrieval_test*.csv files")
  e.add_argument("--relevancy", help="(videos, captions) .npy instead of --annotations")
  e.add_argument("--threads", type=int, help="CPU threads (default: all usable)")
  e.add_argument("--no-normalize", action="store_true", help="dot product, not cosine")
  e.add_argument("--out", help="metrics json (written atomically)")
  return p


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    record, table = (_retrieval if args.task == "retrieval" else _ek100)(args)
  except (InputError, ValueError, TypeError) as e:
    print(f"mmts eval {args.task}: {e}", file=sys.stderr)
    return 2
  print(table)
  if args.out:
    _write_json(args.out, record)
    print(f"wrote {args.out}")
  return 0
