"""Every bad input through every command ends in exit status 2 and one line naming the problem.

Table-driven: each case writes a (small) malformed, truncated, mistyped or misplaced input,
runs `mmts ...` in-process, and checks that

* the exit status is 2;
* stderr is exactly one line `mmts COMMAND: error: ...` naming the file (or flag) at fault and
  the stated problem, with no traceback;
* nothing new was written (no artifact, no temp file, no half-made folder).
"""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from mmts_jax import cli
from mmts_jax.clusters.table import ClusterTable

EK100_VIDEO = "narration_id,verb_class,all_noun_classes\nv0,0,[1]\nv1,1,\"[1, 2]\"\nv2,0,[3]\n"
EK100_SENTENCE = "narration_id,narration\nv0,take cup\nv2,open door\n"
EK100_TRAIN = (
  "narration_id,narration,verb_class,noun_classes\n"
  "t0,take cup,0,[1]\nt1,open door,1,[2]\nt2,wash pan,0,\"[3, 1]\"\n"
)


def _write(path: pathlib.Path, data: str | bytes) -> str:
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(data, str):
    data = data.encode()
  path.write_bytes(data)
  return str(path)


def _png(path: pathlib.Path) -> str:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", (4, 4), (200, 10, 10)).save(path, format="PNG")
  return str(path)


def _npy(path: pathlib.Path, x, allow_pickle=False) -> str:
  with open(path, "wb") as f:
    np.save(f, x, allow_pickle=allow_pickle)
  return str(path)


def _labels_csv(d: pathlib.Path) -> str:
  return _write(d / "labels.csv", "id,cls\n0,a\n1,b\n2,a\n3,c\n")


def _table(d: pathlib.Path, name="table.npz") -> str:
  t = ClusterTable.from_labels(["a", "b", "a", "c"])
  t.save(d / name)
  return str(d / name)


def _truncated(path: pathlib.Path, keep: int) -> str:
  data = path.read_bytes()
  path.write_bytes(data[:keep])
  return str(path)


def _ek100_dir(d: pathlib.Path, video=EK100_VIDEO, sentence=EK100_SENTENCE) -> str:
  _write(d / "ann" / "EPIC_100_retrieval_test.csv", video)
  _write(d / "ann" / "EPIC_100_retrieval_test_sentence.csv", sentence)
  return str(d / "ann")


def _tar(path: pathlib.Path, members) -> str:
  """members: (TarInfo, bytes or None)."""
  with tarfile.open(path, "w") as tar:
    for info, data in members:
      if data is not None:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
      else:
        tar.addfile(info)
  return str(path)


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
  return tarfile.TarInfo(name), data


def _good_png_bytes() -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (4, 4)).save(buf, format="PNG")
  return buf.getvalue()


def _prepare_images(d: pathlib.Path) -> str:
  _png(d / "imgs" / "a.png")
  return str(d / "imgs")


