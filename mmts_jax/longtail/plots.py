"""Figures of the synthetic benchmark (matplotlib, Agg backend, written atomically as PNG).

- `temperature_per_cluster.png`: the temperature of each K-Means cluster along training, coloured
  by cluster size (the paper's Fig. 3), next to the fixed and TS rows.
- `cluster_distribution.png`: cluster sizes (sorted, log scale) with their Eq. 6 shift, and the
  class sizes of the generator.
- `learning_curves.png`: training loss and test R@1 (overall / head / tail) against the step.
"""

from __future__ import annotations

import pathlib

import numpy as np

from mmts_jax import shifts
from mmts_jax import temperature as temperature_lib

__all__ = ["write_all", "temperature_per_cluster", "cluster_distribution", "learning_curves"]


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")  # headless: no display on a CPU box or a TPU VM
  import matplotlib.pyplot as plt

  return plt


def _save(fig, path: pathlib.Path) -> str:
  from mmts_jax.clusters.table import atomic_write

  try:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
  finally:
    _pyplot().close(fig)
  return str(path)


def _spec(config, row: str) -> temperature_lib.Policy:
  from mmts_jax.config_defaults import canonical_mode

  temperature = dict(config["temperature"], mode=canonical_mode(row))
  return temperature_lib.from_config(
    temperature, config["mmts"], total_steps=int(config["total_steps"])
  )


def temperature_per_cluster(results: dict, config, path: pathlib.Path) -> str:
  """Fig. 3: `tau_c(t) = tau_base(t) + sh(c)` for every cluster, and the other rows' `tau(t)`."""
  plt = _pyplot()
  steps = np.arange(int(config["total_steps"]) + 1)
  sizes = np.asarray(results["clusters"]["sizes"], np.float64)
  mm = config["mmts"]
  shift = shifts.cluster_shift(sizes, float(mm["sh_min"]), float(mm["sh_max"]))
  fig, ax = plt.subplots(figsize=(8, 4.5))
  rows = results["rows"]
  if "mmts" in rows:
    base = np.asarray(_spec(config, "mmts").base(steps))
    cmap = plt.get_cmap("viridis")
    from matplotlib.colors import Normalize

    norm = Normalize(np.log(sizes.min()), np.log(sizes.max()))
    for size, sh in sorted(zip(sizes, shift, strict=True)):
      ax.plot(steps, base + sh, color=cmap(norm(np.log(size))), lw=1.0, alpha=0.8)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=norm)
    bar = fig.colorbar(sm, ax=ax)
    ticks = np.unique(np.geomspace(sizes.min(), sizes.max(), 5).round())
    bar.set_ticks(np.log(ticks).tolist())
    bar.set_ticklabels([f"{t:.0f}" for t in ticks])
    bar.set_label("cluster size (MM-TS, one line per cluster)")
  for row, style in (("fixed", "k--"), ("ts", "r:")):
    if row in rows:
      spec = _spec(config, row)
      ax.plot(
        steps,
        np.broadcast_to(np.asarray(spec.base(steps)), steps.shape),
        style,
        lw=1.5,
        label=results["labels"].get(row, row),
      )
  ax.set_xlabel("training step")
  ax.set_ylabel("temperature")
  ax.set_title("Per-cluster temperature along training (cf. MM-TS Fig. 3)")
  if ax.get_legend_handles_labels()[0]:
    ax.legend(loc="upper right")
  return _save(fig, path)


def cluster_distribution(results: dict, config, path: pathlib.Path) -> str:
  """Sorted cluster sizes (bars, log scale), their shift (line), and the class sizes."""
  plt = _pyplot()
  sizes = np.sort(np.asarray(results["clusters"]["sizes"]))[::-1]
  mm = config["mmts"]
  shift = shifts.cluster_shift(sizes, float(mm["sh_min"]), float(mm["sh_max"]))
  classes = np.asarray(results["data"]["class_sizes"])
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  ax1.bar(np.arange(len(classes)), classes, color="tab:gray")
  ax1.set_yscale("log")
  ax1.set_title(f"generator class sizes\n(imbalance {results['data']['imbalance']:.0f})")
  ax1.set_xlabel("class rank")
  ax1.set_ylabel("training samples")
  ax2.bar(np.arange(len(sizes)), sizes, color="tab:blue")
  ax2.set_yscale("log")
  nmi = results["clusters"].get("class_cluster_nmi")
  source = results["clusters"].get("provenance", {}).get("source")
  what = "generator classes" if source == "labels" else "K-Means on MiniLM caption embeddings"
  ax2.set_title(
    f"{what}\n(k={len(sizes)}" + (f", NMI with classes {nmi:.2f})" if nmi is not None else ")")
  )
  ax2.set_xlabel("cluster rank")
  ax2.set_ylabel("samples", color="tab:blue")
  twin = ax2.twinx()
  twin.plot(np.arange(len(sizes)), shift, "o-", color="tab:red", ms=3)
  twin.set_ylabel("shift sh(c) (Eq. 6)", color="tab:red")
  return _save(fig, path)


def learning_curves(results: dict, path: pathlib.Path) -> str:
  """Training loss and test R@1 per row (seed 0) against the step."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
  cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  colors = dict(zip(results["rows"], cycle, strict=False))  # the cycle outnumbers the rows
  for run in results["runs"]:
    if run["seed"] != 0:
      continue
    label = results["labels"].get(run["row"], run["row"])
    color = colors[run["row"]]
    log = [r for r in run["train_log"] if "loss" in r]
    axes[0].plot([r["step"] for r in log], [r["loss"] for r in log], color=color, label=label)
    for ax, group in zip(axes[1:], ("all", "head", "tail"), strict=True):
      ax.plot(
        [c["step"] for c in run["curve"]],
        [100 * c[f"{group}/R@1"] for c in run["curve"]],
        "o-",
        ms=3,
        color=color,
        label=label,
      )
  axes[0].set_title("training loss (seed 0)")
  for ax, group in zip(axes[1:], ("all", "head", "tail"), strict=True):
    ax.set_title(f"test R@1, {group} queries (%)")
  for ax in axes:
    ax.set_xlabel("step")
  axes[0].legend()
  return _save(fig, path)


def write_all(results: dict, out_dir, config) -> dict[str, str]:
  """All three figures into `out_dir`; returns `{name: path}`."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  config = config.to_dict() if hasattr(config, "to_dict") else config
  return {
    "temperature_per_cluster": temperature_per_cluster(
      results, config, out_dir / "temperature_per_cluster.png"
    ),
    "cluster_distribution": cluster_distribution(
      results, config, out_dir / "cluster_distribution.png"
    ),
    "learning_curves": learning_curves(results, out_dir / "learning_curves.png"),
  }
