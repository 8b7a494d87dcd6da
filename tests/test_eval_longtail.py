"""Long-tail report (`mmts_jax.eval.longtail`) against an independent float64 numpy reference."""

import numpy as np
import pytest

from mmts_jax.eval import class_relevancy
from mmts_jax.eval.longtail import (
  cluster_buckets,
  format_longtail,
  label_relevancy,
  longtail_report,
)

# Written from the definitions (official EK-100 MIR mAP.py / nDCG.py and the bucket rules), one
# query at a time with a full argsort, so that nothing is shared with the library's key sort.


def _ap(scores, rel):
  order = np.argsort(-scores, kind="stable")
  r = rel[order].astype(np.float64)
  running = np.cumsum(r)
  ranks = np.arange(1, len(r) + 1)
  full = r == 1
  return float(np.sum(running[full] / ranks[full]) / full.sum())


def _ndcg(scores, rel):
  k = int(np.sum(rel > 0))
  order = np.argsort(scores, kind="stable")[::-1]
  disc = 1 / np.log2(np.arange(2, k + 2))
  dcg = np.sum(rel[order][:k].astype(np.float64) * disc)
  idcg = np.sum(np.sort(rel.astype(np.float64))[::-1][:k] * disc)
  return float(dcg / idcg)


def _recall(scores, pos, k):
  best = max(scores[j] for j in range(len(scores)) if pos[j])
  return float(sum(s > best for s in scores) < k)


def _bucket_ref(sizes, scheme):
  total = float(sum(sizes))
  out = []
  for kc in sizes:
    if scheme == "share":
      share = sum(float(s) for s in sizes if s > kc) / total
      out.append(0 if share < 1 / 3 else (2 if share >= 2 / 3 else 1))
    else:
      q1, q2 = np.quantile(np.asarray(sizes, np.float64), [1 / 3, 2 / 3])
      out.append(0 if kc > q2 else (2 if kc <= q1 else 1))
  return np.array(out)


def _report_ref(sim, rel, img_c, txt_c, sizes, ks, scheme):
  sim = sim.astype(np.float64)
  b = _bucket_ref(list(sizes), scheme)
  pos = np.eye(sim.shape[0], dtype=bool)
  out = {}
  for name, code in (("all", None), ("head", 0), ("middle", 1), ("tail", 2)):
    qi = [i for i in range(sim.shape[0]) if code is None or b[img_c[i]] == code]
    qt = [j for j in range(sim.shape[1]) if code is None or b[txt_c[j]] == code]
    if not qi or not qt:
      continue
    row = {}
    for k in ks:
      a = np.mean([_recall(sim[i], pos[i], k) for i in qi])
      t = np.mean([_recall(sim[:, j], pos[:, j], k) for j in qt])
      row[f"R@{k}"] = (a + t) / 2
    a = np.mean([_ap(sim[i], rel[i]) for i in qi])
    t = np.mean([_ap(sim[:, j], rel[:, j]) for j in qt])
    row["mAP"] = (a + t) / 2
    a = np.mean([_ndcg(sim[i], rel[i]) for i in qi])
    t = np.mean([_ndcg(sim[:, j], rel[:, j]) for j in qt])
    row["nDCG"] = (a + t) / 2
    row["num_queries"] = len(qi)
    out[name] = row
  return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scheme", ["share", "terciles"])
def test_single_label_matches_reference(seed, scheme):
  rng = np.random.default_rng(seed)
  sizes = np.array([30, 12, 7, 4, 2, 1])
  labels = rng.choice(len(sizes), size=40, p=sizes / sizes.sum())
  img = rng.standard_normal((40, 8))
  txt = img + 0.8 * rng.standard_normal((40, 8))
  sim = (img @ txt.T).astype(np.float32)
  rel = label_relevancy(labels, labels)
  got = longtail_report(
    sim,
    rel,
    image_clusters=labels,
    text_clusters=labels,
    cluster_sizes=sizes,
    ks=(1, 5),
    scheme=scheme,
  )
  want = _report_ref(sim, rel, labels, labels, sizes, (1, 5), scheme)
  assert set(got) == set(want)
  for bucket, row in want.items():
    for key, value in row.items():
      np.testing.assert_allclose(
        got[bucket][key], value, rtol=1e-12, atol=1e-12, err_msg=f"{scheme} {bucket} {key}"
      )


