"""The install is clean: `pip install -e .` (what `make` runs) prints no setuptools warning, and
`pip install .` builds a wheel of the package alone, with the accelerator extras the README
documents (`cuda12`, `cuda13`, `tpu`) and the Python versions `requires-python` allows.

Both builds run pip in a copy of the project (build isolation fetches `setuptools>=77` from the
same index `make install` uses), installing into a scratch prefix: the test's own environment is
not touched.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# A pip configuration on the test machine can name index folders that do not exist there; pip
# says so per package. That line is about the machine, not about this project's build.
_MACHINE_NOTE = re.compile(r"^WARNING: Location '[^']*' is ignored: it is neither a file nor a")


def _project_copy(tmp_path: pathlib.Path) -> pathlib.Path:
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy2(ROOT / name, src / name)
  shutil.copytree(ROOT / "mmts_jax", src / "mmts_jax", ignore=shutil.ignore_patterns("__pycache__"))
  return src


def _pip(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=300,
  )


def _warnings(proc: subprocess.CompletedProcess) -> list[str]:
  lines = (proc.stdout + proc.stderr).splitlines()
  return [
    line
    for line in lines
    if re.search(r"warn|deprecat", line, re.I) and not _MACHINE_NOTE.match(line.strip())
  ]


def test_editable_install_prints_no_warning(tmp_path):
  src = _project_copy(tmp_path)
  proc = _pip("install", "--no-deps", "--prefix", str(tmp_path / "prefix"), "-e", ".", cwd=src)
  assert proc.returncode == 0, proc.stderr
  assert _warnings(proc) == [], proc.stderr


def test_wheel_holds_the_package_and_declares_the_accelerator_extras(tmp_path):
  src = _project_copy(tmp_path)
  proc = _pip("wheel", "--no-deps", "--wheel-dir", str(tmp_path / "dist"), ".", cwd=src)
  assert proc.returncode == 0, proc.stderr
  assert _warnings(proc) == [], proc.stderr
  (wheel,) = (tmp_path / "dist").glob("mmts_jax-*.whl")
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    metadata = z.read(meta).decode()
    entry_points = z.read(meta.replace("METADATA", "entry_points.txt")).decode()
  tops = {n.split("/")[0] for n in names}
  assert tops == {"mmts_jax", meta.split("/")[0]}, tops  # no tests/, configs/, benchmarks/
  assert "mmts_jax/cli.py" in names and "mmts = mmts_jax.cli:main" in entry_points
  extras = set(re.findall(r"^Provides-Extra: (\S+)$", metadata, re.M))
  assert {"cuda12", "cuda13", "tpu", "text", "data"} <= extras, extras
  for extra in ("cuda12", "cuda13", "tpu"):
    want = rf"^Requires-Dist: jax\[{extra}\].*extra == \"{extra}\""
    assert re.search(want, metadata, re.M), extra
  assert "Requires-Python: >=3.11" in metadata
  assert "License-Expression: Apache-2.0" in metadata


def test_readme_documents_each_accelerator_extra_and_the_python_versions():
  readme = (ROOT / "README.md").read_text()
  for extra in ("cuda12", "cuda13", "tpu"):
    assert extra in PYPROJECT["project"]["optional-dependencies"], extra
    assert f'pip install ".[{extra}' in readme, extra
  classifiers = PYPROJECT["project"]["classifiers"]
  versions = [c.rsplit(" ", 1)[1] for c in classifiers if re.match(r".*Python :: 3\.\d+$", c)]
  assert versions == ["3.11", "3.12"], classifiers
  assert PYPROJECT["project"]["requires-python"] == ">=3.11"
  # Where each version is checked is said once, in the README's install section.
  for version in versions:
    assert f"Python {version}" in readme, version
