"""docs/quickstart.md works as printed: every `$ ` command of its shell blocks runs, in order, in
one bash session in a fresh repository-shaped folder (its `python` blocks headed `# NAME.py` are
written there first), and prints what the page shows.

The only change to a printed command is a smaller budget, appended as ordinary flags (`BUDGET`,
keyed by the command's first words; a later `--config.KEY=VALUE` wins), so that the whole page
runs in under a minute on two cores. The folder holds a copy of the Makefile, pyproject.toml and
configs/, `../shared` (the EK-100 annotations), and a `.venv/` as `make install` leaves it: an
install stamp, `bin/python` (runs the interpreter running the tests), `bin/mmts` (the console script
of the `mmts = mmts_jax.cli:main` entry point that tests/test_packaging.py finds in the wheel)
and `bin/activate`; `make install` there is then the no-op it is after a first install.

Printed output is compared line by line up to each line's first digit (numbers depend on the
budget and the host), with the folder's absolute path taken out (the commands print absolute
paths); `...` lines stand for omitted output.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "quickstart.md"
MARK = "::quickstart-command-done::"

# command prefix -> flags appended: the page's own numbers would take minutes on a CPU.
BUDGET = {
  "mmts finetune train": [
    "--config.total_steps=20",
    "--config.optim.warmup_steps=5",
    "--config.eval.every_steps=20",
    "--config.checkpoint.every_steps=20",
  ],
  "mmts finetune eval": ["--val-videos", "2000"],
  "mmts eval ek100": ["--val-videos", "2000"],
  "mmts train": ["--config.total_steps=10", "--config.log_every=5", "--config.tensorboard=false"],
}


@dataclasses.dataclass
class Command:
  text: str  # as printed, continuation lines joined
  expected: list[str]  # the output lines printed under it


def parse_page(text: str) -> tuple[list[Command], dict[str, str]]:
  """The `$ ` commands in page order, and the `# NAME.py` python blocks as {NAME.py: source}."""
  commands: list[Command] = []
  files: dict[str, str] = {}
  for lang, body in re.findall(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M):
    lines = body.splitlines()
    if lang == "python":
      head = re.fullmatch(r"# (\S+\.py)", lines[0]) if lines else None
      if head:
        files[head.group(1)] = body
      continue
    current: Command | None = None
    continued = False
    for line in lines:
      if continued and current is not None:
        current.text += "\n" + line
      elif line.startswith("$ "):
        current = Command(line[2:], [])
        commands.append(current)
      elif current is not None:
        current.expected.append(line)
      continued = line.endswith("\\")
  return commands, files


def _budget(command: str) -> str:
  words = " ".join(command.replace("\\\n", " ").split())
  for prefix in sorted(BUDGET, key=len, reverse=True):
    if words.startswith(prefix + " "):
      return command + " " + " ".join(BUDGET[prefix])
  return command


def _make_repo(tmp_path: pathlib.Path) -> pathlib.Path:
  repo = tmp_path / "repo"
  repo.mkdir()
  (tmp_path / "shared").symlink_to((ROOT / ".." / "shared").resolve())
  for name in ("Makefile", "pyproject.toml"):
    shutil.copy2(ROOT / name, repo / name)
  shutil.copytree(ROOT / "configs", repo / "configs", ignore=shutil.ignore_patterns("__pycache__"))
  bin_dir = repo / ".venv" / "bin"
  bin_dir.mkdir(parents=True)
  # `python` execs the interpreter (a symlink would lose its virtualenv: Python finds
  # pyvenv.cfg next to the path it was started as).
  (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
  (bin_dir / "mmts").write_text(
    f"#!{sys.executable}\nimport sys\nfrom mmts_jax.cli import main\nsys.exit(main())\n"
  )
  for script in ("python", "mmts"):
    (bin_dir / script).chmod(0o755)
  (bin_dir / "activate").write_text(
    f'VIRTUAL_ENV="{repo / ".venv"}"\nexport VIRTUAL_ENV\nPATH="$VIRTUAL_ENV/bin:$PATH"\n'
  )
  (repo / ".venv" / ".installed").touch()  # after pyproject.toml: `make install` has nothing to do
  return repo


def _shape(line: str) -> str:
  """A line up to its first digit, whitespace squeezed: what any budget prints alike."""
  return " ".join(re.split(r"\d", line, maxsplit=1)[0].split())


def test_quickstart_commands_run_as_printed(tmp_path):
  commands, files = parse_page(PAGE.read_text())
  assert len(commands) >= 8 and "make_zs.py" in files, (len(commands), sorted(files))
  for stage in ("mmts finetune prepare", "mmts cluster", "mmts finetune train", "mmts eval ek100"):
    assert any(c.text.startswith(stage + " ") for c in commands), stage
  repo = _make_repo(tmp_path)
  for name, source in files.items():
    (repo / name).write_text(source)
  # One session: `source .venv/bin/activate` holds for the commands after it. A failing command
  # stops the script with its status; the marker after each says which ones completed.
  script = ["set -eo pipefail"]
  for c in commands:
    script += [_budget(c.text), f"echo {MARK}"]
  env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MMTS_DEBUG")}
  env.update(PYTHONPATH=str(ROOT), PATH="/usr/local/bin:/usr/bin:/bin", HOME=str(tmp_path))
  proc = subprocess.run(
    ["bash", "-c", "\n".join(script)],
    cwd=repo,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  outputs = proc.stdout.replace(f"{repo}/", "").split(MARK + "\n")
  done = len(outputs) - 1
  assert proc.returncode == 0, (
    f"command {done + 1} of the quickstart failed (status {proc.returncode}):\n"
    f"$ {commands[done].text}\n{outputs[-1]}{proc.stderr[-3000:]}"
  )
  assert done == len(commands)
  for c, out in zip(commands, outputs, strict=False):
    printed = [_shape(line) for line in out.splitlines()]
    for line in c.expected:
      if line.strip() in ("", "...") or not _shape(line):
        continue
      assert any(p.startswith(_shape(line)) for p in printed), (
        f"$ {c.text}\nthe page shows {line!r}; the command printed:\n{out}"
      )
