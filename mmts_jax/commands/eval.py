"""`mmts eval`: retrieval R@K or EK-100 MIR mAP / nDCG from saved embeddings; json + a table.

  mmts eval retrieval --embeddings emb.npz [--captions-per-image 5] [--out metrics.json]
  mmts eval ek100 --embeddings emb.npz --annotations ../shared/data/ek100 [--out metrics.json]
  mmts eval ek100 --similarity sim.npy --relevancy rel.npy
  ... --longtail CLUSTERS.npy [--cluster-sizes SIZES.npy]   # + R@K/mAP/nDCG by head/middle/tail

`--longtail` (both tasks) adds the long-tail table of `mmts_jax.eval.longtail`: the `(N,)` cluster
(or class) id of every image / video; a caption takes its image's id (retrieval) or its segment's
(EK-100, captions follow `EPIC_100_retrieval_test_sentence.csv`, whose ids then go in a second
file via `--text-clusters`). Bucket sizes are the ids' counts unless `--cluster-sizes` gives a
size (frequency) per id. Retrieval's relevancy for mAP/nDCG is `[same id]`; EK-100's is its own.

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
import os

import numpy as np

from mmts_jax import array_files
from mmts_jax.atomic_io import atomic_write, read_bytes
from mmts_jax.commands import errors
from mmts_jax.commands.help_format import HelpFormatter
from mmts_jax.errors import UserInputError


class InputError(UserInputError):
  """A problem with the user's files or flags: reported in one line, exit status 2."""

  def __init__(self, message: str):
    super().__init__(None, message)


def _open_npy(path: str):
  """`np.load` of a local file or an object (`gs://...`, downloaded whole)."""
  return np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)


def _load(path: str, key: str | None = None) -> np.ndarray:
  """An array from a `.npy`, or array `key` of a `.npz`; never unpickles."""
  if path.endswith(".npz"):
    # No key: the "has no array" error lists the arrays the file has.
    return array_files.load_npz_array(path, str(key))
  if key is not None and not path.endswith(".npy"):
    raise UserInputError(path, "unknown array file type", expected="a .npz or .npy file")
  return array_files.load_npy(path)


def _pick(args, npz_key_attr: str, file_attr: str, what: str, required: bool = True):
  """An array from `--<file_attr>` if given, else from the `--embeddings` npz."""
  path = getattr(args, file_attr, None)
  if path:
    return _load(path)
  if args.embeddings:
    if args.embeddings.endswith(".npz"):
      key = getattr(args, npz_key_attr)
      return array_files.load_npz_array(
        args.embeddings,
        key,
        required=required,
        expected=f"a .npz with the {what} array {key!r}",
        hint=f" (rename with --{npz_key_attr.replace('_', '-')})",
      )
    raise UserInputError(
      args.embeddings, "--embeddings is not a .npz file", expected="a .npz archive of arrays"
    )
  if required:
    raise InputError(
      f"missing {what}: give --embeddings FILE.npz or --{file_attr.replace('_', '-')} FILE.npy"
    )
  return None


def _embeddings(
  args, key_attr: str, file_attr: str, what: str
) -> tuple[np.ndarray, str, str | None]:
  """A (n, dim) finite float embedding matrix, with the file and key it came from."""
  x = _pick(args, key_attr, file_attr, what)
  assert x is not None, "_pick(required=True) raises rather than return None"
  path = getattr(args, file_attr, None) or args.embeddings
  key = None if getattr(args, file_attr, None) else getattr(args, key_attr)
  array_files.check_matrix(x, path, key)
  return x, path, key


def _write_json(path: str, record: dict) -> None:
  with errors.writing(path, "the metrics"):
    atomic_write(path, lambda f: f.write((json.dumps(record, indent=2) + "\n").encode()))


# ---- retrieval -----------------------------------------------------------------------------------


