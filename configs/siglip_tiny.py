"""Tiny MM-TS run with the sigmoid (SigLIP) loss: trains in seconds on a CPU, logs every step.

Toy long-tail pairs with feature vectors on both sides (`data.text = "features"`) and a feature
tower per side (cheaper to compile than `configs/tiny.py`'s text transformer), with
`loss.name = "sigmoid"`: the model learns the logit bias `b` (init `loss.bias_init = -10`) and
the step passes it to the loss. Every row applies to the sigmoid loss's temperature as to
InfoNCE's: `temperature.value = 0.1` is SigLIP's initial temperature (`t' = log 10`), the
fixed value and the `clip` row's initial value; `ts`, `ics`, `mmts` use the paper's
alpha = 0.04 and shifts [0.05, 0.10] unchanged.

  mmts train --config configs/siglip_tiny.py[:ROW] --workdir /tmp/siglip_tiny

ROW: fixed | clip (learnable temperature, SigLIP's t') | ts | ics | mmts (default).
"""

from mmts_jax.config_defaults import default_config, with_row


def get_config(row: str = ""):
  c = default_config()
  c.total_steps = 20
  c.batch_size = 32
  c.log_every = 1
  c.progress_bar = False
  c.data.update(num_examples=512, num_clusters=16, image_dim=16, text="features")
  c.model.update(embed_dim=16)
  c.model.image.hidden_dims = (32,)
  c.model.text = dict(name="features", hidden_dims=(32,))
  c.loss.update(name="sigmoid", bias_init=-10.0)
  c.temperature.update(value=0.1, tau_min=0.07, tau_max=1.0)
  c.mmts.update(alpha=0.04, sh_min=0.05, sh_max=0.10, num_oscillations=5)
  c.optim.update(lr=3e-3, warmup_steps=2)
  c.checkpoint.update(every_steps=5, keep=2)
  return with_row(c, row)