def test_graded_relevancy_matches_reference():
  """EK-100's `0.5 [verb equal] + 0.5 IoU(nouns)`: partial relevancies enter mAP and nDCG."""
  rng = np.random.default_rng(7)
  n = 30
  verbs = rng.integers(0, 3, n)
  nouns = [tuple(sorted(set(rng.integers(0, 5, rng.integers(1, 3)).tolist()))) for _ in range(n)]
  rel = class_relevancy(verbs, nouns, verbs, nouns)
  main_noun = np.array([s[0] for s in nouns])
  freq = np.bincount(main_noun, minlength=5) + np.arange(5)  # a frequency table of the classes
  sim = rng.standard_normal((n, n)).astype(np.float32)
  got = longtail_report(
    sim, rel, image_clusters=main_noun, text_clusters=main_noun, cluster_sizes=freq, ks=(1, 3)
  )
  want = _report_ref(sim, rel, main_noun, main_noun, freq, (1, 3), "share")
  assert set(got) == set(want)
  for bucket, row in want.items():
    for key, value in row.items():
      np.testing.assert_allclose(got[bucket][key], value, rtol=1e-12, atol=1e-12)


def test_bucket_edges_documented_cases():
  # Equal sizes share a bucket; the head holds the first third of the samples.
  assert cluster_buckets(np.array([5, 5, 5])).tolist() == [0, 0, 0]
  assert cluster_buckets(np.array([40, 30, 20, 10])).tolist() == [0, 1, 2, 2]
  sizes = np.random.default_rng(0).integers(1, 50, 17)
  for scheme in ("share", "terciles"):
    np.testing.assert_array_equal(cluster_buckets(sizes, scheme), _bucket_ref(sizes, scheme))


def test_bad_inputs_name_the_problem():
  sim = np.zeros((3, 3), np.float32)
  rel = np.eye(3, dtype=np.float32)
  c = np.zeros(3, int)
  with pytest.raises(ValueError, match="scheme"):
    cluster_buckets([1, 2], "median")
  with pytest.raises(ValueError, match=">= 0"):
    cluster_buckets([3, -1])
  with pytest.raises(ValueError, match="image_clusters must be cluster ids in \\[0, 2\\)"):
    longtail_report(
      sim, rel, image_clusters=np.array([0, 1, 2]), text_clusters=c, cluster_sizes=[2, 1], ks=(1,)
    )
  with pytest.raises(ValueError, match="every K"):
    longtail_report(sim, rel, image_clusters=c, text_clusters=c, cluster_sizes=[3], ks=(4,))
  with pytest.raises(ValueError, match="square"):
    longtail_report(
      np.zeros((3, 2), np.float32),
      rel[:, :2],
      image_clusters=c,
      text_clusters=c[:2],
      cluster_sizes=[3],
      ks=(1,),
    )


def test_format_has_one_line_per_bucket():
  rng = np.random.default_rng(3)
  labels = np.array([0] * 6 + [1] * 3 + [2])
  sim = rng.standard_normal((10, 10)).astype(np.float32)
  rep = longtail_report(
    sim,
    label_relevancy(labels, labels),
    image_clusters=labels,
    text_clusters=labels,
    cluster_sizes=np.bincount(labels),
    ks=(1, 5),
  )
  lines = format_longtail(rep, ks=(1, 5)).splitlines()
  assert [line.split()[0] for line in lines[1:]] == list(rep)
  assert list(rep) == ["all", "head", "middle", "tail"]


def test_cli_retrieval_longtail_table(tmp_path, capsys):
  """`mmts eval retrieval --longtail`: the json holds the report of the library call."""
  import json

  from mmts_jax import cli

  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(4), [12, 5, 2, 1])
  image = rng.standard_normal((20, 8)).astype(np.float32)
  text = (np.repeat(image, 2, axis=0) + rng.standard_normal((40, 8))).astype(np.float32)
  np.savez(tmp_path / "emb.npz", image_emb=image, text_emb=text)
  np.save(tmp_path / "ids.npy", labels)
  out = tmp_path / "m.json"
  assert (
    cli.main(
      [
        "eval",
        "retrieval",
        "--embeddings",
        str(tmp_path / "emb.npz"),
        "--captions-per-image",
        "2",
        "--longtail",
        str(tmp_path / "ids.npy"),
        "--out",
        str(out),
      ]
    )
    == 0
  )
  metrics = json.loads(out.read_text())["metrics"]
  mapping = np.arange(40) // 2
  im = image / np.linalg.norm(image, axis=1, keepdims=True)
  tx = text / np.linalg.norm(text, axis=1, keepdims=True)
  want = longtail_report(
    im @ tx.T,
    label_relevancy(labels, labels[mapping]),
    image_clusters=labels,
    text_clusters=labels[mapping],
    cluster_sizes=np.bincount(labels),
    positives=mapping[None] == np.arange(20)[:, None],
  )
  assert metrics["longtail/tail/mAP"] == want["tail"]["mAP"]
  assert metrics["longtail/head/R@5"] == want["head"]["R@5"]
  assert "long tail" in capsys.readouterr().out
  assert (
    cli.main(
      [
        "eval",
        "retrieval",
        "--embeddings",
        str(tmp_path / "emb.npz"),
        "--captions-per-image",
        "2",
        "--longtail",
        str(tmp_path / "emb.npz"),
      ]
    )
    == 2
  )
