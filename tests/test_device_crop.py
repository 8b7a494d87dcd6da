"""The optional device-side random resized crop (`mmts_jax.data.device_crop`, the pipeline's
`device_crop=True`) against the host path's Pillow bicubic crop, on natural JPEGs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mmts_jax.data import device_crop, image_ops, pipeline, sources
from mmts_jax.data.sample_images import natural_jpeg
from mmts_jax.mesh import make_mesh

SIZE = 224
# Pixel differences (0-255 scale) to the host crop, per image, on natural JPEGs with N(0, 6)
# grain (harder than photos). Measured: bicubic mean 0.86-1.6, max 5-10; bilinear mean 1.2-1.9,
# max 8-13. The bounds leave headroom yet see a box moved by 4 source pixels (checked below).
BOUNDS = {"bicubic": (2.5, 24.0), "bilinear": (3.0, 32.0)}


@pytest.fixture(scope="module")
def pairs():
  """(host uint8 crops, device-crop sources, boxes) for 6 JPEGs of CC3M-like sizes."""
  rng = np.random.default_rng(0)
  host_t = pipeline.ImageTextTransform(None, image_size=SIZE, uint8=True)
  dev_t = pipeline.ImageTextTransform(None, image_size=SIZE, uint8=True, device_crop=True)
  host, square, box = [], [], []
  for i in range(6):
    rec = {
      "image": natural_jpeg(rng, int(rng.integers(320, 640)), int(rng.integers(240, 480))),
      "index": i,
    }
    host.append(host_t(rec, np.random.default_rng(i))["image"])
    out = dev_t(rec, np.random.default_rng(i))
    assert out["crop_size"] == SIZE and out["index"] == i
    square.append(out["image"])
    box.append(out["crop_box"])
  return np.stack(host), np.stack(square), np.stack(box)


def test_boxes_are_the_host_paths_boxes():
  """The same generator draws the same box: the transform's crop_box is the host box, mapped."""
  data = natural_jpeg(np.random.default_rng(1), 500, 300)
  t = pipeline.ImageTextTransform(None, image_size=SIZE, uint8=True, device_crop=True)
  out = t({"image": data, "index": 0}, np.random.default_rng(7))
  img = image_ops.decode_image(data, draft=image_ops.source_side(SIZE, 0.9))
  box = image_ops.random_resized_crop_box(img.width, img.height, np.random.default_rng(7))
  side = image_ops.source_side(SIZE, 0.9)
  assert out["image"].shape == (side, side, 3) and out["image"].dtype == np.uint8
  np.testing.assert_allclose(
    out["crop_box"],
    np.array(box) * side / [img.width, img.height, img.width, img.height],
    rtol=1e-6,
  )


@pytest.mark.parametrize("method", device_crop.METHODS)
def test_device_crop_is_within_stated_error_of_the_host_crop(pairs, method):
  host, square, box = pairs
  crops = np.asarray(
    device_crop.crop_on_device(jnp.asarray(square), jnp.asarray(box), SIZE, method)
  )
  assert crops.shape == host.shape and crops.min() >= 0 and crops.max() <= 255
  err = np.abs(crops.astype(np.float64) - host.astype(np.float64)).reshape(len(host), -1)
  mean_bound, max_bound = BOUNDS[method]
  assert err.mean(axis=1).max() < mean_bound, err.mean(axis=1)
  assert err.max() < max_bound, err.max(axis=1)
  # The bound is tight enough to see a wrong box: shifting every box by 4 source pixels fails it.
  shifted = np.asarray(
    device_crop.crop_on_device(jnp.asarray(square), jnp.asarray(box + [4, 4, 4, 4]), SIZE, method)
  )
  assert np.abs(shifted - host.astype(np.float64)).mean() > mean_bound


def test_integer_box_at_scale_one_is_the_exact_sub_image():
  """Independent reference: a box of side `size` on the pixel grid copies those pixels."""
  x = np.random.default_rng(0).integers(0, 256, (2, 12, 12, 3)).astype(np.uint8)
  boxes = np.array([[3, 2, 8, 7], [0, 7, 5, 12]], np.float32)
  out = np.asarray(device_crop.crop_on_device(jnp.asarray(x), jnp.asarray(boxes), 5))
  np.testing.assert_allclose(out[0], x[0, 2:7, 3:8], atol=1e-3)
  np.testing.assert_allclose(out[1], x[1, 7:12, 0:5], atol=1e-3)


def test_to_device_crops_then_normalises(pairs):
  host, square, box = pairs
  batch = {
    "image": square[:4],
    "crop_box": box[:4],
    "crop_size": np.full(4, SIZE, np.int32),
    "index": np.arange(4, dtype=np.int32),
  }
  out = sources.to_device(batch, make_mesh(1))
  assert sorted(out) == ["image", "index"] and out["image"].shape == (4, SIZE, SIZE, 3)
  want = image_ops.normalize_on_device(
    device_crop.crop_on_device(jnp.asarray(square[:4]), jnp.asarray(box[:4]), SIZE)
  )
  np.testing.assert_allclose(np.asarray(out["image"]), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_bad_options_are_named():
  with pytest.raises(ValueError, match="device_crop=True needs .*uint8=False"):
    pipeline.ImageTextTransform(None, device_crop=True)
  with pytest.raises(ValueError, match="device_crop=True needs train=True.*train=False"):
    pipeline.ImageTextTransform(None, train=False, uint8=True, device_crop=True)
  x, b = jnp.zeros((1, 8, 8, 3), jnp.uint8), jnp.array([[0.0, 0.0, 4.0, 4.0]])
  with pytest.raises(ValueError, match="'nearest'"):
    device_crop.crop_on_device(x, b, 4, "nearest")
  with pytest.raises(ValueError, match=r"\(2, 4\)"):
    device_crop.crop_on_device(x, jnp.zeros((2, 4)), 4)
  with pytest.raises(ValueError, match="side must be a positive int, got 0"):
    device_crop.square_source(image_ops.decode_image(np.zeros((4, 4, 3), np.uint8)), 0)
  with pytest.raises(ValueError, match=r"box \(0, 0, 9, 4\) .* 8 x 8"):
    device_crop.box_in_square((0, 0, 9, 4), 8, 8, 4)
  bad = {
    "image": np.zeros((2, 8, 8, 3), np.uint8),
    "crop_box": np.tile([0.0, 0.0, 4.0, 4.0], (2, 1)).astype(np.float32),
    "crop_size": np.array([4, 5], np.int32),
    "index": np.arange(2, dtype=np.int32),
  }
  with pytest.raises(ValueError, match=r"crop_size \[4, 5\]"):
    sources.to_device(bad, make_mesh(1))