def _retrieval(args) -> tuple[dict, str]:
  from mmts_jax.eval import retrieval_metrics

  image, ipath, ikey = _embeddings(args, "image_key", "image_emb", "image embedding")
  text, tpath, tkey = _embeddings(args, "text_key", "text_emb", "caption embedding")
  if image.shape[1] != text.shape[1]:
    raise UserInputError(
      tpath,
      f"caption embeddings are {text.shape[1]}-d, the image "
      f"embeddings ({ipath}) {image.shape[1]}-d",
      key=tkey,
      expected="the same width in both modalities",
    )
  mapping = _pick(args, "map_key", "text_to_image", "caption->image", required=False)
  if mapping is not None:
    mpath = args.text_to_image or args.embeddings
    mkey = None if args.text_to_image else args.map_key
    if mapping.ndim != 1 or mapping.dtype.kind not in "iu":
      raise UserInputError(
        mpath,
        f"has dtype {mapping.dtype} shape {mapping.shape}",
        key=mkey,
        expected=f"a ({len(text)},) integer array: each caption's image",
      )
    if len(mapping) != len(text) or (
      len(mapping) and (mapping.min() < 0 or mapping.max() >= len(image))
    ):
      raise UserInputError(
        mpath,
        f"has {len(mapping)} entries in [{mapping.min()}, {mapping.max()}]",
        key=mkey,
        expected=f"{len(text)} image indices in [0, {len(image)})",
      )
  if args.captions_per_image:
    if mapping is not None:
      raise InputError("give either a text_to_image array or --captions-per-image, not both")
    if len(text) != args.captions_per_image * len(image):
      raise InputError(
        f"--captions-per-image {args.captions_per_image} needs {args.captions_per_image} x "
        f"{len(image)} = {args.captions_per_image * len(image)} captions, got {len(text)}"
      )
    mapping = np.arange(len(text)) // args.captions_per_image
  if mapping is None:
    raise InputError(
      f"missing caption->image map: an array {args.map_key!r} in the npz, "
      "--text-to-image FILE.npy, or --captions-per-image K"
    )
  subsets = {}
  for spec in args.subset or []:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
      raise InputError(f"--subset wants NAME=MASK.npy, got {spec!r}")
    mask = _load(path)
    if mask.dtype != bool:
      if mask.dtype.kind not in "iuf" or not np.isin(mask, (0, 1)).all():
        raise UserInputError(
          path, f"--subset {name} has dtype {mask.dtype}", expected="a bool (or 0/1) mask"
        )
      mask = mask.astype(bool)
    if mask.shape != (len(image),):
      raise UserInputError(
        path,
        f"--subset {name} has shape {mask.shape}",
        expected=f"a ({len(image)},) mask over the images",
      )
    subsets[name] = mask
  block = tuple(args.block_size) if args.block_size else None
  metrics = retrieval_metrics(
    image,
    text,
    mapping,
    ks=tuple(args.ks),
    block_size=block,
    normalize=not args.no_normalize,
    subsets=subsets,
  )
  lines = [
    f"retrieval: {len(image)} images, {len(text)} captions"
    + ("" if args.no_normalize else " (cosine)")
  ]
  header = "".join(f"{f'R@{k}':>8}" for k in args.ks) + f"{'medR':>8}{'queries':>9}"
  lines.append(f"{'':<16}{header}")
  for prefix in [""] + [f"{name}/" for name in subsets]:
    for side, label in (("t2i", "text->image"), ("i2t", "image->text")):
      p = f"{prefix}{side}/"
      row = "".join(f"{100 * metrics[f'{p}R@{k}']:8.2f}" for k in args.ks)
      row += f"{metrics[f'{p}medR']:8.1f}{metrics[f'{p}num_queries']:9d}"
      lines.append(f"{(prefix + label):<16}{row}")
    lines.append(f"{prefix + 'rsum':<16}{metrics[f'{prefix}rsum']:8.2f}")
  if args.longtail:
    from mmts_jax.eval import label_relevancy

    im, tx = image.astype(np.float32), text.astype(np.float32)
    if not args.no_normalize:
      im = im / np.maximum(np.linalg.norm(im, axis=1, keepdims=True), 1e-8)
      tx = tx / np.maximum(np.linalg.norm(tx, axis=1, keepdims=True), 1e-8)
    ids = _load(args.longtail)
    if ids.shape != (len(image),):
      raise InputError(
        f"--longtail must hold one cluster id per image ({len(image)}), got shape {ids.shape}"
      )
    _add_longtail(
      args,
      metrics,
      lines,
      im @ tx.T,
      label_relevancy(ids, ids[mapping]),
      ids,
      ids[mapping],
      positives=mapping[None, :] == np.arange(len(image))[:, None],
    )
  return {
    "task": "retrieval",
    "metrics": metrics,
    "inputs": {
      "images": int(len(image)),
      "captions": int(len(text)),
      "normalize": not args.no_normalize,
      "ks": list(args.ks),
    },
  }, "\n".join(lines)


# ---- EK-100 MIR ----------------------------------------------------------------------------------


def _val_videos(value: str) -> int | list[str]:
  """`--val-videos`: a count, a file of video ids (one per line) or a comma-separated list."""
  value = value.strip()
  if value.isdigit():
    return int(value)
  if os.path.isfile(value):
    text = read_bytes(value).decode("utf-8", errors="replace")
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
      raise InputError(f"--val-videos {value}: the file holds no video id")
    return ids
  return [v.strip() for v in value.split(",") if v.strip()]


