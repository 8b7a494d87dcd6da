"""Where the Mosaic max-margin dS kernel differs from float64 on the GPU (session 12's diagnosis
of run 10's check_mm_kernels: ds_rel 0.136).

  PYTHONPATH=$PWD python3 benchmarks/mm_ds_diagnose.py   # writes $OUT/diag_mm.json

Per case (tile size, signed or positive cotangents, with or without the sums, one warpgroup):
the largest error relative to the largest entry, the entries more than 1% off, where they lie,
and the first few (row, column, kernel value, float64 value). The float64 hinge argument of the
entries found is printed by `_reference64.hinge_tile(...).tie` (within 1e-6 of 0).
"""

import json
import os

import jax.numpy as jnp
import numpy as np

from mmts_jax.losses import _mosaic_tiles as mt
from mmts_jax.losses._reference64 import hinge_inputs, hinge_tile

out = {}


def run(tag, n, id_shift, need_sums=True, cfg=None, signed=True):
  if cfg is not None:
    mt.set_config("bwd", cfg)
  try:
    (x, y), (rr, qc, ro, co), (rid, cid) = hinge_inputs(n, 512, seed=4, id_shift=id_shift)
    if signed:
      gr, gc = np.linspace(-1, 1, n), np.linspace(0.5, -0.5, n)
    else:
      gr, gc = np.full(n, 1e-3), np.full(n, 2e-3)
    f = lambda v: jnp.asarray(v, jnp.float32)
    t = hinge_tile(x, y, rr, qc, ro, co, rid, cid, gr, gc)
    res = mt.mm_ds(
      x,
      y,
      f(rr),
      f(qc),
      f(ro),
      f(co),
      jnp.asarray(rid),
      jnp.asarray(cid),
      f(gr),
      f(gc),
      need_sums=need_sums,
    )
    got = np.asarray(res[0], np.float64)
    err = np.abs(got - t.dsw) / np.abs(t.dsw).max()
    bad = err > 0.01
    r, c = np.nonzero(bad)
    d = {"rel": float(err.max()), "nbad": int(bad.sum()), "frac_bad": float(bad.mean())}
    if len(r):
      d["rows_mod128"] = np.bincount(r % 128, minlength=128).nonzero()[0][:20].tolist()
      d["cols_mod128"] = np.bincount(c % 128, minlength=128).nonzero()[0][:20].tolist()
      d["row_blocks256"] = np.unique(r // 256).tolist()[:20]
      d["col_blocks128"] = np.unique(c // 128).tolist()[:20]
      d["on_diag_ids"] = int((np.asarray(rid)[r] == np.asarray(cid)[c]).sum())
      first = list(zip(r, c, strict=True))[:6]
      d["sample"] = [(int(a), int(b), float(got[a, b]), float(t.dsw[a, b])) for a, b in first]
      d["got_zero_frac"] = float((got[bad] == 0).mean())
    out[tag] = d
  except Exception as e:
    out[tag] = {"error": str(e)[-300:]}
  finally:
    mt.set_config("bwd", None)
  print(tag, json.dumps(out[tag]), flush=True)


def main():
  run("n2048_shift1024", 2048, 1024)
  run("n2048_unsigned", 2048, 1024, signed=False)
  run("n2048_nosums", 2048, 1024, need_sums=False)
  run("n256_shift0", 256, 0)
  run("n2048_wgs1", 2048, 1024, cfg=mt.MosaicConfig(stages=3, wgs=1))
  run("n4096_shift1024", 4096, 1024)
  json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "diag_mm.json"), "w"), indent=1)


if __name__ == "__main__":
  main()
