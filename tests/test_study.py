"""The seed-batched study runner on the CPU: pairing, policies, selection, intervals, report."""

import json

import numpy as np
import pytest

from mmts_jax import shifts
from mmts_jax.longtail.generator import GeneratorConfig
from mmts_jax.study import experiment, report, stats
from mmts_jax.study import policies as P
from mmts_jax.study.runner import TrainConfig, batch_orders, train_seeds
from mmts_jax.study.task import make_task

_CFG = TrainConfig(steps=3, batch_size=16)


@pytest.fixture(scope="module")
def task():
  return make_task(
    GeneratorConfig(num_classes=5, head_size=40, imbalance=8, val_per_class=3, test_per_class=3)
  )


def test_seeds_are_paired_and_hyper_parameters_are_arguments(task):
  """Seed 1 alone, after seed 0 or before it: the same run; tau is fed, not compiled in."""
  fixed = train_seeds(P.Fixed(0.07), task, seeds=(0, 1), cfg=_CFG)
  swapped = train_seeds(P.Fixed(0.05), task, seeds=(1, 0), cfg=_CFG)
  again = train_seeds(P.Fixed(0.05), task, seeds=(0, 1), cfg=_CFG)
  np.testing.assert_allclose(swapped["test_text"][0], again["test_text"][1], rtol=1e-5, atol=1e-6)
  assert not np.allclose(again["test_text"][1], fixed["test_text"][1])
  assert not np.allclose(fixed["test_image"][0], fixed["test_image"][1])  # seeds differ
  np.testing.assert_allclose(fixed["temperature"], 0.07, rtol=1e-6)
  assert fixed["test_image"].shape == (2, 15, 64)
  np.testing.assert_allclose(np.linalg.norm(fixed["test_image"], axis=-1), 1, rtol=1e-5)


