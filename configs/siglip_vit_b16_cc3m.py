"""SigLIP ViT-B/16 on CC3M: the sigmoid loss with MM-TS temperatures.

The loss is SigLIP's (Zhai et al. 2023), `-(1/B) sum_ij log sigmoid(z_ij (s_ij / tau + b))`,
with the learned bias `b` initialised at -10 (`loss.bias_init`) and, in the `clip` row, the
learned temperature at SigLIP's `t' = log(1/tau) = log 10` (`temperature.value = 0.1`). MM-TS
values are the paper's CC3M ones (supplement Sec. 7), applied to the sigmoid loss's temperature
unchanged: alpha = 0.04, shifts [0.05, 0.10], K-Means k = 200 on caption embeddings, 5
oscillations. The fixed row uses `temperature.value = 0.1` (SigLIP's initial value). The
model, batch and schedule are an assumption, not a tuned recipe: ViT-B/16 (mean-pooled
patches: SigLIP pools without a class token), the CLIP BPE text transformer, 768-d
embeddings, and `configs/clip_rn50_cc3m.py`'s batch 1024, ~30 epochs of ~2.8M pairs and
AdamW at 1e-3 with weight decay 0.1, except beta2 = 0.95 (the SigLIP paper lowers Adam's
beta2 to 0.95 for stable training); adjust them to your data and hardware. Large batches: the
sigmoid loss's `impl="ring"` keeps only one visiting block per device (docs/losses.md).

Before training: `mmts prepare` the dataset (ArrayRecord) and `mmts cluster` the captions into
a cluster table, then set data.path, data.tokenizer and mmts.cluster_table.

  mmts train --config configs/siglip_vit_b16_cc3m.py[:ROW] --workdir gs://.../siglip_cc3m \\
      --config.data.path=/data/cc3m --config.data.tokenizer=/data/clip_bpe \\
      --config.mmts.cluster_table=/data/cc3m/clusters_k200.npz
  ROW: fixed | clip (learnable temperature, SigLIP's t') | ts | ics | mmts (default)
"""

from mmts_jax.config_defaults import default_config, with_row


def get_config(row: str = ""):
  c = default_config()
  c.total_steps = 82_000  # ~30 epochs of 2.8M pairs at batch 1024
  c.batch_size = 1024
  c.log_every = 100
  c.data.update(
    name="mmts_jax.data.trainer_source:records", path="", tokenizer="", text_len=77, image_size=224
  )
  c.model.update(embed_dim=768, dtype="bfloat16")
  c.model.image = dict(name="vit", variant="B/16", pool="gap")
  c.model.text = dict(
    name="transformer",
    vocab_size=49408,
    max_len=77,
    width=512,
    depth=12,
    num_heads=8,
    mlp_dim=2048,
    pool="eot",
    causal=True,
    pad_id=0,
  )
  c.loss.update(name="sigmoid", impl="auto", bias_init=-10.0)
  c.temperature.update(value=0.1, tau_min=0.1, tau_max=1.0)
  c.mmts.update(alpha=0.04, sh_min=0.05, sh_max=0.10, num_oscillations=5, k=200)
  c.optim.update(lr=1e-3, warmup_steps=2000, weight_decay=0.1, b2=0.95, eps=1e-6)
  c.checkpoint.update(every_steps=2000, keep=3)
  return with_row(c, row)
