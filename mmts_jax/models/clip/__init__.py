"""CLIP towers exactly as OpenAI CLIP / OpenCLIP compute them, their checkpoint converter and
the CLIP BPE tokenizer. See docs/clip.md."""
from mmts_jax.models.clip.config import CLIPConfig, VARIANTS, variant_config
from mmts_jax.models.clip.model import CLIP

__all__ = ["CLIP", "CLIPConfig", "VARIANTS", "variant_config"]