def test_constant_shift_table_is_the_fixed_row(task):
  """Same init and batch order across rows: ICS with every shift 0.07 trains as fixed 0.07."""
  fixed = train_seeds(P.Fixed(0.07), task, seeds=(0, 1), cfg=_CFG)
  n = len(task.train_label)
  # level=0.07 re-centres a constant 0.07 table onto itself (and shares the ics_lm program).
  ics = train_seeds(
    P.ICS(0.07, 0.07, level=0.07), task, seeds=(0, 1), cfg=_CFG, shift_table=np.full(n, 0.07)
  )
  for key in ("loss", "test_image", "val_text", "temperature"):
    # Same numbers up to float32 rounding (the two programs fuse differently).
    np.testing.assert_allclose(fixed[key], ics[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_traced_schedules_equal_the_library_schedules():
  import jax.numpy as jnp

  from mmts_jax import schedules

  idx = jnp.arange(2)
  for t in (0, 7, 30, 59):
    ts = P.TS(0.03, 0.12, 60.0).values({}, step=t, index=idx)
    want = schedules.temperature_schedule(0.03, 0.12, 60.0)(t)
    np.testing.assert_allclose(ts, want, rtol=1e-6)
    mm = P.MMTS(0.05, 0.10, alpha=0.04, period=60.0)
    got = mm.values({"shift_table": jnp.array([0.05, 0.1])}, step=t, index=idx)
    want = schedules.cosine_oscillation(0.04, 60.0)(t) + jnp.array([0.05, 0.1])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_batch_orders_are_epochs_of_permutations():
  o = batch_orders([3, 4], 10, 5, 4)  # 2 batches per epoch, 3 epochs (the last one cut)
  assert o.shape == (2, 5, 4)
  for s in range(2):
    for e in range(2):
      epoch = o[s, 2 * e : 2 * e + 2].reshape(-1)
      assert len(set(epoch.tolist())) == 8
  np.testing.assert_array_equal(o[0], batch_orders([3], 10, 5, 4)[0])
  with pytest.raises(ValueError, match="batch_size 11 > 10"):
    batch_orders([0], 10, 1, 11)


def test_level_matched_policy_and_learnable_temperature(task):
  n = len(task.train_label)
  table = shifts.cluster_shift(task.sample_sizes(), 0.05, 0.10)
  lm = P.MMTS(0.05, 0.10, level=0.08, alpha=0.04, period=10.0)
  state = lm.init_state(n, table)
  np.testing.assert_allclose(
    float(np.mean(np.asarray(state["shift_table"], np.float64))), 0.08, atol=1e-7
  )
  with pytest.raises(ValueError, match="lowest temperature"):
    P.ICS(0.05, 0.30, level=0.02).init_state(
      n, shifts.cluster_shift(task.sample_sizes(), 0.05, 0.30)
    )
  out = train_seeds(P.Learnable(0.07), task, seeds=(0, 1), cfg=_CFG)
  temps = out["temperature"][:, :, 0]
  assert np.all((temps >= 0.01) & (temps <= 1.0))
  assert not np.allclose(temps[:, -1], 0.07)  # the model's parameter moved


def test_paired_interval_against_textbook_t():
  # t_{0.975, df} from any t table: 12.706 (1), 2.262 (9), 2.131 (15).
  for df, want in ((1, 12.706), (9, 2.262), (15, 2.131)):
    assert abs(stats.t_quantile(0.975, df) - want) < 2e-3
  rng = np.random.default_rng(0)
  a, b = rng.normal(0.5, 0.02, 16), rng.normal(0.49, 0.02, 16)
  r = stats.paired_interval(a, b)
  d = a - b
  half = 2.131 * d.std(ddof=1) / 4
  np.testing.assert_allclose([r["lo"], r["hi"]], [d.mean() - half, d.mean() + half], atol=1e-5)
  assert stats.paired_interval(a, a)["verdict"] == "no measurable difference"
  assert stats.paired_interval(a + 1, a)["verdict"] == "higher"
  with pytest.raises(ValueError, match=">= 2 seeds"):
    stats.paired_interval([1.0], [0.0])


def test_run_selects_on_validation_and_reports(task, tmp_path):
  grid = {
    "fixed": [(P.Fixed(t), {"tau": t}) for t in (0.05, 0.1, 0.2)],
    "ics_lm": [
      (P.ICS(0.05, 0.07, level=0.1), {"width": 0.02}),
      (P.ICS(0.05, 5.0, level=0.1), {"width": 4.95}),
    ],
  }
  path = tmp_path / "trials.jsonl"

  def on_trial(rec):
    with open(path, "a") as f:
      f.write(json.dumps(rec) + "\n")

  res = experiment.run(
    task,
    seeds=(0, 1),
    cfg=_CFG,
    rows=("fixed", "ics_lm"),
    grid=grid,
    on_trial=on_trial,
    log=lambda s: None,
  )
  fixed = res["trials"]["fixed"]
  means = [np.mean([s["all/R@1"] for s in t["val"]]) for t in fixed]
  assert res["selected"]["fixed"] == int(np.argmax(means))
  assert res["level"] == grid["fixed"][res["selected"]["fixed"]][0].tau
  assert "skipped" in res["trials"]["ics_lm"][1]  # a spread of 5 cannot be centred at 0.1
  # Only the selected trial has the full report (test split); the others the selection metric.
  assert [("test" in t) for t in fixed] == [i == res["selected"]["fixed"] for i in range(3)]
  assert res["edges"]["fixed"] == experiment.on_edge(fixed, res["selected"]["fixed"])
  zero = res["paired"]["fixed"]["tail/mAP"]
  assert zero["mean"] == 0 and zero["verdict"] == "no measurable difference"
  assert {"all/R@1", "head/mAP", "tail/nDCG"} <= set(res["paired"]["ics_lm"])
  text = report.render(str(path), json_dir=str(tmp_path))
  assert "| ICS, level-matched |" in text and "## Paired differences" in text


def test_trials_train_side_by_side_as_they_train_alone(task):
  """`train_trials` (vmap over trial x seed, training set padded) = each trial on its own."""
  from mmts_jax.study.runner import train_trials

  both = train_trials(
    [P.Learnable(0.05), P.Learnable(0.1)],
    task,
    seeds=(0, 1),
    cfg=_CFG,
    pad_to=len(task.train_label) + 7,
  )
  alone = train_seeds(P.Learnable(0.1), task, seeds=(0, 1), cfg=_CFG)
  for key in ("loss", "test_image", "temperature"):
    np.testing.assert_allclose(both[key][1], alone[key], rtol=1e-5, atol=1e-6, err_msg=key)
  np.testing.assert_allclose(both["temperature"][:, :, 0, 0], [[0.05, 0.05], [0.1, 0.1]], rtol=1e-5)


def test_on_edge_names_the_axes():
  trials = [{"coords": {"c": c, "w": w}} for c in (1, 2, 3) for w in (1, 2, 3)]
  assert experiment.on_edge(trials, 4) == []  # (2, 2): inside
  assert experiment.on_edge(trials, 8) == ["c (largest)", "w (largest)"]
  assert experiment.on_edge(trials, 1) == ["c (smallest)"]


def test_ek100_task_and_bucketed_mir():
  """EK-100 real-text task: the official frequencies as clusters, MIR by noun bucket equals the
  library's MIR on the masked queries (an independent call)."""
  import pathlib

  from mmts_jax.eval.ek100_mir import mir_metrics
  from mmts_jax.study import ek100

  ann = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ek100"
  text = {"train": np.zeros((15989, 4), np.float32), "val": np.zeros((3842, 4), np.float32)}
  task, val = ek100.build_task(str(ann), text)
  assert task.train["image"].shape == (15989, 64) and task.val["image"].shape == (9668, 64)
  assert np.all(task.sample_sizes() > 0) and val["relevancy"].shape == (9668, 3842)
  assert set(np.unique(val["video_bucket"])) == {0, 1, 2}
  with pytest.raises(ValueError, match="stale cache"):
    ek100.build_task(str(ann), {"train": text["train"][:5], "val": text["val"]})
  # A small slice of the relevancy: 3 buckets of queries, every query with an exact match.
  rng = np.random.default_rng(0)
  rel = np.eye(6, dtype=np.float32) * 0.5 + np.eye(6, dtype=np.float32) * 0.5
  rel[0, 1] = rel[1, 0] = 0.5
  small = {
    "relevancy": rel,
    "video_bucket": np.array([0, 0, 1, 1, 2, 2]),
    "caption_bucket": np.array([0, 1, 1, 2, 2, 0]),
  }
  v, t = rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=(6, 8)).astype(np.float32)
  got = ek100.evaluate(v, t, small)
  want = mir_metrics(v @ t.T, rel)
  np.testing.assert_allclose(got["all/mAP"], want["mAP"].average, rtol=1e-6)
  np.testing.assert_allclose(got["all/nDCG"], want["nDCG"].average, rtol=1e-6)
  assert set(got) == {f"{b}/{m}" for b in ek100.BUCKETS for m in ("mAP", "nDCG")}


@pytest.mark.parametrize("imbalance", [100, 10])
def test_default_grids_have_nine_positive_trials_per_row(imbalance):
  # The "same number of trials per tuned row" holds only if no trial is skipped for a
  # temperature <= 0; that depends on the class sizes, so it is checked on the study's tasks.
  task = make_task(GeneratorConfig(val_per_class=20, imbalance=imbalance))
  grid = experiment.default_grid(period=60.0)
  grid.update(experiment.level_matched_grid(0.45, period=60.0))
  assert sorted(grid) == sorted(experiment.ROWS)
  for row, trials in grid.items():
    assert len(trials) == 9, row
    for policy, coords in trials:
      state = policy.init_state(len(task.train_label), experiment._table(task, policy))
      assert state is not None, (row, coords)
  assert max(t for t in experiment.TAUS) == 1.0
