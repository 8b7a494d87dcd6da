"""benchmarks/e2e_train_bench.py, our side end to end on the CPU: real JPEGs written as ArrayRecord
records, the real trainer (`mmts_jax.train.setup`, MM-TS) with a tiny model, fed once by a fixed
device batch and once by the grain pipeline with a worker process. The json must count what ran:
every step advanced the optimizer, the from-files window consumed one loader batch per step, and
the rates and CPU seconds are the counts divided by the measured times.
(The OpenCLIP side needs torch: a manual smoke run, see BENCHMARKS.md.)"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "e2e_train_bench.py"


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("e2e_train_bench", _PATH)
  assert spec is not None and spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)  # puts benchmarks/ on sys.path
  import train_step_bench

  # Small enough to compile in seconds: 16 px crops (four 8 x 8 patches), 5 tokens.
  train_step_bench.MODELS["e2e_test"] = dict(
    image=dict(name="vit", variant="mu/8"),
    image_size=16,
    text=dict(
      name="transformer", vocab_size=50, max_len=5, width=16, depth=1, num_heads=2, mlp_dim=32
    ),
    embed_dim=8,
  )
  return module


def test_ours_from_files_vs_fixed_batch(bench, tmp_path):
  out = tmp_path / "e2e.json"
  batch = 4
  argv = [
    "--out", str(out), "--sides", "ours", "--model", "e2e_test", "--batch", str(batch),
    "--num-images", "12", "--workers", "1", "--seconds", "0.3", "--warmup-s", "0",
    "--warmup-steps", "2", "--data-dir", str(tmp_path / "data"),
  ]  # fmt: skip
  assert bench.main(argv) == 0
  result = json.loads(out.read_text())  # the file is whole (written atomically)
  ours = result["ours"]
  assert ours["workers"] == 1 and ours["batch"] == batch and not result["skipped"]
  run = 0
  for name in ("fixed_batch", "from_files"):
    w = ours[name]
    assert w["steps"] >= 3 and w["examples"] == w["steps"] * batch
    assert w["examples_per_s"] == pytest.approx(w["examples"] / w["wall_s"], rel=1e-9)
    assert w["cpu_s"] > 0
    assert w["cpu_s_per_example"] == pytest.approx(w["cpu_s"] / w["examples"], rel=1e-9)
    assert ours[f"{name}_examples_per_s"] == w["examples_per_s"]
    run += w["steps"] + w["warmup_steps"]
  files, fixed = ours["from_files"], ours["fixed_batch"]
  # The from-files window drains the loader's buffers first: at least 2 x workers + 2 steps.
  assert files["warmup_steps"] >= 4
  # Every step ran and updated the optimizer (none skipped as non-finite).
  assert ours["steps_run"] == run == ours["optimizer_steps"]
  # One loader batch per from-files step, plus setup's first batch and the one more that
  # `device_batches` keeps in flight; the fixed window took none.
  assert ours["loader_batches_yielded"] == files["warmup_steps"] + files["steps"] + bench.PREFETCH
  assert ours["ratio"] == pytest.approx(files["examples_per_s"] / fixed["examples_per_s"])
  assert ours["input_cpu_s_per_example"] == pytest.approx(
    files["cpu_s_per_example"] - fixed["cpu_s_per_example"]
  )
  events = [e["s"] for e in result["timeline"]]
  assert events == sorted(events) and len(events) >= 5
  assert list((tmp_path / "data" / "wds").glob("*.tar"))  # the OpenCLIP side's shards, too
