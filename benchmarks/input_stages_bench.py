"""Examples per CPU-second of each input stage, one thread: where the host's cores go per image.

Stages on the same realistic JPEGs as `input_bench.py` (CC3M-like sizes, 320-640 px): decode
(full size, or JPEG draft: libjpeg's DCT scaling to the smallest scale still >= the crop size),
random resized crop to `--image-size` (bicubic), CLIP normalisation to float32; and decode + crop
of images stored pre-resized at conversion (`shrink_shorter_side(256)`, re-encoded at quality
95). Chains add the stages' CPU seconds. Rates are `n / process CPU seconds` (best of
`--repeats`), which a shared machine disturbs much less than wall time; `cores_for_3200` is how
many fully available cores of this kind feed 3,200 examples/s (issue 17's step target).

  python benchmarks/input_stages_bench.py --out benchmarks/results/input_stages_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from input_bench import _natural_jpeg

from mmts_jax.data import image_ops

TARGET = 3200  # examples/s of one H200 at issue 17's step target


def _cpu_rate(n: int, fn, repeats: int) -> float:
  """n / best process CPU seconds of `fn()` over `repeats`."""
  best = float("inf")
  for _ in range(repeats):
    c0 = time.process_time()
    fn()
    best = min(best, time.process_time() - c0)
  return n / max(best, 1e-9)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--num-images", type=int, default=96)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  if args.num_images <= 0 or args.image_size <= 0 or args.repeats <= 0:
    p.error("--num-images, --image-size and --repeats must be positive")
  n, size = args.num_images, args.image_size
  rng = np.random.default_rng(0)
  jpegs = [
    _natural_jpeg(rng, int(rng.integers(320, 640)), int(rng.integers(240, 480))) for _ in range(n)
  ]
  small = [
    image_ops.encode_jpeg(image_ops.shrink_shorter_side(image_ops.decode_image(j), 256))
    for j in jpegs
  ]

  def decode(data, draft=None):
    return [image_ops.decode_image(d, draft=draft).copy() for d in data]  # copy() forces load

  full, drafted, pre = decode(jpegs), decode(jpegs, size), decode(small)
  crop_rng = np.random.default_rng(1)

  def crop(images):
    return [image_ops.random_resized_crop(im, size, crop_rng) for im in images]

  crops = crop(full)
  r = args.repeats
  stage = {
    "decode_full": _cpu_rate(n, lambda: decode(jpegs), r),
    "decode_draft": _cpu_rate(n, lambda: decode(jpegs, size), r),
    "decode_preresized_256": _cpu_rate(n, lambda: decode(small), r),
    "crop_from_full": _cpu_rate(n, lambda: crop(full), r),
    "crop_from_draft": _cpu_rate(n, lambda: crop(drafted), r),
    "crop_from_preresized": _cpu_rate(n, lambda: crop(pre), r),
    "normalise_float32": _cpu_rate(n, lambda: [image_ops.normalize(c) for c in crops], r),
    "to_uint8_array": _cpu_rate(n, lambda: [np.asarray(c) for c in crops], r),
  }

  def chain(*names):
    return 1.0 / sum(1.0 / stage[k] for k in names)

  chains = {
    "full_decode_crop_normalise": chain("decode_full", "crop_from_full", "normalise_float32"),
    "draft_decode_crop_normalise": chain("decode_draft", "crop_from_draft", "normalise_float32"),
    "draft_decode_crop_uint8 (normalise on device)": chain(
      "decode_draft", "crop_from_draft", "to_uint8_array"
    ),
    "preresized_decode_crop_uint8": chain(
      "decode_preresized_256", "crop_from_preresized", "to_uint8_array"
    ),
  }
  result = {
    "bench": "input stages, examples per CPU-second, one thread",
    "num_images": n,
    "image_size": size,
    "repeats": r,
    "mean_jpeg_bytes": float(np.mean([len(j) for j in jpegs])),
    "mean_preresized_bytes": float(np.mean([len(j) for j in small])),
    "host": {
      "cpu_count": os.cpu_count(),
      "load_avg_1m": os.getloadavg()[0],
      "python": platform.python_version(),
      "node": platform.node(),
    },
    "per_cpu_second": {**stage, **chains},
    "cores_for_3200": {k: TARGET / v for k, v in chains.items()},
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
  with os.fdopen(fd, "w") as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, out)
  print(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
