"""Named sets of speed options for the transformer towers and the optimizer: data only.

Every option keeps the parameters and the maths (docs/training.md, tests/test_speed_options.py);
a preset is the set that measured fastest on a platform, so a config file can ask for it by
name instead of restating it. `"gpu"` is issue 17's fastest ViT-B/16 + text step on one H200
(benchmarks/BENCHMARKS.md, runs 21-24: 78.4 ms against OpenCLIP compiled's 94.5 in run 23):

- both towers: cuDNN attention (`"auto"`), one fused q/k/v product whose backward joins dq, dk,
  dv and the bias gradient in a Pallas kernel, one padding token per tower (`even_length`),
  a 2-D residual stream, the layer norms (with the skip connection's cotangent added in their
  backward) and fc1's bias + GELU in Pallas kernels;
- the image tower (ViT) embeds its patches with one matrix product; the text tower runs the
  fused short-sequence Pallas attention (faster than cuDNN at L=77, slower at ViT-B/16's 197);
- the optimizer clips and keeps Adam's moments on one flat vector (`optim.flatten`; a
  different optimizer-state layout, meant for replicated parameters).

Off GPUs the Pallas options take their XLA forms and `"auto"` attention takes XLA, so the
preset runs anywhere; it is measured on one GPU only.

Like `config_defaults`, this module imports nothing of the JAX stack.

Example:
  >>> from mmts_jax.config_defaults import default_config
  >>> c = default_config()
  >>> c.model.image = dict(name="vit", variant="B/16")
  >>> c = with_speed(c, "gpu")
  >>> c.model.image["patch_embed"], c.model.text["attention"], c.optim.flatten
  ('dense', 'pallas', True)
"""

from __future__ import annotations

import ml_collections

__all__ = ["PRESETS", "with_speed"]

_GPU_TOWERS = dict(
  attention="auto",
  fused_qkv=True,
  split_qkv_backward="pallas",
  even_length=True,
  flat_residual=True,
  lean_layer_norm="pallas_res",
  lean_gelu="pallas",
)

# preset -> {"image": options of a "vit" tower, "text": options of a "transformer" tower,
# "optim": optimizer keys}.
PRESETS = {
  "gpu": {
    "image": {**_GPU_TOWERS, "patch_embed": "dense"},
    "text": {**_GPU_TOWERS, "attention": "pallas"},
    "optim": {"flatten": True},
  },
}

# The tower names each side's options apply to (`mmts_jax.models.build.build_tower`).
_TOWER_NAMES = {"image": ("vit",), "text": ("transformer",)}


def with_speed(config: ml_collections.ConfigDict, preset: str = "gpu") -> ml_collections.ConfigDict:
  """`config` with the speed options of `preset` merged into its transformer towers and optimizer.

  A ViT image tower takes the preset's "image" options, a transformer text tower its "text"
  options (options already set in the tower win over the preset's: the preset fills in, it does
  not overrule); other towers (ResNet, features) are left as they are. Returns `config`, changed
  in place, as `config_defaults.with_row` does.

  Raises:
    ValueError: `preset` is not one of `PRESETS`.
  """
  if preset not in PRESETS:
    raise ValueError(f"with_speed: preset must be one of {sorted(PRESETS)}, got {preset!r}")
  options = PRESETS[preset]
  for side, names in _TOWER_NAMES.items():
    tower = config.model[side]
    if tower.get("name") in names:
      config.model[side] = {**options[side], **dict(tower)}
  config.optim.update(options["optim"])
  return config
