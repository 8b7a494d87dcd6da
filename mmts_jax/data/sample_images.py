"""Small real image-caption datasets on disk, for tests, benchmarks and trying the pipeline.

Image `i` is a flat colour `color_of(i)` (so a test can check after decoding, cropping and
normalising that the pixels still belong to the example's `index`), of a pseudo-random size, saved
as a real JPEG or PNG with Pillow; its caption is `caption_of(i)`. Layouts written:

  * `write_image_folder`: `images/000123.jpg ...` + `pairs.tsv` (header `image<TAB>caption`);
  * `write_wds_shards`: webdataset tars `shard-00000.tar` with `000123.jpg` + `000123.txt`.

`natural_jpeg` makes a textured JPEG that compresses like a photo, for decoder and resize tests
and the input benchmarks (flat colours hide decoding and scaling differences).
"""

from __future__ import annotations

import io
import os
import pathlib
import tarfile

import numpy as np
from PIL import Image

__all__ = [
  "color_of",
  "caption_of",
  "make_image",
  "natural_jpeg",
  "write_image_folder",
  "write_wds_shards",
]

_WORDS = ("dog", "cat", "bird", "car", "tree", "boat", "cup", "house")


def color_of(i: int) -> tuple[int, int, int]:
  """A distinct, non-grey RGB colour per index (away from 0/255, so JPEG does not clip it)."""
  return (40 + (i * 37) % 176, 40 + (i * 91) % 176, 40 + (i * 53) % 176)


def caption_of(i: int) -> str:
  """A caption with a long-tail word (word `k` for about 1/2^k of the indices) and the index."""
  i = int(i)
  k = min(len(_WORDS) - 1, (i & -i).bit_length() - 1) if i else 0
  return f"a photo of a {_WORDS[k]} number {i}"


def make_image(
  i: int, rng: np.random.Generator, fmt: str = "jpg", size_range: tuple[int, int] = (40, 96)
) -> bytes:
  w, h = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
  img = Image.new("RGB", (w, h), color_of(i))
  buf = io.BytesIO()
  if fmt in ("jpg", "jpeg"):
    img.save(buf, format="JPEG", quality=95)
  elif fmt == "png":
    img.save(buf, format="PNG")
  else:
    raise ValueError(f"fmt must be jpg or png, got {fmt!r}")
  return buf.getvalue()


def natural_jpeg(
  rng: np.random.Generator, width: int, height: int, *, quality: int = 90, **save_kw
) -> bytes:
  """A `width x height` JPEG of smooth random content plus grain (~0.5-1.5 bits per pixel).

  Bicubically upsampled noise at 1/16 resolution with N(0, 6) grain compresses like a photo,
  unlike flat colours (too easy) or white noise (too hard). `save_kw` goes to `Image.save`
  (e.g. `subsampling=0`, `progressive=True`).

  Example:
    >>> data = natural_jpeg(np.random.default_rng(0), 64, 48)
    >>> Image.open(io.BytesIO(data)).size, 200 < len(data) < 64 * 48 * 3
    ((64, 48), True)
  """
  if width < 1 or height < 1:
    raise ValueError(f"width and height must be >= 1, got {width} x {height}")
  small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
  img = np.asarray(
    Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), np.int16
  )
  img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=quality, **save_kw)
  return buf.getvalue()


def write_image_folder(
  root: str | os.PathLike, n: int, *, seed: int = 0, size_range: tuple[int, int] = (40, 96)
) -> pathlib.Path:
  """`n` images (every third one PNG) under `root/images` and `root/pairs.tsv`; returns the TSV.

  Example:
    >>> import tempfile
    >>> tsv = write_image_folder(tempfile.mkdtemp(), 10)
    >>> tsv.read_text().splitlines()[1]
    'images/000000.jpg\\ta photo of a dog number 0'
  """
  root = pathlib.Path(root)
  (root / "images").mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  lines = ["image\tcaption"]
  for i in range(n):
    fmt = "png" if i % 3 == 2 else "jpg"
    rel = f"images/{i:06d}.{fmt}"
    (root / rel).write_bytes(make_image(i, rng, fmt, size_range))
    lines.append(f"{rel}\t{caption_of(i)}")
  tsv = root / "pairs.tsv"
  tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return tsv


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_wds_shards(
  root: str | os.PathLike,
  n: int,
  per_shard: int,
  *,
  seed: int = 0,
  size_range: tuple[int, int] = (40, 96),
  labels: bool = False,
) -> list[str]:
  """`n` samples in webdataset tars of `per_shard` (`key.jpg` + `key.txt` [+ `key.cls`])."""
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  paths = []
  for s, start in enumerate(range(0, n, per_shard)):
    path = root / f"shard-{s:05d}.tar"
    with tarfile.open(path, "w") as tar:
      for i in range(start, min(n, start + per_shard)):
        _add(tar, f"{i:06d}.jpg", make_image(i, rng, "jpg", size_range))
        _add(tar, f"{i:06d}.txt", caption_of(i).encode())
        if labels:
          _add(tar, f"{i:06d}.cls", str(i % 5).encode())
    paths.append(str(path))
  return paths
