"""Subprocess side of tests/test_faults.py: JAX fixes its device count and its process group
when the backend starts, so runs on another number of devices, several processes or under a
file-size limit happen here, in a fresh interpreter.

  python tests/faults_worker.py TASK [TASK ...]     (in order, in one process)
    train:WORKDIR:STOP   the tiny run (`config()`) on however many devices XLA_FLAGS gives,
                         trained (or resumed) in WORKDIR up to STOP.
    disk_full:WORKDIR:FAIL_STEP:STOP
                         `mmts train` whose checkpoint save of FAIL_STEP runs under a 16 KiB
                         file-size limit (RLIMIT_FSIZE: the kernel fails tensorstore's writes
                         with EFBIG, as a full disk fails them with ENOSPC). Prints its exit
                         status. (The rerun is a new process, as after a real full disk: orbax's
                         threads of the failed save may still be winding down in this one.)
  python tests/faults_worker.py mp PROCESS_ID PORT WORKDIR STOP OUT_JSON
      one of two processes (`jax.distributed.initialize` on 127.0.0.1:PORT, gloo collectives):
      trains WORKDIR up to STOP, checks the ring loss over the 2-process mesh against a float64
      dense loss and records this process's input rows in OUT_JSON.
"""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
# The CLI flags of every run here: checkpoints at 3, 6, ...; no TensorBoard, no progress bar.
FLAGS = [
  "--config",
  TINY,
  "--config.checkpoint.every_steps=3",
  "--config.checkpoint.keep=3",
  "--config.tensorboard=false",
  "--no-progress",
]


def config():
  from mmts_jax.commands.train import load_config

  c = load_config(TINY)
  c.update(tensorboard=False, progress_bar=False)
  c.checkpoint.update(every_steps=3, keep=3)
  return c


def train(specs) -> None:
  from mmts_jax import train as train_lib

  for spec in specs:
    workdir, stop = spec.rsplit(":", 1)
    train_lib.train_and_evaluate(config(), workdir, stop_at_step=int(stop))


def ring_vs_dense(mesh) -> dict:
  """The ring InfoNCE over the processes' devices and a float64 numpy dense InfoNCE of the same
  global batch (per-anchor temperatures)."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from mmts_jax import losses

  rng = np.random.default_rng(0)
  n, d = 4 * mesh.size, 8
  x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  y /= np.linalg.norm(y, axis=1, keepdims=True)
  t = rng.uniform(0.05, 0.2, size=n)
  rows = slice(jax.process_index() * n // 2, (jax.process_index() + 1) * n // 2)
  spec = NamedSharding(mesh, P("data"))
  glob = [
    jax.make_array_from_process_local_data(spec, a[rows].astype(np.float32), a.shape)
    for a in (x, y, t)
  ]
  fn = losses.make_sharded_loss(mesh, "infonce", sharded="ring", block_size=(2, 3))
  ring = float(jax.jit(fn, out_shardings=NamedSharding(mesh, P()))(*glob))

  def ce(logits):  # mean over rows of -log softmax at the diagonal
    m = logits.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    return float(np.mean(lse - np.diag(logits)))

  s = x @ y.T
  dense = 0.5 * (ce(s / t[:, None]) + ce(s.T / t[:, None]))
  return {"ring": ring, "dense": dense}


def multiprocess(process_id: int, port: int, workdir: str, stop: int, out: str) -> None:
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=2,
    process_id=process_id,
    initialization_timeout=60,
  )
  from mmts_jax import mesh as mesh_lib
  from mmts_jax import train as train_lib
  from mmts_jax.data import sources

  c = config()
  result = train_lib.train_and_evaluate(c, workdir, stop_at_step=stop)
  source = sources.make_source(c.data, global_batch_size=int(c.batch_size), seed=int(c.seed))
  first = next(source.iterate(0, jax.process_index(), jax.process_count()))
  record = {
    "process_index": jax.process_index(),
    "process_count": jax.process_count(),
    "devices": jax.device_count(),
    "local_devices": jax.local_device_count(),
    "step": result.step,
    "first_batch_index": first["index"].tolist(),
    **ring_vs_dense(mesh_lib.make_mesh()),
  }
  pathlib.Path(out).write_text(json.dumps(record))
  jax.distributed.shutdown()


def disk_full(workdir: str, fail_step: int, stop: int) -> None:
  import resource
  import signal

  from mmts_jax import cli
  from mmts_jax.checkpointing import Checkpointer

  # Without this the kernel kills the process (SIGXFSZ) instead of failing the write.
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  save = Checkpointer.save

  def save_with_a_full_disk(self, step, tree, meta, *, force=False):
    if int(step) == fail_step:
      self.wait()  # the disk fills up during this save, not during the previous one
      resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, resource.RLIM_INFINITY))
    return save(self, step, tree, meta, force=force)

  Checkpointer.save = save_with_a_full_disk
  argv = ["train", "--workdir", workdir, "--stop-at-step", str(stop)] + FLAGS
  status = cli.main(argv)
  resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
  Checkpointer.save = save
  print(f"status: {status}", flush=True)


if __name__ == "__main__":
  if sys.argv[1] == "mp":
    a = sys.argv[2:]
    multiprocess(int(a[0]), int(a[1]), a[2], int(a[3]), a[4])
    sys.exit(0)
  for task in sys.argv[1:]:
    kind, *a = task.split(":")
    if kind == "train":
      train([f"{a[0]}:{a[1]}"])
    elif kind == "disk_full":
      disk_full(a[0], int(a[1]), int(a[2]))
    else:
      raise SystemExit(f"unknown task {task!r}")
