"""Parity of the converted Flax CLIP with the stored PyTorch outputs, for every model in
clip_reference.json (CPU, float32, no PyTorch needed); writes parity_cpu.json.

  PYTHONPATH=. python tests/data/clip/parity_report.py [--out tests/data/clip/parity_cpu.json]

Per model and tower: max over rows of 1 - cos(z, z_ref) and of |z - z_ref| on unit-norm
embeddings, and the mean pairwise cosine between different rows of the reference (how far apart
the inputs' embeddings are, i.e. how much a wrong weight would move them).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import jax
import numpy as np

from mmts_jax.models.clip import convert
from mmts_jax.models.clip.model import CLIP
from mmts_jax.models.clip.random_state_dict import parity_inputs, random_state_dict

HERE = pathlib.Path(__file__).resolve().parent


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--out", default=str(HERE / "parity_cpu.json"))
  args = p.parse_args(argv)
  meta = json.loads((HERE / "clip_reference.json").read_text())
  ref = np.load(HERE / "clip_reference.npz")
  report = {
    "command": "PYTHONPATH=. python tests/data/clip/parity_report.py",
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "machine": platform.machine(),
    "reference_versions": meta["versions"],
    "models": {},
  }
  for name, m in meta["models"].items():
    t0 = time.time()
    sd = random_state_dict([(k, s) for k, s, _ in m["keys"]], meta["seed"])
    cfg = convert.infer_config(sd, m["format"], act=m["act"], hf_config=m["hf_config"])
    params = convert.convert_state_dict(sd, cfg, m["format"])
    del sd
    images, tokens = parity_inputs(
      meta["seed"], m["batch"], m["image_size"], m["context_length"], m["vocab_size"]
    )
    out = jax.jit(CLIP(cfg).apply)(
      {"params": params}, {"image": images.transpose(0, 2, 3, 1), "text": tokens.astype(np.int32)}
    )
    row = {"format": m["format"], "config": cfg.to_dict(), "batch": m["batch"]}
    for side in ("image", "text"):
      z = np.asarray(out[side], np.float64)
      r = ref[f"{name}/{side}_features"].astype(np.float64)
      r = r / np.linalg.norm(r, axis=-1, keepdims=True)
      gram = r @ r.T
      row[side] = {
        "max_1_minus_cos": float((1 - (z * r).sum(-1)).max()),
        "max_abs": float(np.abs(z - r).max()),
        "ref_mean_offdiag_cos": float(gram[~np.eye(len(r), dtype=bool)].mean()),
      }
    row["seconds"] = round(time.time() - t0, 1)
    report["models"][name] = row
    print(name, json.dumps({s: row[s] for s in ("image", "text")}), flush=True)
    del params
  pathlib.Path(args.out).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
  main()
