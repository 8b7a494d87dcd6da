"""Feature-level fine-tuning and zero-shot retrieval evaluation.

* `ek100_features`: EK-100 train / validation features derived from the real annotations (a
  stand-in for frozen AVION features), and the noun-class cluster table.
* `mir_eval`: the EK-100 MIR validation split and an `eval_fn` for the trainer (mAP / nDCG).
* `driver`: prepare -> train projection heads with `mmts_jax.train` -> MIR metrics.
* `zero_shot`: Flickr30K / COCO-style retrieval (5 captions per image) as the paper's Table 1
  columns, during training (an `eval_fn`) and after it (from a checkpoint).
* `embedding`: embeds arrays in fixed-size chunks with the trainer's `embed` function.
"""

from __future__ import annotations
