"""Host image ops: decode modes, crops, CLIP normalisation."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from mmts_jax.data import image_ops


def _encode(img: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  return buf.getvalue()


def test_normalize_matches_float64_reference():
  rng = np.random.default_rng(0)
  pix = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
  want = (
    pix.astype(np.float64) / 255.0 - np.array([0.48145466, 0.4578275, 0.40821073])
  ) / np.array([0.26862954, 0.26130258, 0.27577711])
  got = image_ops.normalize(pix)
  assert got.dtype == np.float32 and got.shape == (7, 5, 3)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
  with pytest.raises(ValueError, match=r"\(7, 5\)"):
    image_ops.normalize(pix[..., 0])


@pytest.mark.parametrize(
  "mode,fmt", [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("RGB", "JPEG"), ("L", "JPEG")]
)
def test_decode_gives_rgb(mode, fmt):
  src = Image.new("RGB", (9, 6), (200, 100, 50)).convert(mode)
  img = image_ops.decode_image(_encode(src, fmt))
  assert img.mode == "RGB" and img.size == (9, 6)
  want = np.asarray(src.convert("RGB"), np.int16)
  assert np.abs(np.asarray(img, np.int16) - want).max() <= 3


def test_decode_transparent_png_composites_on_white():
  src = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
  assert np.asarray(image_ops.decode_image(_encode(src, "PNG"))).min() == 255


def test_decode_array_and_errors():
  arr = np.full((5, 6, 3), 77, np.uint8)
  assert np.array_equal(np.asarray(image_ops.decode_image(arr)), arr)
  assert image_ops.decode_image(arr[..., :1]).size == (6, 5)
  with pytest.raises(ValueError, match="float32"):
    image_ops.decode_image(arr.astype(np.float32))
  with pytest.raises(TypeError, match="str"):
    image_ops.decode_image("x.jpg")


def test_jpeg_draft_keeps_both_sides_above_target():
  data = _encode(Image.new("RGB", (800, 600), (10, 20, 30)), "JPEG")
  img = image_ops.decode_image(data, draft=120)
  assert 120 <= min(img.size) < 600 and img.size[0] / img.size[1] == pytest.approx(4 / 3, 0.02)


def test_random_resized_crop_box_statistics():
  rng = np.random.default_rng(1)
  w, h, scale, ratio = 200, 150, (0.3, 0.9), (3 / 4, 4 / 3)
  areas, ratios = [], []
  for _ in range(500):
    left, t, r, b = image_ops.random_resized_crop_box(w, h, rng, scale=scale, ratio=ratio)
    assert 0 <= left < r <= w and 0 <= t < b <= h
    areas.append((r - left) * (b - t) / (w * h))
    ratios.append((r - left) / (b - t))
  areas, ratios = np.array(areas), np.array(ratios)
  # Rounding to whole pixels moves area and ratio by a few percent at most.
  assert areas.min() > scale[0] * 0.95 and areas.max() < scale[1] * 1.05
  assert ratios.min() > ratio[0] * 0.97 and ratios.max() < ratio[1] * 1.03
  # log-uniform ratio: the mean of log ratio is near 0 for a symmetric range.
  assert abs(np.mean(np.log(ratios))) < 0.05
  # Same generator state, same box.
  a = image_ops.random_resized_crop_box(w, h, np.random.default_rng(5))
  assert a == image_ops.random_resized_crop_box(w, h, np.random.default_rng(5))


def test_random_resized_crop_falls_back_to_centre_for_extreme_aspect():
  # A 1000x10 strip admits no 3/4..4/3 box of >= 90% of its area: centre crop clamped to 4/3.
  box = image_ops.random_resized_crop_box(1000, 10, np.random.default_rng(0))
  assert box == (493, 0, 506, 10)
  img = image_ops.random_resized_crop(Image.new("RGB", (1000, 10)), 16, np.random.default_rng(0))
  assert img.size == (16, 16)
  with pytest.raises(ValueError, match="scale"):
    image_ops.random_resized_crop_box(10, 10, np.random.default_rng(0), scale=(0.5, 1.5))


def test_resize_center_crop_takes_the_middle():
  arr = np.zeros((40, 80, 3), np.uint8)
  arr[:, 20:60] = 255  # the central 40x40 square is white, the sides black
  out = np.asarray(image_ops.resize_center_crop(Image.fromarray(arr), 20))
  assert out.shape == (20, 20, 3)
  assert out[:, 2:-2].min() >= 250


def test_shrink_shorter_side_and_encode():
  img = Image.new("RGB", (300, 200), (1, 2, 3))
  small = image_ops.shrink_shorter_side(img, 100)
  assert small.size == (150, 100)
  assert image_ops.shrink_shorter_side(small, 500) is small
  data = image_ops.encode_jpeg(small)
  assert Image.open(io.BytesIO(data)).format == "JPEG"
  assert math.isclose(image_ops.CLIP_MEAN[0], 0.48145466, rel_tol=1e-7)
