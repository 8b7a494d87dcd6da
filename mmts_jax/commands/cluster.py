"""`mmts cluster`: build the cluster table (MM-TS's long-tail position of every sample).

Three sources of the distribution:
  text        captions -> Flax sentence encoder -> K-Means (k=200)           --text-column
  labels      class labels from a column, or external class frequencies     --label-column
  embeddings  precomputed `(N, D)` embeddings of any modality (.npy) -> K-Means

Examples:
  mmts cluster captions.csv --text-column narration --id-column narration_id --out table.npz
  mmts cluster train.csv --label-column noun_classes --frequencies ek100_noun_freq.csv \\
      --out nouns.npz
  mmts cluster video_emb.npy --k 200 --backend jax --out video.npz
  mmts cluster captions.csv --id-column narration_id --validate table.npz

It prints a summary (cluster-size histogram, head/tail shares, captions from the largest and
smallest clusters) and writes the table and a plot of the sorted sizes with their shifts. Bad
input fails before anything is written; artifacts are written atomically.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import time

import numpy as np

from mmts_jax import array_files, table_files
from mmts_jax.clusters.table import ClusterTable, atomic_write, dataset_fingerprint
from mmts_jax.commands import errors
from mmts_jax.commands.help_format import HelpFormatter
from mmts_jax.errors import UserInputError
from mmts_jax.table_files import Table

__all__ = ["main", "read_records", "build_parser"]


class CommandError(ValueError):
  """A user-facing error: printed in one line without a traceback, exit status 2."""


# ---------------------------------------------------------------------------- reading input
def read_table(path: str) -> Table:
  """A CSV / TSV / JSON-lines table (`mmts_jax.table_files.read_table`, errors name the line)."""
  if path.lower().endswith(".npy"):
    raise UserInputError(path, "is a .npy array", expected="a .csv, .tsv or .jsonl table")
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in table_files.TABLE_SUFFIXES:
    raise UserInputError(
      path,
      f"unknown input type {suffix or '(no suffix)'!r}",
      expected="a .csv, .tsv or .jsonl table, or .npy embeddings",
    )
  return table_files.read_table(path)


class _Rows(list):
  """Table rows (dicts) that remember their file and the line each row starts on."""

  path: str = ""
  lines: list[int] = []

  def line(self, i: int) -> int | None:
    return self.lines[i] if i < len(self.lines) else None


def read_records(path: str) -> tuple[list[str], list[dict]]:
  """Rows of a CSV / TSV / JSON-lines file as dicts (a list that knows each row's line), and the
  column names; `UserInputError` names the file and line of a malformed one."""
  t = read_table(path)
  rows = _Rows(t.rows)
  rows.path, rows.lines = t.path, t.lines
  return t.columns, rows


def _line(rows, i: int) -> int | None:
  return rows.line(i) if isinstance(rows, _Rows) else None


def _column(rows: list[dict], columns: list[str], name: str, path: str) -> list:
  if name not in columns:
    raise UserInputError(
      path, f"has no column {name!r}, only {columns}", expected=f"a column {name!r}"
    )
  values = [r.get(name) for r in rows]
  missing = [i for i, v in enumerate(values) if v is None]
  if missing:
    raise UserInputError(
      path,
      f"{len(missing)} row(s) have no {name!r}",
      line=_line(rows, missing[0]),
      expected=f"a {name!r} value in every row",
    )
  return values


def _first_label(value) -> str:
  """A class label; list-valued cells ("[3, 17]", EK-100 noun_classes) give their first entry,
  the narration's main noun."""
  if isinstance(value, list):
    if not value:
      raise CommandError("an empty label list has no class")
    return str(value[0])
  if isinstance(value, float):
    if not value.is_integer():
      raise CommandError(f"label {value!r} is not a class id")
    value = int(value)
  if isinstance(value, dict):
    raise CommandError("label is a JSON object")
  text = str(value).strip()
  if text.startswith("["):
    try:
      items = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
      raise CommandError(f"cannot parse label list {text!r}") from e
    if not isinstance(items, (list, tuple)):
      raise CommandError(f"label list {text!r} is not a list")
    return _first_label(list(items))
  if not text:
    raise CommandError("empty label")
  return text


def _labels(rows, columns, spec: str, path: str) -> list[str]:
  """`col` or `col1+col2` (joined with "_", e.g. EK-100 verb+noun "6_0")."""
  parts = [_column(rows, columns, c, path) for c in spec.split("+")]
  out = []
  for i, vals in enumerate(zip(*parts, strict=True)):
    try:
      out.append("_".join(_first_label(v) for v in vals))
    except CommandError as e:
      raise UserInputError(
        path,
        str(e),
        line=_line(rows, i),
        key=spec,
        expected="a class label (or a [list] whose first entry is one)",
      ) from e
  return out


def _read_frequencies(path: str) -> dict[str, float]:
  columns, rows = read_records(path)
  if len(columns) < 2:
    raise UserInputError(
      path, f"has columns {columns}", expected="a frequency table with two columns (class, count)"
    )
  key, count = ("class_id", "count") if {"class_id", "count"} <= set(columns) else columns[:2]
  freq = {}
  for i, r in enumerate(rows):
    try:
      value = float(r[count])
    except (TypeError, ValueError, KeyError):
      value = float("nan")
    if not (math.isfinite(value) and value >= 0):
      raise UserInputError(
        path,
        f"count {r.get(count)!r} of class {r.get(key)!r}",
        line=_line(rows, i),
        key=count,
        expected="a finite number >= 0",
      )
    freq[str(r[key]).strip()] = value
  return freq


def _load_embeddings(path: str) -> np.ndarray:
  from mmts_jax.clusters.kmeans import check_points

  x = array_files.load_npy(path, mmap=True, expected="a .npy (N, D) float array of embeddings")
  array_files.check_matrix(x, path)
  try:
    return check_points(x, name=f"embeddings {path!r}")
  except (TypeError, ValueError) as e:
    raise UserInputError(path, str(e), expected="a (N, D) float array of embeddings") from e


# ---------------------------------------------------------------------------- the command
def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="mmts cluster",
    formatter_class=HelpFormatter,
    description="Build an MM-TS cluster table from captions, class labels or embeddings.",
    epilog="examples:" + str(__doc__).split("Examples:")[1].split("It prints")[0],
  )
  p.add_argument("input", help="captions / labels table (.csv, .tsv, .jsonl) or embeddings (.npy)")
  src = p.add_mutually_exclusive_group()
  src.add_argument("--text-column", help="caption column: embed and K-Means cluster it")
  src.add_argument(
    "--label-column",
    help="class column (`verb_class+noun_classes` joins two); list cells use their first entry",
  )
  p.add_argument(
    "--frequencies",
    help="class,count table: K_c = the class's count there "
    "(e.g. ek100_noun_freq.csv) instead of its count in the input",
  )
  p.add_argument(
    "--class-names",
    help="class id -> name table for the summary (e.g. "
    "EPIC_100_noun_classes_v2.csv: columns id, key)",
  )
  p.add_argument("--meta", help="for .npy input: a table with the same rows (ids, captions)")
  p.add_argument(
    "--id-column",
    help="column whose ordered values fingerprint the dataset (default: the text or label column)",
  )
  p.add_argument("--out", help="the cluster table to write (.npz)")
  p.add_argument(
    "--validate",
    metavar="TABLE",
    help="check TABLE against this input (size and fingerprint) and exit",
  )
  p.add_argument("--k", type=int, default=200, help="K-Means clusters")
  p.add_argument("--seed", type=int, default=0, help="K-Means seed (runs use seed, seed+1, ...)")
  p.add_argument(
    "--n-init",
    type=int,
    default=1,
    help="K-Means runs from different seeds; the lowest inertia is kept",
  )
  p.add_argument(
    "--backend",
    choices=("sklearn", "jax"),
    default="sklearn",
    help="K-Means on the host (scikit-learn) or on the local devices (JAX)",
  )
  p.add_argument(
    "--model",
    help="Hugging Face BERT-family model directory (default: the packaged all-MiniLM-L6-v2)",
  )
  p.add_argument("--batch-size", type=int, default=256, help="sentences per encoder step")
  p.add_argument("--save-embeddings", metavar="NPY", help="also write the text embeddings")
  p.add_argument(
    "--compare-column",
    help="report the NMI between the clusters and this label column (e.g. noun_classes)",
  )
  p.add_argument("--sh-min", type=float, default=0.05, help="shift range for the summary/plot")
  p.add_argument("--sh-max", type=float, default=0.10, help="shift range for the summary/plot")
  p.add_argument(
    "--plot", help="PNG of the sorted cluster sizes and shifts (default: OUT with .png)"
  )
  p.add_argument("--no-plot", action="store_true", help="do not write the plot")
  p.add_argument("--examples", type=int, default=3, help="captions shown per cluster")
  p.add_argument(
    "--no-progress",
    action="store_true",
    help="no progress bars (there are none anyway when stderr is not a terminal)",
  )
  p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
  return p


