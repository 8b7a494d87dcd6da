"""The shape of a CLIP model (Radford et al. 2021) as one flat, JSON-serialisable record.

A config fixes every array shape of the towers; the converter infers one from a state dict and
`mmts convert clip` writes it next to the checkpoint (`clip_config.json`). Named variants are
OpenAI's published sizes:

  | variant  | image tower                            | text tower              | embed_dim |
  | ViT-B/32 | ViT, 224 px, patch 32, 768 x 12, 12 h  | 512 x 12, 8 h, ctx 77   | 512       |
  | ViT-B/16 | ViT, 224 px, patch 16, 768 x 12, 12 h  | 512 x 12, 8 h, ctx 77   | 512       |
  | ViT-L/14 | ViT, 224 px, patch 14, 1024 x 24, 16 h | 768 x 12, 12 h, ctx 77  | 768       |
  | RN50     | modified ResNet (3,4,6,3), width 64    | 512 x 12, 8 h, ctx 77   | 1024      |

Example:
  >>> cfg = variant_config("ViT-B/16")
  >>> cfg.num_patches, cfg.vision_heads, cfg.act
  (196, 12, 'quick_gelu')
  >>> CLIPConfig.from_dict(cfg.to_dict()) == cfg
  True
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["CLIPConfig", "VARIANTS", "variant_config", "ACTIVATIONS"]

ACTIVATIONS = ("quick_gelu", "gelu")
VISION_KINDS = ("vit", "resnet")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Every shape of a CLIP model.

  Attributes:
    embed_dim: the joint embedding size (`text_projection`'s output).
    vision_kind: "vit" or "resnet" (OpenAI's modified ResNet with an attention pool).
    image_size: input side in pixels.
    vision_width: ViT width; for the ResNet the stem width (64 for RN50; stage i has
      `vision_width * 2**i` bottleneck channels and 4x that many outputs).
    vision_layers: (depth,) for a ViT; blocks per stage for the ResNet, e.g. (3, 4, 6, 3).
    vision_heads: ViT heads; attention-pool heads for the ResNet (`32 * width / 64`).
    patch_size: ViT patch side (0 for the ResNet).
    context_length, vocab_size, text_width, text_heads, text_layers: the text transformer.
    act: "quick_gelu" (`x * sigmoid(1.702 x)`, OpenAI's weights) or "gelu" (exact erf GELU,
      OpenCLIP's LAION weights).
    ln_eps: LayerNorm epsilon (1e-5 in both PyTorch implementations).
  """

  embed_dim: int = 512
  vision_kind: str = "vit"
  image_size: int = 224
  vision_width: int = 768
  vision_layers: tuple[int, ...] = (12,)
  vision_heads: int = 12
  patch_size: int = 16
  context_length: int = 77
  vocab_size: int = 49408
  text_width: int = 512
  text_heads: int = 8
  text_layers: int = 12
  act: str = "quick_gelu"
  ln_eps: float = 1e-5

  def __post_init__(self):
    object.__setattr__(self, "vision_layers", tuple(int(v) for v in self.vision_layers))
    if self.vision_kind not in VISION_KINDS:
      raise ValueError(
        f"CLIPConfig.vision_kind must be one of {VISION_KINDS}, got {self.vision_kind!r}"
      )
    if self.act not in ACTIVATIONS:
      raise ValueError(f"CLIPConfig.act must be one of {ACTIVATIONS}, got {self.act!r}")
    for name in (
      "embed_dim",
      "image_size",
      "vision_width",
      "vision_heads",
      "context_length",
      "vocab_size",
      "text_width",
      "text_heads",
      "text_layers",
    ):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"CLIPConfig.{name} must be > 0, got {getattr(self, name)!r}")
    if self.text_width % self.text_heads:
      raise ValueError(
        f"CLIPConfig.text_width={self.text_width} is not a multiple of text_heads={self.text_heads}"
      )
    if self.vision_kind == "vit":
      if len(self.vision_layers) != 1:
        raise ValueError(
          f"CLIPConfig.vision_layers must be (depth,) for a ViT, got {self.vision_layers!r}"
        )
      if self.patch_size <= 0 or self.image_size % self.patch_size:
        raise ValueError(
          f"CLIPConfig.image_size={self.image_size} must be a positive multiple "
          f"of patch_size={self.patch_size}"
        )
      if self.vision_width % self.vision_heads:
        raise ValueError(
          f"CLIPConfig.vision_width={self.vision_width} is not a multiple of "
          f"vision_heads={self.vision_heads}"
        )
    else:
      if len(self.vision_layers) != 4:
        raise ValueError(
          f"CLIPConfig.vision_layers must have 4 stages for the ResNet, got {self.vision_layers!r}"
        )
      if self.image_size % 32:
        raise ValueError(
          f"CLIPConfig.image_size={self.image_size} must be a multiple of 32 for the ResNet"
        )
      if (self.vision_width * 32) % self.vision_heads:
        raise ValueError(
          f"CLIPConfig: attention-pool width {self.vision_width * 32} is not a "
          f"multiple of vision_heads={self.vision_heads}"
        )

  @property
  def num_patches(self) -> int:
    """Tokens the image tower attends over besides the class / mean token."""
    side = self.image_size // (self.patch_size if self.vision_kind == "vit" else 32)
    return side * side

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["vision_layers"] = list(self.vision_layers)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> CLIPConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"CLIPConfig: unknown keys {unknown} (known: {sorted(known)})")
    return cls(**dict(d))

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)


_TEXT_B: dict[str, Any] = dict(
  context_length=77, vocab_size=49408, text_width=512, text_heads=8, text_layers=12
)
VARIANTS: dict[str, CLIPConfig] = {
  "ViT-B/32": CLIPConfig(
    embed_dim=512,
    vision_kind="vit",
    image_size=224,
    vision_width=768,
    vision_layers=(12,),
    vision_heads=12,
    patch_size=32,
    **_TEXT_B,
  ),
  "ViT-B/16": CLIPConfig(
    embed_dim=512,
    vision_kind="vit",
    image_size=224,
    vision_width=768,
    vision_layers=(12,),
    vision_heads=12,
    patch_size=16,
    **_TEXT_B,
  ),
  "ViT-L/14": CLIPConfig(
    embed_dim=768,
    vision_kind="vit",
    image_size=224,
    vision_width=1024,
    vision_layers=(24,),
    vision_heads=16,
    patch_size=14,
    context_length=77,
    vocab_size=49408,
    text_width=768,
    text_heads=12,
    text_layers=12,
  ),
  "RN50": CLIPConfig(
    embed_dim=1024,
    vision_kind="resnet",
    image_size=224,
    vision_width=64,
    vision_layers=(3, 4, 6, 3),
    vision_heads=32,
    patch_size=0,
    **_TEXT_B,
  ),
}


def variant_config(name: str, **overrides) -> CLIPConfig:
  """A named variant (`VARIANTS`; "-" and "/" are interchangeable), with fields overridden."""
  key = str(name).replace("-", "/").replace("RN/50", "RN50")
  key = {"ViT/B/32": "ViT-B/32", "ViT/B/16": "ViT-B/16", "ViT/L/14": "ViT-L/14"}.get(key, key)
  if key not in VARIANTS:
    raise ValueError(f"CLIP variant must be one of {sorted(VARIANTS)}, got {name!r}")
  return dataclasses.replace(VARIANTS[key], **overrides) if overrides else VARIANTS[key]
