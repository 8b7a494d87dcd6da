"""Input pipelines side by side on the GPU machine: ours vs OpenCLIP's loader, then end to end.

One process, one run, the same images for both sides:

1. `--num-images` realistic JPEGs (`sample_images.natural_jpeg`, 320-640 x 240-480 px, like
   CC3M as img2dataset stores it) written twice: as webdataset tar shards (64 samples each,
   `key.jpg` + `key.txt`) and as an ArrayRecord dataset (`records.write_records`); optionally
   also pre-resized to shorter side 237 (`mmts prepare --for-image-size 224`) in both forms.
2. Loaders, each at `--workers` counts, batches of `--batch` 224 px training crops:
     ours_threads   `image_text_pipeline(uint8=True)` + `Loader(num_threads=W)`: grain threads,
                    simplejpeg with JPEG draft, random resized crop (bicubic), uint8 out;
     ours_workers   the same with `Loader(worker_count=W)`: grain worker processes;
     ours_old       the pipeline before issue 17 item 3 (Pillow, float32 normalised on the
                    host), threads, at the largest W;
     openclip       OpenCLIP's training loader rebuilt from its public recipe: webdataset
                    `ResampledShards` -> `split_by_worker` -> tar samples -> `decode("pilrgb")`
                    -> torchvision `RandomResizedCrop(224, scale=(0.9, 1), BICUBIC)`,
                    `ToTensor`, `Normalize(CLIP mean/std)` -> `batched` -> torch `DataLoader(
                    num_workers=W, persistent_workers=True)` (what `wds.WebLoader` wraps);
                    float32 batches, no sample shuffle buffer.
   Text is left out on both sides (no tokenizer on either), so both time the image path only.
   Each configuration warms up (worker start, prefetch buffers drained), then counts batches
   for `--seconds`; CPU time is the sum over the process and all its children (psutil), so
   `examples_per_cpu_second` counts worker processes too.
3. End to end (if time is left): the real trainer (`mmts_jax.train.setup`, MM-TS, AdamW, bf16)
   with a small CLIP (`--model`: ViT-S/16 image tower, 4-layer width-256 text transformer,
   batch `--e2e-batch`), examples/s with a fixed device batch vs with batches from our
   ArrayRecord pipeline through `Setup.device_batches` (uint8 shipped, normalised on device).

Everything stops at `--deadline` seconds after start; the json (rewritten after every
configuration) holds what finished.

  python3 benchmarks/input_gpu_bench.py --out $OUT/input_gpu_h200.json
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import pathlib
import platform
import sys
import tarfile
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

T0 = time.perf_counter()
TARGET = 3200


def _log(msg: str) -> None:
  print(f"[input_gpu_bench {time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _make_jpeg(i: int) -> bytes:
  from mmts_jax.data.sample_images import natural_jpeg

  rng = np.random.default_rng(i)
  return natural_jpeg(rng, int(rng.integers(320, 640)), int(rng.integers(240, 480)))


def _preresize(data: bytes) -> bytes:
  from mmts_jax.data import image_ops

  side = image_ops.source_side(224, 0.9)
  return image_ops.encode_jpeg(image_ops.shrink_shorter_side(image_ops.decode_image(data), side))


def _write_tars(root: str, jpegs: list[bytes], per_shard: int = 64) -> list[str]:
  paths = []
  for s in range(0, len(jpegs), per_shard):
    path = f"{root}/shard-{s // per_shard:05d}.tar"
    with tarfile.open(path, "w") as tar:
      for i in range(s, min(len(jpegs), s + per_shard)):
        for name, payload in ((f"{i:06d}.jpg", jpegs[i]), (f"{i:06d}.txt", f"photo {i}".encode())):
          info = tarfile.TarInfo(name)
          info.size = len(payload)
          tar.addfile(info, io.BytesIO(payload))
    paths.append(path)
  return paths


def _cpu_tree(proc) -> float:
  """user + system seconds of `proc` and its live descendants."""
  import psutil

  total = 0.0
  for p in [proc, *proc.children(recursive=True)]:
    try:
      t = p.cpu_times()
      total += t.user + t.system
    except psutil.Error:
      pass
  return total


def _measure(it, batch: int, workers: int, seconds: float) -> dict:
  """Warm up (start-up, then drain prefetched batches), then count batches for `seconds`."""
  import psutil

  proc = psutil.Process()
  t_start = time.perf_counter()
  next(it)
  first_s = time.perf_counter() - t_start
  # Prefetch buffers (DataLoader: 2 per worker; grain: one batch) fill during start-up; drain
  # them, plus one second, so the timed part is steady state.
  warm = 2 * workers + 2
  t_w = time.perf_counter()
  for _ in range(warm):
    next(it)
  while time.perf_counter() - t_w < 1.0:
    next(it)
  c0, t0, k = _cpu_tree(proc), time.perf_counter(), 0
  while time.perf_counter() - t0 < seconds or k < 3:
    next(it)
    k += 1
  wall, cpu = time.perf_counter() - t0, _cpu_tree(proc) - c0
  return {
    "examples_per_s": k * batch / wall,
    "examples_per_cpu_second": k * batch / max(cpu, 1e-9),
    "cpu_cores_busy": cpu / wall,
    "batches_timed": k,
    "first_batch_s": first_s,
  }


def _openclip_loader(urls: list[str], batch: int, workers: int, image_size: int = 224):
  import torch
  import webdataset as wds
  from torchvision import transforms as T

  mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
  preprocess = T.Compose(
    [
      T.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
      lambda im: im.convert("RGB"),
      T.ToTensor(),
      T.Normalize(mean, std),
    ]
  )
  pipe = wds.DataPipeline(
    wds.ResampledShards(urls),
    wds.split_by_worker,  # a no-op for resampled shards, as in OpenCLIP; kept for the recipe
    wds.tarfile_to_samples(),
    wds.decode("pilrgb"),
    wds.rename(image="jpg;png;jpeg;webp", text="txt"),
    wds.map_dict(image=preprocess),
    wds.to_tuple("image", "text"),
    wds.batched(batch, partial=False),
  )
  torch.set_num_threads(1)
  # OpenCLIP wraps this in `wds.WebLoader`, a thin DataPipeline around the same DataLoader; the
  # DataLoader's own iterator is kept here so its workers can be shut down between runs.
  return iter(
    torch.utils.data.DataLoader(
      pipe, batch_size=None, shuffle=False, num_workers=workers, persistent_workers=workers > 0
    )
  )


def _ours_loader(
  data_dir: str, batch: int, workers: int, mode: str, old: bool = False, image_size: int = 224
):
  from mmts_jax.data import pipeline

  pipe = pipeline.image_text_pipeline(
    data_dir,
    None,
    image_size=image_size,
    global_batch_size=batch,
    seed=0,
    num_epochs=None,
    uint8=not old,
    decoder="pil" if old else "auto",
    process_index=0,
    process_count=1,
  )
  if mode == "threads":
    return pipe.loader(num_threads=workers)
  return pipe.loader(worker_count=workers, num_threads=1)


def _write(path: str, result: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, path)


def _e2e(result: dict, data_dir: str, args, out: str) -> None:
  """Small CLIP through the real trainer: fixed device batch vs our pipeline."""
  import jax

  from mmts_jax import train
  from mmts_jax.data import sources

  b, n = args.e2e_batch, result["num_images"]
  text_len, vocab = 32, 1000
  tokens = np.random.default_rng(0).integers(1, vocab, size=(b, text_len)).astype(np.int32)
  sizes = np.clip(np.random.default_rng(1).zipf(1.5, size=n), 1, 1000)

  class Src:
    def __init__(self, make):
      self.make, self.num_examples, self.fingerprint, self.cluster_sizes = make, n, None, sizes

    def iterate(self, start_batch=0, process_index=0, process_count=1):
      return self.make()

  def pipeline_batches():
    for x in _ours_loader(data_dir, b, args.e2e_threads, "threads"):
      yield {"image": x["image"], "index": x["index"], "text": tokens}

  def fixed_batches():
    rng = np.random.default_rng(2)
    host = {
      "image": rng.integers(0, 256, (b, 224, 224, 3), dtype=np.uint8),
      "index": rng.integers(0, n, b).astype(np.int32),
      "text": tokens,
    }
    while True:
      yield host

  c = train.default_config()
  c.total_steps, c.batch_size = 10_000, b
  c.model.update(embed_dim=256, dtype="bfloat16")
  c.model.image = dict(name="vit", variant=args.model)
  c.model.text = dict(
    name="transformer",
    vocab_size=vocab,
    max_len=text_len,
    width=256,
    depth=4,
    num_heads=4,
    mlp_dim=1024,
    pool="eot",
    causal=True,
  )
  c.temperature.update(mode="mmts", value=0.07)
  c.optim.update(lr=1e-4, warmup_steps=100)
  c.mesh.num_devices = 1
  e2e = result.setdefault("end_to_end", {})
  e2e.update(
    model=f"ViT-{args.model} image tower + 4-layer width-256 text transformer, 32 tokens, "
    "embed 256, bf16 compute, AdamW, MM-TS",
    batch=b,
    loader_threads=args.e2e_threads,
  )
  for name, make in (("fixed_device_batch", fixed_batches), ("ours_pipeline", pipeline_batches)):
    if time.perf_counter() - T0 > args.deadline - 25:
      e2e[f"{name}_skipped"] = "deadline"
      break
    sources.SOURCES["input_gpu_bench"] = lambda cfg, make=make, **kw: Src(make)
    c.data.name = "input_gpu_bench"
    run = train.setup(c)
    state = run.state
    it = run.device_batches(0, prefetch=3)
    first = next(it)
    t = time.perf_counter()
    step = run.step_fn.lower(state, first).compile()
    e2e[f"{name}_compile_s"] = time.perf_counter() - t
    _log(f"e2e {name}: compiled in {e2e[f'{name}_compile_s']:.1f} s")
    fixed = first if name == "fixed_device_batch" else None
    for _ in range(5):  # warm-up
      state, m = step(state, fixed if fixed is not None else next(it))
    jax.block_until_ready(m)
    import psutil

    c0, t, k = _cpu_tree(psutil.Process()), time.perf_counter(), 0
    budget = min(args.e2e_seconds, args.deadline - 10 - (time.perf_counter() - T0))
    while time.perf_counter() - t < budget or k < 3:
      state, m = step(state, fixed if fixed is not None else next(it))
      k += 1
      if k % 8 == 0:
        jax.block_until_ready(m)
    jax.block_until_ready(m)
    wall = time.perf_counter() - t
    cores = (_cpu_tree(psutil.Process()) - c0) / wall
    e2e[name] = {
      "examples_per_s": k * b / wall,
      "step_ms": wall / k * 1e3,
      "steps": k,
      "host_cores_busy": cores,
    }
    _log(f"e2e {name}: {k * b / wall:.0f} examples/s")
    _write(out, result)
    del run, state, step, it, first


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--num-images", type=int, default=2048)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--workers", default="1,4,8,16")
  p.add_argument("--seconds", type=float, default=2.5)
  p.add_argument("--sides", default="ours_threads,ours_workers,openclip")
  p.add_argument("--preresized-workers", type=int, default=16, help="0: skip pre-resized runs")
  p.add_argument("--model", default="S/16")
  p.add_argument("--e2e-batch", type=int, default=256)
  p.add_argument("--e2e-threads", type=int, default=16)
  p.add_argument("--e2e-seconds", type=float, default=8.0)
  p.add_argument("--deadline", type=float, default=230.0)
  args = p.parse_args(argv)
  workers = [int(w) for w in args.workers.split(",")]
  sides = args.sides.split(",")
  import psutil

  from mmts_jax.data import image_ops
  from mmts_jax.data.records import write_records

  result = {
    "bench": "input pipelines side by side: ours (grain) vs OpenCLIP-style webdataset+DataLoader",
    "command": "python3 benchmarks/input_gpu_bench.py " + " ".join(argv or sys.argv[1:]),
    "num_images": args.num_images,
    "batch": args.batch,
    "image_size": 224,
    "host": {
      "cpu_count": os.cpu_count(),
      "cpu_affinity": len(psutil.Process().cpu_affinity()),
      "python": platform.python_version(),
      "node": platform.node(),
      "simplejpeg": image_ops.has_simplejpeg(),
    },
    "loaders": {},
  }
  root = tempfile.mkdtemp(prefix="input_gpu_bench_")
  with mp.get_context("fork").Pool(os.cpu_count()) as pool:
    jpegs = pool.map(_make_jpeg, range(args.num_images), chunksize=16)
    pre = pool.map(_preresize, jpegs, chunksize=16) if args.preresized_workers else []
  result["mean_jpeg_bytes"] = float(np.mean([len(j) for j in jpegs]))
  sets = {"orig": jpegs, "pre237": pre} if pre else {"orig": jpegs}
  urls, dirs = {}, {}
  for key, data in sets.items():
    os.makedirs(f"{root}/{key}/wds")
    urls[key] = _write_tars(f"{root}/{key}/wds", data)
    dirs[key] = f"{root}/{key}/records"
    write_records(dirs[key], ({"image": d, "caption": f"photo {i}"} for i, d in enumerate(data)))
  _log(f"wrote {args.num_images} images x {len(sets)} sets")
  out = args.out
  _write(out, result)

  runs = [(side, w, "orig") for w in workers for side in sides]
  runs.append(("ours_old", max(workers), "orig"))
  if args.preresized_workers:
    for side in ("ours_threads", "openclip"):
      runs.append((side, args.preresized_workers, "pre237"))
  for side, w, key in runs:
    if time.perf_counter() - T0 > args.deadline * 0.6:
      result.setdefault("skipped", []).append(f"{side}/{w}/{key}")
      continue
    try:
      if side == "openclip":
        it = _openclip_loader(urls[key], args.batch, w)
      elif side == "ours_old":
        it = _ours_loader(dirs[key], args.batch, w, "threads", old=True)
      else:
        it = _ours_loader(dirs[key], args.batch, w, side.split("_")[1])
      r = _measure(it, args.batch, w, args.seconds)
    except Exception as e:  # one side failing must not lose the others' numbers
      result["loaders"][f"{side}/w{w}/{key}"] = {"error": f"{type(e).__name__}: {e}"}
      _log(f"{side} w={w} {key}: {type(e).__name__}: {e}")
      _write(out, result)
      continue
    r["cores_for_3200"] = TARGET / r["examples_per_cpu_second"]
    result["loaders"][f"{side}/w{w}/{key}"] = r
    _log(
      f"{side} w={w} {key}: {r['examples_per_s']:.0f} ex/s, "
      f"{r['examples_per_cpu_second']:.0f} ex/CPU-s, {r['cpu_cores_busy']:.1f} cores busy"
    )
    _write(out, result)
    # Stop the workers now (grain's multiprocessing iterator, the DataLoader's workers).
    inner = getattr(it, "_it", it)
    for stop in ("close", "_shutdown_workers"):
      if callable(getattr(inner, stop, None)):
        getattr(inner, stop)()
    del it, inner
    time.sleep(0.5)  # workers exit before the next configuration starts
  if time.perf_counter() - T0 < args.deadline - 60:
    try:
      _e2e(result, dirs["orig"], args, out)
    except Exception as e:  # the loader numbers above stand on their own
      result["end_to_end_error"] = f"{type(e).__name__}: {e}"
      _log(result["end_to_end_error"])
  else:
    result["end_to_end_skipped"] = "deadline"
  result["elapsed_s"] = time.perf_counter() - T0
  _write(out, result)
  print(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