def _check_args(args) -> None:
  if args.validate is None and args.out is None:
    raise CommandError("--out is required (or --validate TABLE)")
  if args.out is not None and not args.out.endswith(".npz"):
    raise CommandError(f"--out must end with .npz, got {args.out!r}")
  if args.batch_size < 1:
    raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
  if args.k < 1:
    raise CommandError(f"--k must be >= 1, got {args.k}")
  if not (math.isfinite(args.sh_min) and math.isfinite(args.sh_max)) or args.sh_min > args.sh_max:
    raise CommandError(f"need finite --sh-min <= --sh-max, got {args.sh_min}, {args.sh_max}")
  if args.frequencies and not args.label_column:
    raise CommandError("--frequencies needs --label-column")


def _inputs(args):
  """(source, columns, rows, embeddings, table_path) from the command line."""
  is_npy = args.input.lower().endswith(".npy")
  if is_npy:
    if args.label_column or (args.text_column and not args.meta):
      raise CommandError(
        ".npy input is clustered as embeddings; --text-column/--label-column "
        "apply to a table (with --meta FILE, --text-column names the captions "
        "shown in the summary)"
      )
    x = _load_embeddings(args.input)
    columns, rows = read_records(args.meta) if args.meta else ([], None)
    if rows is not None and len(rows) != x.shape[0]:
      raise CommandError(f"--meta {args.meta!r} has {len(rows)} rows, the embeddings {x.shape[0]}")
    return "embeddings", columns, rows, x, args.meta
  columns, rows = read_records(args.input)
  if not (args.text_column or args.label_column or args.validate):
    raise CommandError(
      "say what to cluster: --text-column COL (captions) or --label-column "
      f"COL (classes); columns of {args.input!r}: {columns}"
    )
  return ("text" if args.text_column else "labels"), columns, rows, None, args.input