# Each case: d -> (argv, the file/flag the message must name, the problem it must state).
CASES = {
  # ------------------------------------------------------------------ mmts cluster: tables
  "cluster/missing_input": lambda d: (
    ["cluster", str(d / "nope.csv"), "--label-column", "cls", "--out", str(d / "o.npz")],
    "nope.csv",
    "does not exist",
  ),
  "cluster/empty_file": lambda d: (
    ["cluster", _write(d / "e.csv", ""), "--label-column", "cls", "--out", str(d / "o.npz")],
    "e.csv",
    "is empty",
  ),
  "cluster/header_only": lambda d: (
    [
      "cluster",
      _write(d / "h.csv", "id,cls\n"),
      "--label-column",
      "cls",
      "--out",
      str(d / "o.npz"),
    ],
    "h.csv",
    "has no rows",
  ),
  "cluster/row_too_long": lambda d: (
    [
      "cluster",
      _write(d / "r.csv", "id,cls\n0,a\n1,b,extra\n"),
      "--label-column",
      "cls",
      "--out",
      str(d / "o.npz"),
    ],
    "r.csv:3",
    "row has 3 fields but the header has 2",
  ),
  "cluster/row_too_short": lambda d: (
    [
      "cluster",
      _write(d / "r.csv", "id,cls\n0\n"),
      "--label-column",
      "cls",
      "--out",
      str(d / "o.npz"),
    ],
    "r.csv:2",
    "row has 1 fields",
  ),
  "cluster/unterminated_quote": lambda d: (
    [
      "cluster",
      _write(d / "q.csv", 'id,cls\n0,"a\n1,b\n'),
      "--label-column",
      "cls",
      "--out",
      str(d / "o.npz"),
    ],
    "q.csv",
    "malformed CSV",
  ),
  "cluster/nul_byte": lambda d: (
    [
      "cluster",
      _write(d / "n.csv", b"id,cls\n0,a\x00b\n"),
      "--label-column",
      "cls",
      "--out",
      str(d / "o.npz"),
    ],
    "n.csv:2",
    "NUL byte",
  ),
  "cluster/latin1": lambda d: (
    [
      "cluster",
      _write(d / "l.csv", "id,cls\n0,caf\xe9\n".encode("latin-1")),
      "--label-column",
      "cls",
      "--out",
      str(d / "o.npz"),
    ],
    "l.csv:2",
    "is not UTF-8",
  ),
  "cluster/utf16": lambda d: (
    [
      "cluster",
      _write(d / "u.csv", "id,cls\n0,a\n".encode("utf-16")),
      "--label-column",
      "cls",
      "--out",
      str(d / "o.npz"),
    ],
    "u.csv",
    "NUL byte",
  ),
  "cluster/duplicate_header": lambda d: (
    [
      "cluster",
      _write(d / "dup.csv", "cls,cls\n0,a\n"),
      "--label-column",
      "cls",
      "--out",
      str(d / "o.npz"),
    ],
    "dup.csv:1",
    "duplicate column",
  ),
  "cluster/jsonl_not_object": lambda d: (
    [
      "cluster",
      _write(d / "j.jsonl", '{"cls": "a"}\n[1, 2]\n'),
      "--label-column",
      "cls",
      "--out",
      str(d / "o.npz"),
    ],
    "j.jsonl:2",
    "not an object",
  ),
  "cluster/jsonl_bad_json": lambda d: (
    [
      "cluster",
      _write(d / "j.jsonl", '{"cls": "a"}\n{"cls": b}\n'),
      "--label-column",
      "cls",
      "--out",
      str(d / "o.npz"),
    ],
    "j.jsonl:2",
    "not valid JSON",
  ),
  "cluster/jsonl_truncated": lambda d: (
    [
      "cluster",
      _write(d / "j.jsonl", '{"cls": "a"}\n{"cls": "b", "id'),
      "--label-column",
      "cls",
      "--out",
      str(d / "o.npz"),
    ],
    "j.jsonl:2",
    "not valid JSON",
  ),
  "cluster/jsonl_missing_key": lambda d: (
    [
      "cluster",
      _write(d / "j.jsonl", '{"cls": "a"}\n{"id": 1}\n'),
      "--label-column",
      "cls",
      "--out",
      str(d / "o.npz"),
    ],
    "j.jsonl:2",
    "have no 'cls'",
  ),
  "cluster/missing_column": lambda d: (
    ["cluster", _labels_csv(d), "--label-column", "noun", "--out", str(d / "o.npz")],
    "labels.csv",
    "has no column 'noun'",
  ),
  "cluster/bad_label_list": lambda d: (
    [
      "cluster",
      _write(d / "ll.csv", 'id,cls\n0,[1]\n1,"[2, "\n'),
      "--label-column",
      "cls",
      "--out",
      str(d / "o.npz"),
    ],
    "ll.csv:3",
    "cannot parse label list",
  ),
  "cluster/unknown_suffix": lambda d: (
    ["cluster", _write(d / "c.txt", "a\n"), "--label-column", "cls", "--out", str(d / "o.npz")],
    "c.txt",
    "unknown input type",
  ),
  "cluster/input_is_folder": lambda d: (
    ["cluster", str(d), "--label-column", "cls", "--out", str(d / "o.npz")],
    str(d),
    "unknown input type",
  ),
  "cluster/frequency_not_a_number": lambda d: (
    [
      "cluster",
      _labels_csv(d),
      "--label-column",
      "cls",
      "--frequencies",
      _write(d / "f.csv", "class_id,count\na,10\nb,lots\nc,1\n"),
      "--out",
      str(d / "o.npz"),
    ],
    "f.csv:3",
    "expected a finite number >= 0",
  ),
  "cluster/frequency_negative": lambda d: (
    [
      "cluster",
      _labels_csv(d),
      "--label-column",
      "cls",
      "--frequencies",
      _write(d / "f.csv", "class_id,count\na,10\nb,-4\nc,1\n"),
      "--out",
      str(d / "o.npz"),
    ],
    "f.csv:3",
    "count '-4'",
  ),
  "cluster/frequency_nan": lambda d: (
    [
      "cluster",
      _labels_csv(d),
      "--label-column",
      "cls",
      "--frequencies",
      _write(d / "f.csv", "class_id,count\na,10\nb,nan\nc,1\n"),
      "--out",
      str(d / "o.npz"),
    ],
    "f.csv:3",
    "count 'nan'",
  ),
  "cluster/jsonl_label_is_object": lambda d: (
    [
      "cluster",
      _write(d / "j.jsonl", '{"cls": "a"}\n{"cls": {"x": 1}}\n'),
      "--label-column",
      "cls",
      "--out",
      str(d / "o.npz"),
    ],
    "j.jsonl:2",
    "label is a JSON object",
  ),
  # ------------------------------------------------------------------ mmts cluster: arrays
  "cluster/png_as_embeddings": lambda d: (
    ["cluster", _png(d / "emb.npy"), "--k", "2", "--out", str(d / "o.npz")],
    "emb.npy",
    "is a PNG image, not a .npy file",
  ),
  "cluster/truncated_npy": lambda d: (
    [
      "cluster",
      _truncated(pathlib.Path(_npy(d / "t.npy", np.ones((50, 4), np.float32))), 200),
      "--k",
      "2",
      "--out",
      str(d / "o.npz"),
    ],
    "t.npy",
    "truncated or corrupt",
  ),
  "cluster/npy_nan": lambda d: (
    [
      "cluster",
      _npy(d / "nan.npy", np.where(np.eye(6, 3) > 0, np.inf, 1.0)),
      "--k",
      "2",
      "--out",
      str(d / "o.npz"),
    ],
    "nan.npy",
    "non-finite value(s), first at row 0",
  ),
  "cluster/npy_1d": lambda d: (
    ["cluster", _npy(d / "v.npy", np.ones(6, np.float32)), "--k", "2", "--out", str(d / "o.npz")],
    "v.npy",
    "has shape (6,)",
  ),
  "cluster/npy_pickled_objects": lambda d: (
    [
      "cluster",
      _npy(d / "obj.npy", np.array([{"a": 1}, None], object), allow_pickle=True),
      "--k",
      "2",
      "--out",
      str(d / "o.npz"),
    ],
    "obj.npy",
    "pickled data is never loaded",
  ),
  "cluster/npy_strings": lambda d: (
    [
      "cluster",
      _npy(d / "s.npy", np.array([["a", "b"], ["c", "d"]])),
      "--k",
      "2",
      "--out",
      str(d / "o.npz"),
    ],
    "s.npy",
    "has dtype <U1",
  ),
  "cluster/meta_row_count": lambda d: (
    [
      "cluster",
      _npy(d / "e.npy", np.random.default_rng(0).normal(size=(6, 3))),
      "--k",
      "2",
      "--meta",
      _labels_csv(d),
      "--out",
      str(d / "o.npz"),
    ],
    "labels.csv",
    "has 4 rows",
  ),
  # ------------------------------------------------------------------ mmts cluster: tables in
  "cluster/validate_png": lambda d: (
    ["cluster", _labels_csv(d), "--id-column", "id", "--validate", _png(d / "t.npz")],
    "t.npz",
    "is a PNG image, not a .npz file",
  ),
  "cluster/validate_other_npz": lambda d: (
    [
      "cluster",
      _labels_csv(d),
      "--id-column",
      "id",
      "--validate",
      str(np.savez(d / "t.npz", a=np.ones(3)) or d / "t.npz"),
    ],
    "t.npz",
    "without the mmts_jax.ClusterTable format tag",
  ),
  "cluster/validate_truncated": lambda d: (
    [
      "cluster",
      _labels_csv(d),
      "--id-column",
      "id",
      "--validate",
      _truncated(pathlib.Path(_table(d)), 300),
    ],
    "table.npz",
    "truncated or corrupt",
  ),
  "cluster/validate_other_dataset": lambda d: (
    [
      "cluster",
      _write(d / "rev.csv", "id,cls\n3,c\n2,a\n1,b\n0,a\n"),
      "--id-column",
      "id",
      "--validate",
      str(
        ClusterTable.from_labels(["a", "b", "a", "c"], fingerprint="sha256:x").save(d / "t.npz")
        or d / "t.npz"
      ),
    ],
    "t.npz",
    "different content or order",
  ),
  # ------------------------------------------------------------------ mmts cluster: outputs
  "cluster/out_under_a_file": lambda d: (
    ["cluster", _labels_csv(d), "--label-column", "cls", "--out", str(d / "labels.csv" / "t.npz")],
    "labels.csv",
    "is a file, not a folder",
  ),
  "cluster/out_is_a_folder": lambda d: (
    [
      "cluster",
      _labels_csv(d),
      "--label-column",
      "cls",
      "--out",
      str((d / "f.npz").mkdir() or d / "f.npz"),
    ],
    "f.npz",
    "--out is a folder",
  ),
  "cluster/plot_under_a_file": lambda d: (
    [
      "cluster",
      _labels_csv(d),
      "--label-column",
      "cls",
      "--out",
      str(d / "t.npz"),
      "--plot",
      str(d / "labels.csv" / "p.png"),
    ],
    "labels.csv",
    "cannot write --plot",
  ),
  # ------------------------------------------------------------------ mmts eval retrieval
  "eval/missing_embeddings": lambda d: (
    ["eval", "retrieval", "--embeddings", str(d / "none.npz"), "--captions-per-image", "1"],
    "none.npz",
    "does not exist",
  ),
  "eval/text_as_npz": lambda d: (
    [
      "eval",
      "retrieval",
      "--embeddings",
      _write(d / "e.npz", "image,text\n"),
      "--captions-per-image",
      "1",
    ],
    "e.npz",
    "is a text file, not a .npz file",
  ),
  "eval/missing_key": lambda d: (
    [
      "eval",
      "retrieval",
      "--embeddings",
      str(np.savez(d / "e.npz", image_emb=np.ones((2, 3))) or d / "e.npz"),
      "--captions-per-image",
      "1",
    ],
    "e.npz",
    "has no array 'text_emb'",
  ),
  "eval/nan_embeddings": lambda d: (
    [
      "eval",
      "retrieval",
      "--embeddings",
      str(
        np.savez(
          d / "e.npz", image_emb=np.ones((2, 3)), text_emb=np.array([[1, 2, 3], [np.nan, 0, 0]])
        )
        or d / "e.npz"
      ),
      "--captions-per-image",
      "1",
    ],
    "e.npz['text_emb']",
    "non-finite value(s), first at row 1",
  ),
  "eval/width_mismatch": lambda d: (
    [
      "eval",
      "retrieval",
      "--embeddings",
      str(
        np.savez(d / "e.npz", image_emb=np.ones((2, 3)), text_emb=np.ones((2, 4))) or d / "e.npz"
      ),
      "--captions-per-image",
      "1",
    ],
    "e.npz['text_emb']",
    "caption embeddings are 4-d",
  ),
  "eval/map_out_of_range": lambda d: (
    [
      "eval",
      "retrieval",
      "--embeddings",
      str(
        np.savez(
          d / "e.npz",
          image_emb=np.ones((2, 3)),
          text_emb=np.ones((3, 3)),
          text_to_image=np.array([0, 1, 5]),
        )
        or d / "e.npz"
      ),
    ],
    "e.npz['text_to_image']",
    "expected 3 image indices in [0, 2)",
  ),
  "eval/map_float": lambda d: (
    [
      "eval",
      "retrieval",
      "--embeddings",
      str(
        np.savez(
          d / "e.npz",
          image_emb=np.ones((2, 3)),
          text_emb=np.ones((2, 3)),
          text_to_image=np.array([0.0, 1.0]),
        )
        or d / "e.npz"
      ),
    ],
    "e.npz['text_to_image']",
    "has dtype float64",
  ),
  "eval/pickled_array_in_npz": lambda d: (
    [
      "eval",
      "retrieval",
      "--embeddings",
      str(
        np.savez(d / "e.npz", image_emb=np.array([None, {}], object), text_emb=np.ones((2, 3)))
        or d / "e.npz"
      ),
      "--captions-per-image",
      "1",
    ],
    "e.npz['image_emb']",
    "pickled data is never loaded",
  ),
  "eval/subset_shape": lambda d: (
    [
      "eval",
      "retrieval",
      "--embeddings",
      str(
        np.savez(d / "e.npz", image_emb=np.ones((2, 3)), text_emb=np.ones((2, 3))) or d / "e.npz"
      ),
      "--captions-per-image",
      "1",
      "--subset",
      "head=" + _npy(d / "m.npy", np.ones(5, bool)),
    ],
    "m.npy",
    "expected a (2,) mask",
  ),
  "eval/out_under_a_file": lambda d: (
    [
      "eval",
      "retrieval",
      "--embeddings",
      str(
        np.savez(d / "e.npz", image_emb=np.ones((2, 3)), text_emb=np.ones((2, 3))) or d / "e.npz"
      ),
      "--captions-per-image",
      "1",
      "--out",
      str(d / "e.npz" / "m.json"),
    ],
    "e.npz",
    "is a file, not a folder",
  ),
  # ------------------------------------------------------------------ mmts eval ek100
  "eval/ek100_missing_annotations": lambda d: (
    [
      "eval",
      "ek100",
      "--similarity",
      _npy(d / "s.npy", np.ones((3, 2), np.float32)),
      "--annotations",
      str(d / "no_such_dir"),
    ],
    "no_such_dir",
    "no such folder",
  ),
  "eval/ek100_bad_verb_class": lambda d: (
    [
      "eval",
      "ek100",
      "--similarity",
      _npy(d / "s.npy", np.ones((3, 2), np.float32)),
      "--annotations",
      _ek100_dir(d, video=EK100_VIDEO.replace("v1,1,", "v1,one,")),
    ],
    "EPIC_100_retrieval_test.csv:3",
    "verb_class is 'one'",
  ),
  "eval/ek100_bad_noun_list": lambda d: (
    [
      "eval",
      "ek100",
      "--similarity",
      _npy(d / "s.npy", np.ones((3, 2), np.float32)),
      "--annotations",
      _ek100_dir(d, video=EK100_VIDEO.replace("[3]", "[3")),
    ],
    "EPIC_100_retrieval_test.csv:4",
    "all_noun_classes is '[3'",
  ),
  "eval/ek100_ragged_row": lambda d: (
    [
      "eval",
      "ek100",
      "--similarity",
      _npy(d / "s.npy", np.ones((3, 2), np.float32)),
      "--annotations",
      _ek100_dir(d, sentence=EK100_SENTENCE + "v1\n"),
    ],
    "EPIC_100_retrieval_test_sentence.csv:4",
    "row has 1 fields",
  ),
  "eval/ek100_unknown_caption": lambda d: (
    [
      "eval",
      "ek100",
      "--similarity",
      _npy(d / "s.npy", np.ones((3, 2), np.float32)),
      "--annotations",
      _ek100_dir(d, sentence=EK100_SENTENCE.replace("v2,", "v9,")),
    ],
    "EPIC_100_retrieval_test_sentence.csv:3",
    "are not video segments",
  ),
  "eval/ek100_similarity_png": lambda d: (
    ["eval", "ek100", "--similarity", _png(d / "s.npy"), "--annotations", _ek100_dir(d)],
    "s.npy",
    "is a PNG image",
  ),
  "eval/ek100_wrong_shape": lambda d: (
    [
      "eval",
      "ek100",
      "--similarity",
      _npy(d / "s.npy", np.ones((2, 2), np.float32)),
      "--annotations",
      _ek100_dir(d),
    ],
    "s.npy",
    "expected 3 videos x 2 captions",
  ),
  "eval/ek100_relevancy_shape": lambda d: (
    [
      "eval",
      "ek100",
      "--similarity",
      _npy(d / "s.npy", np.ones((3, 2), np.float32)),
      "--relevancy",
      _npy(d / "r.npy", np.ones((2, 3), np.float32)),
    ],
    "r.npy",
    "has shape (2, 3)",
  ),
  "eval/ek100_val_videos_without_annotations": lambda d: (
    [
      "eval",
      "ek100",
      "--similarity",
      _npy(d / "s.npy", np.ones((3, 2), np.float32)),
      "--relevancy",
      _npy(d / "r.npy", np.ones((3, 2), np.float32)),
      "--val-videos",
      "2",
    ],
    "--val-videos",
    "needs --annotations",
  ),
  # ------------------------------------------------------------------ mmts prepare
  "prepare/missing_table": lambda d: (
    ["prepare", "table", str(d / "p.tsv"), "--images", _prepare_images(d), "--out", str(d / "ds")],
    "p.tsv",
    "does not exist",
  ),
  "prepare/ragged_row": lambda d: (
    [
      "prepare",
      "table",
      _write(d / "p.tsv", "image\tcaption\na.png\n"),
      "--images",
      _prepare_images(d),
      "--out",
      str(d / "ds"),
    ],
    "p.tsv:2",
    "row has 1 fields",
  ),
  "prepare/latin1": lambda d: (
    [
      "prepare",
      "table",
      _write(d / "p.csv", "image,caption\na.png,caf\xe9\n".encode("latin-1")),
      "--images",
      _prepare_images(d),
      "--out",
      str(d / "ds"),
    ],
    "p.csv:2",
    "is not UTF-8",
  ),
  "prepare/nul_byte": lambda d: (
    [
      "prepare",
      "table",
      _write(d / "p.csv", b"image,caption\na.png,a\x00cat\n"),
      "--images",
      _prepare_images(d),
      "--out",
      str(d / "ds"),
    ],
    "p.csv:2",
    "NUL byte",
  ),
  "prepare/label_not_int": lambda d: (
    [
      "prepare",
      "table",
      _write(d / "p.csv", "image,caption,y\na.png,cat,x7\n"),
      "--images",
      _prepare_images(d),
      "--label-column",
      "y",
      "--out",
      str(d / "ds"),
    ],
    "p.csv:2",
    "label 'x7'",
  ),
  "prepare/image_path_escapes": lambda d: (
    [
      "prepare",
      "table",
      _write(d / "p.csv", "image,caption\n../secret.png,cat\n"),
      "--images",
      _prepare_images(d),
      "--out",
      str(d / "ds"),
    ],
    "p.csv:2",
    "no '..'",
  ),
  "prepare/out_under_a_file": lambda d: (
    [
      "prepare",
      "table",
      _write(d / "p.csv", "image,caption\na.png,cat\n"),
      "--images",
      _prepare_images(d),
      "--out",
      str(d / "p.csv" / "ds"),
    ],
    "p.csv",
    "is a file",
  ),
  "prepare/wds_not_a_tar": lambda d: (
    ["prepare", "wds", _write(d / "s.tar", "hello"), "--out", str(d / "ds")],
    "s.tar",
    "is not a tar file",
  ),
  "prepare/wds_truncated": lambda d: (
    [
      "prepare",
      "wds",
      _truncated(
        pathlib.Path(
          _tar(
            d / "s.tar",
            [
              _file("0.png", _good_png_bytes()),
              _file("0.txt", b"a cat"),
              _file("1.png", _good_png_bytes() * 40),
              _file("1.txt", b"a dog"),
            ],
          )
        ),
        3000,
      ),
      "--out",
      str(d / "ds"),
    ],
    "s.tar",
    "truncated or corrupt",
  ),
  "prepare/wds_dotdot_member": lambda d: (
    ["prepare", "wds", _tar(d / "s.tar", [_file("../evil.txt")]), "--out", str(d / "ds")],
    "s.tar",
    "has an absolute path or '..'",
  ),
  "prepare/wds_absolute_member": lambda d: (
    ["prepare", "wds", _tar(d / "s.tar", [_file("/etc/evil.txt")]), "--out", str(d / "ds")],
    "s.tar",
    "has an absolute path or '..'",
  ),
  "prepare/wds_symlink_member": lambda d: (
    [
      "prepare",
      "wds",
      _tar(d / "s.tar", [(_link("0.png", "/etc/passwd", tarfile.SYMTYPE), None)]),
      "--out",
      str(d / "ds"),
    ],
    "s.tar",
    "is a link",
  ),
  "prepare/wds_hardlink_member": lambda d: (
    [
      "prepare",
      "wds",
      _tar(d / "s.tar", [(_link("0.png", "etc/passwd", tarfile.LNKTYPE), None)]),
      "--out",
      str(d / "ds"),
    ],
    "s.tar",
    "is a link",
  ),
  "prepare/wds_device_member": lambda d: (
    [
      "prepare",
      "wds",
      _tar(d / "s.tar", [(_link("0.png", "", tarfile.CHRTYPE), None)]),
      "--out",
      str(d / "ds"),
    ],
    "s.tar",
    "device file or FIFO",
  ),
  "prepare/wds_caption_not_utf8": lambda d: (
    [
      "prepare",
      "wds",
      _tar(
        d / "s.tar",
        [_file("0.png", _good_png_bytes()), _file("0.txt", "caf\xe9".encode("latin-1"))],
      ),
      "--out",
      str(d / "ds"),
    ],
    "s.tar",
    "caption 0.txt is not UTF-8",
  ),
  "prepare/wds_label_not_int": lambda d: (
    [
      "prepare",
      "wds",
      _tar(
        d / "s.tar",
        [_file("0.png", _good_png_bytes()), _file("0.txt", b"a cat"), _file("0.cls", b"cat")],
      ),
      "--label-ext",
      "cls",
      "--out",
      str(d / "ds"),
    ],
    "s.tar",
    "label 0.cls is 'cat'",
  ),
  "prepare/tfds_unknown_dataset": lambda d: (
    ["prepare", "tfds", "no_such_ds", "--data-dir", str(d / "tfds"), "--out", str(d / "ds")],
    "no_such_ds",
    "no such TFDS dataset",
  ),
  "prepare/inspect_not_a_dataset": lambda d: (
    ["prepare", "inspect", str(d)],
    str(d),
    "is not a converted dataset",
  ),
  "prepare/inspect_corrupt_manifest": lambda d: (
    [
      "prepare",
      "inspect",
      str(pathlib.Path(_write(d / "ds" / "manifest.json", '{"format": ')).parent),
    ],
    "manifest.json",
    "is corrupt",
  ),
  # ------------------------------------------------------------------ mmts finetune
  "finetune/prepare_missing_annotations": lambda d: (
    ["finetune", "prepare", "--annotations", str(d / "ann"), "--out", str(d / "data")],
    "EPIC_100_retrieval_train_sentence.csv",
    "does not exist",
  ),
  "finetune/prepare_bad_verb_class": lambda d: (
    [
      "finetune",
      "prepare",
      "--annotations",
      str(
        pathlib.Path(
          _write(
            d / "ann" / "EPIC_100_retrieval_train_sentence.csv",
            EK100_TRAIN.replace("t1,open door,1", "t1,open door,1.5"),
          )
        ).parent
      ),
      "--out",
      str(d / "data"),
    ],
    "EPIC_100_retrieval_train_sentence.csv:3",
    "verb_class is '1.5'",
  ),
  "finetune/prepare_duplicate_id": lambda d: (
    [
      "finetune",
      "prepare",
      "--annotations",
      str(
        pathlib.Path(
          _write(
            d / "ann" / "EPIC_100_retrieval_train_sentence.csv", EK100_TRAIN.replace("t2,", "t0,")
          )
        ).parent
      ),
      "--out",
      str(d / "data"),
    ],
    "EPIC_100_retrieval_train_sentence.csv:4",
    "narration_id 't0' repeats line 2",
  ),
  "finetune/prepare_out_is_a_file": lambda d: (
    [
      "finetune",
      "prepare",
      "--annotations",
      _write(d / "ann.csv", "x"),
      "--out",
      str(d / "ann.csv"),
    ],
    "ann.csv",
    "--out is a file",
  ),
  "finetune/eval_not_a_workdir": lambda d: (
    ["finetune", "eval", "--data", str(d / "data"), "--annotations", str(d), "--workdir", str(d)],
    "config.json",
    "not a training workdir",
  ),
  "finetune/zero_shot_corrupt_config": lambda d: (
    [
      "finetune",
      "zero-shot",
      "--workdir",
      str(pathlib.Path(_write(d / "run" / "config.json", '{"model": ')).parent),
      "--test-set",
      str(d / "t.npz"),
    ],
    "config.json",
    "is not valid JSON",
  ),
  "finetune/zero_shot_png_test_set": lambda d: (
    ["finetune", "zero-shot", "--workdir", _run_dir(d), "--test-set", _png(d / "t.npz")],
    "t.npz",
    "is a PNG image, not a .npz file",
  ),
  # ------------------------------------------------------------------ mmts train (config)
  "train/missing_config": lambda d: (
    ["train", "--config", str(d / "c.py"), "--workdir", str(d / "run")],
    "c.py",
    "does not exist",
  ),
  "train/features_png": lambda d: (
    [
      "train",
      "--config",
      EK100_CONFIG,
      "--workdir",
      str(d / "run"),
      f"--config.data.path={_png(d / 'f.npz')}",
      "--config.total_steps=2",
    ],
    "f.npz",
    "is a PNG image, not a .npz file",
  ),
  "train/features_nan": lambda d: (
    [
      "train",
      "--config",
      EK100_CONFIG,
      "--workdir",
      str(d / "run"),
      f"--config.data.path={_features(d / 'f.npz', nan=True)}",
      "--config.total_steps=2",
    ],
    "f.npz['image_features']",
    "non-finite value(s), first at row 3",
  ),
  "train/features_missing_index": lambda d: (
    [
      "train",
      "--config",
      EK100_CONFIG,
      "--workdir",
      str(d / "run"),
      f"--config.data.path={_features(d / 'f.npz', drop='index')}",
      "--config.total_steps=2",
    ],
    "f.npz",
    "has no array(s) ['index']",
  ),
  "train/cluster_table_png": lambda d: (
    [
      "train",
      "--config",
      EK100_CONFIG,
      "--workdir",
      str(d / "run"),
      f"--config.data.path={_features(d / 'f.npz')}",
      f"--config.mmts.cluster_table={_png(d / 't.npz')}",
      "--config.total_steps=2",
      "--config.batch_size=8",
      "--config.optim.warmup_steps=0",
    ],
    "t.npz",
    "is a PNG image, not a .npz file",
  ),
  "train/config_syntax_error": lambda d: (
    [
      "train",
      "--config",
      _write(d / "c.py", "def get_config(:\n  pass\n"),
      "--workdir",
      str(d / "run"),
    ],
    "c.py:1",
    "expected a Python config file",
  ),
}


