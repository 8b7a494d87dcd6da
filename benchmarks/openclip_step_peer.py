"""The peer of `train_step_bench.py` for any OpenCLIP architecture: one GPU, random 224 px
images and 77-token texts, `open_clip.create_model(MODEL)` randomly initialised, bf16 autocast,
AdamW (lr 1e-4, weight decay 0.1, betas 0.9/0.98, eps 1e-6), OpenCLIP's `ClipLoss`, gradient
clipping at 1.0, optionally `torch.compile`: the training step of `../shared/peers/
peer_openclip_step.py` (ViT-B-16 only) with the architecture as an argument.

  python benchmarks/openclip_step_peer.py ViT-L-14 256 compile     # prints one json line

3 warm-up steps (compilation), then 20 timed steps; the median step, examples/s and
`torch.cuda.max_memory_allocated` over the timed steps.
"""

import json
import sys
import time

import open_clip
import torch
from open_clip.loss import ClipLoss


def main(model_name: str, batch: int, compiled: bool) -> dict:
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  model = open_clip.create_model(model_name, device="cuda")
  n_params = sum(p.numel() for p in model.parameters())
  run = torch.compile(model) if compiled else model
  opt = torch.optim.AdamW(
    model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6
  )
  loss_fn = ClipLoss()
  size = model.visual.image_size
  size = size[0] if isinstance(size, tuple | list) else size
  images = torch.randn(batch, 3, size, size, device="cuda")
  texts = torch.randint(1, 49408, (batch, 77), device="cuda")

  def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
      image_emb, text_emb, scale = run(images, texts)[:3]
      loss = loss_fn(image_emb, text_emb, scale)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  t0 = time.perf_counter()
  for _ in range(3):
    step()
  torch.cuda.synchronize()
  warm_s = time.perf_counter() - t0
  torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(20):
    t = time.perf_counter()
    step()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
  ms = sorted(times)[len(times) // 2] * 1e3
  return {
    "peer": f"open_clip {model_name}" + (" compiled" if compiled else " eager"),
    "batch": batch,
    "params": n_params,
    "step_ms_median": round(ms, 2),
    "step_ms_all": [round(t * 1e3, 2) for t in times],
    "examples_per_sec": round(batch / ms * 1e3, 1),
    "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    "warm_s": round(warm_s, 1),
  }


if __name__ == "__main__":
  name, b = sys.argv[1], int(sys.argv[2])
  print(json.dumps(main(name, b, len(sys.argv) > 3 and sys.argv[3] == "compile")))