def _fingerprint(args, source, columns, rows, path):
  key_col = (
    args.id_column
    or args.text_column
    or (args.label_column if args.label_column and "+" not in args.label_column else None)
  )
  if rows is None or key_col is None:
    if args.id_column:
      raise CommandError("--id-column needs a table input (or --meta for .npy)")
    return None, None
  return dataset_fingerprint(_column(rows, columns, key_col, path)), f"column:{key_col}"


def _build(args, source, columns, rows, x, path, fingerprint, keys, progress):
  common = {
    "fingerprint": fingerprint,
    "fingerprint_keys": keys,
    "input": os.path.basename(args.input),
  }
  if source == "labels":
    labels = _labels(rows, columns, args.label_column, path)
    if args.frequencies:
      freq = _read_frequencies(args.frequencies)
      try:
        return ClusterTable.from_frequencies(
          labels,
          freq,
          column=args.label_column,
          frequency_table=os.path.basename(args.frequencies),
          **common,
        ), None
      except ValueError as e:
        raise CommandError(f"{e} ({args.frequencies})") from e
    return ClusterTable.from_labels(labels, column=args.label_column, **common), None

  from mmts_jax.clusters.kmeans import check_k, kmeans

  n = len(rows) if x is None else x.shape[0]
  try:
    check_k(args.k, n)  # before the (long) embedding step
  except ValueError as e:
    raise CommandError(str(e)) from e
  extra = {}
  if source == "text":
    from mmts_jax.clusters.encoder import SentenceEncoder

    captions = _column(rows, columns, args.text_column, path)
    encoder = SentenceEncoder.load(args.model)
    t0 = time.perf_counter()
    x = encoder.encode([str(c) for c in captions], batch_size=args.batch_size, progress=progress)
    extra = {
      **encoder.provenance(),
      "column": args.text_column,
      "embed_seconds": round(time.perf_counter() - t0, 3),
    }
    if args.save_embeddings:
      with errors.writing(args.save_embeddings, "the embeddings"):
        atomic_write(args.save_embeddings, lambda f: np.save(f, x))
  t0 = time.perf_counter()
  result = kmeans(
    x, args.k, seed=args.seed, backend=args.backend, n_init=args.n_init, progress=progress
  )
  table = ClusterTable.from_assignments(
    result.labels,
    args.k,
    source=source,
    k=args.k,
    seed=args.seed,
    backend=args.backend,
    n_init=args.n_init,
    inertia=result.inertia,
    n_iter=result.n_iter,
    cluster_seconds=round(time.perf_counter() - t0, 3),
    **extra,
    **common,
  )
  return table, x