EK100_CONFIG = str(
  pathlib.Path(__file__).resolve().parents[1] / "configs" / "ek100_features_mimm.py"
)


def _features(path: pathlib.Path, nan: bool = False, drop: str | None = None) -> str:
  rng = np.random.default_rng(0)
  arrays = {
    "image_features": rng.normal(size=(8, 64)).astype(np.float32),
    "text_features": rng.normal(size=(8, 48)).astype(np.float32),
    "index": np.arange(8, dtype=np.int64),
  }
  if nan:
    arrays["image_features"][3, 5] = np.nan
  arrays.pop(drop, None)
  np.savez(path, **arrays)
  return str(path)


def _run_dir(d: pathlib.Path) -> str:
  """A workdir holding only the config.json of the EK-100 features config."""
  from mmts_jax.commands.train import load_config

  _write(d / "run" / "config.json", load_config(EK100_CONFIG).to_json())
  return str(d / "run")


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
  info = tarfile.TarInfo(name)
  info.type, info.linkname = kind, target
  return info


def _snapshot(root: pathlib.Path) -> set[str]:
  return {
    os.path.relpath(os.path.join(dp, n), root) for dp, dns, fns in os.walk(root) for n in dns + fns
  }


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_with_status_2(name, tmp_path, capsys):
  d = tmp_path / "in"
  d.mkdir()
  argv, names, problem = CASES[name](d)
  before = _snapshot(tmp_path)
  capsys.readouterr()
  rc = cli.main(argv)
  out, err = capsys.readouterr()
  assert rc == 2, (out, err)
  assert "Traceback" not in err + out
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith(f"mmts {argv[0]}: error: "), err
  assert names in lines[0], err
  assert problem in lines[0], err
  assert _snapshot(tmp_path) == before, "a failed command left files behind"


