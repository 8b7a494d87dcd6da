"""Times `mmts synthetic` end to end and records its ablation table.

  python benchmarks/synthetic_bench.py --name default -- --workdir /tmp/mmts_syn
  python benchmarks/synthetic_bench.py --name ablation_3seeds -- --workdir /tmp/s3 --seeds 3
  python benchmarks/synthetic_bench.py --name ablation_3seeds --from-workdir /tmp/s3

Runs the command in a subprocess (so the time includes the imports, the MiniLM load, every JIT
compile and the plots) and writes `benchmarks/results/synthetic_<name>.json`: wall and CPU
seconds, the host's core count and load average (the numbers are only comparable on an idle
host), the command, and the summary table from the run's results.json. `--from-workdir` records
an existing run (time taken from its results.json) instead of running one.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _workdir(args_after: list[str]) -> str:
  if "--workdir" not in args_after:
    raise SystemExit("pass --workdir DIR after `--` (the command's own flag)")
  return args_after[args_after.index("--workdir") + 1]


def _write(path: pathlib.Path, obj) -> None:
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def main() -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--name", required=True)
  p.add_argument("--from-workdir", default=None)
  p.add_argument("cmd", nargs="*", help="arguments of `mmts synthetic` (after --)")
  args = p.parse_args()
  record = {
    "host": {
      "cpus": os.cpu_count(),
      "machine": platform.machine(),
      "python": platform.python_version(),
    }
  }
  if args.from_workdir:
    workdir = args.from_workdir
    results = json.loads((pathlib.Path(workdir) / "results.json").read_text())
    record.update(command="(recorded from an earlier run)", wall_s=results["seconds"])
  else:
    workdir = _workdir(args.cmd)
    cmd = [sys.executable, "-m", "mmts_jax.cli", "synthetic", *args.cmd]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
      return proc.returncode
    results = json.loads((pathlib.Path(workdir) / "results.json").read_text())
    record.update(
      command="mmts synthetic " + " ".join(args.cmd),
      wall_s=wall,
      cpu_user_s=usage.ru_utime,
      cpu_sys_s=usage.ru_stime,
      load_avg_before=load_before,
      load_avg_after=os.getloadavg(),
    )
  record.update(
    seeds=results["seeds"],
    rows=results["rows"],
    labels=results["labels"],
    summary=results["summary"],
    data=results["data"],
    clusters={k: v for k, v in results["clusters"].items() if k != "provenance"},
    per_run_seconds={f"{r['row']}/seed_{r['seed']}": r["seconds"] for r in results["runs"]},
    config={
      k: results["config"][k] for k in ("total_steps", "batch_size", "mmts", "temperature", "optim")
    },
  )
  out = ROOT / "benchmarks" / "results" / f"synthetic_{args.name}.json"
  _write(out, record)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