def _ek100(args) -> tuple[dict, str]:
  from mmts_jax.eval import ek100_relevancy, mir_metrics, read_ek100_mir, video_subset

  if args.val_videos is not None and not args.annotations:
    raise InputError(
      "--val-videos needs --annotations DIR (the captions of the kept videos "
      "come from the EK-100 CSVs)"
    )
  if args.similarity:
    sim = array_files.check_matrix(_load(args.similarity), args.similarity)
  else:
    video, vpath, vkey = _embeddings(args, "video_key", "video_emb", "video embedding")
    text, tpath, tkey = _embeddings(args, "text_key", "text_emb", "caption embedding")
    if video.shape[1] != text.shape[1]:
      raise UserInputError(
        tpath,
        f"caption embeddings are {text.shape[1]}-d, the video "
        f"embeddings ({vpath}) {video.shape[1]}-d",
        key=tkey,
        expected="the same width in both modalities",
      )
    video, text = video.astype(np.float32), text.astype(np.float32)
    if not args.no_normalize:
      video = video / np.maximum(np.linalg.norm(video, axis=1, keepdims=True), 1e-8)
      text = text / np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-8)
    sim = video @ text.T
  if args.relevancy:
    rel = array_files.check_matrix(_load(args.relevancy), args.relevancy)
    if rel.shape != sim.shape:
      raise UserInputError(
        args.relevancy,
        f"has shape {rel.shape}",
        expected=f"the similarity's shape {sim.shape} (videos, captions)",
      )
  elif args.annotations:
    ann = read_ek100_mir(args.annotations)
    if sim.shape != ann.shape:
      raise UserInputError(
        args.similarity or args.embeddings or args.video_emb,
        f"gives a {sim.shape[0]} x {sim.shape[1]} similarity",
        expected=f"{ann.shape[0]} videos x {ann.shape[1]} captions in the "
        f"order of the CSVs in {args.annotations}",
      )
    rel = ek100_relevancy(ann)
    if args.val_videos is not None:
      try:
        keep_v, keep_c = video_subset(ann, _val_videos(args.val_videos))
      except ValueError as e:
        raise InputError(f"--val-videos {args.val_videos}: {e}") from None
      sim, rel = sim[np.ix_(keep_v, keep_c)], rel[np.ix_(keep_v, keep_c)]
  else:
    raise InputError(
      "missing relevancy: give --annotations DIR (the EK-100 CSVs) or --relevancy FILE.npy"
    )
  metrics = mir_metrics(sim, rel, num_threads=args.threads)
  lines = [
    f"EK-100 MIR: {sim.shape[0]} videos x {sim.shape[1]} captions",
    f"{'':<6}{'v->t':>8}{'t->v':>8}{'avg':>8}",
  ]
  for name, score in metrics.items():
    lines.append(f"{name:<6}" + "".join(f"{100 * v:8.2f}" for v in score))
  flat = {
    f"{name}/{field}": float(v)
    for name, score in metrics.items()
    for field, v in score._asdict().items()
  }
  if args.longtail:
    if not args.text_clusters:
      raise InputError("--longtail for ek100 also needs --text-clusters (one id per caption)")
    _add_longtail(
      args,
      flat,
      lines,
      sim,
      rel,
      _load(args.longtail),
      _load(args.text_clusters),
      positives=rel >= 1,
    )
  return {
    "task": "ek100_mir",
    "metrics": flat,
    "inputs": {"videos": int(sim.shape[0]), "captions": int(sim.shape[1])},
  }, "\n".join(lines)


def _add_longtail(args, metrics, lines, sim, rel, image_ids, text_ids, positives) -> None:
  """Adds the head / middle / tail table (`eval.longtail_report`) to the metrics and the lines."""
  from mmts_jax.eval import format_longtail, longtail_report

  if not (np.issubdtype(image_ids.dtype, np.integer) and np.issubdtype(text_ids.dtype, np.integer)):
    raise InputError(f"cluster ids must be integers, got {image_ids.dtype} / {text_ids.dtype}")
  sizes = (
    _load(args.cluster_sizes)
    if args.cluster_sizes
    else np.bincount(image_ids, minlength=int(max(image_ids.max(), text_ids.max())) + 1)
  )
  ks = tuple(getattr(args, "ks", None) or (1, 5, 10))
  report = longtail_report(
    sim.astype(np.float32),
    rel,
    image_clusters=image_ids,
    text_clusters=text_ids,
    cluster_sizes=sizes,
    positives=positives,
    ks=ks,
    scheme=args.bucket_scheme,
    num_threads=args.threads,
  )
  metrics.update({f"longtail/{b}/{k}": v for b, row in report.items() for k, v in row.items()})
  lines += [
    f"long tail (buckets by {args.bucket_scheme} of cluster size)",
    format_longtail(report, ks),
  ]


