"""Unsafe files and unwritable places: no pickle, no escaping tar members, bounded image decoding,
and an output path that cannot be written (under a file, full disk, read-only) named in one line.

CI runs as root, where a chmod'ed folder is still writable, so "read-only" and "full" are made
honest by injecting the operating system's own errors (EROFS, ENOSPC) at the write, and a path
under a regular file is a real one.
"""

from __future__ import annotations

import ast
import errno
import io
import os
import pathlib
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

import mmts_jax
from mmts_jax import array_files, cli
from mmts_jax.data import convert, image_ops
from mmts_jax.errors import UserInputError

PACKAGE = pathlib.Path(mmts_jax.__file__).parent


def _calls(tree: ast.AST, name: str):
  for node in ast.walk(tree):
    if isinstance(node, ast.Call):
      f = node.func
      called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
      if called == name:
        yield node


def test_no_pickle_anywhere_in_the_package():
  """No module imports pickle, and no np.load / np.save may allow it."""
  offenders = []
  for path in PACKAGE.rglob("*.py"):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
        if any(
          n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib") for n in names
        ):
          offenders.append(f"{path}:{node.lineno} imports pickle")
    for fn in ("load", "save", "savez", "savez_compressed"):
      for call in _calls(tree, fn):
        for kw in call.keywords:
          if kw.arg == "allow_pickle" and not (
            isinstance(kw.value, ast.Constant) and kw.value.value is False
          ):
            offenders.append(f"{path}:{call.lineno} {fn}(allow_pickle=...)")
  assert not offenders, offenders


def test_object_arrays_are_refused(tmp_path):
  np.save(tmp_path / "o.npy", np.array([{"x": 1}], object), allow_pickle=True)
  with pytest.raises(UserInputError, match="pickled data is never loaded"):
    array_files.load_npy(tmp_path / "o.npy")
  np.savez(tmp_path / "o.npz", a=np.array([None], object))
  with pytest.raises(UserInputError, match=r"o.npz\['a'\]: holds Python objects"):
    array_files.load_npz_array(tmp_path / "o.npz", "a")


# ---------------------------------------------------------------------------- tar members
def _shard(path, infos) -> str:
  with tarfile.open(path, "w") as tar:
    for info, data in infos:
      if data is None:
        tar.addfile(info)
      else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  return str(path)


def _info(name, kind=tarfile.REGTYPE, link=""):
  info = tarfile.TarInfo(name)
  info.type, info.linkname = kind, link
  return info


@pytest.mark.parametrize(
  "info,problem",
  [
    (_info("../../etc/cron.d/x.txt"), "absolute path or '..'"),
    (_info("a/../../x.txt"), "absolute path or '..'"),
    (_info("/abs/x.txt"), "absolute path or '..'"),
    (_info("x.jpg", tarfile.SYMTYPE, "/etc/shadow"), "is a link"),
    (_info("x.jpg", tarfile.LNKTYPE, "y.jpg"), "is a link"),
    (_info("x.jpg", tarfile.CHRTYPE), "device file or FIFO"),
    (_info("x.jpg", tarfile.BLKTYPE), "device file or FIFO"),
    (_info("x.jpg", tarfile.FIFOTYPE), "device file or FIFO"),
  ],
)
def test_unsafe_tar_members_are_refused(tmp_path, info, problem):
  good = io.BytesIO()
  Image.new("RGB", (4, 4)).save(good, format="PNG")
  shard = _shard(
    tmp_path / "s.tar",
    [
      (_info("0.png"), good.getvalue()),
      (_info("0.txt"), b"a cat"),
      (info, None if info.type != tarfile.REGTYPE else b"x"),
    ],
  )
  with pytest.raises(UserInputError, match=problem) as e:
    convert.convert_webdataset(shard, tmp_path / "ds", threads=1)
  assert e.value.path == shard
  assert not (tmp_path / "ds" / "manifest.json").exists()


def test_oversized_member_is_refused_without_reading_it(tmp_path, monkeypatch):
  monkeypatch.setattr(convert, "MAX_MEMBER_BYTES", 10)
  shard = _shard(tmp_path / "s.tar", [(_info("0.txt"), b"a caption longer than 10 bytes")])
  with pytest.raises(UserInputError, match="at most 10 bytes per member"):
    convert.convert_webdataset(shard, tmp_path / "ds", threads=1)


# ---------------------------------------------------------------------------- image bombs
def _png_declaring(width: int, height: int) -> bytes:
  """A tiny valid PNG whose header declares width x height (its pixel data is not there)."""
  buf = io.BytesIO()
  Image.new("L", (1, 1)).save(buf, format="PNG")
  data = bytearray(buf.getvalue())
  ihdr = data.index(b"IHDR")
  data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
  crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
  data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
  return bytes(data)


def test_pillow_limit_is_set_explicitly():
  assert Image.MAX_IMAGE_PIXELS == image_ops.MAX_IMAGE_PIXELS == 1 << 26