def test_there_are_at_least_40_cases():
  assert len(CASES) >= 40 and len({k.split("/")[0] for k in CASES}) == 5


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
  argv, _, _ = CASES["cluster/row_too_long"](tmp_path)
  with pytest.raises(ValueError, match="row has 3 fields"):
    cli.main(argv + ["--debug"])
  monkeypatch.setenv("MMTS_DEBUG", "1")
  with pytest.raises(ValueError, match="row has 3 fields"):
    cli.main(argv)


def test_exit_status_attribute_and_interrupt(capsys):
  from mmts_jax.commands import errors

  class Diverged(FloatingPointError):
    exit_status = 3

  def diverge(argv):
    raise Diverged("the loss became NaN at step 7\nsee metrics.jsonl")

  def interrupt(argv):
    raise KeyboardInterrupt

  assert errors.run("mmts x", diverge, []) == 3
  assert capsys.readouterr().err == (
    "mmts x: error: the loss became NaN at step 7 see metrics.jsonl\n"
  )
  assert errors.run("mmts x", interrupt, []) == 130
  assert capsys.readouterr().err == "mmts x: interrupted\n"

  def bug(argv):
    raise KeyError("a bug keeps its traceback")

  with pytest.raises(KeyError):
    errors.run("mmts x", bug, [])


