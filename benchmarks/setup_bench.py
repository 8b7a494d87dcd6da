"""Where `mmts_jax.train.setup` spends its time: one process builds the runs of
`train_step_bench.py` (its models and configuration, one device) for each `--modes` entry in
turn, and records per `setup` the wall time, every XLA compilation it triggered (name and
seconds, from `jax_log_compiles`) and a content hash of the created state (equal hashes: the same
initial parameters, optimizer state and policy state, bit for bit).

  python benchmarks/setup_bench.py --out benchmarks/results/cpu_setup17/setup_after.json \\
      --model vit_b16 --batch 8 --modes fixed,mmts

Writes one json (atomically).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import pathlib
import platform
import re
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import train_step_bench as tsb  # noqa: E402

from mmts_jax import atomic_io  # noqa: E402
from mmts_jax.data import sources  # noqa: E402
from mmts_jax.train import setup  # noqa: E402

_COMPILED = re.compile(r"Finished XLA compilation of (\S+) in ([0-9.]+) sec")


class _Compiles(logging.Handler):
  """Collects (name, seconds) of every XLA compilation logged by `jax_log_compiles`."""

  def __init__(self):
    super().__init__()
    self.events: list[tuple[str, float]] = []

  def emit(self, record):
    m = _COMPILED.search(record.getMessage())
    if m:
      self.events.append((m.group(1), float(m.group(2))))


def state_hash(state) -> str:
  """sha256 (16 hex digits) of every array of the state, in tree order."""
  h = hashlib.sha256()
  for x in jax.tree.leaves(state.checkpoint_tree()):
    h.update(np.ascontiguousarray(np.asarray(x)).tobytes())
  return h.hexdigest()[:16]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
  p.add_argument("--out", required=True, help="json path")
  p.add_argument("--model", choices=sorted(tsb.MODELS), default="vit_b16")
  p.add_argument("--variant", choices=sorted(tsb.VARIANTS), default="fast")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--modes", default="fixed,mmts", help="comma separated temperature modes")
  p.add_argument("--table-size", type=int, default=2_900_000)
  args = p.parse_args(argv)
  jax.config.update("jax_log_compiles", True)
  handler = _Compiles()
  logging.getLogger("jax").addHandler(handler)
  logging.getLogger("jax").setLevel(logging.WARNING)
  spec = tsb.MODELS[args.model]
  host = tsb._batch(spec, args.batch, args.table_size)
  sizes = np.clip(np.random.default_rng(1).zipf(1.5, size=args.table_size), 1, 10_000)
  sources.SOURCES["setup_bench"] = lambda cfg, **kw: tsb._FixedBatchSource(host, sizes)
  result = {
    "bench": "setup",
    "model": args.model,
    "variant": args.variant,
    "batch": args.batch,
    "table_size": args.table_size,
    "platform": jax.devices()[0].platform,
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "python": platform.python_version(),
    "runs": [],
  }
  for mode in args.modes.split(","):
    c, _ = tsb._config(args.model, args.variant, mode, args.batch)
    c.data.name, c.mesh.num_devices = "setup_bench", 1
    start = len(handler.events)
    t0 = time.perf_counter()
    run = setup(c)
    jax.block_until_ready(run.state)
    seconds = time.perf_counter() - t0
    compiles = handler.events[start:]
    result["runs"].append(
      {
        "mode": mode,
        "setup_s": seconds,
        "compile_s": sum(s for _, s in compiles),
        "compiles": [{"name": n, "s": s} for n, s in compiles],
        "state_sha256_16": state_hash(run.state),
      }
    )
    print(f"{mode}: setup {seconds:.1f} s, {len(compiles)} compiles", file=sys.stderr, flush=True)
  atomic_io.atomic_write_json(args.out, result)
  print(json.dumps(result, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
