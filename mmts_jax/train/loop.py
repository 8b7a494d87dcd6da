"""The training loop: `train_and_evaluate(config, workdir)`.

It calls `setup` (which restores the workdir's latest checkpoint), then for each step: the next
device batch (`Setup.device_batches`, prefetched), the compiled step, the metrics into a
`MetricsLogger` (fetched from the device only when logging, checked for NaN/inf there), the
evaluation hook, and a checkpoint when due, at the end, at `stop_at_step` or on SIGTERM. A run
resumed from step N reads its input from the same batch position and appends exactly the records
the uninterrupted run would have written.

A step whose loss or gradient is NaN/inf (checked when the metrics are fetched, always before a
checkpoint) either stops the run with `NonFiniteLossError` naming the last good checkpoint
(`config.train.skip_nonfinite=False`; `mmts train` exits 3), or, with `skip_nonfinite=True` (the
default), is skipped: the step left the whole state unchanged (`step` included, so the schedule
does not advance), its batch is consumed, one line is printed on stderr and the record's
`nonfinite_skipped` counts the skipped steps of the run (kept in the checkpoint's metadata).

Example (two steps of a feature-tower model on the toy data; `mmts train --config
configs/tiny.py` is the command-line front end):
  >>> import tempfile
  >>> from mmts_jax.config_defaults import default_config
  >>> config = default_config()
  >>> config.total_steps, config.batch_size, config.optim.warmup_steps = 10, 16, 1
  >>> config.data.update(num_examples=64, text="features")
  >>> config.model.text = dict(name="features", hidden_dims=(16,))
  >>> config.update(tensorboard=False, progress_bar=False)
  >>> config.checkpoint.async_save = False
  >>> result = train_and_evaluate(config, tempfile.mkdtemp(), stop_at_step=2)
  >>> result.step, result.status
  (2, 'stopped')
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from mmts_jax.checkpointing import Checkpointer, PreemptionWatcher
from mmts_jax.metrics_log import MetricsWriter, truncate_metrics
from mmts_jax.train import workdir as workdir_lib
from mmts_jax.train.setup import setup, validate
from mmts_jax.train.state import TrainState
from mmts_jax.train.step import make_embed_fn

__all__ = ["train_and_evaluate", "TrainResult", "NonFiniteLossError", "MetricsLogger"]


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient became NaN/inf; the last good checkpoint is kept. `mmts train` prints
  it as one line and exits with `exit_status`."""

  exit_status = 3


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  model: Any  # the DualEncoder (`make_embed_fn(result.model)`)
  step: int
  status: str  # "done", "stopped" (stop_at_step) or "preempted" (SIGTERM)
  workdir: epath.Path
  last_metrics: dict
  nonfinite_skipped: int = 0  # steps skipped for a NaN/inf loss (`train.skip_nonfinite`)