# ---------------------------------------------------------------------------- reporting
def _histogram(sizes: np.ndarray, width: int = 40) -> list[str]:
  """Text histogram of cluster sizes in powers-of-two bins."""
  sizes = sizes[sizes > 0]
  edges = 2 ** np.arange(0, int(np.ceil(np.log2(sizes.max() + 1))) + 1)
  counts, _ = np.histogram(sizes, bins=edges)
  top = max(counts.max(), 1)
  lines = []
  for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True):
    if c:
      lines.append(f"  [{lo:>6}, {hi:>6})  {c:>4}  {'#' * max(1, round(width * c / top))}")
  return lines


def _examples(table, captions, cluster: int, n: int) -> list[str]:
  if captions is None or n <= 0:
    return []
  members = np.flatnonzero(table.cluster_ids == cluster)
  seen, out = set(), []
  for i in members:
    c = str(captions[i])
    if c not in seen:
      seen.add(c)
      out.append(c)
    if len(out) == n:
      break
  return out


def summarize(table: ClusterTable, args, captions=None, nmi=None) -> dict:
  s = table.summary(top=5)
  sh = table.shift_table(args.sh_min, args.sh_max)
  s.update(
    shift_min=float(sh.min()),
    shift_mean=float(sh.mean()),
    shift_max=float(sh.max()),
    sh_min=args.sh_min,
    sh_max=args.sh_max,
  )
  for key in ("largest", "smallest"):
    s[key] = [
      {
        "cluster": c,
        "name": name,
        "size": size,
        "examples": _examples(table, captions, c, args.examples),
      }
      for c, name, size in s[key]
    ]
  if nmi is not None:
    s["nmi"] = nmi
  return s


def _read_class_names(path: str) -> dict[str, str]:
  columns, rows = read_records(path)
  if len(columns) < 2:
    raise UserInputError(
      path, f"has columns {columns}", expected="a class-name table with two columns (id, name)"
    )
  key, name = ("id", "key") if {"id", "key"} <= set(columns) else columns[:2]
  return {str(r[key]).strip(): str(r[name]) for r in rows}


def _print_summary(table: ClusterTable, s: dict) -> None:
  p = table.provenance
  desc = {
    "text": f"text clusters, {p.get('model')} + {p.get('backend')} K-Means k={p.get('k')}",
    "embeddings": f"embedding clusters, {p.get('backend')} K-Means k={p.get('k')}",
    "labels": f"classes of column {p.get('column')!r}",
    "frequencies": f"classes of {p.get('column')!r}, sizes from {p.get('frequency_table')}",
  }
  print(
    f"cluster table: {s['num_samples']} samples, {s['occupied_clusters']} clusters "
    f"({desc.get(p['source'], p['source'])})"
  )
  print(f"fingerprint: {p.get('fingerprint') or 'none (size check only)'}")
  print(
    f"cluster sizes K_c: min {s['size_min']}, median {s['size_median']:g}, max "
    f"{s['size_max']} (max/min {s['imbalance']:.1f}x)"
  )
  print("size histogram (clusters per size range):")
  print("\n".join(_histogram(table.sizes[np.unique(table.cluster_ids)])))
  print(
    f"head: the {s['head_clusters']} largest clusters (20%) hold "
    f"{100 * s['head_share']:.1f}% of the samples; tail: the {s['tail_clusters']} smallest "
    f"(50%) hold {100 * s['tail_share']:.1f}%"
  )
  print(
    f"shifts (Eq. 6, sh in [{s['sh_min']}, {s['sh_max']}]): min {s['shift_min']:.4f}, "
    f"mean {s['shift_mean']:.4f}, max {s['shift_max']:.4f}"
  )
  if "nmi" in s:
    print(f"NMI(clusters, {s['nmi']['column']}) = {s['nmi']['value']:.4f}")
  for key, title in (("largest", "largest clusters"), ("smallest", "smallest clusters")):
    print(f"{title}:")
    for c in s[key]:
      name = f" {c['name']!r}" if table.cluster_names else ""
      ex = "; ".join(c["examples"])
      print(f"  #{c['cluster']:<4}{name} K={c['size']:<6} {ex}")


