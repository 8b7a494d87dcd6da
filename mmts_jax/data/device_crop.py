"""Random resized crop on the accelerator: the host ships a fixed-size source and a box.

The host path (`image_ops.random_resized_crop`) resamples every example to `size x size` with
Pillow's bicubic filter, the largest per-example host cost once decoding is cheap. Here the host
only makes a fixed-shape source: the (draft-decoded) image stretched to a `side x side` square
with Pillow's bilinear filter (`square_source`; `side = image_ops.source_side(size, scale_lo)`,
237 for 224, so every crop of the host path is still at least `size` pixels wide in it), plus the
crop box of `image_ops.random_resized_crop_box` drawn from the same generator (the same box as
the host path), mapped into the square's coordinates (`box_in_square`). The device then samples
the box of each square to `size x size` (`crop_on_device`: `jax.image.scale_and_translate` under
`vmap`, antialiased bicubic or bilinear) before the usual on-device normalisation.

A box `(l, t, r, b)` of a `W x H` image becomes `(l S/W, t S/H, r S/W, b S/H)` in the square of
side `S`; output pixel centre `x + 1/2` of the crop reads source position
`l' + (x + 1/2) (r' - l') / size` (and likewise for rows): `scale = size / (r' - l')`,
`translation = -l' * scale`, Pillow's `resize(box=...)` convention.

Two resamplings (host bilinear stretch, device bicubic) differ from the one host bicubic pass:
`tests/test_device_crop.py` bounds the mean and max pixel difference on natural JPEGs.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from PIL import Image

__all__ = ["METHODS", "square_source", "box_in_square", "crop_on_device"]

METHODS = ("bilinear", "bicubic")


def square_source(img: Image.Image, side: int) -> np.ndarray:
  """An RGB image stretched to `side x side` (Pillow bilinear, antialiased), uint8 (S, S, 3).

  Example:
    >>> square_source(Image.new("RGB", (40, 30), (1, 2, 3)), 8)[0, 0].tolist()
    [1, 2, 3]
  """
  if not isinstance(side, int) or side < 1:
    raise ValueError(f"side must be a positive int, got {side!r}")
  if img.mode != "RGB":
    raise ValueError(f"square_source expects an RGB image, got mode {img.mode!r}")
  return np.asarray(img.resize((side, side), Image.Resampling.BILINEAR), np.uint8)


def box_in_square(box: tuple[int, int, int, int], width: int, height: int, side: int) -> np.ndarray:
  """A (left, top, right, bottom) box of a `width x height` image, in its `side`-square's
  coordinates: x scaled by `side / width`, y by `side / height`; float32 (4,).

  Example:
    >>> box_in_square((10, 0, 50, 30), 100, 60, 20).tolist()
    [2.0, 0.0, 10.0, 10.0]
  """
  left, top, right, bottom = box
  if not (0 <= left < right <= width and 0 <= top < bottom <= height):
    raise ValueError(f"box {box} is not a non-empty box inside a {width} x {height} image")
  sx, sy = side / width, side / height
  return np.array([left * sx, top * sy, right * sx, bottom * sy], np.float32)


@functools.partial(jax.jit, static_argnames=("size", "method"))
def crop_on_device(
  images: jax.Array, boxes: jax.Array, size: int, method: str = "bicubic"
) -> jax.Array:
  """Crops box `boxes[i]` of `images[i]` and resamples it to `size x size`, for every `i`.

  images: (B, S, S, C) (uint8 or float), boxes: (B, 4) float (left, top, right, bottom) in pixel
  edges. Returns float32 (B, size, size, C) in the input's value range, clipped to [0, 255]
  (bicubic overshoots; the host path saturates to uint8 the same way).

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
    >>> crop_on_device(x, jnp.array([[2.0, 0.0, 4.0, 2.0]]), 2)[0, ..., 0].tolist()
    [[2.0, 3.0], [6.0, 7.0]]
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if images.ndim != 4 or boxes.shape != (images.shape[0], 4):
    raise ValueError(
      f"expected images (B, H, W, C) and boxes (B, 4), got {images.shape} and {boxes.shape}"
    )
  import jax.numpy as jnp

  boxes = boxes.astype(jnp.float32)
  # Per axis (rows, cols): scale = size / extent, translation = -start * scale.
  extent = jnp.stack([boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]], axis=1)
  start = jnp.stack([boxes[:, 1], boxes[:, 0]], axis=1)
  scale = size / extent
  translation = -start * scale

  def one(image, s, t):
    return jax.image.scale_and_translate(
      image.astype(jnp.float32),
      (size, size, image.shape[-1]),
      (0, 1),
      s,
      t,
      method=method,
      antialias=True,
    )

  return jnp.clip(jax.vmap(one)(images, scale, translation), 0.0, 255.0)