def _longtail_flags(p) -> None:
  p.add_argument(
    "--longtail",
    metavar="CLUSTERS.npy",
    help="(N,) int cluster / class id per image (video): adds the bucket table",
  )
  p.add_argument(
    "--cluster-sizes",
    metavar="SIZES.npy",
    help="(C,) size or frequency of each id (default: the ids' counts)",
  )
  p.add_argument(
    "--bucket-scheme",
    default="share",
    choices=("share", "terciles"),
    help="head/middle/tail edges: cumulative share of samples, or terciles of K",
  )


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="mmts eval", description=__doc__, formatter_class=HelpFormatter)
  sub = p.add_subparsers(dest="task", required=True)
  r = sub.add_parser(
    "retrieval",
    help="text<->image R@K and median rank",
    description="Text<->image retrieval R@K and median rank from embeddings.",
    formatter_class=HelpFormatter,
  )
  r.add_argument("--embeddings", help=".npz with the arrays below")
  r.add_argument("--image-key", default="image_emb", help="(N, D) image embeddings in the npz")
  r.add_argument("--text-key", default="text_emb", help="(M, D) caption embeddings in the npz")
  r.add_argument(
    "--map-key",
    default="text_to_image",
    help="(M,) int array in the npz: the image of each caption",
  )
  r.add_argument("--image-emb", help="(N, D) .npy instead of the npz")
  r.add_argument("--text-emb", help="(M, D) .npy instead of the npz")
  r.add_argument("--text-to-image", help="(M,) int .npy: the image of each caption")
  r.add_argument(
    "--captions-per-image",
    type=int,
    help="caption i describes image i // K (COCO / Flickr30K order)",
  )
  r.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10], help="the K of R@K")
  r.add_argument(
    "--block-size",
    type=int,
    nargs=2,
    metavar=("QUERIES", "KEYS"),
    help="similarity tile on the device (default 1024 8192)",
  )
  r.add_argument(
    "--subset",
    action="append",
    metavar="NAME=MASK.npy",
    help="(N,) bool mask over images; metrics are repeated for it (repeatable)",
  )
  r.add_argument("--no-normalize", action="store_true", help="dot product, not cosine")
  r.add_argument("--out", help="metrics json (written atomically)")
  r.add_argument("--threads", type=int, help="CPU threads of the long-tail table")
  _longtail_flags(r)
  e = sub.add_parser(
    "ek100",
    help="EK-100 multi-instance retrieval mAP / nDCG",
    description="EPIC-KITCHENS-100 multi-instance retrieval mAP and nDCG.",
    formatter_class=HelpFormatter,
  )
  e.add_argument("--embeddings", help=".npz with video and caption embeddings")
  e.add_argument("--video-key", default="video_emb", help="(9668, D) video embeddings in the npz")
  e.add_argument("--text-key", default="text_emb", help="(3842, D) caption embeddings in the npz")
  e.add_argument("--video-emb", help="(9668, D) .npy instead of the npz")
  e.add_argument("--text-emb", help="(3842, D) .npy instead of the npz")
  e.add_argument("--similarity", help="(videos, captions) .npy instead of embeddings")
  e.add_argument("--annotations", help="folder with the EPIC_100_retrieval_test*.csv files")
  e.add_argument("--relevancy", help="(videos, captions) .npy instead of --annotations")
  e.add_argument(
    "--val-videos",
    metavar="N|IDS|FILE",
    help="score some videos and their captions only (needs --annotations): the first N, a "
    "comma-separated list of video ids (narration_id of EPIC_100_retrieval_test.csv), or a "
    "text file of ids, one per line (default: all)",
  )
  e.add_argument("--threads", type=int, help="CPU threads (default: all usable)")
  e.add_argument("--no-normalize", action="store_true", help="dot product, not cosine")
  e.add_argument("--out", help="metrics json (written atomically)")
  _longtail_flags(e)
  e.add_argument("--text-clusters", metavar="IDS.npy", help="(captions,) ids for --longtail")
  return p


def _main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  if args.out:
    errors.check_output_path(args.out, "--out")
  record, table = (_retrieval if args.task == "retrieval" else _ek100)(args)
  print(table)
  if args.out:
    _write_json(args.out, record)
    print(f"wrote {args.out}")
  return 0


def main(argv: list[str] | None = None) -> int:
  return errors.run("mmts eval", _main, argv)
