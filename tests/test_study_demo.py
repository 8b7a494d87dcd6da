"""`make run`'s rows carry the hyper-parameters the reported GPU study selected on validation."""

import dataclasses
import json
import pathlib

import pytest

from mmts_jax.study import demo

RESULTS = (
  pathlib.Path(__file__).resolve().parents[1] / "benchmarks/results/study/wide2/results.json"
)


@pytest.mark.parametrize("row", ["fixed", "learnable", "mmts", "mmts_lm"])
def test_demo_rows_equal_the_reported_study_selection(row):
  selected = json.loads(RESULTS.read_text())["selected_policies"][row]
  policy = dict(demo.demo_rows(period=selected.get("period", 60.0)))[row]
  fields = {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)}
  for key, value in selected.items():
    assert (
      fields[key] == pytest.approx(value, rel=1e-12)
      if isinstance(value, float)
      else (fields[key] == value)
    ), (row, key, fields[key], value)
