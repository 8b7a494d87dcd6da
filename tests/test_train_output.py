"""What `mmts train` prints: a progress bar only on a terminal, and a max-margin run's values
named margins (in the summary, `metrics.jsonl` and the bar), never temperatures."""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import pty
import struct
import subprocess
import sys
import termios

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _train(workdir: pathlib.Path, *overrides: str, stderr) -> subprocess.CompletedProcess:
  cmd = [sys.executable, "-m", "mmts_jax.cli", "train", "--config", "configs/tiny.py"]
  cmd += ["--workdir", str(workdir), "--config.total_steps=4", "--config.progress_bar=True"]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.run(
    [*cmd, *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, timeout=120
  )


def test_max_margin_run_names_margins_and_a_pipe_gets_no_progress_bar(tmp_path):
  proc = _train(tmp_path / "run", "--config.loss.name=max_margin", stderr=subprocess.PIPE)
  out, err = proc.stdout.decode(), proc.stderr.decode()
  assert proc.returncode == 0, err
  # progress_bar=True, but stderr is a pipe: no bar (tqdm would draw with carriage returns).
  assert "\r" not in err and "step/s" not in err and "train:" not in err, err
  assert "margin mean" in out and "tau" not in out, out
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  assert len(records) == 4
  for r in records:
    assert {"margin_mean", "margin_min", "margin_max", "margin_base"} <= set(r), r
    assert not [k for k in r if "temperature" in k], r
    assert 0 < r["margin_min"] <= r["margin_mean"] <= r["margin_max"]


def test_a_terminal_gets_the_progress_bar_with_the_value_named(tmp_path):
  # stderr on a pseudo-terminal: the bar is drawn, its value named `tau` for InfoNCE.
  leader, follower = pty.openpty()
  # A new pseudo-terminal is 0 columns wide; the bar fits its width (dynamic_ncols).
  fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
  try:
    proc = _train(tmp_path / "run", stderr=follower)
    os.close(follower)
    chunks = []
    while True:
      try:
        chunk = os.read(leader, 65536)
      except OSError:  # EIO: the terminal's other end is closed and drained
        break
      if not chunk:
        break
      chunks.append(chunk)
  finally:
    os.close(leader)
  err = b"".join(chunks).decode(errors="replace")
  assert proc.returncode == 0, err
  assert "train:" in err and "4/4" in err and "tau=" in err, err
  assert "tau mean" in proc.stdout.decode()
