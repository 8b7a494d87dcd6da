"""One direction for a batch (docs/architecture.md): along input -> step -> model -> temperature
policy -> loss -> metrics no module imports one of a higher layer, lazily or not. Reads the
sources with `ast` (nothing is imported)."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Lower layers never import higher ones; a layer may import its own modules.
LAYERS = [
  ["mmts_jax.config_defaults"],
  ["mmts_jax.schedules", "mmts_jax.shifts", "mmts_jax.losses", "mmts_jax.mesh"],
  ["mmts_jax.models"],
  ["mmts_jax.temperature", "mmts_jax.policies"],
  ["mmts_jax.data", "mmts_jax.train.state", "mmts_jax.train.optim"],
  ["mmts_jax.train.step", "mmts_jax.train.grad_cache"],
  ["mmts_jax.train.setup", "mmts_jax.train.pretrained", "mmts_jax.train.workdir"],
  ["mmts_jax.train.loop", "mmts_jax.train"],
  ["mmts_jax.commands.train"],
]


def _layer(module: str) -> int | None:
  best = None
  for i, names in enumerate(LAYERS):
    for name in names:
      if (module == name or module.startswith(name + ".")) and (
        best is None or len(name) > len(best[1])
      ):
        best = (i, name)
  return None if best is None else best[0]


def _module(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path):
  pkg = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + [base]).strip(".")
      for alias in node.names:
        sub = ROOT.joinpath(*base.split("."), alias.name)
        # `from pkg import submodule` imports the submodule (and pkg/__init__, which re-exports
        # from below); `from module import name` imports the module.
        is_module = sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file()
        yield f"{base}.{alias.name}" if is_module else base


def test_no_module_on_the_batch_path_imports_a_higher_layer():
  files = [p for p in (ROOT / "mmts_jax").rglob("*.py")]
  checked, bad = 0, []
  for path in files:
    mine = _layer(_module(path))
    if mine is None:
      continue
    checked += 1
    for name in _imports(path):
      theirs = _layer(name)
      if theirs is not None and theirs > mine:
        bad.append(f"{_module(path)} (layer {mine}) imports {name} (layer {theirs})")
  assert checked > 30, checked
  assert not bad, "\n".join(sorted(set(bad)))
