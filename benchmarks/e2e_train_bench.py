"""End-to-end training throughput from JPEG files, ours vs OpenCLIP, in one run on one GPU.

For each side, the same compiled training step timed twice: on a fixed batch already on the
device, and fed by that side's own loader from the same JPEG files; ratio = from files / fixed
(1.0: the loader keeps up; below: input-bound), and the host CPU-seconds per example (psutil,
user + system, summed over the process and all its children, i.e. the loader workers too).

  ours      the real trainer: `mmts_jax.train.setup` + its compiled step (ViT-B/16 + CLIP's
            12-layer text transformer, `train_step_bench._config(model, variant, "mmts", B)`:
            bf16 compute, f32 parameters, AdamW, MM-TS temperature), fed through
            `Setup.device_batches` by our ArrayRecord pipeline (`image_text_pipeline(uint8=True)`,
            simplejpeg with JPEG draft, random resized crop, grain worker processes
            `Loader(worker_count=W)`: the fastest settings of `input_gpu_h200.json`), uint8
            shipped and normalised on the device.
  openclip  `open_clip.create_model("ViT-B-16")` + `torch.compile`, bf16 autocast, AdamW,
            `ClipLoss`, gradient clipping at 1.0, fed by OpenCLIP's webdataset recipe on tar
            shards of the same JPEGs (`input_gpu_bench._openclip_loader`: `ResampledShards` ->
            `decode("pilrgb")` -> torchvision crop + normalise -> `batched` -> torch
            `DataLoader(num_workers=W)`), moved with `.to(device, non_blocking=True)`.

Both sides: the same `--num-images` JPEGs (`sample_images.natural_jpeg`, 320-640 x 240-480 px,
as `input_gpu_bench` writes them, once as ArrayRecord records, once as 64-sample tars), batch
`--batch`, `--workers` loader workers, and the same text: one fixed (B, 77) batch of random token
ids (seed 0), shipped with every batch, since neither side's tokenizer is timed. Each window
warms up first (`--warmup-s` and at least `--warmup-steps` steps: compile, allocator, the
loaders' prefetch buffers drained), then counts steps for `--seconds`, syncing every 10 steps.

Timeline (one process, one GPU): write the data; start OpenCLIP's untimed warm-up (a child
process pinned to the last 6 cores, fills TorchInductor's on-disk cache) while ours runs `setup`
(parameter init); once the warm-up child has exited, compile our step (XLA's autotuning then has
the GPU to itself), time ours (fixed, then from files), stop our loader, then run OpenCLIP in
a fresh child (cache hit), which times its fixed batch, then its loader. The two sides never
share the GPU while timed. Stages that would end past `--deadline-s` are skipped; the json
(`mmts_jax.atomic_io`, rewritten after every stage) keeps what finished; every stage is logged on
stderr with the seconds since the start.

GPU call (one H200, Python 3.12), carrying the ignored folder wheels/final, whose whl/ holds
(`pip download --no-deps --only-binary=:all: --python-version 3.12 ...`, BENCHMARKS.md):
ml_collections-1.1.0, open_clip_torch-3.3.0, ftfy-6.3.1, wcwidth-0.9.4, webdataset-1.0.2
(webdataset-1.0.2-py3-none-any.whl), braceexpand-0.1.7, grain-0.2.18, array_record-0.8.6,
simplejpeg-1.9.0, portpicker-1.6.0, importlib_resources-7.1.0:

  python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/final/whl/*.whl
  PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 580 python3 \\
      benchmarks/e2e_train_bench.py --out $OUT/e2e_train_h200.json 2> $OUT/e2e_train_h200.log

CPU smoke (tiny models, a handful of images; PY: a Python with torch, open_clip, webdataset):

  python benchmarks/e2e_train_bench.py --out /tmp/e2e.json --model tiny --openclip-model tiny \\
      --batch 8 --num-images 64 --workers 2 --seconds 2 --warmup-s 0.5 --openclip-python PY
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent))
sys.path.insert(0, str(_HERE))

import input_gpu_bench as igb  # noqa: E402  (numpy only at import: the OpenCLIP child loads it)

T0 = time.perf_counter()
WALL_T0 = time.time()  # the same instant on the wall clock, for the children's log lines
TIMELINE: list[dict] = []
SYNC_EVERY = 10  # steps between host syncs, both sides (the trainer's loop syncs at log_every)
PREFETCH = 2  # device batches in flight: `Setup.device_batches`' default, what `train.loop` uses

# OpenCLIP's model config for the CPU smoke run (registered with `open_clip.add_model_config`):
# the shapes of `train_step_bench.MODELS["tiny"]`.
_TINY_OPENCLIP = {
  "embed_dim": 16,
  "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
  "text_cfg": {"context_length": 7, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}


def _log(msg: str) -> None:
  t = time.perf_counter() - T0
  TIMELINE.append({"s": round(t, 1), "event": msg})
  print(f"[e2e_train_bench {t:6.1f} s] {msg}", file=sys.stderr, flush=True)


def _clog(args, msg: str) -> None:
  """A child's log line, in seconds since the parent started (`--t0`: its `time.time()`)."""
  t = time.time() - args.t0 if args.t0 else time.perf_counter() - T0
  print(f"[e2e_train_bench {t:6.1f} s] openclip {args.child}: {msg}", file=sys.stderr, flush=True)