def save_plot(
  table: ClusterTable, path: str, sh_min: float, sh_max: float, title: str = ""
) -> None:
  """Sorted cluster sizes (log scale) and their Eq. 6 shifts on a second axis (paper Fig. 5/8)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from mmts_jax import shifts

  occupied = np.unique(table.cluster_ids)
  sizes = np.sort(table.sizes[occupied])[::-1]
  sh = shifts.cluster_shift(sizes, sh_min, sh_max)
  fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
  ax.bar(np.arange(sizes.size), sizes, width=1.0, color="#4C72B0")
  ax.set_yscale("log")
  ax.set_xlabel("cluster (sorted by size)")
  ax.set_ylabel("cluster size $K_c$ (log)")
  ax2 = ax.twinx()
  ax2.plot(np.arange(sizes.size), sh, color="#C44E52", lw=2)
  ax2.set_ylabel(f"shift sh(c), [{sh_min}, {sh_max}]", color="#C44E52")
  ax.set_title(title or f"{table.num_samples} samples, {sizes.size} clusters")
  fig.tight_layout()
  atomic_write(path, lambda f: fig.savefig(f, format="png"))
  plt.close(fig)


def _nmi(table, rows, columns, spec, path):
  from sklearn.metrics import normalized_mutual_info_score

  truth = _labels(rows, columns, spec, path)
  return {"column": spec, "value": float(normalized_mutual_info_score(truth, table.cluster_ids))}


def _outputs(args) -> list[str]:
  """The artifacts this run writes, checked to be writable before any work."""
  if args.validate:
    return []
  paths = [errors.check_output_path(args.out, "--out")]
  if not args.no_plot:
    paths.append(
      errors.check_output_path(args.plot or os.path.splitext(args.out)[0] + ".png", "--plot")
    )
  if args.save_embeddings:
    paths.append(errors.check_output_path(args.save_embeddings, "--save-embeddings"))
  return paths


def _run(args) -> int:
  _check_args(args)
  outputs = _outputs(args)
  progress = False if args.no_progress else None  # None: a bar only on a terminal
  source, columns, rows, x, path = _inputs(args)
  fingerprint, keys = _fingerprint(args, source, columns, rows, path)
  if args.validate:
    n = x.shape[0] if x is not None else len(rows or ())
    ClusterTable.load(args.validate).validate(num_samples=n, fingerprint=fingerprint)
    print(
      f"ok: {args.validate} matches {args.input} ({n} samples, "
      f"fingerprint {fingerprint or 'not checked'})"
    )
    return 0
  if args.compare_column and rows is not None:
    _column(rows, columns, args.compare_column.split("+")[0], path)  # fail before the work
  names = _read_class_names(args.class_names) if args.class_names else None
  with errors.all_or_nothing(outputs):
    return _build_and_write(
      args, source, columns, rows, x, path, fingerprint, keys, progress, names
    )


def _build_and_write(
  args, source, columns, rows, x, path, fingerprint, keys, progress, names
) -> int:
  table, _ = _build(args, source, columns, rows, x, path, fingerprint, keys, progress)
  caption_col = args.text_column or ("narration" if "narration" in columns else None)
  captions = _column(rows, columns, caption_col, path) if rows and caption_col else None
  nmi = (
    _nmi(table, rows, columns, args.compare_column, path)
    if (args.compare_column and rows is not None)
    else None
  )
  s = summarize(table, args, captions, nmi)
  if names is not None:
    for c in s["largest"] + s["smallest"]:
      c["name"] = f"{c['name']} {names.get(c['name'], '?')}"
  if not args.no_plot:
    plot = args.plot or os.path.splitext(args.out)[0] + ".png"
    try:
      with errors.writing(plot, "the plot"):
        save_plot(table, plot, args.sh_min, args.sh_max, title=os.path.basename(args.input))
      s["plot"] = plot
    except ImportError:
      print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
  with errors.writing(args.out, "the cluster table"):
    table.save(args.out)
  s["table"] = args.out
  if args.json:
    print(json.dumps(s))
  else:
    _print_summary(table, s)
    print(f"wrote {args.out}" + (f" and {s['plot']}" if "plot" in s else ""))
  return 0


def main(argv: list[str] | None = None) -> int:
  return errors.run("mmts cluster", lambda a: _run(build_parser().parse_args(a)), argv)
