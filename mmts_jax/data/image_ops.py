"""Host-side image ops for the input pipeline: decode, resize, crops, normalise (numpy + Pillow).

Training uses CLIP/OpenCLIP's augmentation, a random resized crop (area fraction `scale`, aspect
ratio `ratio`, log-uniform) resized to `size x size` with bicubic filtering; evaluation resizes
the shorter side to `size` and takes the centre crop. Pixels are then normalised per channel:
`x = (p / 255 - mean) / std` with the CLIP mean and std.

Every random choice comes from the `np.random.Generator` passed in, so the pipeline (which seeds
one generator per example from the dataset seed and the example's position) is reproducible.

JPEGs decode with simplejpeg when it is installed (the `fast` extra; libjpeg-turbo called
straight into a numpy array, the same pixels as Pillow's libjpeg-turbo: tests check equality),
else with Pillow; `decoder="pil"` forces Pillow. Either decodes at a reduced DCT scale 1/s
(s in 8, 4, 2, 1: Pillow's `Image.draft` rule) when `draft` allows it.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

try:  # optional: `pip install mmts_jax[fast]`
  import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
  _simplejpeg = None

__all__ = [
  "MAX_IMAGE_PIXELS",
  "ImageTooLargeError",
  "check_image_size",
  "open_image",
  "CLIP_MEAN",
  "CLIP_STD",
  "DECODERS",
  "decode_image",
  "draft_scale",
  "has_simplejpeg",
  "random_resized_crop_box",
  "random_resized_crop",
  "resize_center_crop",
  "normalize",
  "normalize_on_device",
  "encode_jpeg",
  "shrink_shorter_side",
  "source_side",
]

# Decoding is bounded: an image declaring more pixels than this is refused before its pixels are
# decoded (a "decompression bomb": a few KB of PNG can declare 100,000 x 100,000 pixels). 2**26
# pixels = 8192 x 8192, 192 MiB as RGB; Pillow's own limit is set to the same number, so Pillow
# also raises `Image.DecompressionBombError` beyond twice it, wherever an image is opened.
MAX_IMAGE_PIXELS = 1 << 26
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class ImageTooLargeError(ValueError):
  """An image whose declared size exceeds `MAX_IMAGE_PIXELS`."""


def check_image_size(img: Image.Image, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
  """Refuses an opened (not yet decoded) image whose width x height exceeds `max_pixels`.

  Example:
    >>> check_image_size(Image.new("RGB", (4, 4)), max_pixels=8)
    Traceback (most recent call last):
    ...
    mmts_jax.data.image_ops.ImageTooLargeError: image of 4 x 4 pixels exceeds the decoding limit of
    8 pixels (MAX_IMAGE_PIXELS)
  """
  w, h = img.size
  if w * h > max_pixels:
    raise ImageTooLargeError(
      f"image of {w} x {h} pixels exceeds the decoding limit of "
      f"{max_pixels} pixels (MAX_IMAGE_PIXELS)"
    )
  return img


def open_image(data: bytes | bytearray | memoryview) -> Image.Image:
  """`Image.open` of encoded bytes, bounded: refuses more than `MAX_IMAGE_PIXELS` before decoding.

  Example:
    >>> buf = io.BytesIO(); Image.new("RGB", (3, 2)).save(buf, format="PNG")
    >>> open_image(buf.getvalue()).size
    (3, 2)
  """
  try:
    img = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:  # Pillow's own check, beyond twice the limit
    raise ImageTooLargeError(
      f"image exceeds the decoding limit of {MAX_IMAGE_PIXELS} pixels (MAX_IMAGE_PIXELS): {e}"
    ) from None
  return check_image_size(img)


CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


DECODERS = ("auto", "pil", "simplejpeg")


def has_simplejpeg() -> bool:
  """Whether the optional simplejpeg decoder is importable (`decoder="auto"` then uses it)."""
  return _simplejpeg is not None


def draft_scale(width: int, height: int, target: int) -> int:
  """The JPEG DCT scale denominator `s` Pillow's `Image.draft(mode, (target, target))` picks.

  `s` is the largest of 8, 4, 2, 1 with `s <= min(width // target, height // target)`; the image
  then decodes at `(ceil(width / s), ceil(height / s))`, both sides still >= `target`.

  Example:
    >>> draft_scale(640, 480, 224), draft_scale(640, 480, 250), draft_scale(4000, 3000, 224)
    (2, 1, 8)
  """
  if target < 1:
    raise ValueError(f"draft target must be >= 1 pixel, got {target}")
  fit = min(width // target, height // target)
  return next(s for s in (8, 4, 2, 1) if s <= max(fit, 1))


def _decode_simplejpeg(data, draft: int | None) -> np.ndarray | None:
  """JPEG bytes -> (H, W, 3) uint8 via simplejpeg, or None where Pillow should decode instead
  (not a baseline/progressive YCbCr or grey JPEG, or a libjpeg warning: Pillow is laxer)."""
  if _simplejpeg is None or bytes(data[:3]) != b"\xff\xd8\xff":
    return None
  try:
    header = _simplejpeg.decode_jpeg_header(data)
  except ValueError:
    return None
  h, w, colorspace = int(header[0]), int(header[1]), header[2]
  if colorspace not in ("YCbCr", "Gray", "RGB"):  # CMYK/YCCK: Pillow's conversion
    return None
  if w * h > MAX_IMAGE_PIXELS:
    raise ImageTooLargeError(
      f"image of {w} x {h} pixels exceeds the decoding limit of "
      f"{MAX_IMAGE_PIXELS} pixels (MAX_IMAGE_PIXELS)"
    )
  s = draft_scale(w, h, draft) if draft is not None else 1
  try:
    # libjpeg-turbo picks the largest reduction whose output is >= these: exactly 1/s.
    return _simplejpeg.decode_jpeg(
      data, colorspace="RGB", min_width=-(-w // s), min_height=-(-h // s)
    )
  except ValueError:
    return None


def decode_image(
  data: bytes | np.ndarray | Image.Image, *, draft: int | None = None, decoder: str = "auto"
) -> Image.Image:
  """Encoded bytes (JPEG, PNG, ...), a uint8 array (H, W[, C]) or a PIL image -> RGB PIL image.

  `draft`: for JPEG, let libjpeg decode at a reduced scale whose both sides are still >= `draft`
  (DCT scaling, much cheaper than decoding full size and resizing; see `draft_scale`).
  `decoder`: "auto" (simplejpeg for JPEG when installed, else Pillow), "pil" or "simplejpeg"
  (which must be installed); both give the same pixels.

  Example:
    >>> buf = io.BytesIO(); Image.new("RGB", (640, 480), (9, 99, 199)).save(buf, format="JPEG")
    >>> img = decode_image(buf.getvalue(), draft=224)
    >>> img.mode, img.size, img.getpixel((5, 5)) == decode_image(buf.getvalue()).getpixel((5, 5))
    ('RGB', (320, 240), True)
  """
  if decoder not in DECODERS:
    raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
  if decoder == "simplejpeg" and _simplejpeg is None:
    raise ValueError("decoder='simplejpeg' needs the simplejpeg package (pip install simplejpeg)")
  if isinstance(data, (bytes, bytearray, memoryview)):
    if decoder != "pil":
      pixels = _decode_simplejpeg(data, draft)
      if pixels is not None:
        return Image.fromarray(pixels)
    img = open_image(data)  # refuses huge images before any pixel is decoded
    if draft is not None and img.format == "JPEG":
      img.draft("RGB", (draft, draft))
  elif isinstance(data, np.ndarray):
    if data.dtype != np.uint8 or data.ndim not in (2, 3):
      raise ValueError(f"image arrays must be uint8 (H, W[, C]), got {data.dtype} {data.shape}")
    img = Image.fromarray(data[..., 0] if data.ndim == 3 and data.shape[-1] == 1 else data)
  elif isinstance(data, Image.Image):
    img = data
  else:
    raise TypeError(f"cannot decode an image from {type(data).__name__}")
  if img.mode != "RGB":
    # Palette/alpha images: composite on white, as viewers show them, rather than on black.
    if img.mode in ("RGBA", "LA", "P"):
      img = img.convert("RGBA")
      bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
      img = Image.alpha_composite(bg, img)
    img = img.convert("RGB")
  return img


def random_resized_crop_box(
  width: int,
  height: int,
  rng: np.random.Generator,
  *,
  scale: tuple[float, float] = (0.9, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
  """The (left, top, right, bottom) box of a random resized crop, torchvision's algorithm.

  Area fraction ~ U(scale), log aspect ratio ~ U(log ratio); up to 10 tries for a box inside the
  image, else the centre crop clamped to `ratio`.

  Example:
    >>> random_resized_crop_box(100, 80, np.random.default_rng(0))
    (0, 1, 100, 80)
  """
  if not 0 < scale[0] <= scale[1] <= 1:
    raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
  if not 0 < ratio[0] <= ratio[1]:
    raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
  area = width * height
  log_r = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    r = math.exp(rng.uniform(*log_r))
    w = int(round(math.sqrt(target * r)))
    h = int(round(math.sqrt(target / r)))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


def random_resized_crop(
  img: Image.Image,
  size: int,
  rng: np.random.Generator,
  *,
  scale: tuple[float, float] = (0.9, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
  """Random box (see `random_resized_crop_box`) resized to `size x size`, bicubic, in one pass."""
  box = random_resized_crop_box(img.width, img.height, rng, scale=scale, ratio=ratio)
  return img.resize((size, size), Image.Resampling.BICUBIC, box=box)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
  """Shorter side -> `size` (bicubic), then the central `size x size` square."""
  w, h = img.size
  s = size / min(w, h)
  nw, nh = max(size, round(w * s)), max(size, round(h * s))
  img = img.resize((nw, nh), Image.Resampling.BICUBIC)
  left, top = (nw - size) // 2, (nh - size) // 2
  return img.crop((left, top, left + size, top + size))


def normalize(
  img: Image.Image | np.ndarray, mean: np.ndarray = CLIP_MEAN, std: np.ndarray = CLIP_STD
) -> np.ndarray:
  """uint8 RGB -> float32 (H, W, 3), `(p / 255 - mean) / std`."""
  x = np.asarray(img, dtype=np.float32)
  if x.ndim != 3 or x.shape[-1] != 3:
    raise ValueError(f"normalize expects an RGB image (H, W, 3), got shape {x.shape}")
  # (p/255 - m)/s = p * (1/(255 s)) - m/s, in place on the fresh float copy (no temporaries).
  if x is img:
    x = x.copy()
  np.multiply(x, (1.0 / (255.0 * std)).astype(np.float32), out=x)
  np.subtract(x, (mean / std).astype(np.float32), out=x)
  return x


def normalize_on_device(
  images, mean: np.ndarray = CLIP_MEAN, std: np.ndarray = CLIP_STD, dtype=None
):
  """`normalize` for uint8 batches already on the accelerator (jnp; fuses into the train step).

  Shipping uint8 images (`ImageTextTransform(..., uint8=True)`) moves 4x fewer bytes to the
  device and frees the host of the per-pixel float work.

  Example:
    >>> import jax.numpy as jnp
    >>> x = normalize_on_device(jnp.full((2, 4, 4, 3), 255, jnp.uint8))  # (B, H, W, 3) uint8
    >>> x.shape, x.dtype, [round(float(v), 4) for v in x[0, 0, 0]]  # (1 - mean) / std
    ((2, 4, 4, 3), dtype('float32'), [1.9303, 2.0749, 2.1459])
  """
  import jax.numpy as jnp

  dtype = jnp.float32 if dtype is None else dtype
  scale = jnp.asarray(1.0 / (255.0 * std), dtype)
  shift = jnp.asarray(mean / std, dtype)
  return images.astype(dtype) * scale - shift


def source_side(image_size: int, crop_scale_min: float = 0.9) -> int:
  """The smallest shorter side that loses nothing a `image_size` random resized crop keeps.

  A crop of area fraction `s` of a square side-`D` image has side `sqrt(s) D`; it must stay
  >= `image_size` for the resize to only shrink: `D = ceil(image_size / sqrt(crop_scale_min))`.
  The pipeline's JPEG draft target, and `mmts prepare --for-image-size`'s stored shorter side.

  Example:
    >>> source_side(224), source_side(224, 1.0), source_side(336, 0.5)
    (237, 224, 476)
  """
  if not isinstance(image_size, int) or image_size < 1:
    raise ValueError(f"image_size must be a positive int, got {image_size!r}")
  if not 0 < crop_scale_min <= 1:
    raise ValueError(f"crop_scale_min must be in (0, 1], got {crop_scale_min}")
  return math.ceil(image_size / math.sqrt(crop_scale_min))


def shrink_shorter_side(img: Image.Image, side: int) -> Image.Image:
  """Downscales (never upscales) so that the shorter side is at most `side`, keeping the aspect.

  This is img2dataset's `keep_ratio` mode, how CC3M/CC12M are usually stored (side 256-512).
  """
  if side < 1:
    raise ValueError(f"side must be >= 1, got {side}")
  w, h = img.size
  if min(w, h) <= side:
    return img
  s = side / min(w, h)
  return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)


def encode_jpeg(img: Image.Image, quality: int = 95) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=quality)
  return buf.getvalue()
