"""EK-100 MIR: parity with the official numbers, ties, the relevancy builder, bad input."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

from mmts_jax.eval import (
  MirScore,
  class_relevancy,
  ek100_mir,
  ek100_relevancy,
  mir_map,
  mir_metrics,
  mir_ndcg,
  mir_per_query,
  read_ek100_mir,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_official():
  """The benchmark's step-by-step numpy transcription of the official algorithm."""
  spec = importlib.util.spec_from_file_location("mir_bench", ROOT / "benchmarks" / "mir_bench.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


official = _load_official()


@pytest.fixture(scope="module")
def ref(shared_dir):
  with np.load(shared_dir / "reference" / "ek100_mir_small.npz") as d:
    return {k: d[k] for k in d.files}


@pytest.fixture(scope="module")
def annotations(shared_dir):
  return read_ek100_mir(shared_dir / "data" / "ek100")


@pytest.fixture(scope="module")
def full_relevancy(annotations):
  return ek100_relevancy(annotations)


@pytest.mark.parametrize("name", ["random", "noisy_oracle"])
def test_matches_official_reference(ref, name):
  sim, rel = ref[f"{name}/similarity"], ref["relevancy"]
  m = mir_metrics(sim, rel)
  np.testing.assert_allclose(m["mAP"], ref[f"{name}/mAP"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(m["nDCG"], ref[f"{name}/nDCG"], rtol=0, atol=1e-6)
  assert mir_map(sim, rel) == m["mAP"]
  assert mir_ndcg(sim, rel) == m["nDCG"]
  assert isinstance(m["mAP"], MirScore)
  assert m["mAP"].average == pytest.approx((m["mAP"][0] + m["mAP"][1]) / 2, abs=1e-15)


@pytest.mark.parametrize("name", ["random", "noisy_oracle"])
def test_baseline_transcription_matches_official_reference(ref, name):
  # The benchmark's baseline must itself be the official algorithm.
  got = official.official_metrics(
    ref[f"{name}/similarity"].astype(np.float64), ref["relevancy"].astype(np.float64)
  )
  np.testing.assert_allclose(got["mAP"], ref[f"{name}/mAP"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(got["nDCG"], ref[f"{name}/nDCG"], rtol=0, atol=1e-6)


def _stable_official(sim, rel):
  with np.errstate(all="raise"):
    return official.official_metrics(sim.astype(np.float64), rel.astype(np.float64), "stable")


def test_ties_follow_the_stable_official_order(ref):
  # Rounded similarities: large groups of ties, with positive, negative and zero (+-0.0) scores.
  sim = np.round(ref["random/similarity"] * 2) / 2
  sim[sim == 0] = np.where(np.arange((sim == 0).sum()) % 2, 0.0, -0.0)
  rel = ref["relevancy"]
  m = mir_metrics(sim, rel)
  want = _stable_official(sim, rel)
  np.testing.assert_allclose(m["mAP"], want["mAP"], rtol=0, atol=1e-9)
  np.testing.assert_allclose(m["nDCG"], want["nDCG"], rtol=0, atol=1e-9)


def test_small_random_cases_with_ties_blocks_and_threads(monkeypatch):
  rng = np.random.default_rng(0)
  monkeypatch.setattr(ek100_mir, "_BLOCK_ROWS", 3)  # several blocks per direction
  for trial in range(40):
    v, c = rng.integers(2, 12, size=2)
    sim = rng.integers(-3, 4, size=(v, c)).astype(np.float32) / 2  # many ties
    if trial % 3 == 0:
      sim = rng.standard_normal((v, c)).astype(np.float32)
    rel = rng.choice([0.0, 0.25, 0.5, 1.0], size=(v, c), p=[0.5, 0.2, 0.15, 0.15])
    rel[np.arange(v), rng.integers(0, c, v)] = 1.0  # every video has a fully relevant caption
    rel[rng.integers(0, v, c), np.arange(c)] = 1.0  # and every caption a video
    rel = rel.astype(np.float32)
    want = _stable_official(sim, rel)
    for threads in (1, 2):
      m = mir_metrics(sim, rel, num_threads=threads)
      np.testing.assert_allclose(m["mAP"], want["mAP"], rtol=0, atol=1e-12)
      np.testing.assert_allclose(m["nDCG"], want["nDCG"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("run", [30, 2])
def test_tie_runs_long_and_short(run):
  # A run of 30 equal scores per row outgrows the neighbour-by-neighbour search (8 steps) and
  # finishes with the one-pass search; when most items tie, the one-pass search runs directly.
  rng = np.random.default_rng(1)
  sim = rng.standard_normal((20, 400)).astype(np.float32)
  sim[:, 50 : 50 + run] = 0.5
  sim[:, 200 : 200 + run] = -0.25
  rel = (rng.random((20, 400)) < 0.3) * 0.5
  rel[:, 0] = rel[0, :] = 1.0
  rel[:, 55] = 1.0
  rel = rel.astype(np.float32)
  m = mir_metrics(sim, rel)
  want = _stable_official(sim, rel)
  np.testing.assert_allclose(m["mAP"], want["mAP"], rtol=0, atol=1e-12)
  np.testing.assert_allclose(m["nDCG"], want["nDCG"], rtol=0, atol=1e-12)
  quantized = np.round(sim)  # nearly everything ties
  m = mir_metrics(quantized, rel)
  want = _stable_official(quantized, rel)
  np.testing.assert_allclose(m["mAP"], want["mAP"], rtol=0, atol=1e-12)
  np.testing.assert_allclose(m["nDCG"], want["nDCG"], rtol=0, atol=1e-12)


def test_per_query_and_subsets(ref):
  sim, rel = ref["noisy_oracle/similarity"], ref["relevancy"]
  per = mir_per_query(sim, rel)
  assert per.map_videos.shape == (599,) and per.ndcg_captions.shape == (309,)
  assert per.scores() == mir_metrics(sim, rel)
  videos, captions = np.arange(599) % 3 == 0, np.arange(309) < 100
  # Per-query official values from the transcription, on the selected queries only.
  want_v = official.official_map(sim[videos].astype(np.float64), rel[videos].astype(np.float64))
  want_c = official.official_ndcg(
    sim.T[captions].astype(np.float64), rel.T[captions].astype(np.float64)
  )
  got = per.scores(video_mask=videos, caption_mask=captions)
  assert got["mAP"].video_to_text == pytest.approx(want_v, abs=1e-9)
  assert got["nDCG"].text_to_video == pytest.approx(want_c, abs=1e-9)
  with pytest.raises(ValueError, match=r"video_mask must be a bool mask of shape \(599,\)"):
    per.scores(video_mask=np.ones(598, bool))
  with pytest.raises(ValueError, match="caption_mask selects no query"):
    per.scores(caption_mask=np.zeros(309, bool))


def test_perfect_and_reversed_rankings():
  rel = np.eye(4, dtype=np.float32)
  assert tuple(mir_map(rel, rel)) == (1.0, 1.0, 1.0)
  assert tuple(mir_ndcg(rel, rel)) == (1.0, 1.0, 1.0)
  worst = mir_map(-rel, rel)  # the relevant item is ranked last (rank 4) everywhere
  assert worst.average == pytest.approx(0.25, abs=1e-15)


def test_relevancy_matches_the_official_slice(full_relevancy, ref, annotations):
  assert annotations.shape == (9668, 3842)
  assert full_relevancy.shape == (9668, 3842) and full_relevancy.dtype == np.float32
  # The reference slice: the first 600 videos x the first 309 captions, without video 549, the
  # one whose class set has no fully relevant caption among those 309.
  videos = [i for i in range(600) if i != 549]
  np.testing.assert_array_equal(full_relevancy[videos, :309], ref["relevancy"])
  assert not (full_relevancy[549, :309] == 1).any()


def test_relevancy_formula_on_rows(annotations, full_relevancy):
  rng = np.random.default_rng(0)
  for v, c in zip(rng.integers(0, 9668, 50), rng.integers(0, 3842, 50), strict=True):
    a, b = set(annotations.video_nouns[v]), set(annotations.caption_nouns[c])
    want = 0.5 * (annotations.video_verbs[v] == annotations.caption_verbs[c])
    want += 0.5 * len(a & b) / len(a | b)
    assert full_relevancy[v, c] == np.float32(want)


def test_class_relevancy_small():
  got = class_relevancy([0, 1, 2], [[2], [2, 3, 3], []], [0, 2], [[2, 3], []])
  want = np.array([[0.75, 0.0], [0.5, 0.0], [0.0, 0.5]], np.float32)
  np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="one verb per noun set"):
    class_relevancy([0], [[1], [2]], [0], [[1]])
  with pytest.raises(ValueError, match=r"noun classes must be >= 0, got \[-1\]"):
    class_relevancy([0], [[-1]], [0], [[1]])


def test_random_baseline_on_the_whole_validation_split(full_relevancy):
  # The EK-100 paper's random baseline: mAP 5.7 / 5.6 / 5.6, nDCG 10.8 / 10.9 / 10.9 (%).
  sim = np.random.default_rng(0).standard_normal(full_relevancy.shape).astype(np.float32)
  m = mir_metrics(sim, full_relevancy)
  assert [round(100 * v, 1) for v in m["mAP"]] == [5.7, 5.6, 5.6]
  assert [round(100 * v, 1) for v in m["nDCG"]] == [10.8, 10.9, 10.9]


def test_shape_mismatch():
  with pytest.raises(ValueError, match=r"same shape.*\(3, 4\) and \(4, 3\)"):
    mir_map(np.zeros((3, 4), np.float32), np.ones((4, 3), np.float32))
  with pytest.raises(ValueError, match=r"must be \(videos, captions\), got shape \(3,\)"):
    mir_ndcg(np.zeros(3, np.float32), np.ones(3, np.float32))
  with pytest.raises(TypeError, match="must be an array, got list"):
    mir_map([[1.0]], np.ones((1, 1)))


def test_nan_similarity_is_reported_with_positions():
  sim = np.zeros((3, 4), np.float32)
  sim[1, 2] = sim[2, 0] = np.nan
  with pytest.raises(
    ValueError,
    match=r"2 NaN value\(s\), first at \(video, caption\) "
    r"\[\(1, 2\), \(2, 0\)\]",
  ):
    mir_map(sim, np.ones((3, 4), np.float32))


def test_queries_without_a_fully_relevant_item_are_named():
  rel = np.eye(4, dtype=np.float32)
  rel[2, 2] = 0.5  # video 2 and caption 2 keep a partial match only
  sim = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
  with pytest.raises(ValueError) as e:
    mir_map(sim, rel)
  msg = str(e.value)
  assert "1 video query has no caption with relevancy == 1" in msg
  assert "video indices [2]" in msg and "caption indices [2]" in msg
  assert mir_ndcg(sim, rel).average > 0  # nDCG only needs relevancy > 0
  rel[3, 3] = 0.0
  with pytest.raises(
    ValueError,
    match=r"no caption with relevancy > 0 \(nDCG undefined\), "
    r"video indices \[3\]",
  ):
    mir_ndcg(sim, rel)


def test_bad_relevancy_and_dtypes():
  sim = np.zeros((2, 2), np.float32)
  with pytest.raises(
    ValueError,
    match=r"finite and >= 0, got 1 bad value\(s\), first at "
    r"\(video, caption\) \[\(0, 1\)\]",
  ):
    mir_map(sim, np.array([[1.0, -0.5], [0.0, 1.0]]))
  with pytest.raises(TypeError, match="not exactly representable in float32"):
    mir_map(np.array([[0.1, 0.2], [0.3, 0.4]]), np.eye(2))
  # float64 holding float32 values is fine.
  assert mir_map(np.eye(2), np.eye(2)).average == 1.0
  with pytest.raises(ValueError, match="num_threads must be a positive int, got 0"):
    mir_map(sim, np.eye(2), num_threads=0)