class MetricsLogger:
  """Collects each step's device metrics and writes the latest one when flushed.

  `add` only keeps a reference (no device sync); `flush` fetches everything pending, checks
  each step's loss and gradient (a non-finite one raises `NonFiniteLossError`, or is counted in
  `skipped` and reported on stderr when `skip_nonfinite`), and writes one record for the latest
  step: its metrics, the throughput since the previous flush (examples/s overall and per device),
  `nonfinite_skipped`, and `extra` (evaluation) scalars.
  """

  def __init__(
    self,
    writer: MetricsWriter,
    *,
    global_batch_size: int,
    num_devices: int,
    start_step: int,
    checkpointer: Checkpointer,
    cluster_shifts: np.ndarray | None = None,
    skip_nonfinite: bool = False,
    skipped: int = 0,
    verbose: bool = True,
    value_name: str = "temperature",
  ):
    self.writer, self.checkpointer = writer, checkpointer
    # What the policy's values are: "temperature" (InfoNCE, sigmoid) or "margin" (max-margin);
    # the step's `temperature_*` metrics are logged under this name.
    self.value_name = value_name
    self.skip_nonfinite, self.skipped, self.verbose = bool(skip_nonfinite), int(skipped), verbose
    self.global_batch_size, self.num_devices = global_batch_size, num_devices
    self.cluster_shifts = cluster_shifts
    self.pending: list[tuple[int, Mapping[str, Any]]] = []
    self.last: dict = {}
    self._time, self._step = time.perf_counter(), start_step

  def start_clock(self) -> None:
    """Throughput counts from now (call after the first, compiling, step was dispatched)."""
    self._time = time.perf_counter()

  def add(self, step: int, metrics: Mapping[str, Any]) -> None:
    self.pending.append((step, metrics))

  def _check(self, fetched) -> None:
    for s, m in fetched:
      if bool(m["finite"]):
        continue
      what = f"the loss is {float(m['loss'])} (grad norm {float(m['grad_norm'])}) at step {s}"
      if self.skip_nonfinite:
        self.skipped += 1
        if self.verbose:
          print(
            f"warning: {what}: batch skipped, the state was not updated "
            f"({self.skipped} skipped in this run)",
            file=sys.stderr,
            flush=True,
          )
        continue
      good = self.checkpointer.latest_step()
      raise NonFiniteLossError(
        f"{what}: training stopped (train.skip_nonfinite=False); the state was not updated "
        f"by that step; the last good checkpoint is "
        + (
          f"step {good} in {self.checkpointer.directory}"
          if good is not None
          else "none (no checkpoint was saved yet)"
        )
      )

  def flush(self, extra: Mapping[str, float] | None = None) -> dict | None:
    """Fetches, checks and logs the pending metrics; returns the record written (or None)."""
    if not self.pending:
      return None
    fetched = jax.device_get(self.pending)
    self.pending.clear()
    self._check(fetched)
    s, m = fetched[-1]
    now = time.perf_counter()
    eps = max(s - self._step, 1) * self.global_batch_size / max(now - self._time, 1e-9)
    self._time, self._step = now, s
    record = {self._name(k): float(v) for k, v in m.items() if k != "finite"}
    record.update(
      examples_per_sec=eps,
      examples_per_sec_per_device=eps / self.num_devices,
      nonfinite_skipped=self.skipped,
    )
    record.update(extra or {})
    self.writer.write(s, record)
    if self.cluster_shifts is not None:
      self.writer.write_histogram(
        s,
        f"{self.value_name}/per_cluster",
        record[f"{self.value_name}_base"] + self.cluster_shifts,
      )
    self.last = {"step": s, **record}
    return record

  def _name(self, key: str) -> str:
    if key.startswith("temperature_") and self.value_name != "temperature":
      return self.value_name + key[len("temperature") :]
    return key


def _workdir(path) -> epath.Path:
  text = os.fspath(path)
  return epath.Path(text if "://" in text else os.path.abspath(text))