@pytest.mark.parametrize(
  "exc,expected",
  [
    (FileNotFoundError(2, "No such file or directory", "a.csv"), "a.csv: no such file or folder"),
    (
      NotADirectoryError(20, "Not a directory", "README.md/x"),
      "README.md/x: a part of the path is a file, not a folder",
    ),
    (PermissionError(13, "Permission denied", "/root/x"), "/root/x: permission denied"),
    (IsADirectoryError(21, "Is a directory", "data"), "data: is a folder, not a file"),
    (OSError(28, "No space left on device", "t.npz"), "t.npz: no space left on the device"),
    (OSError(30, "Read-only file system", "t.npz"), "t.npz: the file system is read-only"),
    (ValueError("--k must be >= 1, got 0"), "--k must be >= 1, got 0"),
    (zipfile.BadZipFile("File is not a zip file"), "not a valid .npz (zip) file"),
    (
      ValueError("Object arrays cannot be loaded when allow_pickle=False"),
      "Object arrays cannot be loaded",
    ),
    (
      UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
      "not UTF-8 text (invalid start byte at byte 0)",
    ),
    (csv.Error("field larger than field limit"), "malformed CSV (field larger"),
    (json.JSONDecodeError("Expecting value", "{\n x", 3), "not valid JSON at line 2 column 2"),
    (SyntaxError("invalid syntax", ("c.py", 4, 1, "def (")), "c.py:4: invalid syntax"),
    (tarfile.ReadError("file could not be opened successfully"), "not a readable tar file"),
    (EOFError("Compressed file ended"), "the file ends early"),
  ],
)
def test_describe_maps_library_exceptions(exc, expected):
  from mmts_jax.commands import errors

  message = errors.describe(exc)
  assert message is not None and expected in message and "\n" not in message


def test_long_library_messages_are_cut():
  from mmts_jax.commands import errors

  message = errors.describe(ValueError("x" * 5000))
  assert len(message) <= 600 and message.endswith("(--debug shows the whole message)")


@pytest.mark.parametrize(
  "exc",
  [KeyError("x"), AttributeError("x"), IndexError("x"), RuntimeError("x"), ZeroDivisionError()],
)
def test_describe_leaves_bugs_to_their_traceback(exc):
  from mmts_jax.commands import errors

  assert errors.describe(exc) is None
