"""The docstring examples of the input-checking modules run (and agree with the code)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
  "mmts_jax.errors",
  "mmts_jax.array_files",
  "mmts_jax.table_files",
  "mmts_jax.data.convert",
  "mmts_jax.read_access",
  "mmts_jax.commands.errors",
  "mmts_jax.commands.help_format",
  "mmts_jax.data.image_ops",
  "mmts_jax.data.device_crop",
  "mmts_jax.eval.relevancy",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0, result
