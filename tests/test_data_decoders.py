"""JPEG decoding paths: simplejpeg against Pillow, draft (DCT-scaled) decoding against full size.

All on textured JPEGs written by `sample_images.natural_jpeg` (flat colours would hide decoding
and scaling differences). simplejpeg is a declared dependency of the test environment (`fast`
extra, installed by `make install`).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mmts_jax.data import image_ops, pipeline
from mmts_jax.data.sample_images import natural_jpeg


def _pixels(data: bytes, decoder: str, draft: int | None = None) -> np.ndarray:
  return np.asarray(image_ops.decode_image(data, draft=draft, decoder=decoder), np.int16)


def test_simplejpeg_is_installed_for_the_tests():
  assert image_ops.has_simplejpeg()


@pytest.mark.parametrize("subsampling", [0, 2])  # 4:4:4 and 4:2:0
@pytest.mark.parametrize("progressive", [False, True])
def test_simplejpeg_gives_pillows_pixels(subsampling, progressive):
  """Both call libjpeg-turbo with the accurate DCT and fancy upsampling: identical pixels, at
  full size and at every DCT scale draft picks (odd sides round up alike)."""
  data = natural_jpeg(
    np.random.default_rng(subsampling), 333, 217, subsampling=subsampling, progressive=progressive
  )
  for draft in (None, 150, 100, 50, 20):
    want, got = _pixels(data, "pil", draft), _pixels(data, "simplejpeg", draft)
    assert got.shape == want.shape, (draft, got.shape, want.shape)
    np.testing.assert_array_equal(got, want)


def test_grey_and_cmyk_jpegs_decode_to_the_same_rgb():
  rng = np.random.default_rng(3)
  grey = Image.fromarray(np.asarray(Image.open(io.BytesIO(natural_jpeg(rng, 101, 77))))[..., 0])
  cmyk = Image.open(io.BytesIO(natural_jpeg(rng, 64, 48))).convert("CMYK")
  for img in (grey, cmyk):  # CMYK is handed to Pillow's own conversion
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    want = _pixels(buf.getvalue(), "pil")
    assert want.shape == (img.height, img.width, 3)
    np.testing.assert_array_equal(_pixels(buf.getvalue(), "simplejpeg"), want)


def test_simplejpeg_refuses_oversized_images_before_decoding(monkeypatch):
  data = natural_jpeg(np.random.default_rng(0), 40, 30)
  monkeypatch.setattr(image_ops, "MAX_IMAGE_PIXELS", 40 * 30 - 1)
  with pytest.raises(image_ops.ImageTooLargeError, match="40 x 30"):
    image_ops.decode_image(data, decoder="simplejpeg")


def test_decoder_names_are_checked():
  data = natural_jpeg(np.random.default_rng(0), 16, 16)
  with pytest.raises(ValueError, match="'turbo'"):
    image_ops.decode_image(data, decoder="turbo")
  with pytest.raises(ValueError, match="'cv2'"):
    pipeline.ImageTextTransform(None, decoder="cv2")
  with pytest.raises(ValueError, match="target"):
    image_ops.draft_scale(100, 100, 0)


@pytest.mark.parametrize("decoder", ["pil", "simplejpeg"])
@pytest.mark.parametrize("size", [(640, 480), (500, 496), (1000, 800), (2000, 1500)])
def test_draft_decode_then_exact_resize_stays_close_to_full_decode(decoder, size):
  """Draft decoding (DCT scaling to 1/2..1/8) then the same crop, in relative coordinates,
  resized bicubically to 224: measured mean |diff| 0.6-1.1, 99th percentile 2-4, max 4-8 grey
  levels of 255, on content whose mean deviation is ~50 levels. Bounds: 1.5, 6 and 12 levels
  (1 level = 0.015 after CLIP normalisation)."""
  w, h = size
  data = natural_jpeg(np.random.default_rng(w), w, h)
  full = image_ops.decode_image(data, decoder=decoder)
  drafted = image_ops.decode_image(data, draft=237, decoder=decoder)  # 224 / sqrt(0.9), rounded up
  s = w / drafted.width
  assert s >= 2 and min(drafted.size) >= 237  # scaled, never below the target
  box = (10, 7, w - 13, h - 4)
  a = np.asarray(full.resize((224, 224), Image.Resampling.BICUBIC, box=box), np.int16)
  b = np.asarray(
    drafted.resize((224, 224), Image.Resampling.BICUBIC, box=tuple(v / s for v in box)), np.int16
  )
  diff = np.abs(a - b)
  assert diff.mean() <= 1.5 and np.percentile(diff, 99) <= 6 and diff.max() <= 12
  assert np.abs(a - a.mean()).mean() > 30  # textured content: the bound means something


def test_transform_outputs_are_identical_for_both_decoders():
  """The whole train transform (draft decode, random resized crop, uint8 or normalised float)
  gives the same example with either decoder and the same generator seed."""
  rng = np.random.default_rng(7)
  sizes = rng.integers(250, 700, size=(6, 2))
  records = [
    {"image": natural_jpeg(rng, int(w), int(h)), "index": i} for i, (w, h) in enumerate(sizes)
  ]
  for uint8 in (False, True):
    pil = pipeline.ImageTextTransform(None, image_size=64, uint8=uint8, decoder="pil")
    sj = pipeline.ImageTextTransform(None, image_size=64, uint8=uint8, decoder="simplejpeg")
    for i, r in enumerate(records):
      a, b = pil(r, np.random.default_rng(i)), sj(r, np.random.default_rng(i))
      assert a["image"].dtype == (np.uint8 if uint8 else np.float32)
      np.testing.assert_array_equal(a["image"], b["image"])
  # uint8 then normalised = the float path, bit for bit.
  as_uint8 = pipeline.ImageTextTransform(None, image_size=64, uint8=True)
  as_float = pipeline.ImageTextTransform(None, image_size=64)
  raw = as_uint8(records[0], np.random.default_rng(0))["image"]
  np.testing.assert_array_equal(
    image_ops.normalize(raw), as_float(records[0], np.random.default_rng(0))["image"]
  )
