"""The built-in synthetic long-tail multimodal benchmark (`mmts synthetic`).

`generator` draws the data (Zipf classes, image features, real captions), `benchmark` runs the
cluster table + CLIP / MM-TS ablation + retrieval evaluation, `plots` draws the figures.
Importing this package imports only numpy; the benchmark pulls in the trainer and the encoder.
"""

from __future__ import annotations

from mmts_jax.longtail.generator import (
  GeneratorConfig,
  Split,
  SyntheticDataset,
  make_dataset,
  zipf_class_sizes,
)

__all__ = ["GeneratorConfig", "Split", "SyntheticDataset", "make_dataset", "zipf_class_sizes"]
