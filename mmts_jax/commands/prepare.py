"""`mmts prepare`: convert image-caption data to an ArrayRecord dataset, or inspect one.

  mmts prepare table pairs.tsv --images DIR --out data/mine     CSV/TSV + image folder
  mmts prepare wds 'cc3m/{00000..00331}.tar' --out data/cc3m    webdataset tar shards
  mmts prepare tfds coco_captions --data-dir ~/tensorflow_datasets --out data/coco
  mmts prepare inspect data/mine                                what a converted dataset holds

Conversion prints the number of records, the skipped samples and the dataset fingerprint that
the cluster table and the trainer check. Reading the result never needs TensorFlow.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Any

from mmts_jax.commands import errors
from mmts_jax.commands.help_format import HelpFormatter
from mmts_jax.errors import UserInputError


def _common(p: argparse.ArgumentParser) -> None:
  p.add_argument("--out", required=True, help="output directory of the converted dataset")
  p.add_argument(
    "--shorter-side",
    type=int,
    default=None,
    help="shrink images whose shorter side is larger (re-encoded as JPEG q95)",
  )
  p.add_argument(
    "--for-image-size",
    type=int,
    default=None,
    help="store images pre-resized for training crops of this size: shorter side "
    "ceil(N / sqrt(--crop-scale-min)), the smallest that loses nothing the crop keeps "
    "(2-3x less host decode+resize work per example)",
  )
  p.add_argument(
    "--crop-scale-min",
    type=float,
    default=0.9,
    help="smallest area fraction of the training crops (with --for-image-size)",
  )
  p.add_argument(
    "--on-error",
    choices=("skip", "raise"),
    default="skip",
    help="what to do with missing/undecodable images (default: skip and count)",
  )
  p.add_argument("--threads", type=int, default=8, help="image checking/resizing threads")
  p.add_argument(
    "--records-per-shard", type=int, default=50_000, help="records per ArrayRecord shard file"
  )
  p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="mmts prepare", description=__doc__, formatter_class=HelpFormatter
  )
  sub = p.add_subparsers(dest="source", required=True)

  def add(name, help_):
    return sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)

  t = add("table", "CSV/TSV of image paths and captions + an image folder")
  t.add_argument("table", help="CSV (comma) or TSV/TAB (tab) file")
  t.add_argument("--images", required=True, help="folder the image paths are relative to")
  t.add_argument("--image-column", default="image", help="header name or 0-based position")
  t.add_argument("--caption-column", default="caption", help="header name or 0-based position")
  t.add_argument("--label-column", default=None, help="optional int class label column")
  t.add_argument("--delimiter", default=None, help="default: tab for .tsv/.tab, else comma")
  t.add_argument("--no-header", action="store_true", help="the first row is data")
  _common(t)
  w = add("wds", "webdataset tar shards (key.jpg + key.txt)")
  w.add_argument("shards", nargs="+", help="tar paths, globs or {000..123} ranges")
  w.add_argument("--caption-ext", default="txt", help="extension of the caption member")
  w.add_argument("--label-ext", default=None, help="e.g. cls for an int label per sample")
  _common(w)
  f = add("tfds", "a TFDS dataset prepared in the array_record format")
  f.add_argument("name", help="TFDS name, e.g. coco_captions or coco_captions/2017:1.1.0")
  f.add_argument("--data-dir", default=None, help="TFDS data_dir (default: TFDS's own)")
  f.add_argument("--split", default="train", help="TFDS split")
  f.add_argument("--image-key", default="image", help="the image feature")
  f.add_argument("--caption-key", default="captions/text", help="'/' for nested features")
  f.add_argument("--label-key", default=None, help="an int class label feature, if any")
  f.add_argument(
    "--first-caption",
    action="store_true",
    help="one record per example (first caption) instead of one per caption",
  )
  _common(f)
  i = add("inspect", "print a converted dataset's manifest and first records")
  i.add_argument("data_dir", help="a dataset folder written by `mmts prepare`")
  i.add_argument("--num", type=int, default=3, help="records to show")
  return p


def _inspect(args) -> int:
  from mmts_jax.data import image_ops
  from mmts_jax.data.records import RecordSource

  src = RecordSource(args.data_dir)
  m = src.manifest
  print(f"{args.data_dir}: {m.num_records} records in {len(m.shards)} shard(s)")
  print(f"fingerprint: {m.fingerprint} (sha256 over the {m.fingerprint_of}s)")
  print(f"fields: {', '.join(sorted(m.fields))}")
  print(f"source: {m.source.get('kind')}, {m.source.get('skipped', 0)} samples skipped")
  for r in (src[k] for k in range(min(args.num, len(src)))):
    img = image_ops.open_image(r["image"])
    extra = f" label={r['label']}" if "label" in r else ""
    caption = repr(r["caption"][:60]) if "caption" in r else "-"
    print(
      f"  [{r['index']}] key={r['key']!r} {img.format} {img.width}x{img.height}{extra} "
      f"caption={caption}"
    )
  return 0


def _main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  if args.source == "inspect":
    return _inspect(args)
  errors.check_output_dir(args.out, "--out")
  fresh = not os.path.lexists(args.out)
  try:
    with errors.writing(args.out, "the dataset"):
      return _convert(args)
  except BaseException:
    if fresh and os.path.isdir(args.out):  # a half-written dataset of ours: leave nothing
      shutil.rmtree(args.out, ignore_errors=True)
    raise


def main(argv: list[str] | None = None) -> int:
  return errors.run("mmts prepare", _main, argv)


def _convert(args) -> int:
  from mmts_jax.data import convert

  shorter_side = args.shorter_side
  if args.for_image_size is not None:
    if shorter_side is not None:
      raise UserInputError(
        "--for-image-size", "given with --shorter-side", expected="one of the two"
      )
    from mmts_jax.data import image_ops

    try:
      shorter_side = image_ops.source_side(args.for_image_size, args.crop_scale_min)
    except ValueError as e:
      raise UserInputError("--for-image-size", str(e), expected="N >= 1, 0 < scale <= 1") from e
  common: dict[str, Any] = dict(
    shorter_side=shorter_side,
    on_error=args.on_error,
    threads=args.threads,
    records_per_shard=args.records_per_shard,
    overwrite=args.overwrite,
    log=lambda s: print(s, flush=True),
  )
  t0 = time.perf_counter()
  if args.source == "table":
    m = convert.convert_table(
      args.table,
      args.images,
      args.out,
      image_column=args.image_column,
      caption_column=args.caption_column,
      label_column=args.label_column,
      delimiter=args.delimiter,
      header=not args.no_header,
      **common,
    )
  elif args.source == "wds":
    m = convert.convert_webdataset(
      args.shards, args.out, caption_ext=args.caption_ext, label_ext=args.label_ext, **common
    )
  else:
    try:
      m = convert.convert_tfds(
        args.name,
        args.out,
        split=args.split,
        data_dir=args.data_dir,
        image_key=args.image_key,
        caption_key=args.caption_key or None,
        label_key=args.label_key,
        all_captions=not args.first_caption,
        **common,
      )
    except KeyError as e:  # a feature the dataset does not have (tfds_source names it)
      raise UserInputError(
        args.name,
        str(e.args[0] if e.args else e),
        expected="existing features (--image-key, --caption-key)",
      ) from e
    except Exception as e:  # noqa: BLE001 (TFDS's own class; its message lists every dataset)
      if type(e).__name__ != "DatasetNotFoundError":
        raise
      raise UserInputError(
        args.name,
        f"no such TFDS dataset in {args.data_dir or 'the default TFDS data_dir'}",
        expected="a dataset prepared with `tfds build "
        "--file_format=array_record`, and its --data-dir",
      ) from e
  dt = time.perf_counter() - t0
  skipped = m.source.get("skipped", 0)
  print(
    f"wrote {m.num_records} records to {args.out} ({len(m.shards)} shard(s), {skipped} "
    f"skipped) in {dt:.1f} s ({m.num_records / max(dt, 1e-9):.0f} records/s)"
  )
  for reason, count in sorted(m.source.get("skip_reasons", {}).items()):
    print(f"  skipped {count}: {reason}")
  print(f"fingerprint: {m.fingerprint} (sha256 over the {m.fingerprint_of}s)")
  print(f"fields: {', '.join(sorted(m.fields))}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
