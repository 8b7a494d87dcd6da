"""The MM-TS trainer: train state, the pure sharded train step, the input protocol and the loop.

The train step is one pure function `train_step(state, batch) -> (state, metrics)`. Inside it

  tau_i = schedule(step) + shift_table[batch["index"]_i]          (MM-TS Eq. 8, or another
  loss  = infonce(z_img, z_txt, tau) or max_margin(..., margin=tau) ablation row: `temperature.py`)

and `compile_train_step` jit-compiles it over a `("data",)` mesh with explicit shardings (batch
split over devices; parameters replicated or FSDP-sharded) and the state donated.

Input protocol: `config.data.name` names a factory (`"synthetic"`, `"npz"`, or
`"package.module:function"`) called as `factory(config.data, global_batch_size=B, seed=S)`. It
returns a source with `num_examples`, `iterate(start_batch, process_index, process_count)` (an
iterator of this process's numpy batch dicts, each carrying `index`, starting at global batch
number `start_batch`) and optionally `cluster_sizes` (per example). The loop counts consumed
batches; a resumed run restarts the iterator at that count, so it sees exactly the same data.

Example (a few steps of the tiny configuration; `mmts train` is the command-line front end):
  >>> import tempfile
  >>> from configs import tiny  # doctest: +SKIP
  >>> result = train_and_evaluate(tiny.get_config(), tempfile.mkdtemp())  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import math
import os
import pathlib
import tempfile
import time
from typing import Any, Callable, Iterator, Mapping

import flax.struct as struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmts_jax import atomic_io, losses, shifts
from mmts_jax import mesh as mesh_lib
from mmts_jax import temperature as temperature_lib
from mmts_jax.checkpointing import Checkpointer, PreemptionWatcher
from mmts_jax.metrics_log import MetricsWriter, truncate_metrics
from mmts_jax.models import build_model

__all__ = ["default_config", "with_row", "TrainState", "LossSpec", "create_train_state",
           "init_train_state", "train_step",
           "eval_step", "make_embed_fn", "compile_train_step", "make_optimizer", "make_source",
           "ArraySource", "synthetic_source", "npz_source", "resolve_shift_table",
           "train_and_evaluate", "TrainResult", "NonFiniteLossError"]


# ----------------------------------------------------------------------------- configuration


def default_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, with defaults (the synthetic long-tail setting, MM-TS InfoNCE
  with the CLIP/CC3M alpha and shift range). `configs/*.py` start from this."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 256                 # global, over all devices and hosts
  c.log_every = 50
  c.progress_bar = True
  c.tensorboard = True
  c.distributed = "auto"             # jax.distributed.initialize(): True / False / "auto"
  c.data = ml_collections.ConfigDict(dict(
      name="synthetic", path="", num_examples=4096, num_clusters=50, zipf=1.1,
      image_dim=64, text="tokens", text_len=16, vocab_size=256, noise=0.5, shuffle=True))
  c.model = ml_collections.ConfigDict(dict(
      embed_dim=64, dtype="float32",
      image=dict(name="features", hidden_dims=(128,), dropout=0.0),
      text=dict(name="transformer", vocab_size=256, max_len=16, width=64, depth=2, num_heads=2,
                mlp_dim=128, pool="mean", causal=False, pad_id=0)))
  c.loss = ml_collections.ConfigDict(dict(name="infonce", impl="auto", block_size=None))
  # For loss "max_margin" every value below is a margin instead of a temperature.
  c.temperature = ml_collections.ConfigDict(dict(mode="mmts", value=0.07, tau_min=0.07,
                                                 tau_max=1.0))
  c.mmts = ml_collections.ConfigDict(dict(
      alpha=0.04, sh_min=0.05, sh_max=0.10, num_oscillations=5, k=200,
      cluster_table="", shift_table_path="", shift_table_kind="sizes"))
  c.optim = ml_collections.ConfigDict(dict(
      lr=5e-4, warmup_steps=100, end_lr_factor=0.0, weight_decay=0.1, b1=0.9, b2=0.98,
      eps=1e-6, grad_clip_norm=1.0))
  c.mesh = ml_collections.ConfigDict(dict(num_devices=0, param_sharding="replicated"))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True))
  c.train = ml_collections.ConfigDict(dict(skip_nonfinite=True))
  # every_steps: how often `eval_fn` runs (0: only at total_steps). zero_shot: "[NAME=]PATH,..."
  # retrieval test sets that `mmts train` evaluates (mmts_jax.finetune.zero_shot).
  c.eval = ml_collections.ConfigDict(dict(every_steps=0, zero_shot=""))
  return c


ABLATION_ROWS = {"fixed": "fixed", "clip": "learnable", "learnable": "learnable", "ts": "ts",
                 "ics": "ics", "mmts": "mmts", "ts_ics": "mmts"}


def with_row(config: ml_collections.ConfigDict, row: str = "") -> ml_collections.ConfigDict:
  """Selects one row of the paper's ablation: "fixed" (fixed temperature / margin), "clip"
  (CLIP's learnable temperature), "ts" (uni-modal schedule), "ics" (per-sample shifts only),
  "mmts" (TS&ICS, the default when `row` is empty). Used as `configs/x.py:ROW`.

  Example:
    >>> with_row(default_config(), "ics").temperature.mode
    'ics'
  """
  row = (row or "mmts").lower()
  if row not in ABLATION_ROWS:
    raise ValueError(f"ablation row must be one of {sorted(ABLATION_ROWS)}, got {row!r}")
  config.temperature.mode = ABLATION_ROWS[row]
  return config


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


# ----------------------------------------------------------------------------- input


class ArraySource:
  """In-memory examples, deterministic and resumable: global batch `b` of epoch `e = b // S`
  (`S = N // B`, the remainder dropped) is slice `b % S` of a permutation seeded by
  `(seed, e)`; process `p` of `P` takes rows `[p B/P, (p+1) B/P)` of it."""

  def __init__(self, arrays: Mapping[str, np.ndarray], *, global_batch_size: int, seed: int,
               shuffle: bool = True, cluster_sizes: np.ndarray | None = None):
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    sizes = {k: v.shape[0] for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"all arrays must have the same number of examples, got {sizes}")
    self.num_examples = next(iter(sizes.values()))
    if global_batch_size > self.num_examples:
      raise ValueError(f"batch_size {global_batch_size} > number of examples "
                       f"{self.num_examples}")
    self.arrays = arrays
    self.batch_size = int(global_batch_size)
    self.seed = int(seed)
    self.shuffle = bool(shuffle)
    self.cluster_sizes = cluster_sizes
    self.steps_per_epoch = self.num_examples // self.batch_size
    self.fingerprint = None   # in-memory data has no stable identity to check a table against

  def __len__(self) -> int:
    return self.num_examples

  def _order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.num_examples)
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

  def iterate(self, start_batch: int = 0, process_index: int = 0,
              process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    if self.batch_size % process_count:
      raise ValueError(f"batch_size {self.batch_size} does not split over {process_count} "
                       f"processes")
    local = self.batch_size // process_count
    b, epoch, order = int(start_batch), None, None
    while True:
      if b // self.steps_per_epoch != epoch:
        epoch = b // self.steps_per_epoch
        order = self._order(epoch)
      start = (b % self.steps_per_epoch) * self.batch_size + process_index * local
      rows = order[start:start + local]
      yield {k: v[rows] for k, v in self.arrays.items()}
      b += 1


def _zipf_sizes(num_examples: int, num_clusters: int, exponent: float) -> np.ndarray:
  """Long-tail cluster sizes proportional to `1 / rank^exponent`, each >= 1, summing to N."""
  w = 1.0 / np.arange(1, num_clusters + 1) ** exponent
  sizes = np.maximum(1, np.floor(w / w.sum() * num_examples)).astype(np.int64)
  sizes[0] += num_examples - sizes.sum()
  if sizes[0] < 1:
    raise ValueError(f"cannot split {num_examples} examples into {num_clusters} clusters")
  return sizes


def synthetic_source(cfg, *, global_batch_size: int, seed: int) -> ArraySource:
  """Long-tail synthetic image-text pairs: cluster `c` (Zipf-sized) has a random feature centre
  and a few keyword tokens; `image_features = centre + noise`, `text` = keywords + random tokens
  (or `text_features`, with `cfg.text == "features"`). Trains in seconds on a CPU."""
  n = _positive_int("data.num_examples", cfg.num_examples)
  k = _positive_int("data.num_clusters", cfg.num_clusters)
  rng = np.random.default_rng(seed)
  sizes = _zipf_sizes(n, k, float(cfg.zipf))
  cluster = rng.permutation(np.repeat(np.arange(k), sizes))
  dim = _positive_int("data.image_dim", cfg.image_dim)
  centres = rng.normal(size=(k, dim)).astype(np.float32)
  image = centres[cluster] + float(cfg.noise) * rng.normal(size=(n, dim)).astype(np.float32)
  arrays = {"image_features": image.astype(np.float32),
            "index": np.arange(n, dtype=np.int32)}
  if cfg.text == "tokens":
    length = _positive_int("data.text_len", cfg.text_len)
    vocab = _positive_int("data.vocab_size", cfg.vocab_size)
    if vocab < 4 or length < 4:
      raise ValueError(f"data.vocab_size and data.text_len must be >= 4, got {vocab}, {length}")
    keywords = rng.integers(1, vocab, size=(k, 2))
    tokens = rng.integers(1, vocab, size=(n, length)).astype(np.int32)
    tokens[:, :2] = keywords[cluster]
    lengths = rng.integers(3, length + 1, size=n)
    tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0   # pad id 0
    arrays["text"] = tokens
  elif cfg.text == "features":
    text_centres = rng.normal(size=(k, dim)).astype(np.float32)
    arrays["text_features"] = (text_centres[cluster] + float(cfg.noise) * rng.normal(
        size=(n, dim))).astype(np.float32)
  else:
    raise ValueError(f"data.text must be 'tokens' or 'features', got {cfg.text!r}")
  return ArraySource(arrays, global_batch_size=global_batch_size, seed=seed,
                     shuffle=bool(cfg.get("shuffle", True)), cluster_sizes=sizes[cluster])


def npz_source(cfg, *, global_batch_size: int, seed: int) -> ArraySource:
  """Precomputed features (or token ids) from `cfg.path` (.npz): any of `image`,
  `image_features`, `text`, `text_features`, optional `index` (default: the row number, which is
  the example's stable dataset position) and `cluster_size` (per example, for the shifts)."""
  path = pathlib.Path(cfg.path)
  if not path.is_file():
    raise FileNotFoundError(f"data.path {str(path)!r} does not exist")
  with np.load(path) as f:
    arrays = {k: f[k] for k in f.files}
  cluster_sizes = arrays.pop("cluster_size", None)
  n = next(iter(arrays.values())).shape[0]
  arrays.setdefault("index", np.arange(n, dtype=np.int32))
  return ArraySource(arrays, global_batch_size=global_batch_size, seed=seed,
                     shuffle=bool(cfg.get("shuffle", True)), cluster_sizes=cluster_sizes)


SOURCES: dict[str, Callable] = {"synthetic": synthetic_source, "npz": npz_source}


def make_source(cfg, *, global_batch_size: int, seed: int):
  """`config.data` -> a source (see the module docstring for the protocol)."""
  name = cfg.name
  if name in SOURCES:
    factory = SOURCES[name]
  elif isinstance(name, str) and ":" in name:
    module, _, fn = name.partition(":")
    factory = getattr(importlib.import_module(module), fn)
  else:
    raise ValueError(f"data.name must be one of {sorted(SOURCES)} or 'package.module:function', "
                     f"got {name!r}")
  return factory(cfg, global_batch_size=global_batch_size, seed=seed)


def check_batch(batch: Mapping[str, np.ndarray], num_examples: int) -> None:
  """Every batch must carry `index` (its examples' dataset positions) within the table."""
  if "index" not in batch:
    raise KeyError(f"the batch has no 'index' (keys: {sorted(batch)}): every example must carry "
                   f"its stable dataset position, which selects its MM-TS shift")
  index = np.asarray(batch["index"])
  if not np.issubdtype(index.dtype, np.integer) or index.ndim != 1:
    raise ValueError(f"batch['index'] must be a 1-D integer array, got {index.dtype} "
                     f"{index.shape}")
  if index.size and (index.min() < 0 or index.max() >= num_examples):
    raise ValueError(f"batch['index'] has values in [{index.min()}, {index.max()}] outside the "
                     f"dataset / shift table [0, {num_examples})")


# ----------------------------------------------------------------------------- shift table


def resolve_shift_table(config, source, spec: temperature_lib.TemperatureSpec,
                        shift_table=None) -> np.ndarray | None:
  """The per-example shift table `sh(c_i)` (N,) float32, or None when the mode uses none.

  In order: the `shift_table` argument; `config.mmts.cluster_table` (a `ClusterTable` artifact,
  validated against the dataset); `config.mmts.shift_table_path` (.npy of per-example cluster
  sizes or shifts, `config.mmts.shift_table_kind`); the source's `cluster_sizes`.
  """
  if not spec.uses_shift_table:
    return None
  m = config.mmts
  sh_min, sh_max = float(m.sh_min), float(m.sh_max)
  n = source.num_examples
  if shift_table is None and m.get("cluster_table"):
    from mmts_jax import cluster_table as ct  # built by the preprocessing stage
    table = ct.ClusterTable.load(m.cluster_table)
    # Raises ClusterTableMismatch (a ValueError) for a table of another dataset.
    table.validate(num_samples=n, fingerprint=getattr(source, "fingerprint", None))
    shift_table = table.shift_table(sh_min, sh_max)
  elif shift_table is None and m.get("shift_table_path"):
    arr = np.load(m.shift_table_path)
    kind = m.get("shift_table_kind", "sizes")
    if kind not in ("sizes", "shifts"):
      raise ValueError(f"mmts.shift_table_kind must be 'sizes' or 'shifts', got {kind!r}")
    shift_table = shifts.cluster_shift(arr, sh_min, sh_max) if kind == "sizes" else arr
  elif shift_table is None and getattr(source, "cluster_sizes", None) is not None:
    shift_table = shifts.cluster_shift(np.asarray(source.cluster_sizes), sh_min, sh_max)
  if shift_table is None:
    raise ValueError(f"temperature mode {spec.mode!r} needs per-example shifts: set "
                     f"config.mmts.cluster_table or config.mmts.shift_table_path")
  return temperature_lib.check_shift_table(shift_table, spec, num_examples=n)


def fingerprint(table: np.ndarray | None) -> str:
  """A short content hash: a checkpoint refuses to resume with another table."""
  if table is None:
    return "none"
  return hashlib.sha256(np.ascontiguousarray(table, np.float32).tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- loss


LOSS_IMPLS = ("auto", "dense", "blockwise", "gather", "ring")


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """`name` in {"infonce", "max_margin"}. `impl`: "auto" / "dense" / "blockwise" call the loss
  on the global batch and let XLA partition it over the sharded batch; "gather" / "ring" run the
  sharded loss per device under `shard_map` (`mmts_jax.losses.make_sharded_loss`: all-gather, or
  blocks passed round the ring with no (B, B) logits anywhere). `block_size`: blockwise/ring tile."""
  name: str = "infonce"
  impl: str = "auto"
  block_size: Any = None
  mesh: Any = None

  def __post_init__(self):
    if self.name not in ("infonce", "max_margin"):
      raise ValueError(f"loss.name must be 'infonce' or 'max_margin', got {self.name!r}")
    if self.impl not in LOSS_IMPLS:
      raise ValueError(f"loss.impl must be one of {LOSS_IMPLS}, got {self.impl!r}")
    if self.impl in ("gather", "ring") and self.mesh is None:
      raise ValueError(f"loss.impl {self.impl!r} needs the mesh")

  def __call__(self, image, text, values):
    if self.impl in ("gather", "ring"):
      fn = losses.make_sharded_loss(self.mesh, self.name, axis_name=mesh_lib.DATA_AXIS,
                                    sharded=self.impl, block_size=self.block_size)
      return fn(image, text, values)
    fn = losses.infonce if self.name == "infonce" else losses.max_margin
    return fn(image, text, values, impl=self.impl, block_size=self.block_size)


# ----------------------------------------------------------------------------- state and step


class TrainState(struct.PyTreeNode):
  """Everything a step reads and writes. Static (non-pytree) fields define the computation."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  shift_table: jax.Array          # (N,) per-example shifts, or (1,) unused
  # The module, not its bound `apply`: modules compare by value, so equal configurations
  # share one compiled step.
  model: Any = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  temperature: temperature_lib.TemperatureSpec = struct.field(pytree_node=False)
  loss: LossSpec = struct.field(pytree_node=False)
  skip_nonfinite: bool = struct.field(pytree_node=False, default=True)
  lr_schedule: Callable | None = struct.field(pytree_node=False, default=None)

  def variables(self) -> dict:
    return {"params": self.params, **({"batch_stats": self.batch_stats}
                                      if self.batch_stats else {})}

  def checkpoint_tree(self) -> dict:
    """What a checkpoint holds (the shift table is rebuilt from its source and fingerprinted)."""
    return {"step": self.step, "params": self.params, "batch_stats": self.batch_stats,
            "opt_state": self.opt_state, "rng": self.rng}

  def replace_from_checkpoint(self, tree: Mapping[str, Any]) -> "TrainState":
    return self.replace(**{k: tree[k] for k in self.checkpoint_tree()})


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


@functools.lru_cache(maxsize=32)
def _optimizer(lr, warmup, total_steps, end_factor, clip, b1, b2, eps, weight_decay):
  # Memoised on the values: equal configurations give the *same* (static) transformation, so a
  # second run in one process (a resume, a sweep) reuses the compiled train step.
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps,
                                                end_value=lr * end_factor)
  parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=_decay_mask))
  return optax.chain(*parts), schedule


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup (from 0) + cosine decay to `lr * end_lr_factor`, after clipping
  the global gradient norm at `grad_clip_norm` (0: no clipping); no weight decay on biases,
  norms and scalars (parameters with fewer than 2 dimensions). Returns `(tx, lr_schedule)`."""
  warmup = int(cfg.warmup_steps)
  if not 0 <= warmup < total_steps:
    raise ValueError(f"optim.warmup_steps must be in [0, total_steps={total_steps}), "
                     f"got {warmup}")
  lr = float(cfg.lr)
  if not (math.isfinite(lr) and lr > 0):
    raise ValueError(f"optim.lr must be finite and > 0, got {lr}")
  return _optimizer(lr, warmup, int(total_steps), float(cfg.end_lr_factor),
                    float(cfg.grad_clip_norm or 0.0), float(cfg.b1), float(cfg.b2),
                    float(cfg.eps), float(cfg.weight_decay))


def create_train_state(model, tx, spec, loss: LossSpec, *, rng, sample_batch,
                       shift_table=None, skip_nonfinite: bool = True,
                       lr_schedule: Callable | None = None) -> TrainState:
  """Initialises parameters, optimizer state and the RNG (pure: wrap it in `jax.jit` with
  `out_shardings` to create a sharded state directly on the devices)."""
  init_rng, state_rng = jax.random.split(rng)
  variables = model.init({"params": init_rng, "dropout": init_rng}, sample_batch, train=False)
  params = variables["params"]
  table = jnp.zeros((1,), jnp.float32) if shift_table is None else jnp.asarray(
      shift_table, jnp.float32)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    rng=state_rng, shift_table=table, model=model, tx=tx,
                    temperature=spec, loss=loss, skip_nonfinite=skip_nonfinite,
                    lr_schedule=lr_schedule)


def _forward(state: TrainState, params, batch, train: bool, rng=None):
  variables = {"params": params}
  has_bs = bool(state.batch_stats)
  if has_bs:
    variables["batch_stats"] = state.batch_stats
  kw = {"rngs": {"dropout": rng}} if rng is not None else {}
  if train and has_bs:
    out, mutated = state.model.apply(variables, batch, train=True, mutable=["batch_stats"], **kw)
    return out, mutated["batch_stats"]
  return state.model.apply(variables, batch, train=train, **kw), state.batch_stats


def _global_norm(tree):
  tree_norm = getattr(getattr(optax, "tree", None), "norm", None)  # optax >= 0.2.5
  return tree_norm(tree) if tree_norm is not None else optax.global_norm(tree)


def _batch_metrics(loss, values) -> dict:
  return {"loss": loss, "temperature_mean": jnp.mean(values),
          "temperature_min": jnp.min(values), "temperature_max": jnp.max(values)}


def train_step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
  """One optimisation step; pure. `batch` needs the model's inputs and `index`.

  If the loss or the gradient is not finite and `state.skip_nonfinite`, the state is returned
  unchanged (metrics["finite"] is False) so no checkpoint ever holds a poisoned state.
  """
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    out, batch_stats = _forward(state, params, batch, True, rng)
    values = state.temperature(state.step, batch["index"], state.shift_table,
                               out.get("temperature"))
    return state.loss(out["image"], out["text"], values), (values, batch_stats)

  (loss, (values, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = _global_norm(grads)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                      opt_state=opt_state, batch_stats=batch_stats)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if state.skip_nonfinite:
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
  metrics = _batch_metrics(loss, values)
  metrics.update(grad_norm=grad_norm, finite=finite,
                 temperature_base=jnp.asarray(state.temperature.base(state.step), jnp.float32))
  if state.lr_schedule is not None:
    metrics["lr"] = jnp.asarray(state.lr_schedule(state.step), jnp.float32)
  return new, metrics


def eval_step(state: TrainState, batch: Mapping[str, jax.Array]) -> dict:
  """Loss, per-anchor values and embeddings of a batch in inference mode (no update)."""
  out, _ = _forward(state, state.params, batch, False)
  values = state.temperature(state.step, batch["index"], state.shift_table,
                             out.get("temperature"))
  metrics = _batch_metrics(state.loss(out["image"], out["text"], values), values)
  metrics.update(image=out["image"], text=out["text"])
  return metrics


def make_embed_fn(model) -> Callable:
  """`embed(variables, batch) -> {"image": (B, D), "text": (B, D)}`, unit-norm float32, jitted.
  For retrieval evaluation: `variables = state.variables()`; a batch may hold only one modality."""

  @jax.jit
  def embed(variables, batch):
    out = {}
    if model.image_key in batch:
      out["image"] = model.apply(variables, batch[model.image_key], method="encode_image")
    if model.text_key in batch:
      out["text"] = model.apply(variables, batch[model.text_key], method="encode_text")
    return out

  return embed


def state_shardings(state: TrainState, mesh, param_sharding: str) -> TrainState:
  """Per-leaf shardings: params / optimizer / BatchNorm state by `param_sharding`; the step, the
  RNG and the shift table replicated."""
  rep = mesh_lib.replicated(mesh)
  return state.replace(
      step=rep, rng=rep, shift_table=rep,
      params=mesh_lib.tree_shardings(state.params, mesh, param_sharding),
      batch_stats=mesh_lib.tree_shardings(state.batch_stats, mesh, param_sharding),
      opt_state=mesh_lib.tree_shardings(state.opt_state, mesh, param_sharding))


def compile_train_step(shardings: TrainState, mesh) -> Callable:
  """`jax.jit(train_step)` with explicit in/out shardings and the state donated."""
  return jax.jit(train_step, in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)


# ----------------------------------------------------------------------------- the loop


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient became NaN/inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  step: int
  status: str                # "done", "stopped" (--stop-at-step) or "preempted" (SIGTERM)
  workdir: pathlib.Path
  last_metrics: dict


def _validate(config) -> dict:
  out = {k: _positive_int(k, config[k]) for k in ("total_steps", "batch_size", "log_every")}
  out["ckpt_every"] = _positive_int("checkpoint.every_steps", config.checkpoint.every_steps)
  out["ckpt_keep"] = _positive_int("checkpoint.keep", config.checkpoint.keep)
  if config.mesh.param_sharding not in mesh_lib.PARAM_SHARDINGS:
    raise ValueError(f"mesh.param_sharding must be one of {mesh_lib.PARAM_SHARDINGS}, got "
                     f"{config.mesh.param_sharding!r}")
  return out


def _init_state(rng, sample_batch, shift_table, *, model, tx, spec, loss, skip_nonfinite,
                lr_schedule):
  # Top level with hashable static arguments, so that jit reuses it across runs in a process.
  return create_train_state(model, tx, spec, loss, rng=rng, sample_batch=sample_batch,
                            shift_table=shift_table, skip_nonfinite=skip_nonfinite,
                            lr_schedule=lr_schedule)


def init_train_state(model, tx, spec, loss: LossSpec, *, rng, sample_batch, shift_table=None,
                     mesh=None, param_sharding: str = "replicated", skip_nonfinite: bool = True,
                     lr_schedule: Callable | None = None) -> tuple[TrainState, Any]:
  """`create_train_state` compiled once, created directly with its shardings over `mesh`.

  Returns `(state, shardings)`; `shardings` is None without a mesh. Only the per-example shapes
  of `sample_batch` matter.
  """
  statics = dict(model=model, tx=tx, spec=spec, loss=loss, lr_schedule=lr_schedule,
                 skip_nonfinite=bool(skip_nonfinite))
  args = (rng, _sample_batch(sample_batch),
          np.zeros((1,), np.float32) if shift_table is None else np.asarray(shift_table))
  shardings = None
  if mesh is not None:
    abstract = jax.eval_shape(functools.partial(_init_state, **statics), *args)
    shardings = state_shardings(abstract, mesh, param_sharding)
  state = jax.jit(_init_state, static_argnames=tuple(statics), out_shardings=shardings)(
      *args, **statics)
  return state, shardings


def _sample_batch(local: Mapping[str, np.ndarray]) -> dict:
  """A 2-example batch with the per-example shapes and dtypes: enough to initialise the model."""
  return {k: np.zeros((2,) + np.shape(v)[1:], np.asarray(v).dtype) for k, v in local.items()}


def train_and_evaluate(config, workdir, *, shift_table=None, stop_at_step: int | None = None,
                       eval_fn: Callable | None = None) -> TrainResult:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

  Writes `workdir/metrics.jsonl` (one record per logged step: step, loss, temperature mean/min/max,
  grad norm, learning rate, examples/s overall and per device), `workdir/config.json`,
  `workdir/checkpoints/<step>/` and TensorBoard events. Stops at `config.total_steps`, at
  `stop_at_step` (with a checkpoint, as a preemption would) or on SIGTERM (checkpoint, then
  status "preempted").

  Args:
    shift_table: optional (N,) per-example shifts; overrides the config's table source.
    eval_fn: optional `eval_fn(step, embed, variables) -> dict` called every
      `config.eval.every_steps` steps and at `total_steps`; its scalars join that step's record.

  Raises:
    ValueError / TypeError: a bad configuration or table, before anything is compiled.
    NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
  """
  limits = _validate(config)
  total = limits["total_steps"]
  if stop_at_step is not None and not 0 < int(stop_at_step) <= total:
    raise ValueError(f"stop_at_step must be in [1, total_steps={total}], got {stop_at_step}")
  workdir = atomic_io.as_path(workdir)   # an epath.Path: local or gs://
  spec = temperature_lib.from_config(config.temperature, config.mmts, total_steps=total,
                                     loss=config.loss.name)
  mesh_lib.initialize_distributed(config.get("distributed", "auto"))
  mesh = mesh_lib.make_mesh(config.mesh.num_devices or None)
  local_bs = mesh_lib.local_batch_size(limits["batch_size"], mesh)
  source = make_source(config.data, global_batch_size=limits["batch_size"],
                       seed=int(config.seed))
  table = resolve_shift_table(config, source, spec, shift_table)
  table_id = fingerprint(table)
  model = build_model(config.model, learnable_temperature=spec.learnable,
                      init_temperature=spec.value)
  tx, lr_schedule = make_optimizer(config.optim, total)
  block = config.loss.get("block_size", None)
  loss = LossSpec(config.loss.name, config.loss.get("impl", "auto"),
                  tuple(block) if isinstance(block, (list, tuple)) else block, mesh)

  primary = jax.process_index() == 0
  workdir.mkdir(parents=True, exist_ok=True)
  if primary:
    atomic_io.atomic_write_json(workdir / "config.json", config.to_dict())
  ckpt = Checkpointer(workdir / "checkpoints", every_steps=limits["ckpt_every"],
                      keep=limits["ckpt_keep"],
                      async_save=bool(config.checkpoint.get("async_save", True)))
  start = ckpt.latest_step() or 0
  position = start          # global batches consumed (one per step unless a source says else)

  def make_iter(position):
    return source.iterate(position, jax.process_index(), jax.process_count())

  it = make_iter(start)
  first = next(it)
  check_batch(first, source.num_examples)
  if first["index"].shape[0] != local_bs:
    raise ValueError(f"the source yielded {first['index'].shape[0]} examples per process, "
                     f"expected batch_size / process_count = {local_bs}")

  state, shardings = init_train_state(
      model, tx, spec, loss, rng=jax.random.PRNGKey(int(config.seed)), sample_batch=first,
      shift_table=table, mesh=mesh, param_sharding=config.mesh.param_sharding,
      skip_nonfinite=bool(config.train.get("skip_nonfinite", True)), lr_schedule=lr_schedule)

  if start:
    tree, meta = ckpt.restore(start, state.checkpoint_tree())
    if meta.get("shift_table") != table_id:
      raise ValueError(
          f"checkpoint {start} in {ckpt.directory} was trained with shift table "
          f"{meta.get('shift_table')!r} but this run's table is {table_id!r}: a cluster table of "
          f"another dataset or setting; use a new workdir")
    state = state.replace_from_checkpoint(tree)
    position = int(meta["input_position"])
    it, first = make_iter(position), None
    if primary:
      truncate_metrics(workdir, start)

  step_fn = compile_train_step(shardings, mesh)
  embed = make_embed_fn(model)
  writer = MetricsWriter(workdir, tensorboard=bool(config.get("tensorboard", True)),
                         enabled=primary)
  cluster_shifts = None if table is None else np.unique(table)
  end = total if stop_at_step is None else int(stop_at_step)
  log_every = limits["log_every"]
  eval_every = int(config.eval.get("every_steps", 0) or 0)
  pending: list[tuple[int, dict]] = []
  last_metrics: dict = {}
  tick = {"time": time.perf_counter(), "step": start}

  def meta(position):
    return {"input_position": int(position), "shift_table": table_id,
            "batch_size": limits["batch_size"], "mode": spec.mode}

  def flush(extra=None):
    """Fetches pending metrics (a device sync), checks them and logs the latest step's, with
    `extra` (evaluation) scalars in the same record."""
    nonlocal last_metrics
    if not pending:
      return
    fetched = jax.device_get(pending)
    pending.clear()
    for s, m in fetched:
      if not bool(m["finite"]):
        good = ckpt.latest_step()
        raise NonFiniteLossError(
            f"the loss is {float(m['loss'])} (grad norm {float(m['grad_norm'])}) at step {s}: "
            f"training stopped. The state was not updated by that step; the last good "
            f"checkpoint is " + (f"step {good} in {ckpt.directory}" if good is not None
                                  else "none (no checkpoint was saved yet)"))
    s, m = fetched[-1]
    now = time.perf_counter()
    steps = max(s - tick["step"], 1)
    eps = steps * limits["batch_size"] / max(now - tick["time"], 1e-9)
    tick.update(time=now, step=s)
    record = {k: float(v) for k, v in m.items() if k != "finite"}
    record.update(examples_per_sec=eps, examples_per_sec_per_device=eps / mesh.size)
    record.update(extra or {})
    writer.write(s, record)
    if cluster_shifts is not None:
      writer.write_histogram(s, "temperature/per_cluster", record["temperature_base"]
                             + cluster_shifts)
    last_metrics = {"step": s, **record}
    return record

  status = "done"
  bar = None
  if primary and config.get("progress_bar", True):
    from tqdm.auto import tqdm
    bar = tqdm(total=end, initial=start, desc="train", unit="step", dynamic_ncols=True)
  try:
    with PreemptionWatcher() as watcher:
      for step in range(start, end):
        local = first if first is not None else next(it)
        first = None
        check_batch(local, source.num_examples)
        batch = mesh_lib.global_batch(local, mesh)
        state, metrics = step_fn(state, batch)
        if step == start:
          # The first call compiled synchronously: throughput counts from its dispatch.
          tick["time"] = time.perf_counter()
        position += 1
        done = step + 1
        pending.append((done, metrics))
        extra = None
        if eval_fn is not None and ((eval_every and done % eval_every == 0) or done == total):
          extra = dict(eval_fn(done, embed, state.variables()))
        if extra is not None or done % log_every == 0 or done == end:
          record = flush(extra)
          if bar is not None and record:
            bar.set_postfix(loss=f"{record['loss']:.4f}", tau=f"{record['temperature_mean']:.4f}")
        if bar is not None:
          bar.update(1)
        preempted = watcher.requested(done)
        if preempted or done == end or ckpt.manager.should_save(done):
          flush()   # never checkpoint a step whose loss has not been checked
          ckpt.save(done, state.checkpoint_tree(), meta(position), force=True)
        if preempted:
          status = "preempted"
          break
      else:
        status = "done" if end == total else "stopped"
  finally:
    if bar is not None:
      bar.close()
    writer.close()
    ckpt.close()
  return TrainResult(state=state, step=int(jax.device_get(state.step)), status=status,
                     workdir=workdir, last_metrics=last_metrics)