def train_and_evaluate(
  config,
  workdir,
  *,
  shift_table=None,
  stop_at_step: int | None = None,
  eval_fn: Callable | None = None,
  allow_config_change: bool = False,
) -> TrainResult:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

  Writes `workdir/metrics.jsonl` (one record per logged step: step, loss, temperature mean/min/max
  (`margin_*` for the max-margin loss),
  grad norm, learning rate, examples/s overall and per device), `workdir/config.json`,
  `workdir/checkpoints/<step>/` and TensorBoard events. Stops at `config.total_steps`, at
  `stop_at_step` (with a checkpoint, as a preemption would) or on SIGTERM (checkpoint, then
  status "preempted").

  Args:
    shift_table: optional (N,) per-example shifts; overrides the config's table source.
    eval_fn: optional `eval_fn(step, embed, variables) -> dict` called every
      `config.eval.every_steps` steps and at `total_steps`; its scalars join that step's record.
      With `config.eval.at_start`, also before the first step of a fresh run (a record of
      step 0: the initial parameters, e.g. zero-shot retrieval of a converted checkpoint).
    allow_config_change: resume even if the configuration differs from the workdir's in a key
      that changes the run (recorded in `config_history.jsonl`).

  Raises:
    ValueError / TypeError: a bad configuration or table, before anything is compiled;
      `workdir.ConfigChangedError` for a resume with another configuration.
    NonFiniteLossError: the loss became NaN/inf and `config.train.skip_nonfinite` is False (the
      last good checkpoint is kept).
    checkpointing.CheckpointWriteError: a checkpoint could not be written (a full disk); the
      previous one is usable and named.
    checkpointing.CheckpointRestoreError: no checkpoint of the workdir can be restored (an
      unreadable latest one alone is warned about and the previous one restored).
  """
  limits = validate(config)
  total = limits["total_steps"]
  if stop_at_step is not None and not 0 < int(stop_at_step) <= total:
    raise ValueError(f"stop_at_step must be in [1, total_steps={total}], got {stop_at_step}")
  workdir = _workdir(workdir)
  primary = jax.process_index() == 0
  # A run that fails before its first step (a bad table, dataset or config) leaves no workdir
  # behind if it made one: nothing half-written looks like a run that could be resumed.
  created = not workdir.exists()
  workdir.mkdir(parents=True, exist_ok=True)
  ckpt = Checkpointer(
    workdir / "checkpoints",
    every_steps=limits["ckpt_every"],
    keep=limits["ckpt_keep"],
    async_save=bool(config.checkpoint.get("async_save", True)),
  )
  writer = None
  try:
    try:
      latest = ckpt.latest_step()
      changes = workdir_lib.check_config_change(
        workdir, config, resuming_from=latest, allow_config_change=allow_config_change
      )
      run = setup(config, checkpointer=ckpt, shift_table=shift_table)
    except BaseException:
      if created and primary:
        ckpt.close()
        workdir.rmtree(missing_ok=True)
      raise
    start = run.start_step
    if primary:
      workdir_lib.record_config(workdir, config, changes=changes, step=start)
      if start:
        truncate_metrics(workdir, start)
        print(f"resumed from step {start} ({ckpt.directory})", flush=True)
    writer = MetricsWriter(
      workdir, tensorboard=bool(config.get("tensorboard", True)), enabled=primary
    )
    logger = MetricsLogger(
      writer,
      global_batch_size=limits["batch_size"],
      num_devices=run.mesh.size,
      start_step=start,
      checkpointer=ckpt,
      cluster_shifts=None if run.shift_table is None else np.unique(run.shift_table),
      skip_nonfinite=bool(config.train.get("skip_nonfinite", True)),
      skipped=int(run.checkpoint_meta.get("nonfinite_skipped", 0)),
      verbose=primary,
      value_name=run.policy.what,
    )
    state, status, done = _loop(
      run,
      ckpt,
      logger,
      end=total if stop_at_step is None else int(stop_at_step),
      total=total,
      log_every=limits["log_every"],
      eval_fn=eval_fn,
      progress=primary and config.get("progress_bar", True),
    )
  finally:
    if writer is not None:
      writer.close()
    ckpt.close()
  # `done`, not `state.step`: a skipped non-finite step left `state.step` where it was.
  return TrainResult(
    state=state,
    model=run.model,
    step=done,
    status=status,
    workdir=workdir,
    last_metrics=logger.last,
    nonfinite_skipped=logger.skipped,
  )


def _loop(
  run,
  ckpt: Checkpointer,
  logger: MetricsLogger,
  *,
  end: int,
  total: int,
  log_every: int,
  eval_fn,
  progress: bool,
) -> tuple[TrainState, str, int]:
  start, position, state = run.start_step, run.input_position, run.state
  eval_every = int(run.config.eval.get("every_steps", 0) or 0)
  embed = make_embed_fn(run.model) if eval_fn is not None else None
  bar = None
  if progress:
    from tqdm.auto import tqdm

    # disable=None: no bar unless stderr is a terminal (a pipe or a log file gets none).
    bar = tqdm(
      total=end, initial=start, desc="train", unit="step", dynamic_ncols=True, disable=None
    )
  short = {"temperature": "tau", "margin": "margin"}.get(logger.value_name, logger.value_name)
  if eval_fn is not None and start == 0 and run.config.eval.get("at_start", False):
    # The "before" numbers: the initial (e.g. converted pretrained) parameters, logged as step 0.
    logger.writer.write(0, dict(eval_fn(0, embed, state.variables())))
  batches = run.device_batches(position)
  status = "done" if end == total else "stopped"
  done = start
  try:
    with PreemptionWatcher() as watcher:
      for step in range(start, end):
        state, metrics = run.step_fn(state, next(batches))
        if step == start:
          logger.start_clock()  # the first call compiled synchronously
        position += 1
        done = step + 1
        logger.add(done, metrics)
        extra = None
        if eval_fn is not None and ((eval_every and done % eval_every == 0) or done == total):
          extra = dict(eval_fn(done, embed, state.variables()))
        if extra is not None or done % log_every == 0 or done == end:
          record = logger.flush(extra)
          if bar is not None and record:
            value = record[f"{logger.value_name}_mean"]
            bar.set_postfix({"loss": f"{record['loss']:.4f}", short: f"{value:.4f}"})
        if bar is not None:
          bar.update(1)
        preempted = watcher.requested(done)
        if preempted or done == end or ckpt.manager.should_save(done):
          logger.flush()  # never checkpoint a step whose loss has not been checked
          ckpt.save(
            done,
            state.checkpoint_tree(),
            dict(run.meta(position), nonfinite_skipped=logger.skipped),
            force=True,
          )
        if preempted:
          status = "preempted"
          break
  finally:
    if bar is not None:
      bar.close()
  return state, status, done
