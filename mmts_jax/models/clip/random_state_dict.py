"""Deterministic random CLIP state dicts and inputs for parity checks against PyTorch.

A tensor's values depend only on `(seed, its name, its shape)`, drawn from numpy's PCG64 seeded
with `[seed, crc32(name)]`, so a state dict regenerates identically from its key list on any
machine (the reference outputs are stored, the 600 MB of weights are not). Scales keep every
layer's activations O(1), so the towers' outputs depend on every weight:

  * a >= 2-D weight `(out, in, ...)` (PyTorch layout): N(0, 1 / prod(in, ...));
  * OpenCLIP's `(in, out)` parameters (`proj`, `text_projection`): N(0, 1 / in);
  * embedding tables / positional embeddings `(n, width)`: N(0, 1 / width);
  * a LayerNorm `weight`: 1 + 0.1 N(0, 1); a BatchNorm gamma: N(0, 1) (signed, so that the
    ReLU stack does not map every image to one direction); a bias, BatchNorm mean:
    0.1 N(0, 1); BatchNorm var: U(0.5, 1.5); `class_embedding (w,)`: N(0, 1 / w);
  * `logit_scale`: log(1 / 0.07); `position_ids`: arange; `num_batches_tracked`: 0.

This module imports numpy only (the PyTorch side loads it by file path).

Example:
  >>> sd = random_state_dict([("ln_final.weight", (4,)), ("text_projection", (4, 2))], seed=0)
  >>> bool((random_state_dict([("text_projection", (4, 2))], 0)["text_projection"]
  ...       == sd["text_projection"]).all())
  True
  >>> sd["ln_final.weight"].dtype, sd["text_projection"].shape
  (dtype('float32'), (4, 2))
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable

import numpy as np

__all__ = ["random_tensor", "random_state_dict", "parity_inputs"]

_IN_OUT = ("proj", "text_projection")
# The modified ResNet's `bn1..3` gammas: signed, so the ReLU stack does not collapse every image
# onto one mean direction (the shortcut's `downsample.1` gamma keeps the 1 + 0.1 N(0, 1) rule).
_BATCH_NORM = re.compile(r"(^|\.)bn\d\.weight$")
_EMBEDDINGS = ("positional_embedding", "position_embedding.weight", "token_embedding.weight")


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
  """The value of state-dict entry `name` (see the module docstring for the scales)."""
  shape = tuple(int(s) for s in shape)
  rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
  leaf = name.rsplit(".", 1)[-1]
  if leaf == "num_batches_tracked":
    return np.zeros(shape, np.int64)
  if leaf == "position_ids":
    return np.broadcast_to(np.arange(shape[-1], dtype=np.int64), shape).copy()
  if leaf == "logit_scale":
    return np.full(shape, math.log(1 / 0.07), np.float32)
  normal = lambda: rng.standard_normal(shape)
  if leaf == "running_var":
    value = rng.uniform(0.5, 1.5, shape)
  elif leaf == "running_mean" or "bias" in leaf:
    value = 0.1 * normal()
  elif name.endswith(_EMBEDDINGS):
    value = normal() / math.sqrt(shape[-1])
  elif leaf in _IN_OUT:
    value = normal() / math.sqrt(shape[0])
  elif len(shape) >= 2:
    value = normal() / math.sqrt(math.prod(shape[1:]))
  elif leaf == "weight" and _BATCH_NORM.search(name):
    value = normal()
  elif leaf == "weight":
    value = 1.0 + 0.1 * normal()
  else:  # class_embedding and other vectors
    value = normal() / math.sqrt(max(shape[-1], 1)) if shape else normal()
  return np.asarray(value, np.float32)


def random_state_dict(
  keys: Iterable[tuple[str, tuple[int, ...]]], seed: int
) -> dict[str, np.ndarray]:
  """`[(name, shape), ...]` -> `{name: random_tensor(name, shape, seed)}`."""
  return {name: random_tensor(name, tuple(shape), seed) for name, shape in keys}


def parity_inputs(
  seed: int, batch: int, image_size: int, context_length: int, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """Fixed inputs: (batch, 3, H, W) float32 pixels (already "preprocessed": a coarse 4x4
  N(0, 1) pattern plus N(0, 1/4) noise) and
  (batch, context_length) int64 captions `[SOT, w_1 .. w_n, EOT, 0 ...]`.

  SOT / EOT are the two largest ids (`vocab_size - 2`, `vocab_size - 1`) as in CLIP's BPE, so
  the end-of-text token is each row's unique argmax. Lengths cycle through 1, the full context
  and values in between.
  """
  if image_size % 4:
    raise ValueError(f"parity_inputs: image_size must be a multiple of 4, got {image_size}")
  rng = np.random.default_rng([int(seed), 7])
  # A coarse 4x4 pattern per image plus pixel noise: i.i.d. noise alone is statistically the
  # same for every image, and a global pool would average the differences away.
  coarse = rng.standard_normal((batch, 3, 4, 4))
  up = np.repeat(np.repeat(coarse, image_size // 4, axis=2), image_size // 4, axis=3)
  noise = rng.standard_normal((batch, 3, image_size, image_size))
  images = (up + 0.5 * noise).astype(np.float32)
  tokens = np.zeros((batch, context_length), np.int64)
  for b in range(batch):
    n = [1, context_length - 2][b] if b < 2 else int(rng.integers(1, context_length - 1))
    tokens[b, 0] = vocab_size - 2
    tokens[b, 1 : n + 1] = rng.integers(1, vocab_size - 2, n)
    tokens[b, n + 1] = vocab_size - 1
  return images, tokens
