"""One-off conversion of image-caption data to an ArrayRecord dataset (`records.py` layout).

Sources:
  * `convert_table`: a CSV/TSV of (image path, caption[, label]) plus an image folder;
  * `convert_webdataset`: webdataset tar shards (`key.jpg` + `key.txt` [+ `key.cls`]), the way
    img2dataset stores CC3M/CC12M;
  * `convert_tfds`: a TFDS dataset by name and `data_dir`, read through `tfds.data_source`, which
    needs the dataset prepared in the `array_record` file format but no TensorFlow.

Images are checked by decoding them; undecodable or missing ones are skipped (or raise, with
`on_error="raise"`) and counted in the manifest. They are stored as found (JPEG/PNG), or
re-encoded as JPEG when `shorter_side` shrinks them or their format is another one. Record
numbers are assigned in source order after skipping, so a dataset's `index` is stable as long
as the converted directory is.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import itertools
import os
import pathlib
import re
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from mmts_jax.data import image_ops
from mmts_jax.data.records import Manifest, RecordWriter
from mmts_jax.data.tfds_source import as_text, lookup_feature, open_tfds
from mmts_jax.errors import UserInputError

__all__ = [
  "convert_table",
  "convert_webdataset",
  "convert_tfds",
  "expand_shards",
  "encode_for_storage",
]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
_KEEP_FORMATS = ("JPEG", "PNG")


class _Skip(Exception):
  """A sample that cannot be converted: `reason` (counted in the manifest) and `detail`."""

  def __init__(self, reason: str, detail: str = "", key: str | None = None):
    super().__init__(reason, detail, key)
    self.reason, self.detail, self.key = reason, detail, key

  def __str__(self) -> str:
    where = f"{self.key}: " if self.key is not None else ""
    return f"{where}{self.reason}" + (f" ({self.detail})" if self.detail else "")


def encode_for_storage(data: bytes, shorter_side: int | None = None, quality: int = 95) -> bytes:
  """Checks that `data` decodes; returns it unchanged, or re-encoded as JPEG when resized/foreign.

  Raises `_Skip` (the reason a sample is skipped) for data PIL cannot decode, or whose size
  exceeds `image_ops.MAX_IMAGE_PIXELS` (refused before decoding).
  """
  try:
    img = image_ops.open_image(data)  # refuses huge images before decoding them
    fmt = img.format
    img.load()
  except image_ops.ImageTooLargeError as e:
    raise _Skip("image too large", str(e)) from None
  except Exception as e:  # PIL raises many types for corrupt files
    raise _Skip("undecodable image", f"{type(e).__name__}: {e}") from None
  if shorter_side is not None and min(img.size) > shorter_side:
    return image_ops.encode_jpeg(
      image_ops.shrink_shorter_side(image_ops.decode_image(img), shorter_side), quality
    )
  if fmt not in _KEEP_FORMATS:
    return image_ops.encode_jpeg(image_ops.decode_image(img), quality)
  return data


def _parallel_ordered(fn: Callable, items: Iterable, threads: int, chunk: int = 512) -> Iterator:
  """`map(fn, items)` on a thread pool, in order, holding at most `chunk` items in flight."""
  if threads <= 1:
    yield from map(fn, items)
    return
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    it = iter(items)
    while block := list(itertools.islice(it, chunk)):
      yield from pool.map(fn, block)


def _write(
  out_dir,
  samples: Iterable[dict],
  *,
  source: dict,
  shorter_side: int | None,
  on_error: str,
  threads: int,
  records_per_shard: int,
  overwrite: bool,
  log: Callable[[str], None] | None,
) -> Manifest:
  """Writes samples (dicts whose `image` is raw bytes or a `_Skip`) as records."""
  if on_error not in ("skip", "raise"):
    raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")

  def prepare(sample: dict):
    try:
      if isinstance(sample.get("image"), _Skip):
        raise sample["image"]
      return {**sample, "image": encode_for_storage(sample["image"], shorter_side)}
    except _Skip as e:
      return _Skip(e.reason, e.detail, sample.get("key"))

  skipped, reasons = 0, collections.Counter()
  first: list[str] = []
  t0 = time.perf_counter()
  writer = RecordWriter(
    out_dir, records_per_shard=records_per_shard, overwrite=overwrite, source=source
  )
  try:
    for n, result in enumerate(_parallel_ordered(prepare, samples, threads), 1):
      if isinstance(result, _Skip):
        if on_error == "raise":
          raise ValueError(f"cannot convert sample {result}")
        skipped += 1
        reasons[result.reason] += 1
        if len(first) < 5:
          first.append(str(result))
      else:
        writer.write(result)
      if log is not None and n % 10_000 == 0:
        log(
          f"  {n} samples, {writer.num_records} written, {skipped} skipped, "
          f"{n / (time.perf_counter() - t0):.0f} samples/s"
        )
    writer.update_source(skipped=skipped, skip_reasons=dict(reasons), first_skipped=first)
    return writer.close()
  except BaseException:
    writer.abort()
    raise


def _text_lines(f, table) -> Iterator[str]:
  """UTF-8 lines of a binary file, decoded one by one so that an error names its line."""
  for line_no, raw in enumerate(f, 1):
    if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
      raw = raw[3:]
    if b"\x00" in raw:
      raise UserInputError(
        table, "contains a NUL byte", line=line_no, expected="a UTF-8 text table"
      )
    try:
      yield raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise UserInputError(
        table, f"is not UTF-8 ({e.reason})", line=line_no, expected="a UTF-8 text table"
      ) from None


def _table_error(table, line: int, e: Exception) -> UserInputError:
  if isinstance(e, UnicodeDecodeError):
    return UserInputError(
      table, f"is not UTF-8 ({e.reason})", line=line, expected="a UTF-8 text table"
    )
  return UserInputError(
    table, f"malformed ({e})", line=line, expected='CSV quoting that closes ("..." with "" inside)'
  )


def _column(
  header: Sequence[str] | None,
  col: str | int | None,
  what: str,
  table: str | os.PathLike = "the table",
) -> int | None:
  if col is None:
    return None
  if isinstance(col, int) or (isinstance(col, str) and col.isdigit()):
    return int(col)
  if header is None:
    raise UserInputError(
      table,
      f"{what} column {col!r} is a name but the table has no header",
      expected="a 0-based column position",
    )
  if col not in header:
    raise UserInputError(
      table,
      f"has no {what} column {col!r}, only {list(header)}",
      line=1,
      expected=f"a header with {col!r} (or a 0-based position)",
    )
  return header.index(col)


def convert_table(
  table: str | os.PathLike,
  image_dir: str | os.PathLike,
  out_dir,
  *,
  image_column: str | int = "image",
  caption_column: str | int = "caption",
  label_column: str | int | None = None,
  delimiter: str | None = None,
  header: bool = True,
  shorter_side: int | None = None,
  on_error: str = "skip",
  threads: int = 8,
  records_per_shard: int = 50_000,
  overwrite: bool = False,
  log: Callable[[str], None] | None = None,
) -> Manifest:
  """CSV/TSV rows (image path relative to `image_dir`, caption[, int label]) -> records.

  The delimiter defaults to a tab for `.tsv`/`.tab` files (read without quoting, as TSV has
  none), else a comma (RFC 4180 quoting). Columns are header names or 0-based positions
  (`header=False` for headerless files such as CC3M's TSV).

  Example:
    >>> import tempfile
    >>> from mmts_jax.data.sample_images import write_image_folder
    >>> tsv = write_image_folder(tempfile.mkdtemp(), 10)  # images/ and pairs.tsv
    >>> m = convert_table(tsv, tsv.parent, pathlib.Path(tempfile.mkdtemp()) / "pairs", threads=1)
    >>> m.num_records, m.fingerprint[:15]
    (10, 'sha256:ddede734')
  """
  table, image_dir = pathlib.Path(table), pathlib.Path(image_dir)
  if not table.is_file():
    raise FileNotFoundError(f"table {table} does not exist")
  if not image_dir.is_dir():
    raise FileNotFoundError(f"image folder {image_dir} does not exist")
  if delimiter is None:
    delimiter = "\t" if table.suffix.lower() in (".tsv", ".tab") else ","

  def samples() -> Iterator[dict]:
    with open(table, "rb") as f:
      # TSV has no quoting (captions such as `the "best" cat` are literal); CSV has RFC 4180's.
      quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
      rows = csv.reader(_text_lines(f, table), delimiter=delimiter, quoting=quoting, strict=True)
      line = 1
      try:
        head = next(rows) if header else None
      except StopIteration:
        raise UserInputError(table, "is empty", expected="a header and rows") from None
      except (UnicodeDecodeError, csv.Error) as e:
        raise _table_error(table, 1, e) from None
      ci = _column(head, image_column, "image", table)
      cc = _column(head, caption_column, "caption", table)
      cl = _column(head, label_column, "label", table)
      assert ci is not None and cc is not None, "image and caption columns are never None"
      needed = max(c for c in (ci, cc, cl) if c is not None) + 1
      count = 0
      while True:
        line = rows.line_num + 1
        try:
          row = next(rows)
        except StopIteration:
          break
        except (UnicodeDecodeError, csv.Error) as e:
          raise _table_error(table, line, e) from None
        if not row:
          continue
        if len(row) < needed or (head is not None and len(row) != len(head)):
          raise UserInputError(
            table,
            f"row has {len(row)} fields",
            line=line,
            expected=f"{len(head) if head is not None else needed} fields (one per column)",
          )
        if any("\x00" in field for field in row):
          raise UserInputError(
            table, "contains a NUL byte", line=line, expected="a UTF-8 text table"
          )
        rel = row[ci]
        if not rel or os.path.isabs(rel) or ".." in pathlib.PurePath(rel).parts:
          raise UserInputError(
            table,
            f"image path {rel!r}",
            line=line,
            expected=f"a relative path inside {image_dir} (no '..')",
          )
        path = image_dir / rel
        try:
          data = path.read_bytes()
        except OSError as e:
          data = _Skip("missing image", type(e).__name__)
        sample = {"key": rel, "image": data, "caption": row[cc]}
        if cl is not None:
          try:
            sample["label"] = int(row[cl])
          except ValueError:
            raise UserInputError(
              table, f"label {row[cl]!r}", line=line, expected="an integer class label"
            ) from None
        count += 1
        yield sample
      if count == 0:
        raise UserInputError(table, "has no rows", expected="at least one (image, caption) row")

  source = {
    "kind": "table",
    "table": str(table),
    "image_dir": str(image_dir),
    "shorter_side": shorter_side,
  }
  return _write(
    out_dir,
    samples(),
    source=source,
    shorter_side=shorter_side,
    on_error=on_error,
    threads=threads,
    records_per_shard=records_per_shard,
    overwrite=overwrite,
    log=log,
  )


_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(patterns: str | Sequence[str]) -> list[str]:
  """webdataset shard specs -> paths: `{000..012}` ranges (zero padding kept) and globs.

  Example:
    >>> expand_shards("cc3m-{00..02}.tar")
    ['cc3m-00.tar', 'cc3m-01.tar', 'cc3m-02.tar']
  """
  import glob

  out: list[str] = []
  for pat in [patterns] if isinstance(patterns, str) else patterns:
    m = _BRACES.search(pat)
    if m:
      lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
      if lo > hi:
        raise ValueError(f"empty shard range {m.group(0)} in {pat!r}")
      out += expand_shards(
        [pat[: m.start()] + f"{i:0{width}d}" + pat[m.end() :] for i in range(lo, hi + 1)]
      )
    elif any(ch in pat for ch in "*?["):
      found = sorted(glob.glob(pat))
      if not found:
        raise FileNotFoundError(f"no shard matches {pat!r}")
      out += found
    else:
      out.append(pat)
  return out


def _split_key(name: str) -> tuple[str, str]:
  """webdataset naming: `dir/abc.seg.jpg` -> key `dir/abc`, field `seg.jpg` (lower case)."""
  d, _, base = name.rpartition("/")
  stem, dot, ext = base.partition(".")
  return (f"{d}/{stem}" if d else stem), ext.lower()


# A member larger than this is refused rather than read into memory (images and captions of
# image-text shards are kilobytes to a few megabytes).
MAX_MEMBER_BYTES = 256 << 20


def _dir(name: str) -> tarfile.TarInfo:
  info = tarfile.TarInfo(name)
  info.type = tarfile.DIRTYPE
  return info


def check_member(shard: str, member: tarfile.TarInfo) -> bool:
  """True for a regular file to read, False for a directory to pass over; refuses the rest.

  webdataset members are read into memory, never extracted, but a shard from elsewhere is
  untrusted: absolute names, `..` components, symbolic or hard links, device files and FIFOs
  have no place in one and are refused, naming the shard and the member.

  Example:
    >>> check_member("s.tar", tarfile.TarInfo("0001.jpg")), check_member("s.tar", _dir("d"))
    (True, False)
    >>> check_member("s.tar", tarfile.TarInfo("../0001.jpg"))
    Traceback (most recent call last):
    ...
    mmts_jax.errors.UserInputError: s.tar: tar member '../0001.jpg' has an absolute path or '..';
    expected members with relative names inside the shard
  """
  name = member.name
  parts = pathlib.PurePosixPath(name).parts
  if name.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", name):
    raise UserInputError(
      shard,
      f"tar member {name!r} has an absolute path or '..'",
      expected="members with relative names inside the shard",
    )
  if member.issym() or member.islnk():
    raise UserInputError(
      shard,
      f"tar member {name!r} is a link (to {member.linkname!r})",
      expected="regular files only",
    )
  if member.isdir():
    return False
  if not member.isfile():
    raise UserInputError(
      shard, f"tar member {name!r} is a device file or FIFO", expected="regular files only"
    )
  if member.size > MAX_MEMBER_BYTES:
    raise UserInputError(
      shard,
      f"tar member {name!r} has {member.size} bytes",
      expected=f"at most {MAX_MEMBER_BYTES} bytes per member",
    )
  return True


def _tar_samples(paths: Sequence[str], caption_ext: str, label_ext: str | None) -> Iterator[dict]:
  for path in paths:
    try:
      tar = tarfile.open(path, "r|*")  # streaming: shards may be large
    except tarfile.TarError as e:
      raise UserInputError(
        path, f"is not a tar file ({e})", expected="a webdataset .tar shard"
      ) from None
    with tar:
      key, fields = None, {}
      members = iter(tar)
      while True:
        try:
          member = next(members, None)
          if member is not None and not check_member(path, member):
            continue
          k, ext = _split_key(member.name) if member is not None else (None, None)
          if k != key and key is not None:
            sample = _wds_sample(path, key, fields, caption_ext, label_ext)
          else:
            sample = None
          if member is not None:
            member_file = tar.extractfile(member)
            assert member_file is not None, "check_member passes regular files only"
            data = member_file.read()
        except (tarfile.TarError, EOFError, OSError) as e:
          raise UserInputError(
            path,
            f"is truncated or corrupt ({type(e).__name__}: {e})",
            expected="a complete webdataset .tar shard",
          ) from None
        if sample is not None:
          yield sample
          fields = {}
        if member is None:
          break
        key = k
        fields[ext] = data


def _wds_sample(path: str, key: str, fields: dict, caption_ext: str, label_ext: str | None):
  image = next((fields[e] for e in IMAGE_EXTS if e in fields), None)
  sample: dict[str, Any] = {"key": key}
  if image is None:
    sample["image"] = _Skip("no image file", f"has {sorted(fields)} in {os.path.basename(path)}")
  elif caption_ext not in fields:
    sample["image"] = _Skip(f"no .{caption_ext} caption", f"in {os.path.basename(path)}")
  else:
    sample["image"] = image
  try:
    sample["caption"] = fields.get(caption_ext, b"").decode("utf-8").strip()
  except UnicodeDecodeError as e:
    raise UserInputError(
      path, f"caption {key}.{caption_ext} is not UTF-8 ({e.reason})", expected="UTF-8 caption files"
    ) from None
  if label_ext is not None:
    if label_ext not in fields:
      sample["image"] = _Skip(f"no .{label_ext} label", f"in {os.path.basename(path)}")
    else:
      text = fields[label_ext].decode("utf-8", "replace").strip()
      try:
        sample["label"] = int(text)
      except ValueError:
        raise UserInputError(
          path, f"label {key}.{label_ext} is {text[:40]!r}", expected="an integer class label"
        ) from None
  return sample


def convert_webdataset(
  shards: str | Sequence[str],
  out_dir,
  *,
  caption_ext: str = "txt",
  label_ext: str | None = None,
  shorter_side: int | None = None,
  on_error: str = "skip",
  threads: int = 8,
  records_per_shard: int = 50_000,
  overwrite: bool = False,
  log: Callable[[str], None] | None = None,
) -> Manifest:
  """webdataset tar shards (`key.jpg`/`.png`/`.webp` + `key.txt` [+ `key.cls`]) -> records.

  Shards are read in the given order (after `expand_shards`), samples in tar order.

  Example:
    >>> import tempfile
    >>> from mmts_jax.data.sample_images import write_wds_shards
    >>> root = tempfile.mkdtemp()
    >>> _ = write_wds_shards(root, 6, per_shard=3)  # shard-00000.tar, shard-00001.tar
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "wds"
    >>> m = convert_webdataset(root + "/shard-{00000..00001}.tar", out, shorter_side=32, threads=1)
    >>> m.num_records, m.fingerprint[:15]
    (6, 'sha256:3209269c')
  """
  paths = expand_shards(shards)
  for p in paths:
    if not os.path.isfile(p):
      raise FileNotFoundError(f"shard {p} does not exist")
  source = {
    "kind": "webdataset",
    "shards": [os.path.basename(p) for p in paths],
    "shorter_side": shorter_side,
  }
  return _write(
    out_dir,
    _tar_samples(paths, caption_ext.lower(), label_ext),
    source=source,
    shorter_side=shorter_side,
    on_error=on_error,
    threads=threads,
    records_per_shard=records_per_shard,
    overwrite=overwrite,
    log=log,
  )


def convert_tfds(
  name: str,
  out_dir,
  *,
  split: str = "train",
  data_dir: str | None = None,
  image_key: str = "image",
  caption_key: str | None = "captions/text",
  label_key: str | None = None,
  all_captions: bool = True,
  shorter_side: int | None = None,
  on_error: str = "skip",
  threads: int = 8,
  records_per_shard: int = 50_000,
  overwrite: bool = False,
  log: Callable[[str], None] | None = None,
) -> Manifest:
  """A TFDS dataset (prepared with `file_format="array_record"`) -> records, without TensorFlow.

  Images are read still encoded (`tfds.decode.SkipDecoding`). Nested features are addressed with
  `/` (`captions/text` for `coco_captions`). A list of captions gives one record per caption
  (`all_captions=True`, keys `id/j`) or one record with the first caption.

  Usage (needs a prepared TFDS dataset on disk, so it is not a doctest)::

    convert_tfds("coco_captions", "data/coco", split="train", data_dir="~/tensorflow_datasets")
  """
  builder, ds = open_tfds(name, split=split, data_dir=data_dir, image_key=image_key)

  def samples() -> Iterator[dict]:
    for i in range(len(ds)):
      ex = ds[i]
      base = {"image": ex[image_key]}
      if label_key is not None:
        base["label"] = int(lookup_feature(ex, label_key))
      if caption_key is None:
        yield {**base, "key": str(i)}
        continue
      caps = lookup_feature(ex, caption_key)
      if isinstance(caps, (str, bytes)):
        caps = [caps]
      caps = [as_text(c) for c in caps] if all_captions else [as_text(c) for c in caps[:1]]
      for j, c in enumerate(caps):
        yield {**base, "key": f"{i}/{j}", "caption": c}

  source = {
    "kind": "tfds",
    "name": builder.info.full_name,
    "split": split,
    "data_dir": str(builder.data_dir),
    "image_key": image_key,
    "caption_key": caption_key,
    "label_key": label_key,
    "all_captions": all_captions,
    "shorter_side": shorter_side,
  }
  return _write(
    out_dir,
    samples(),
    source=source,
    shorter_side=shorter_side,
    on_error=on_error,
    threads=threads,
    records_per_shard=records_per_shard,
    overwrite=overwrite,
    log=log,
  )