def _left(args) -> float:
  return args.deadline_s - (time.perf_counter() - T0)


def _write(path: str, result: dict) -> None:
  from mmts_jax import atomic_io

  result["timeline"] = TIMELINE
  result["elapsed_s"] = time.perf_counter() - T0
  atomic_io.atomic_write_json(path, result)


def fixed_tokens(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
  """The (batch, length) int32 token ids both sides train on: random ids in [1, vocab).

  Example:
    >>> t = fixed_tokens(2, 77, 49408)
    >>> t.shape, t.dtype.name, bool((t >= 1).all() and (t < 49408).all())
    ((2, 77), 'int32', True)
  """
  return np.random.default_rng(seed).integers(1, vocab, size=(batch, length)).astype(np.int32)


def write_data(root: str, num_images: int) -> dict:
  """`num_images` natural JPEGs as webdataset tars (`root/wds`) and ArrayRecord (`root/records`)."""
  from mmts_jax.data.records import write_records

  if num_images >= 256:
    with mp.get_context("fork").Pool(os.cpu_count()) as pool:
      jpegs = pool.map(igb._make_jpeg, range(num_images), chunksize=16)
  else:  # a test's handful: no worker pool
    jpegs = [igb._make_jpeg(i) for i in range(num_images)]
  os.makedirs(f"{root}/wds")
  urls = igb._write_tars(f"{root}/wds", jpegs)
  records = f"{root}/records"
  write_records(records, ({"image": d, "caption": f"photo {i}"} for i, d in enumerate(jpegs)))
  return {
    "urls": urls,
    "records": records,
    "mean_jpeg_bytes": float(np.mean([len(j) for j in jpegs])),
  }


def timed_window(
  step, next_batch, sync, *, batch: int, seconds: float, warmup_s: float, warmup_steps: int
) -> dict:
  """Warm up (`warmup_steps` steps and `warmup_s` seconds), then run `step(next_batch())` for
  `seconds` (at least 3 steps), syncing every `SYNC_EVERY` steps and at the end.

  examples_per_s = steps x batch / wall; cpu_s_per_example = CPU seconds of this process tree
  (`input_gpu_bench._cpu_tree`) in the window / examples.
  """
  import psutil

  proc = psutil.Process()
  t_w, w = time.perf_counter(), 0
  while w < warmup_steps or time.perf_counter() - t_w < warmup_s:
    step(next_batch())
    w += 1
    if w % SYNC_EVERY == 0:
      sync()
  sync()
  warm = time.perf_counter() - t_w
  c0, t0, k = igb._cpu_tree(proc), time.perf_counter(), 0
  while time.perf_counter() - t0 < seconds or k < 3:
    step(next_batch())
    k += 1
    if k % SYNC_EVERY == 0:
      sync()
  sync()
  wall, cpu = time.perf_counter() - t0, igb._cpu_tree(proc) - c0
  return {
    "examples_per_s": k * batch / wall,
    "step_ms": wall / k * 1e3,
    "steps": k,
    "examples": k * batch,
    "wall_s": wall,
    "cpu_s": cpu,
    "cpu_s_per_example": cpu / (k * batch),
    "host_cores_busy": cpu / wall,
    "warmup_steps": w,
    "warmup_s": warm,
  }


def window(name: str, step, next_batch, sync, args) -> dict:
  """`timed_window` with the command line's settings, for either side; the loader's window
  ("from_files") warms up for at least 2 x workers + 2 steps, so its prefetch buffers are
  drained before the timing starts."""
  drain = 2 * args.workers + 2 if name == "from_files" else 0
  return timed_window(
    step,
    next_batch,
    sync,
    batch=args.batch,
    seconds=args.seconds,
    warmup_s=args.warmup_s,
    warmup_steps=max(args.warmup_steps, drain),
  )


def summarize(side: dict) -> dict:
  """The per-side summary fields from its `fixed_batch` and `from_files` windows:
  ratio = from-files / fixed examples/s; input CPU per example = from-files minus fixed-batch
  CPU-seconds per example (the training loop's own host work is in both and cancels).

  Example:
    >>> s = summarize({"fixed_batch": {"examples_per_s": 2000.0, "cpu_s_per_example": 0.0005},
    ...                "from_files": {"examples_per_s": 1500.0, "cpu_s_per_example": 0.0055}})
    >>> s["ratio"], round(s["input_cpu_s_per_example"], 6), round(s["input_examples_per_cpu_s"])
    (0.75, 0.005, 200)
  """
  fixed, files = side.get("fixed_batch"), side.get("from_files")
  if fixed:
    side["fixed_batch_examples_per_s"] = fixed["examples_per_s"]
  if files:
    side["from_files_examples_per_s"] = files["examples_per_s"]
    side["cpu_s_per_example_from_files"] = files["cpu_s_per_example"]
  if fixed and files:
    side["ratio"] = files["examples_per_s"] / fixed["examples_per_s"]
    # What feeding from files adds per example on the host: the loader workers, decode,
    # transfers; the training loop's own CPU (dispatch) is in both windows and cancels.
    extra = files["cpu_s_per_example"] - fixed["cpu_s_per_example"]
    side["input_cpu_s_per_example"] = extra
    side["input_examples_per_cpu_s"] = 1.0 / extra if extra > 0 else None
  return side


# ---------------------------------------------------------------------------------------- ours


class RecordsSource:
  """The trainer's source protocol (`num_examples`, `iterate`, `cluster_sizes` for MM-TS's shift
  table) over our ArrayRecord pipeline with grain worker processes, plus the fixed tokens.
  `batches_yielded` counts the batches the loader handed out (prefetched ones included)."""

  def __init__(self, data_dir, batch, workers, image_size, tokens, cluster_sizes):
    self.data_dir, self.batch, self.workers, self.image_size = data_dir, batch, workers, image_size
    self.tokens, self.cluster_sizes = tokens, cluster_sizes
    self.num_examples, self.fingerprint = len(cluster_sizes), None
    self.batches_yielded, self.loaders = 0, []

  def iterate(self, start_batch=0, process_index=0, process_count=1):
    if start_batch:
      raise ValueError(f"the benchmark source starts at batch 0, got {start_batch}")
    loader = igb._ours_loader(
      self.data_dir, self.batch, self.workers, "workers", image_size=self.image_size
    )
    self.loaders.append(loader)
    return self._batches(loader)

  def _batches(self, loader):
    for b in loader:
      self.batches_yielded += 1
      yield {"image": b["image"], "index": b["index"], "text": self.tokens}

  def close(self) -> None:
    """Stops the grain worker processes."""
    for loader in self.loaders:
      inner = getattr(loader, "_it", None)
      if callable(getattr(inner, "close", None)):
        inner.close()
    self.loaders.clear()


def run_ours(args, data: dict, result: dict, out: str, wait_gpu) -> None:
  """Our side: setup, `wait_gpu()`, compile, then the fixed and from-files windows."""
  import jax
  import train_step_bench as tsb

  from mmts_jax import train
  from mmts_jax.data import image_ops, sources

  side = result.setdefault("ours", {})
  c, spec = tsb._config(args.model, args.variant, "mmts", args.batch)
  c.mesh.num_devices = 1
  text = spec["text"]
  tokens = fixed_tokens(args.batch, text["max_len"], text["vocab_size"])
  sizes = np.clip(np.random.default_rng(1).zipf(1.5, size=args.num_images), 1, 10_000)
  src = RecordsSource(data["records"], args.batch, args.workers, spec["image_size"], tokens, sizes)
  sources.SOURCES["e2e_train_bench"] = lambda cfg, **kw: src
  c.data.name = "e2e_train_bench"
  side.update(
    model=f"{args.model} ({tsb.MODELS[args.model]['image']['variant']} image tower), variant "
    f"{args.variant}, MM-TS, bf16 compute, AdamW",
    batch=args.batch,
    workers=args.workers,
    loader="image_text_pipeline(uint8=True, decoder=auto) + Loader(worker_count=W)",
    simplejpeg=image_ops.has_simplejpeg(),
  )
  try:
    t = time.perf_counter()
    run = train.setup(c)
    jax.block_until_ready(run.state)
    side["setup_s"] = time.perf_counter() - t
    _log(f"ours: setup (parameters initialised, first batch read) in {side['setup_s']:.1f} s")
    it = run.device_batches(0, prefetch=PREFETCH)
    first = next(it)
    # XLA times candidate kernels while it compiles (autotuning): the GPU is ours alone by then.
    wait_gpu()
    t = time.perf_counter()
    compiled = run.step_fn.lower(run.state, first).compile()
    side["compile_s"] = time.perf_counter() - t
    side["device"] = jax.devices()[0].device_kind
    _log(f"ours: step compiled in {side['compile_s']:.1f} s")
    _write(out, result)
    box = {"state": run.state, "m": None, "steps": 0}

    def step(batch):
      box["state"], box["m"] = compiled(box["state"], batch)
      box["steps"] += 1

    def sync():
      jax.block_until_ready(box["m"])

    windows = (("fixed_batch", lambda: first), ("from_files", lambda: next(it)))
    for name, next_batch in windows:
      need = args.warmup_s + args.seconds + 10
      if _left(args) < need:
        result["skipped"].append(f"ours {name}: {_left(args):.0f} s left, needs {need:.0f}")
        _log(f"ours {name}: skipped (deadline)")
        continue
      side[name] = window(name, step, next_batch, sync, args)
      _log(f"ours {name}: {side[name]['examples_per_s']:.0f} examples/s")
      summarize(side)
      _write(out, result)
    side["optimizer_steps"] = int(jax.device_get(box["state"].step))
    side["steps_run"] = box["steps"]
    side["loader_batches_yielded"] = src.batches_yielded
  finally:
    src.close()
  summarize(side)
  _write(out, result)


# ------------------------------------------------------------------------------------ openclip


def openclip_child(args) -> int:
  """OpenCLIP's side, in its own process (`--child warm|timed`), writing `--child-out`."""
  if args.cpus:
    lo, hi = (int(x) for x in args.cpus.split("-"))
    os.sched_setaffinity(0, range(lo, hi + 1))
  import open_clip
  import torch
  from open_clip.loss import ClipLoss

  # As `input_gpu_bench._openclip_loader` sets it in the timed child: the warm-up child compiles
  # in the same state, so the timed one finds its graphs in TorchInductor's cache.
  torch.set_num_threads(1)

  res: dict = {"mode": args.child, "workers": args.workers, "batch": args.batch, "skipped": []}
  out = args.child_out
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  if dev == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  name = args.openclip_model
  if name == "tiny":
    cfg_dir = tempfile.mkdtemp(prefix="oc_cfg_")
    with open(f"{cfg_dir}/e2e-tiny.json", "w") as f:
      json.dump(_TINY_OPENCLIP, f)
    open_clip.add_model_config(cfg_dir)
    name = "e2e-tiny"
  t = time.perf_counter()
  model = open_clip.create_model(name, device=dev)
  size = model.visual.image_size
  size = size[0] if isinstance(size, (tuple, list)) else int(size)
  tokens = torch.from_numpy(
    fixed_tokens(args.batch, model.context_length, model.vocab_size).astype(np.int64)
  )
  res.update(
    model=f"open_clip {args.openclip_model}" + (" compiled" if args.compile else " eager"),
    params=sum(p.numel() for p in model.parameters()),
    device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
    torch=torch.__version__,
    loader="webdataset ResampledShards + decode(pilrgb) + torchvision + DataLoader(num_workers=W)",
  )
  it = None
  if args.child == "timed":  # start the workers now: they fill their buffers while it compiles
    it = igb._openclip_loader(args.urls.split(","), args.batch, args.workers, image_size=size)
    first = next(it)
    fixed = (first[0].to(dev), tokens.to(dev))
  else:
    fixed = (torch.randn(args.batch, 3, size, size, device=dev), tokens.to(dev))
  if args.compile:
    model = torch.compile(model)
  opt = torch.optim.AdamW(
    model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6
  )
  loss_fn = ClipLoss()
  box = {"loss": None}

  def step(batch):
    images, text = (x.to(dev, non_blocking=True) for x in batch)
    with torch.autocast(dev, dtype=torch.bfloat16):
      out_ = model(images, text)
      loss = loss_fn(out_[0], out_[1], out_[2])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    box["loss"] = loss

  def sync():
    if dev == "cuda":
      torch.cuda.synchronize()
    else:
      box["loss"].item()

  t_w = time.perf_counter()
  for _ in range(3):
    step(fixed)
  sync()
  res["build_s"], res["warm_s"] = t_w - t, time.perf_counter() - t_w
  _clog(args, f"built in {res['build_s']:.1f} s, 3 warm-up steps in {res['warm_s']:.1f} s")
  _child_write(out, res)
  if args.child == "timed":
    deadline = time.perf_counter() + args.child_deadline_s
    windows = (("fixed_batch", lambda: fixed), ("from_files", lambda: (next(it)[0], tokens)))
    for wname, next_batch in windows:
      need = args.warmup_s + args.seconds + 5
      if deadline - time.perf_counter() < need:
        res["skipped"].append(f"openclip {wname}: deadline")
        _clog(args, f"{wname}: skipped (deadline)")
        continue
      res[wname] = window(wname, step, next_batch, sync, args)
      _clog(args, f"{wname}: {res[wname]['examples_per_s']:.0f} examples/s")
      _child_write(out, res)
    res["steps_run"] = sum(res[w]["steps"] + res[w]["warmup_steps"] for w, _ in windows if w in res)
    if dev == "cuda":
      res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    _child_write(out, res)
    inner = getattr(it, "_shutdown_workers", None)
    if callable(inner):
      inner()
  return 0


def _child_write(path: str, res: dict) -> None:
  from mmts_jax import atomic_io

  atomic_io.atomic_write_json(path, res)


def _child_cmd(args, mode: str, out: str, urls: list[str], cpus: str, deadline_s: float) -> list:
  cmd = [
    args.openclip_python or sys.executable,
    str(pathlib.Path(__file__).resolve()),
    "--child", mode, "--child-out", out, "--out", out,
    "--openclip-model", args.openclip_model,
    "--batch", str(args.batch), "--workers", str(args.workers),
    "--seconds", str(args.seconds), "--warmup-s", str(args.warmup_s),
    "--warmup-steps", str(args.warmup_steps), "--urls", ",".join(urls),
    "--child-deadline-s", str(deadline_s), "--t0", repr(WALL_T0),
  ]  # fmt: skip
  if cpus:
    cmd += ["--cpus", cpus]
  if not args.compile:
    cmd.append("--no-compile")
  return cmd


def _start(cmd: list) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [str(_HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]))  # fmt: skip
  # Its own process session: on a timeout the child and its DataLoader workers are ended as one
  # group (`_stop`), and nothing else.
  # stderr is ours: its lines land in the same log, on the same clock.
  return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
  if proc.poll() is None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _read_child(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


# ---------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
  global T0, WALL_T0
  p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
  p.add_argument("--out", required=True, help="the result json")
  p.add_argument("--num-images", type=int, default=20_000)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--workers", type=int, default=12, help="loader worker processes, both sides")
  p.add_argument("--model", default="vit_b16", help="ours: a train_step_bench.MODELS key")
  p.add_argument("--variant", default="fast", help="ours: a train_step_bench.VARIANTS key")
  p.add_argument("--openclip-model", default="ViT-B-16", help="'tiny': a small CPU config")
  p.add_argument("--no-compile", dest="compile", action="store_false", help="OpenCLIP eager")
  p.add_argument("--sides", default="ours,openclip")
  p.add_argument("--seconds", type=float, default=30.0, help="timed seconds per window")
  p.add_argument("--warmup-s", type=float, default=8.0, help="warm-up seconds per window")
  p.add_argument("--warmup-steps", type=int, default=5, help="warm-up steps per window, at least")
  p.add_argument("--deadline-s", type=float, default=540.0)
  p.add_argument("--warm-cpus", default=None, help="cores of OpenCLIP's warm-up, e.g. 10-15")
  p.add_argument("--openclip-python", default=None, help="interpreter of the OpenCLIP children")
  p.add_argument("--data-dir", default=None, help="where the JPEGs go (default: a temp dir)")
  # The OpenCLIP child's own arguments.
  p.add_argument("--child", choices=("warm", "timed"), help=argparse.SUPPRESS)
  p.add_argument("--child-out", help=argparse.SUPPRESS)
  p.add_argument("--child-deadline-s", type=float, default=1e9, help=argparse.SUPPRESS)
  p.add_argument("--urls", default="", help=argparse.SUPPRESS)
  p.add_argument("--cpus", default="", help=argparse.SUPPRESS)
  p.add_argument("--t0", type=float, default=0.0, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    return openclip_child(args)
  T0, WALL_T0 = time.perf_counter(), time.time()
  TIMELINE.clear()
  # Ours and OpenCLIP's children share the GPU (never both timed): JAX takes memory as needed.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  sides = [s for s in args.sides.split(",") if s]
  if (
    args.batch <= 0
    or args.workers <= 0
    or args.num_images < args.batch
    or not sides
    or (set(sides) - {"ours", "openclip"})
  ):
    p.error(
      f"--batch and --workers must be positive, --num-images >= --batch, --sides of ours,openclip:"
      f" {args.batch} {args.workers} {args.num_images} {args.sides!r}"
    )
  import psutil

  out = args.out
  pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
  result = {
    "bench": "end-to-end training from JPEG files vs a fixed device batch: ours vs OpenCLIP",
    "command": "python3 benchmarks/e2e_train_bench.py " + " ".join(argv or sys.argv[1:]),
    "num_images": args.num_images,
    "batch": args.batch,
    "workers": args.workers,
    "text": "one fixed batch of random token ids (seed 0), both sides",
    "host": {
      "cpu_count": os.cpu_count(),
      "cpu_affinity": len(psutil.Process().cpu_affinity()),
      "python": platform.python_version(),
      "node": platform.node(),
    },
    "skipped": [],
  }
  root = args.data_dir or tempfile.mkdtemp(prefix="e2e_train_bench_")
  tmp = tempfile.mkdtemp(prefix="e2e_children_")
  warm = None
  try:
    data = write_data(root, args.num_images)
    result["mean_jpeg_bytes"] = data["mean_jpeg_bytes"]
    _log(f"wrote {args.num_images} JPEGs as tars and ArrayRecord under {root}")
    _write(out, result)
    n = os.cpu_count() or 1
    cpus = args.warm_cpus if args.warm_cpus is not None else (f"{n - 6}-{n - 1}" if n >= 12 else "")
    if "openclip" in sides and args.compile:
      # Untimed: fills TorchInductor's cache while ours initialises and compiles.
      warm = _start(_child_cmd(args, "warm", f"{tmp}/warm.json", data["urls"], cpus, 1e9))
      _log(f"openclip: warm-up child started (pid {warm.pid}, cores {cpus or 'all'})")

    waited = []

    def wait_gpu():
      """Blocks until the warm-up child has left the GPU (killed if it would pass the deadline)."""
      if warm is None or waited:
        return
      waited.append(True)
      try:
        warm.wait(timeout=max(_left(args) - 120, 1))
      except subprocess.TimeoutExpired:
        result["skipped"].append("openclip warm-up: killed at the deadline")
        _stop(warm)
      oc = result.setdefault("openclip", {})
      oc["warmup_child"] = _read_child(f"{tmp}/warm.json") or {"rc": warm.returncode}
      _log(f"openclip: warm-up child done (rc {warm.returncode})")

    if "ours" in sides:
      try:
        run_ours(args, data, result, out, wait_gpu)
      except Exception as e:  # the other side's numbers stand on their own
        result["ours_error"] = f"{type(e).__name__}: {str(e)[:500]}"
        _log(result["ours_error"])
    wait_gpu()
    _write(out, result)
    if "openclip" in sides:
      left = _left(args) - 5
      if left < 60:
        result["skipped"].append(f"openclip: {left:.0f} s left")
      else:
        proc = _start(_child_cmd(args, "timed", f"{tmp}/timed.json", data["urls"], "", left - 5))
        _log(f"openclip: timed child started (pid {proc.pid})")
        try:
          proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
          result["skipped"].append("openclip timed child: killed at the deadline")
          _stop(proc)
        oc = result.setdefault("openclip", {})
        oc.update(_read_child(f"{tmp}/timed.json"))
        oc["rc"] = proc.returncode  # on failure its traceback is in the log (stderr)
        summarize(oc)
        _log(f"openclip: timed child done (rc {proc.returncode}): "
             f"{oc.get('from_files_examples_per_s', 0):.0f} examples/s from files")  # fmt: skip
    ours, oc = result.get("ours", {}), result.get("openclip", {})
    for key in ("from_files_examples_per_s", "fixed_batch_examples_per_s"):
      if ours.get(key) and oc.get(key):
        result[f"ours_over_openclip_{key.removesuffix('_examples_per_s')}"] = ours[key] / oc[key]
    if ours.get("input_cpu_s_per_example") and oc.get("input_cpu_s_per_example"):
      # > 1: ours spends fewer host CPU-seconds per example on its input.
      result["openclip_over_ours_input_cpu_s_per_example"] = (
        oc["input_cpu_s_per_example"] / ours["input_cpu_s_per_example"]
      )
  finally:
    if warm is not None:
      _stop(warm)
    if not args.data_dir:
      shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
  _log("done")
  _write(out, result)
  print(json.dumps({k: v for k, v in result.items() if k != "timeline"}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
