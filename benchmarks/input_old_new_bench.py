"""Input pipeline before/after, stage by stage, examples per CPU-second, side by side in one run.

Five paths over the same realistic JPEGs (`sample_images.natural_jpeg`, CC3M-like 320-640 px):

  old        the pipeline before issue 17's item 3: Pillow decode (JPEG draft to
             `source_side(224)` = 237 px), random resized crop to 224 (bicubic), CLIP
             normalisation to float32 on the host, float32 batches shipped to the device;
  new        simplejpeg decode (same pixels, same draft), the same crop, uint8 kept (normalised
             on the device after the transfer), uint8 batches shipped (4x fewer bytes);
  new_pre    `new` on the same images stored pre-resized at conversion
             (`mmts prepare --for-image-size 224`: shorter side 237, JPEG q95);
  new_dev    `new` with the pipeline's `device_crop=True`: the host stretches the decoded image
             to a uint8 237 x 237 square (Pillow bilinear) and ships it with the crop box; the
             bicubic crop runs on the device (`mmts_jax.data.device_crop`);
  new_pre_dev  `new_dev` on the pre-resized images.

Stages: decode, resize (random resized crop; dev paths: box + square source), normalise (old:
float32 CLIP normalisation; new: `np.asarray` of the uint8 crop), batch (np.stack of `--batch`
examples), host->device (`jax.device_put` of one batch, blocked; on this machine the device is
the CPU backend), and device normalise (the jitted uint8 -> float32 normalisation `to_device`
runs on the accelerator, for the dev paths after the crop; here it runs on CPU too, so it is
reported but not charged to the host). Also the whole `ImageTextTransform` per example and the
grain loader (2 threads, 8 batches from a fresh loader, creation included) over ArrayRecord
files.

Every stage runs `--repeats` times with the paths alternating (old, new, ..., then rotated),
so load from other jobs on a shared machine hits all paths alike; rates are `n / process CPU
seconds` per repeat, reported as min / median / max.

  python benchmarks/input_old_new_bench.py --out benchmarks/results/input_old_new_cpu.json
  python benchmarks/input_old_new_bench.py --repeats 3 \
    --out benchmarks/results/input_device_crop_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mmts_jax import atomic_io  # noqa: E402
from mmts_jax.data import device_crop, image_ops, pipeline  # noqa: E402
from mmts_jax.data.sample_images import natural_jpeg  # noqa: E402

TARGET = 3200  # examples/s one H200 consumes at issue 17's step target
PATHS = ("old", "new", "new_pre", "new_dev", "new_pre_dev")
DEV = ("new_dev", "new_pre_dev")


def _cpu_seconds(fn) -> float:
  c0 = time.process_time()
  fn()
  return time.process_time() - c0


def _summary(rates: list[float]) -> dict[str, float]:
  return {"min": min(rates), "median": statistics.median(rates), "max": max(rates)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--num-images", type=int, default=96)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  if min(args.num_images, args.image_size, args.batch, args.repeats) <= 0:
    p.error("--num-images, --image-size, --batch and --repeats must be positive")
  if not image_ops.has_simplejpeg():
    p.error("the new path needs simplejpeg (pip install -e '.[fast]')")
  import jax

  n, size, bs = args.num_images, args.image_size, args.batch
  side = image_ops.source_side(size, 0.9)
  rng = np.random.default_rng(0)
  jpegs = [
    natural_jpeg(rng, int(rng.integers(320, 640)), int(rng.integers(240, 480))) for _ in range(n)
  ]
  pre = [
    image_ops.encode_jpeg(image_ops.shrink_shorter_side(image_ops.decode_image(j), side))
    for j in jpegs
  ]
  data = {"old": jpegs, "new": jpegs, "new_pre": pre, "new_dev": jpegs, "new_pre_dev": pre}
  decoder = {k: "pil" if k == "old" else "simplejpeg" for k in PATHS}

  def decode(path):
    images = [image_ops.decode_image(d, draft=side, decoder=decoder[path]) for d in data[path]]
    for im in images:
      im.load()  # Pillow decodes lazily: make it decode here, not in the resize
    return images

  decoded = {k: decode(k) for k in PATHS}

  boxes = {}

  def crop(path):
    g = np.random.default_rng(1)
    if path in DEV:  # what ImageTextTransform(device_crop=True) does per example
      out, boxes[path] = [], []
      for im in decoded[path]:
        box = image_ops.random_resized_crop_box(im.width, im.height, g)
        out.append(device_crop.square_source(im, side))
        boxes[path].append(device_crop.box_in_square(box, im.width, im.height, side))
      return out
    return [image_ops.random_resized_crop(im, size, g) for im in decoded[path]]

  crops = {k: crop(k) for k in PATHS}

  def normalise(path):
    if path == "old":
      return [image_ops.normalize(c) for c in crops[path]]
    return [np.asarray(c, np.uint8) for c in crops[path]]

  pixels = {k: normalise(k) for k in PATHS}
  nb = max(1, n // bs)

  def batch(path):
    out = [np.stack(pixels[path][i * bs : (i + 1) * bs]) for i in range(nb)]
    if path in DEV:
      return [(b, np.stack(boxes[path][i * bs : (i + 1) * bs])) for i, b in enumerate(out)]
    return out

  batches = {k: batch(k) for k in PATHS}
  dev = jax.devices()[0]

  def to_device(path):
    for b in batches[path]:
      jax.block_until_ready(jax.device_put(b, dev))

  normalize_jit = jax.jit(image_ops.normalize_on_device)
  on_dev = {k: [jax.device_put(b, dev) for b in batches[k]] for k in PATHS}
  normalize_jit(on_dev["new"][0]).block_until_ready()  # compile outside the timing

  def crop_normalize(images, crop_boxes):
    return normalize_jit(device_crop.crop_on_device(images, crop_boxes, size))

  crop_normalize(*on_dev["new_dev"][0]).block_until_ready()

  def device_normalise(path):
    if path in DEV:
      for b in on_dev[path]:
        crop_normalize(*b).block_until_ready()
    elif path != "old":  # old batches arrive normalised
      for b in on_dev[path]:
        normalize_jit(b).block_until_ready()

  transforms = {
    "old": pipeline.ImageTextTransform(None, image_size=size, decoder="pil"),
    "new": pipeline.ImageTextTransform(None, image_size=size, uint8=True, decoder="simplejpeg"),
  }
  transforms["new_pre"] = transforms["new"]
  transforms["new_dev"] = pipeline.ImageTextTransform(
    None, image_size=size, uint8=True, decoder="simplejpeg", device_crop=True
  )
  transforms["new_pre_dev"] = transforms["new_dev"]
  recs = {k: [{"image": d, "index": i} for i, d in enumerate(data[k])] for k in PATHS}

  def transform(path):
    t = transforms[path]
    for i, r in enumerate(recs[path]):
      t(r, np.random.default_rng(i))

  stages = {
    "decode": (decode, n),
    "resize": (crop, n),
    "normalise": (normalise, n),
    "batch": (batch, nb * bs),
    "host_to_device": (to_device, nb * bs),
    "device_normalise (accelerator work; CPU backend here)": (device_normalise, nb * bs),
    "transform (decode+resize+normalise, one call)": (transform, n),
  }

  with tempfile.TemporaryDirectory() as root:
    from mmts_jax.data.records import write_records

    for k in ("old", "new_pre"):
      write_records(f"{root}/{k}", ({"image": d, "caption": "x"} for d in data[k]))
    pipes = {
      k: pipeline.image_text_pipeline(
        f"{root}/{'new_pre' if k in ('new_pre', 'new_pre_dev') else 'old'}",
        None,
        image_size=size,
        global_batch_size=bs,
        seed=0,
        num_epochs=None,
        uint8=k != "old",
        decoder=decoder[k],
        device_crop=k in DEV,
        process_index=0,
        process_count=1,
      )
      for k in PATHS
    }
    loader_batches = 8

    def loader(path):
      # A fresh loader each time, timed from its creation (no prefilled buffer); the prefetch
      # it leaves in flight settles untimed (the sleep below), not in another path's timing.
      it = pipes[path].loader(num_threads=2)
      for _ in range(loader_batches):
        next(it)
      del it

    stages["grain loader, 2 threads (batches from ArrayRecord files)"] = (
      loader,
      loader_batches * bs,
    )
    load_start = os.getloadavg()
    rates: dict[str, dict[str, list[float]]] = {s: {k: [] for k in PATHS} for s in stages}
    for r in range(args.repeats):
      order = PATHS[r % len(PATHS) :] + PATHS[: r % len(PATHS)]  # rotate who goes first
      for name, (fn, count) in stages.items():
        for path in order:
          if name.startswith("device_normalise") and path == "old":
            continue
          seconds = _cpu_seconds(lambda fn=fn, path=path: fn(path))
          rates[name][path].append(count / max(seconds, 1e-9))
          if name.startswith("grain"):
            time.sleep(0.5)
    load_end = os.getloadavg()

  per_stage = {s: {k: _summary(v) for k, v in d.items() if v} for s, d in rates.items()}
  host_stages = ("decode", "resize", "normalise", "batch", "host_to_device")

  def chain(path, stat):
    return 1.0 / sum(1.0 / per_stage[s][path][stat] for s in host_stages)

  chains = {k: {st: chain(k, st) for st in ("min", "median", "max")} for k in PATHS}
  result = {
    "bench": "input pipeline old vs new, examples per CPU-second, alternating in one run",
    "command": "python benchmarks/input_old_new_bench.py " + " ".join(argv or sys.argv[1:]),
    "num_images": n,
    "image_size": size,
    "batch": bs,
    "repeats": args.repeats,
    "stored_shorter_side_new_pre": side,
    "mean_jpeg_bytes": {k: float(np.mean([len(d) for d in data[k]])) for k in ("old", "new_pre")},
    "mean_decoded_pixels": {
      k: float(np.mean([im.width * im.height for im in decoded[k]])) for k in PATHS
    },
    "host": {
      "cpu_count": os.cpu_count(),
      "load_avg_start": load_start,
      "load_avg_end": load_end,
      "note": "2-core VM shared with other agents; rates are per CPU-second of this process",
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jax_device": str(dev),
    },
    "paths": {
      "old": "Pillow decode (draft), bicubic crop, float32 normalise on host, float32 batches",
      "new": "simplejpeg decode (draft, same pixels), same crop, uint8 batches, normalise on "
      "device",
      "new_pre": "new, on images stored at shorter side "
      f"{side} (mmts prepare --for-image-size {size})",
      "new_dev": f"new with device_crop=True: host ships a uint8 {side}x{side} bilinear square "
      "and the crop box, the bicubic crop runs on the device",
      "new_pre_dev": "new_dev on the pre-resized images",
    },
    "per_cpu_second": per_stage,
    "host_chain_per_cpu_second": chains,
    "host_chain_speedup_vs_old": {
      k: chains[k]["median"] / chains["old"]["median"] for k in PATHS if k != "old"
    },
    "host_chain_speedup_device_crop": {
      "new_dev_vs_new": chains["new_dev"]["median"] / chains["new"]["median"],
      "new_pre_dev_vs_new_pre": chains["new_pre_dev"]["median"] / chains["new_pre"]["median"],
    },
    "transform_speedup_device_crop": {
      f"{a}_vs_{b}": per_stage[t][a]["median"] / per_stage[t][b]["median"]
      for t in ("transform (decode+resize+normalise, one call)",)
      for a, b in (("new_dev", "new"), ("new_pre_dev", "new_pre"))
    },
    "bytes_shipped_per_example": {
      k: sum(x.nbytes for x in (batches[k][0] if k in DEV else [batches[k][0]])) // bs
      for k in PATHS
    },
    "cores_for_3200_median": {k: TARGET / chains[k]["median"] for k in PATHS},
  }
  atomic_io.atomic_write_json(args.out, result, indent=1)
  print(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