def test_huge_declared_dimensions_are_refused_before_decoding():
  bomb = _png_declaring(50_000, 50_000)  # 2.5e9 pixels, 7.5 GB as RGB, ~70 bytes on disk
  assert len(bomb) < 200
  with pytest.raises(image_ops.ImageTooLargeError, match="exceeds the decoding limit"):
    image_ops.decode_image(bomb)
  just_over = _png_declaring(8193, 8192)
  # Pillow warns between its limit and twice it; the explicit check then refuses the image.
  with (
    pytest.warns(Image.DecompressionBombWarning),
    pytest.raises(image_ops.ImageTooLargeError, match="8193 x 8192"),
  ):
    image_ops.decode_image(just_over)


def test_conversion_skips_a_bomb_and_counts_it(tmp_path):
  good = io.BytesIO()
  Image.new("RGB", (4, 4)).save(good, format="PNG")
  (tmp_path / "imgs").mkdir()
  (tmp_path / "imgs" / "ok.png").write_bytes(good.getvalue())
  (tmp_path / "imgs" / "bomb.png").write_bytes(_png_declaring(40_000, 40_000))
  (tmp_path / "t.csv").write_text("image,caption\nok.png,fine\nbomb.png,boom\n")
  m = convert.convert_table(tmp_path / "t.csv", tmp_path / "imgs", tmp_path / "ds", threads=1)
  assert m.num_records == 1 and m.source["skip_reasons"] == {"image too large": 1}
  with pytest.raises(ValueError, match="image too large"):
    convert.convert_table(
      tmp_path / "t.csv", tmp_path / "imgs", tmp_path / "ds2", threads=1, on_error="raise"
    )


# ---------------------------------------------------------------------------- output paths
def _labels(tmp_path) -> str:
  (tmp_path / "l.csv").write_text("id,cls\n0,a\n1,b\n2,a\n")
  return str(tmp_path / "l.csv")


def _files(root) -> set[str]:
  """Every file and folder under `root`."""
  return {os.path.relpath(os.path.join(d, f), root) for d, ds, fs in os.walk(root) for f in fs + ds}


def _failing_fsync(code: int, fail_on: int):
  """os.fsync that fails with `code` on its `fail_on`-th call (1-based), as a disk would."""
  real, calls = os.fsync, [0]

  def fsync(fd):
    calls[0] += 1
    if calls[0] == fail_on:
      raise OSError(code, os.strerror(code))
    return real(fd)

  return fsync


@pytest.mark.parametrize(
  "code,reason",
  [
    (errno.ENOSPC, "no space left on the device"),
    (errno.EROFS, "the file system is read-only"),
    (errno.EDQUOT, "disk quota exceeded"),
  ],
)
@pytest.mark.parametrize("fail_on", [1, 2])
def test_full_or_read_only_disk_names_the_artifact_and_leaves_nothing(
  tmp_path, capsys, monkeypatch, code, reason, fail_on
):
  src = _labels(tmp_path)
  before = _files(tmp_path)
  monkeypatch.setattr(os, "fsync", _failing_fsync(code, fail_on))
  out = tmp_path / "out" / "t.npz"
  rc = cli.main(["cluster", src, "--label-column", "cls", "--out", str(out)])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1, err
  # The plot is written first (fsync 1), the table second (fsync 2): the message names the
  # artifact that failed, and the plot already written is removed again.
  failed = out.with_suffix(".png") if fail_on == 1 else out
  assert f"{failed}: cannot write" in err[0] and reason in err[0], err
  assert _files(tmp_path) == before


def test_output_under_a_regular_file(tmp_path, capsys):
  src = _labels(tmp_path)
  for argv in (
    ["cluster", src, "--label-column", "cls", "--out", f"{src}/deeper/t.npz"],
    ["eval", "ek100", "--similarity", "x.npy", "--relevancy", "y.npy", "--out", f"{src}/m.json"],
    ["prepare", "table", src, "--images", str(tmp_path), "--out", f"{src}/ds"],
    ["finetune", "prepare", "--annotations", str(tmp_path), "--out", f"{src}/d"],
  ):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{src} is a file" in err, err
  assert _files(tmp_path) == {"l.csv"}


def test_unwritable_folder_is_named_before_any_work(tmp_path, capsys, monkeypatch):
  """`os.access` is what a non-root user's read-only folder fails; root is simulated."""
  src = _labels(tmp_path)
  (tmp_path / "ro").mkdir()
  real = os.access
  monkeypatch.setattr(
    os,
    "access",
    lambda p, mode, **kw: (
      False if str(p).endswith("ro") and mode & os.W_OK else real(p, mode, **kw)
    ),
  )
  assert (
    cli.main(["cluster", src, "--label-column", "cls", "--out", str(tmp_path / "ro" / "t.npz")])
    == 2
  )
  err = capsys.readouterr().err
  assert f"the folder {tmp_path / 'ro'} is not writable" in err
