"""Nakada et al. (AISTATS 2023)-style numerical experiments, re-derived, on a 2-core CPU.

  A. Subspace recovery `||sin Theta||` of unimodal contrastive learning (random-masking views,
     one linear encoder per modality) vs multimodal contrastive learning (linear loss in closed
     form, and the CLIP loss trained by gradient descent), as the fraction of mismatched pairs
     grows.
  B. Multimodal learning with vs without unpaired data that hides true pairs: paired only, paired
     + detected pseudo-pairs (self-training), paired + all hidden pairs (oracle); pair-detection
     precision and recall; against the number of pairs and against the mismatch fraction.
  C. Gradient descent on the regularised linear loss converging to the top singular subspaces of
     the contrastive cross-covariance S.

Usage:
  python -m mmts_jax.projects.nakada.experiments [--out mmts_jax/projects/nakada/results] \
      [--seeds 0 1 2] [--quick]

Writes `nakada.json`, `nakada.png` and `tables.md` into --out (atomically).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmts_jax import atomic_io
from mmts_jax.projects import nakada as lm
from mmts_jax.projects.nakada import gaussian_sampler as synthetic

# Setting A: noise spikes (std 1.5) stronger than the shared factors (std 1) in each modality.
SETTING_A: dict[str, Any] = dict(
  d=30,
  rank=3,
  noise_rank=3,
  signal=1.0,
  spike=1.5,
  noise=0.3,
  n=1000,
  mismatch=[0.0, 0.2, 0.4, 0.6, 0.7, 0.8, 0.9],
  clip=dict(temperature=1.0, rho=1.0, lr=0.3, steps=150, init_scale=0.1),
)
# Setting B: a small paired set and a large pool; 8 shared factors make pairs identifiable.
SETTING_B: dict[str, Any] = dict(
  d=40,
  rank=8,
  noise_rank=8,
  signal=1.0,
  spike=1.0,
  noise=0.2,
  n_hidden=1000,
  n_extra=500,
  n_paired=[100, 200, 400, 800],
  mismatch=[0.0, 0.2, 0.4, 0.6],
  n_paired_for_mismatch=400,
  self_training=dict(rounds=3, threshold=0.95, method="mutual_nn", weight=1.0),
)
SETTING_C: dict[str, Any] = dict(
  d=30, rank=3, n=1000, rho=1.0, lr=0.05, chunks=12, steps_per_chunk=25
)
CLIP = dict(phi=jnp.log1p, psi=jnp.exp)
LINEAR = dict(phi=lm.identity, psi=lm.identity)


def _err(basis_estimate, truth):
  return {
    "spectral": float(lm.sin_theta(basis_estimate, truth)),
    "frobenius": float(lm.sin_theta(basis_estimate, truth, "frobenius")),
  }


def _model(rng, s):
  return synthetic.make_model(
    rng,
    s["d"],
    s["d"],
    s["rank"],
    noise_rank=s["noise_rank"],
    signal=s["signal"],
    spike=s["spike"],
    noise=s["noise"],
  )


def _unimodal(rng, x, rank):
  v1, v2 = synthetic.random_masking_views(rng, x)
  return lm.unimodal_minimiser(lm.centered_cross_covariance(v1, v2), rank, 1.0).T


def experiment_a(seed: int, s=SETTING_A):
  rng = np.random.default_rng(1000 + seed)
  model = _model(rng, s)
  x, xt, _ = synthetic.sample_pairs(model, rng, s["n"])
  r, c = s["rank"], s["clip"]
  rows = []
  uni_x = _err(_unimodal(rng, x, r), model.u1)
  uni_xt = _err(_unimodal(rng, xt, r), model.u2)
  enc0 = lm.init_encoders(jax.random.PRNGKey(seed), s["d"], s["d"], r, scale=c["init_scale"])
  for eps in s["mismatch"]:
    xt_m, _ = synthetic.mismatch(rng, xt, eps)
    lin = lm.linear_minimiser(lm.centered_cross_covariance(x, xt_m), r, 1.0)
    clip, trace = lm.gradient_descent(
      enc0, x, xt_m, c["temperature"], rho=c["rho"], lr=c["lr"], steps=c["steps"], **CLIP
    )
    rows.append(
      {
        "mismatch": eps,
        "unimodal_x": uni_x,
        "unimodal_x_tilde": uni_xt,
        "multimodal_linear_x": _err(lm.row_space(lin.g1), model.u1),
        "multimodal_linear_x_tilde": _err(lm.row_space(lin.g2), model.u2),
        "multimodal_clip_x": _err(lm.row_space(clip.g1), model.u1),
        "multimodal_clip_x_tilde": _err(lm.row_space(clip.g2), model.u2),
        "clip_loss_first_last": [float(trace[0]), float(trace[-1])],
      }
    )
  return rows


def _oracle(x, xt, xp, xtp, match, rank, weight):
  hid = np.nonzero(match >= 0)[0]
  s_mat = lm.centered_cross_covariance(x, xt) + weight * lm.centered_cross_covariance(
    xp[hid], xtp[match[hid]]
  )
  return lm.linear_minimiser(s_mat, rank, 1.0)


def _b_point(model, x, xt, pool, s):
  xp, xtp, match = pool
  r, st = s["rank"], s["self_training"]
  paired = lm.linear_minimiser(lm.centered_cross_covariance(x, xt), r, 1.0)
  enc, hist = lm.self_train_linear(
    x,
    xt,
    xp,
    xtp,
    rank=r,
    rho=1.0,
    weight=st["weight"],
    rounds=st["rounds"],
    threshold=st["threshold"],
    method=st["method"],
    match=match,
  )
  oracle = _oracle(x, xt, xp, xtp, match, r, st["weight"])
  return {
    "paired_only": _err(lm.row_space(paired.g1), model.u1),
    "with_unpaired": _err(lm.row_space(enc.g1), model.u1),
    "oracle_pairs": _err(lm.row_space(oracle.g1), model.u1),
    "paired_only_x_tilde": _err(lm.row_space(paired.g2), model.u2),
    "with_unpaired_x_tilde": _err(lm.row_space(enc.g2), model.u2),
    "detection": hist,
  }


def experiment_b(seed: int, s=SETTING_B):
  rng = np.random.default_rng(2000 + seed)
  model = _model(rng, s)
  pool = synthetic.hidden_pair_pool(model, rng, s["n_hidden"], s["n_extra"])
  x_all, xt_all, _ = synthetic.sample_pairs(model, rng, max(s["n_paired"]))
  by_n = []
  for n in s["n_paired"]:
    by_n.append({"n_paired": n, **_b_point(model, x_all[:n], xt_all[:n], pool, s)})
  by_eps = []
  n = s["n_paired_for_mismatch"]
  for eps in s["mismatch"]:
    xt_m, _ = synthetic.mismatch(rng, xt_all[:n], eps)
    by_eps.append({"mismatch": eps, "n_paired": n, **_b_point(model, x_all[:n], xt_m, pool, s)})
  return {"by_n_paired": by_n, "by_mismatch": by_eps}


def experiment_c(seed: int, s=SETTING_C, a=SETTING_A):
  """GD with the closed-form gradient on the linear loss; distance to the SVD of S per chunk."""
  rng = np.random.default_rng(3000 + seed)
  model = _model(rng, a)
  x, xt, _ = synthetic.sample_pairs(model, rng, s["n"])
  n, r = s["n"], s["rank"]
  s_mat = lm.centered_cross_covariance(x, xt)
  u, sv, vt = jnp.linalg.svd(s_mat)
  best = lm.linear_minimiser(s_mat, r, s["rho"])
  target = best.g1.T @ best.g2
  # tau = n - 1 turns the linear loss's S(beta) into the centred cross-covariance.
  tau = float(n - 1)
  at_min = float(lm.loss(best, x, xt, tau, rho=s["rho"], **LINEAR))
  enc = lm.init_encoders(jax.random.PRNGKey(seed), a["d"], a["d"], r, scale=0.1)
  curve = []
  for k in range(s["chunks"] + 1):
    if k:
      enc, _ = lm.gradient_descent(
        enc, x, xt, tau, rho=s["rho"], lr=s["lr"], steps=s["steps_per_chunk"], **LINEAR
      )
    m = enc.g1.T @ enc.g2
    curve.append(
      {
        "step": k * s["steps_per_chunk"],
        "sin_theta_left": float(lm.sin_theta(lm.row_space(enc.g1), u[:, :r])),
        "sin_theta_right": float(lm.sin_theta(lm.row_space(enc.g2), vt[:r].T)),
        "rel_err_G1tG2": float(jnp.linalg.norm(m - target) / jnp.linalg.norm(target)),
        "loss_minus_min": float(lm.loss(enc, x, xt, tau, rho=s["rho"], **LINEAR)) - at_min,
      }
    )
  return {"singular_values": [float(v) for v in sv[: r + 2]], "curve": curve}


def _mean_std(values):
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std())


def _aggregate(per_seed, path):
  """mean/std over seeds of the value at `path` (a function of one seed's result)."""
  return _mean_std([path(r) for r in per_seed])


def summarise(results):
  a, b = results["A"], results["B"]
  summary = {"A": [], "B_by_n_paired": [], "B_by_mismatch": []}
  for i, eps in enumerate(SETTING_A["mismatch"]):
    row = {"mismatch": eps}
    for key in (
      "unimodal_x",
      "unimodal_x_tilde",
      "multimodal_linear_x",
      "multimodal_linear_x_tilde",
      "multimodal_clip_x",
      "multimodal_clip_x_tilde",
    ):
      row[key] = _aggregate(a, lambda r, k=key, i=i: r[i][k]["spectral"])
    summary["A"].append(row)
  for part, axis in (("by_n_paired", "n_paired"), ("by_mismatch", "mismatch")):
    for i, point in enumerate(b[0][part]):
      row = {axis: point[axis]}
      for key in ("paired_only", "with_unpaired", "oracle_pairs"):
        row[key] = _aggregate(b, lambda r, k=key, p=part, i=i: r[p][i][k]["spectral"])
      for key in ("precision", "recall", "detected"):
        row[f"first_round_{key}"] = _aggregate(
          b, lambda r, k=key, p=part, i=i: r[p][i]["detection"][0][k]
        )
        row[f"last_round_{key}"] = _aggregate(
          b, lambda r, k=key, p=part, i=i: r[p][i]["detection"][-1][k]
        )
      summary[f"B_{part}"].append(row)
  return summary


def _fmt(ms):
  return f"{ms[0]:.3f} ± {ms[1]:.3f}"


def tables(summary, results):
  out = [
    "### A. sin Θ vs fraction of mismatched pairs (mean ± std over seeds)",
    "",
    "| mismatch | unimodal x | unimodal x~ | MMCL linear x | MMCL linear x~ | MMCL CLIP x "
    "| MMCL CLIP x~ |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in summary["A"]:
    out.append(
      f"| {r['mismatch']:.1f} | "
      + " | ".join(
        _fmt(r[k])
        for k in (
          "unimodal_x",
          "unimodal_x_tilde",
          "multimodal_linear_x",
          "multimodal_linear_x_tilde",
          "multimodal_clip_x",
          "multimodal_clip_x_tilde",
        )
      )
      + " |"
    )
  for part, axis, title in (
    ("B_by_n_paired", "n_paired", "number of true pairs"),
    ("B_by_mismatch", "mismatch", "mismatch fraction (400 pairs)"),
  ):
    out += [
      "",
      f"### B. sin Θ (modality 1) with vs without unpaired data, vs {title}",
      "",
      f"| {axis} | paired only | + unpaired (self-training) | + all hidden pairs (oracle) "
      "| precision round 1 → 3 | recall round 1 → 3 | pseudo-pairs round 3 |",
      "|---|---|---|---|---|---|---|",
    ]
    for r in summary[part]:
      out.append(
        f"| {r[axis]} | {_fmt(r['paired_only'])} | {_fmt(r['with_unpaired'])} | "
        f"{_fmt(r['oracle_pairs'])} | {r['first_round_precision'][0]:.3f} → "
        f"{r['last_round_precision'][0]:.3f} | {r['first_round_recall'][0]:.3f} → "
        f"{r['last_round_recall'][0]:.3f} | {r['last_round_detected'][0]:.0f} |"
      )
  out += [
    "",
    "### C. Gradient descent on the linear loss (seed 0)",
    "",
    "| step | sin Θ left | sin Θ right | ‖G1ᵀG2 − SVD_r(S)/ρ‖/‖·‖ | loss − min |",
    "|---|---|---|---|---|",
  ]
  for p in results["C"]["curve"][::3]:
    out.append(
      f"| {p['step']} | {p['sin_theta_left']:.2e} | {p['sin_theta_right']:.2e} | "
      f"{p['rel_err_G1tG2']:.2e} | {p['loss_minus_min']:.2e} |"
    )
  return "\n".join(out) + "\n"


def plot(summary, results, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 2, figsize=(12, 9))
  axes = axes.ravel()

  def line(ax, xs, ms, label, **kw):
    m = np.array([v[0] for v in ms])
    sd = np.array([v[1] for v in ms])
    ax.errorbar(xs, m, yerr=sd, label=label, capsize=3, marker="o", ms=4, **kw)

  ax = axes[0]
  xs = [r["mismatch"] for r in summary["A"]]
  for key, label, style in (
    ("unimodal_x", "unimodal, x", "--"),
    ("unimodal_x_tilde", "unimodal, x~", "--"),
    ("multimodal_linear_x", "MMCL linear, x", "-"),
    ("multimodal_linear_x_tilde", "MMCL linear, x~", "-"),
    ("multimodal_clip_x", "MMCL CLIP (GD), x", ":"),
    ("multimodal_clip_x_tilde", "MMCL CLIP (GD), x~", ":"),
  ):
    line(ax, xs, [r[key] for r in summary["A"]], label, linestyle=style)
  ax.set(
    xlabel="fraction of mismatched pairs",
    ylabel="||sin Θ|| (spectral)",
    title="A. unimodal vs multimodal",
    ylim=(0, 1.05),
  )
  ax.legend(fontsize=7)
  for ax, part, axis, xlabel in (
    (axes[1], "B_by_n_paired", "n_paired", "number of true pairs"),
    (axes[2], "B_by_mismatch", "mismatch", "fraction of mismatched pairs (400 pairs)"),
  ):
    xs = [r[axis] for r in summary[part]]
    for key, label, style in (
      ("paired_only", "paired only", "-"),
      ("with_unpaired", "+ unpaired (detected pairs)", "-"),
      ("oracle_pairs", "+ hidden pairs (oracle)", ":"),
    ):
      line(ax, xs, [r[key] for r in summary[part]], label, linestyle=style)
    ax.set(
      xlabel=xlabel,
      ylabel="||sin Θ||, modality 1",
      title="B. with vs without unpaired",
      ylim=(0, None),
    )
    if axis == "n_paired":
      ax.set_xscale("log")
    ax.legend(fontsize=7)
  ax = axes[3]
  curve = results["C"]["curve"]
  steps = [p["step"] for p in curve]
  for key, label in (
    ("sin_theta_left", "sin Θ(G1 rows, top-r left sing. vec. of S)"),
    ("sin_theta_right", "sin Θ(G2 rows, top-r right sing. vec.)"),
    ("rel_err_G1tG2", "‖G1ᵀG2 − SVD_r(S)/ρ‖ / ‖SVD_r(S)/ρ‖"),
  ):
    ax.semilogy(steps, np.maximum([p[key] for p in curve], 1e-16), marker="o", ms=3, label=label)
  ax.set(xlabel="gradient step", title="C. GD on the linear loss (seed 0)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  atomic_io.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
  p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--quick", action="store_true", help="one seed, fewer points (smoke run)")
  args = p.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  seeds = args.seeds[:1] if args.quick else args.seeds
  if args.quick:
    SETTING_A["mismatch"] = [0.0, 0.8]
    SETTING_A["clip"]["steps"] = 20
    SETTING_B["n_paired"] = [100, 400]
    SETTING_B["mismatch"] = [0.0, 0.4]
  t0 = time.time()
  results: dict[str, Any] = {"A": [], "B": []}
  for seed in seeds:
    results["A"].append(experiment_a(seed))
    print(f"[A] seed {seed} done at {time.time() - t0:.0f}s", flush=True)
    results["B"].append(experiment_b(seed))
    print(f"[B] seed {seed} done at {time.time() - t0:.0f}s", flush=True)
  results["C"] = experiment_c(seeds[0])
  summary = summarise(results)
  record = {
    "settings": {"A": SETTING_A, "B": SETTING_B, "C": SETTING_C},
    "seeds": seeds,
    "summary": summary,
    "per_seed": results,
    "environment": {
      "jax": jax.__version__,
      "python": platform.python_version(),
      "backend": jax.default_backend(),
      "argv": sys.argv,
      "wall_seconds": round(time.time() - t0, 1),
    },
  }
  atomic_io.atomic_write_text(out / "nakada.json", json.dumps(record, indent=1))
  md = tables(summary, results)
  atomic_io.atomic_write_text(out / "tables.md", md)
  plot(summary, results, out / "nakada.png")
  print(md)
  print(
    f"wrote {out / 'nakada.json'}, {out / 'nakada.png'}, {out / 'tables.md'} "
    f"in {time.time() - t0:.0f}s"
  )
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
